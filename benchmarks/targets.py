#!/usr/bin/env python
"""Issue 13's targets, judged from a committed run's JSON files.

    python benchmarks/targets.py TRANSFERS.json [COMPLETION.json] [--label LC]

Targets 1-3 are recomputed from the measured records with the transfer
suite's own definitions (``transfers.peer_records`` and
``transfers.derived_records``), so a file written before those records
existed is judged exactly as a new one. Prints a markdown table, one row per
target and direction, one column per size, each cell the ratio (a miss in
bold), then targets 4-6 from the run-wide records, and the count of cells
met and missed. Exits 0 whatever the verdicts: it reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import _harness as H
import transfers

Record = H.Record

ROWS = (
    ("1: upload / best peer", "h2d_pageable_vs_best_peer"),
    ("1: download / best peer", "d2h_pageable_vs_best_peer"),
    ("2: pinned upload / raw", "h2d_pinned_vs_raw"),
    ("2: pinned download / raw", "d2h_pinned_vs_raw"),
    ("3: upload / naive", "h2d_pageable_vs_naive"),
    ("3: upload / ceiling", "h2d_pageable_vs_ceiling"),
    ("3: download / naive", "d2h_pageable_vs_naive"),
    ("3: download / ceiling", "d2h_pageable_vs_ceiling"),
)
"""Targets 1-3: (row label, record name without its size)."""

_SIZE = re.compile(r"^h2d_pageable_(\d+(?:KiB|MiB|GiB))$")


def load(path: Path) -> list[Record]:
    """The records of a suite's JSON file."""
    data = json.loads(path.read_text())
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise SystemExit(f"{path}: no 'records' list: not a gpuaio benchmark file")
    return records


def sizes_of(by_name: dict[str, Record]) -> list[tuple[str, int]]:
    """The sizes the transfer suite measured, smallest first: (label, bytes)."""
    found = []
    for name in by_name:
        m = _SIZE.match(name)
        if m:
            found.append((m.group(1), H.parse_size(m.group(1))))
    return sorted(found, key=lambda s: s[1])


def judged(by_name: dict[str, Record]) -> dict[str, Record]:
    """Every target record of targets 1-3, recomputed, by name."""
    out: dict[str, Record] = {}
    for size, n in sizes_of(by_name):
        recs = transfers.peer_records(by_name, size, n)
        if n >= transfers.DERIVED_MIN:
            recs += transfers.derived_records(by_name, size)
        out.update((r["name"], r) for r in recs)
    return out


def cell(rec: Record | None, bound: float | None = None) -> tuple[str, bool | None]:
    """A table cell and its verdict (None: nothing to judge). ``bound``: the
    most any copy could reach against the same baseline, measured in the same
    run; a miss where it is below the target is marked ``(ruled out)``."""
    if rec is None or rec.get("ratio") is None or rec.get("target") is None:
        return "", None
    ok = bool(rec["ratio"] >= rec["target"])
    text = f"{rec['ratio']:.2f}"
    if not ok and text == f"{rec['target']:.2f}":
        text = f"{rec['ratio']:.3f}"  # a miss that two decimals would show as the target
    if ok:
        return text, ok
    if bound is not None and bound < rec["target"]:
        return f"**{text}** (ruled out: {bound:.2f})", ok
    return f"**{text}**", ok


def naive_bound(targets: dict[str, Record], stem: str, size: str) -> float | None:
    """The most target 3's naive ratio can be in this run: the ceiling
    (min(pinned DMA, the fastest host copy), both measured) over the naive
    call. A staged copy is a host copy and a DMA, so it cannot beat the
    ceiling: where this is below 3, 3x naive is ruled out on this host."""
    if not stem.endswith("_vs_naive"):
        return None
    naive = targets.get(f"{stem}_{size}")
    ceiling = targets.get(f"{stem.removesuffix('_vs_naive')}_vs_ceiling_{size}")
    if naive is None or ceiling is None:
        return None
    limit, base = ceiling.get("baseline_value"), naive.get("baseline_value")
    return limit / base if limit and base else None


