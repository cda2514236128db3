"""Record a trace of a staged copy and of the prefetch loader; draw it as a PNG.

``python tools/trace_example.py OUT_DIR`` writes ``trace-staged-copy.json``,
``trace-loader.json`` (open them in https://ui.perfetto.dev) and a PNG
timeline of each (needs matplotlib; ``--no-png`` skips them), for the
documentation: ``python tools/trace_example.py docs/img`` remakes the files
docs/tracing.md shows. Runs on any backend: without a GPU, set GPUAIO_BACKEND=sim.
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
        with gpuaio.trace(out / "trace-staged-copy.json"):
            await s.copy(d, host)
            await s.copy(host, d)
    batches = [np.full(8 << 20, i, np.uint8) for i in range(6)]
    with gpuaio.trace(out / "trace-loader.json"):
        async for _batch in gpuaio.prefetch(batches, depth=2):
            await anyio.sleep(0.002)  # the consumer's compute


def _tracks(doc: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(track label, start µs, end µs, colour) per span: ``X`` events and
    ``b``/``e`` pairs; overlapping async ops of a track get lanes, as viewers stack them."""
    events: list[dict[str, Any]] = doc["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"
    }
    spans: list[tuple[str, float, float, str]] = []
    begins: dict[tuple[str, Any], dict[str, Any]] = {}
    lanes: dict[str, list[float]] = {}  # track -> end of the last span in each lane
    for e in sorted((e for e in events if e["ph"] != "M"), key=lambda e: e["ts"]):
        track = f"{procs[e['pid']]} / {threads[e['pid'], e['tid']]}"
        if e["ph"] == "X":
            spans.append((track, e["ts"], e["ts"] + e["dur"], "tab:orange"))
        elif e["ph"] == "b":
            begins[e["cat"], e["id"]] = e
        elif e["ph"] == "e":
            b = begins.pop((e["cat"], e["id"]))
            spans.append((track, b["ts"], e["ts"], "tab:blue"))
    out = []
    for track, t0, t1, colour in sorted(spans, key=lambda s: s[1]):
        if colour == "tab:blue":  # async: the first lane free at t0
            ends = lanes.setdefault(track, [])
            lane = next((i for i, end in enumerate(ends) if end <= t0), len(ends))
            if lane == len(ends):
                ends.append(t1)
            ends[lane] = t1
            track = f"{track} #{lane + 1}" if lane else track
        out.append((track, t0, t1, colour))
    return out


def draw(trace: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = _tracks(json.loads(trace.read_text()))
    t0 = min(s[1] for s in spans)
    tracks = sorted({s[0] for s in spans}, key=lambda t: (not t.startswith("device"), t))
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(tracks)))
    for track, start, end, colour in spans:
        y = tracks.index(track)
        ax.barh(y, (end - start) / 1e3, left=(start - t0) / 1e3, color=colour, edgecolor="black")
    ax.set_yticks(range(len(tracks)), tracks, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first event")
    ax.set_title(f"{title} ({gpuaio.backend_name()} backend)")
    fig.tight_layout()
    png = trace.with_suffix(".png")
    fig.savefig(png, dpi=110)
    return png


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--no-png"]
    out = Path(args[0] if args else ".")
    out.mkdir(parents=True, exist_ok=True)
    anyio.run(record, out)
    for name in ("trace-staged-copy.json", "trace-loader.json"):
        print(out / name)
    if "--no-png" not in sys.argv:
        print(draw(out / "trace-staged-copy.json", "64 MiB staged H2D then D2H"))
        print(draw(out / "trace-loader.json", "gpuaio.prefetch, 6 batches of 8 MiB, depth 2"))


if __name__ == "__main__":
    main()
