"""Where one awaited small copy's time goes, in any build, on the fake GPU.

``python tools/timeline_probe.py`` awaits 4 KiB copies (``--bytes``) one at
a time (1 task) on ``tools/overhead_probe.py``'s fake GPU and prints, per ``--op``
and loop, the median microseconds from the call to: the driver's copy call
(``memcpy``) and its return, the marker's ``event_record``, the moment the
fake GPU finishes the copy (``gpu_done``), the return of each ``event_query`` that found
the copy not done (``miss1``, ``miss2``), the one that found it done
(``hit``), and the await's return; in brackets, the share of ops that had
that mark. Then the same for a hand-written awaitable
(``overhead_probe.floor_op``: the driver calls, a bare yield between
queries, a ``memmove`` through a pinned block for pageable memory).

The marks are taken in the fake backend, which is Python in every build, so
the probe times the compiled build (mypyc) as users run it, where a
profiler sees nothing inside gpuaio. It shows how much of gpuaio's cost
comes before the driver call, and how its polls fall against the GPU's
completion: what a compiled-mode change must shorten (issue 13).
These are CPU figures of this machine, not GPU figures.

``--evict N`` runs an unrelated host copy of N bytes before each timed op,
either way: the caches as a large download's copy-out leaves them for the
next call (issue 13, round forty-four).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead_probe as probe  # beside this file (sys.path above)

import gpuaio

MARKS = ("memcpy", "memcpy_ret", "record", "gpu_done", "miss1", "miss2", "hit", "return")


class Recorder:
    """Timestamps of one op's driver calls, from the fake backend's methods."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def wrap(self, backend: Any) -> None:
        cls = type(backend)
        copy, record, query = cls.memcpy_async, cls.event_record, cls.event_query
        marks = self.marks
        clock = time.perf_counter

        def memcpy_async(self: Any, dst: int, src: int, nbytes: int, stream: Any) -> None:
            marks.append(("memcpy", clock()))
            copy(self, dst, src, nbytes, stream)
            marks.append(("memcpy_ret", clock()))
            marks.append(("gpu_done", stream.busy_until))

        def event_record(self: Any, event: Any, stream: Any) -> None:
            marks.append(("record", clock()))
            record(self, event, stream)

        def event_query(self: Any, event: Any) -> bool:
            # Marked as it returns: the fake decides by a clock read inside
            # the call, so a hit marked before it could precede ``gpu_done``.
            done: bool = query(self, event)
            marks.append(("hit" if done else "miss", clock()))
            return done

        cls.memcpy_async = memcpy_async
        cls.event_record = event_record
        cls.event_query = event_query

    def row(self, t0: float, t1: float) -> dict[str, float]:
        """The marks of the op awaited from ``t0`` to ``t1``: the first of each
        kind, but the last ``hit``, the query that let the await return (a
        sweep may find another stream's or an older marker fired first)."""
        out: dict[str, float] = {"return": t1 - t0}
        misses = 0
        for name, t in self.marks:
            if name == "miss":
                misses += 1
                name = f"miss{misses}"
            if name == "hit":
                out[name] = t - t0
            else:
                out.setdefault(name, t - t0)
        out["n_miss"] = misses
        self.marks.clear()
        return out


async def timeline(
    start: Callable[[], Any],
    rec: Recorder,
    ops: int,
    warmup: int,
    before: Callable[[], object] | None = None,
) -> list[dict[str, float]]:
    for _ in range(warmup):
        await start()
    rec.marks.clear()
    rows = []
    clock = time.perf_counter
    for _ in range(ops):
        if before is not None:
            before()
            rec.marks.clear()
        t0 = clock()
        await start()
        rows.append(rec.row(t0, clock()))
    return rows


def summary(rows: list[dict[str, float]]) -> str:
    parts = []
    for mark in MARKS:
        values = [r[mark] for r in rows if mark in r]
        if values:
            share = len(values) / len(rows)
            parts.append(f"{mark}={statistics.median(values) * 1e6:5.2f}({share:.2f})")
    parts.append(f"misses/op={statistics.fmean(r['n_miss'] for r in rows):.2f}")
    return "  ".join(parts)


def evicter(nbytes: int) -> Callable[[], object] | None:
    """An unrelated host copy of ``nbytes`` (None for 0): run before each timed
    op, it leaves the caches as a large copy's own copy-out leaves them for
    the next call, so the marks show what the call costs with its code and
    data out of the caches (issue 13: a 1 MiB download's next call)."""
    if not nbytes:
        return None
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)

    def evict() -> object:
        # (The closure keeps both arrays alive; a partial of their addresses would not.)
        return ctypes.memmove(dst.ctypes.data, src.ctypes.data, nbytes)

    return evict


async def run(
    op: str, ops: int, backend: Any, rec: Recorder, nbytes: int, evict: int
) -> tuple[str, str]:
    dev = gpuaio.Device(0)
    s = dev.stream()
    before = evicter(evict)
    start = probe.op_factory(gpuaio, dev, op, 1, nbytes)
    rows = await timeline(lambda: start(s, 0), rec, ops, 500, before)
    s.close()
    # The hand-written awaitable of the same op (overhead_probe.floor_op).
    once = probe.floor_op(gpuaio, backend, op, nbytes)
    hand = await timeline(once, rec, ops, 500, before)
    return summary(rows), summary(hand)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="d2h-pageable,d2h-pinned,h2d-pinned,h2d-pageable")
    ap.add_argument("--loops", default="asyncio,uvloop")
    ap.add_argument("--ops", type=int, default=5000)
    ap.add_argument("--launch-us", type=float, default=5.0)
    ap.add_argument("--gpu-us", type=float, default=2.0)
    ap.add_argument("--bytes", type=int, default=probe.COPY_BYTES, help="bytes per copy")
    ap.add_argument(
        "--evict", type=int, default=0, help="bytes of an unrelated host copy before each op"
    )
    args = ap.parse_args(argv)
    backend = probe.fake_gpu(gpuaio, args.launch_us * 1e-6, args.gpu_us * 1e-6)
    rec = Recorder()
    rec.wrap(backend)
    gpuaio.use_backend(backend, completion="events")
    print(
        f"fake GPU (launch {args.launch_us:g} us, {args.gpu_us:g} us/op), {args.bytes} B copies, "
        f"1 task, {args.ops} ops"
        + (f", a {args.evict} B host copy before each" if args.evict else "")
        + ": median us from the call (share of ops with the mark)"
    )
    for loop in args.loops.split(","):
        name, opts = probe.LOOPS[loop]
        for op in args.op.split(","):
            ours, hand = anyio.run(
                run,
                op,
                args.ops,
                backend,
                rec,
                args.bytes,
                args.evict,
                backend=name,
                backend_options=opts,
            )
            print(f"{loop:8} {op:13} gpuaio  {ours}")
            print(f"{loop:8} {op:13} hand    {hand}")


if __name__ == "__main__":
    main()