def table(by_name: dict[str, Record], label: str) -> tuple[list[str], int, int]:
    """The markdown rows of targets 1-3; (lines, met, missed)."""
    sizes = sizes_of(by_name)
    targets = judged(by_name)
    met = missed = 0
    lines = [
        "| target | run | " + " | ".join(_spaced(s) for s, _ in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for title, stem in ROWS:
        cells = []
        for size, _n in sizes:
            text, ok = cell(targets.get(f"{stem}_{size}"), naive_bound(targets, stem, size))
            met += ok is True
            missed += ok is False
            cells.append(text)
        if any(cells):
            lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
    return lines, met, missed


def run_wide(
    transfer: dict[str, Record], completion: dict[str, Record]
) -> tuple[list[str], int, int]:
    """Targets 4-6: one line each; (lines, met, missed)."""
    met = missed = 0
    lines = []

    def verdict(ok: bool | None, text: str) -> None:
        nonlocal met, missed
        met += ok is True
        missed += ok is False
        mark = "n/a " if ok is None else ("met " if ok else "MISS")
        lines.append(f"- {mark} {text}")

    def value(recs: dict[str, Record], name: str) -> float | None:
        rec = recs.get(name)
        got = rec.get("value") if rec else None
        return float(got) if isinstance(got, (int, float)) else None

    lag = value(transfer, "loop_lag_8GiB_pageable")
    verdict(
        None if lag is None else lag <= 1.0,
        f"4: loop lag p99 over 8 GiB {_fmt(lag, 'ms')} (<= 1 ms)",
    )
    if not completion:
        verdict(None, "5, 6: no completion file given")
        return lines, met, missed
    p50, p99 = (
        value(completion, "wake_p50_uvloop_events"),
        value(completion, "wake_p99_uvloop_events"),
    )
    verdict(
        None if p50 is None else p50 <= 15.0, f"5: uvloop wake p50 {_fmt(p50, 'us')} (<= 15 us)"
    )
    verdict(
        None if p99 is None else p99 <= 60.0, f"5: uvloop wake p99 {_fmt(p99, 'us')} (<= 60 us)"
    )
    ops = value(completion, "throughput_1000tasks_uvloop_events")
    sync = value(completion, "throughput_1000tasks_uvloop_raw_sync_on_loop")
    ok = None if ops is None else ops >= 100_000 and (sync is None or ops > sync)
    verdict(
        ok,
        f"5: {_fmt(ops, 'ops/s')} with 1,000 tasks "
        f"(>= 100,000 and over a blocking sync's {_fmt(sync, 'ops/s')})",
    )
    idle = value(completion, "idle_cpu_uvloop_events")
    verdict(None if idle is None else idle < 1.0, f"5: idle CPU {_fmt(idle, '%')} of a core (< 1%)")
    verdict(True, "6: the completion suite wrote its JSON")
    return lines, met, missed


def _spaced(size: str) -> str:
    """``4KiB`` as ``4 KiB``."""
    return re.sub(r"^(\d+)", r"\1 ", size)


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "null"
    return f"{x:,.0f} {unit}" if abs(x) >= 1000 else f"{x:.3g} {unit}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transfers", type=Path, help="a transfers suite JSON file")
    p.add_argument(
        "completion", type=Path, nargs="?", help="the completion suite's JSON of the same run"
    )
    p.add_argument("--label", default="", help="the run's name in the table's second column")
    args = p.parse_args(argv)
    transfer = {r["name"]: r for r in load(args.transfers)}
    completion = {r["name"]: r for r in load(args.completion)} if args.completion else {}
    rows, met, missed = table(transfer, args.label)
    wide, met2, missed2 = run_wide(transfer, completion)
    print("\n".join(rows))
    print()
    print("\n".join(wide))
    print(f"\n{met + met2} met, {missed + missed2} missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
