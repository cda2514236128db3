#!/usr/bin/env python
"""Plot a ``transfers`` result file: bandwidth against transfer size.

Writes a PNG beside the JSON (same name, ``.png``): one panel for
host-to-device and one for device-to-host, one line per method, log-scale
size and bandwidth axes, the multi-threaded host-copy ceiling dashed::

    python benchmarks/plot.py benchmarks/results/2026-11-30-h100-transfers.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

NAME = re.compile(r"^(?P<dir>h2d|d2h)_(?P<method>.+)_(?P<size>\d+(?:B|KiB|MiB|GiB))$")
CEILING = re.compile(r"^host_copy_ceiling(?P<d2h>_d2h)?_(?P<size>\d+(?:B|KiB|MiB|GiB))$")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
CEILING_LABEL = "host copy ceiling (best of 1-16 threads)"

LABELS = {
    "pageable": "gpuaio, pageable (staged)",
    "pinned": "gpuaio, pinned",
    "naive_pageable": "cuMemcpyAsync, pageable",
    "raw_pinned": "cuMemcpyAsync, pinned",
    "torch_pageable": "torch .to('cuda'), pageable",
    "torch_pinned": "torch .to('cuda'), pin_memory()",
    "torch_to_cpu": "torch .to('cpu'), fresh tensor",
    "torch_copy_pageable": "torch copy_ into pageable",
    "cupy_asarray": "cupy.asarray",
    "cupy_get": "cupy .get(out=pageable)",
}


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)(B|KiB|MiB|GiB)", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * UNITS[m.group(2)]


def size_label(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def series(doc: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{"h2d"|"d2h": {method: [(bytes, GB/s), ...]}}`` from a result document."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {"h2d": {}, "d2h": {}}
    for rec in doc.get("records", []):
        if rec.get("metric") != "GB/s" or rec.get("value") is None:
            continue
        name = rec["name"]
        if "_vs_" in name:
            continue
        m = NAME.match(name)
        if m:
            out[m["dir"]].setdefault(m["method"], []).append((size_bytes(m["size"]), rec["value"]))
            continue
        c = CEILING.match(name)
        if c:
            dirn = "d2h" if c["d2h"] else "h2d"
            point = (size_bytes(c["size"]), rec["value"])
            out[dirn].setdefault(CEILING_LABEL, []).append(point)
    for by_method in out.values():
        for pts in by_method.values():
            pts.sort()
    return out


def style(method: str) -> dict[str, Any]:
    if method == CEILING_LABEL:
        return {"color": "black", "linestyle": "--", "linewidth": 1.2, "marker": None}
    if method in ("pageable", "pinned"):
        return {"linewidth": 2.6, "marker": "o"}
    if method in ("naive_pageable", "raw_pinned"):
        return {"linewidth": 1.6, "marker": "s", "linestyle": "-."}
    return {"linewidth": 1.2, "marker": ".", "linestyle": ":"}


def plot(path: Path, out: Path | None = None) -> Path:
    """Plot ``path`` (a transfers result JSON); returns the PNG written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    data = series(doc)
    if not any(data.values()):
        raise SystemExit(f"{path}: no h2d_/d2h_ GB/s records to plot")
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    titles = {"h2d": "host → device", "d2h": "device → host"}
    for ax, dirn in zip(axes, ("h2d", "d2h"), strict=True):
        sizes: set[int] = set()
        for method, pts in sorted(data[dirn].items(), key=lambda kv: kv[0] == CEILING_LABEL):
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            sizes.update(xs)
            ax.plot(xs, ys, label=LABELS.get(method, method), **style(method))
        ax.set_xscale("log", base=2)
        # Log GB/s too: 4 KiB copies run at a hundredth of 1 GiB ones, and the
        # ratios between methods, which are what matter, read as distances.
        ax.set_yscale("log")
        ticks = sorted(sizes)
        ax.set_xticks(ticks)
        ax.set_xticklabels([size_label(n) for n in ticks], rotation=30)
        ax.minorticks_off()
        ax.set_title(titles[dirn])
        ax.set_xlabel("transfer size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("GB/s (median, 1 GB = 1e9 bytes)")
    git = str(doc.get("git", "unknown"))[:10]
    fig.suptitle(
        f"gpuaio transfers: {doc.get('card', '?')}, driver {doc.get('driver', '?')}, "
        f"{str(doc.get('date', ''))[:10]}, git {git}"
    )
    fig.tight_layout()
    target = out or path.with_suffix(".png")
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="transfers result JSON file(s)")
    p.add_argument("--out", type=Path, help="PNG path (only with one input)")
    args = p.parse_args(argv)
    if args.out and len(args.results) > 1:
        p.error("--out takes a single input file")
    for path in args.results:
        print(f"wrote {plot(path, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
