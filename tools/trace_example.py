"""Record a trace of a staged copy and of the prefetch loader; draw it as a PNG.

``python tools/trace_example.py OUT_DIR`` writes ``staged-copy.trace.json``,
``loader.trace.json`` (open them in https://ui.perfetto.dev) and a PNG
timeline of each, for the documentation. Runs on any backend.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import numpy as np

import gpuaio


async def record(out: Path) -> None:
    dev = gpuaio.Device(0)
    n = 64 << 20
    host = np.ones(n, np.uint8)
    d = dev.empty(n)
    async with dev.stream() as s:
        await s.copy(d, host)  # warm up: threads and pinned blocks
        with gpuaio.trace(out / "staged-copy.trace.json"):
            await s.copy(d, host)
            await s.copy(host, d)
    batches = [np.full(8 << 20, i, np.uint8) for i in range(6)]
    with gpuaio.trace(out / "loader.trace.json"):
        async for _batch in gpuaio.prefetch(batches, depth=2):
            await anyio.sleep(0.002)  # the consumer's compute


def draw(trace: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events: list[dict[str, Any]] = json.loads(trace.read_text())["traceEvents"]
    t0 = min(e["ts"] for e in events)
    tracks = sorted({f"{e['pid']} / {e['tid']}" for e in events})
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(tracks)))
    for e in events:
        y = tracks.index(f"{e['pid']} / {e['tid']}")
        color = "tab:orange" if e["pid"] == "host" else "tab:blue"
        ax.barh(y, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, color=color, edgecolor="black")
    ax.set_yticks(range(len(tracks)), tracks, fontsize=8)
    ax.set_xlabel("ms since the first event")
    ax.set_title(f"{title} ({gpuaio.backend_name()} backend)")
    fig.tight_layout()
    png = trace.with_suffix(".png")
    fig.savefig(png, dpi=110)
    return png


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    anyio.run(record, out)
    print(draw(out / "staged-copy.trace.json", "64 MiB staged H2D then D2H"))
    print(draw(out / "loader.trace.json", "gpuaio.prefetch, 6 batches of 8 MiB, depth 2"))


if __name__ == "__main__":
    main()
