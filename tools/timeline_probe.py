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

``--gpu`` takes the same marks on a real GPU (issue 13, round forty-seven):
the CUDA backend's methods are wrapped (they are Python in every build),
there is no ``gpu_done``, and queries made by the completion watcher's
thread are marked apart (``w_miss1``, ``w_hit``): an await that returns
after a ``w_hit`` was woken across threads; ``x_memcpy`` marks a copy issued
by another thread than the loop's (a stream's host thread). ``--bytes`` takes a list of
sizes (``4K,1M,64M``), ``--burn-ms`` runs that much unrelated Python on the
loop before each timed op (the floor probe's ``burn``: a cold call), and
``--out`` writes the medians as JSON. A lone awaited pinned copy costs
gpuaio 7-10 us over the blocking call on an H100 where the hand-written
awaitable costs 1 (run GB): these marks say whether that time goes before
the driver call, in polling, or after the hit.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead_probe as probe  # beside this file (sys.path above)

import gpuaio
from gpuaio._engine.pool import parse_size

MARKS = (
    "memcpy_cpu",
    "memcpy",
    "x_memcpy",
    "memcpy_ret",
    "record",
    "record_ret",
    "gpu_done",
    "miss1",
    "miss2",
    "hit",
    "w_miss1",
    "w_hit",
    "wake",
    "return",
)


class Recorder:
    """Timestamps of one op's driver calls, from the backend's methods."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self.loop_thread = threading.get_ident()

    def wrap(self, backend: Any) -> None:
        """Wrap the methods of ``backend``'s class (or of ``backend``, a class)."""
        cls = backend if isinstance(backend, type) else type(backend)
        copy, record, query = cls.memcpy_async, cls.event_record, cls.event_query
        marks = self.marks
        clock = time.perf_counter
        self.loop_thread = threading.get_ident()
        loop_thread = self.loop_thread
        ident = threading.get_ident
        thread_time = time.thread_time

        def memcpy_async(self: Any, dst: int, src: int, nbytes: int, stream: Any) -> None:
            t = clock()
            marks.append(("memcpy", t))
            if ident() != loop_thread:  # issued by another thread (a stream's host thread)
                marks.append(("x_memcpy", t))
            else:  # the loop thread's CPU time so far: how much of ``memcpy`` it ran
                marks.append(("memcpy_cpu", thread_time()))
            copy(self, dst, src, nbytes, stream)
            marks.append(("memcpy_ret", clock()))
            busy_until = getattr(stream, "busy_until", None)  # the fake GPU's; not CUDA's
            if busy_until is not None:
                marks.append(("gpu_done", busy_until))

        def event_record(self: Any, event: Any, stream: Any) -> None:
            marks.append(("record", clock()))
            record(self, event, stream)
            marks.append(("record_ret", clock()))

        def event_query(self: Any, event: Any) -> bool:
            # Marked as it returns: the fake decides by a clock read inside
            # the call, so a hit marked before it could precede ``gpu_done``.
            done: bool = query(self, event)
            kind = "hit" if done else "miss"
            marks.append((kind if ident() == loop_thread else "w_" + kind, clock()))
            return done

        cls.memcpy_async = memcpy_async
        cls.event_record = event_record
        cls.event_query = event_query

    def wrap_wake(self) -> None:
        """Mark ``wake`` where a task asleep on an op is woken: the set() of the
        anyio event it waits on, run by its loop (``Operation._wait_woken``).
        Call inside a running loop, once per event class."""
        cls = type(anyio.Event())
        if getattr(cls.set, "_timeline", False):
            return
        orig = cls.set
        marks = self.marks
        clock = time.perf_counter

        def set(self: Any) -> None:
            marks.append(("wake", clock()))
            orig(self)

        set._timeline = True  # type: ignore[attr-defined]
        cls.set = set  # type: ignore[method-assign]

    def row(self, t0: float, t1: float, cpu0: float | None = None) -> dict[str, float]:
        """The marks of the op awaited from ``t0`` to ``t1``: the first of each
        kind, but the last ``hit``, ``w_hit`` and ``wake``: the query that let
        the await return (a sweep may find another stream's or an older
        marker fired first), and the wake-up after it (not a pre-wake's).
        Marks before ``t0`` (a watcher's late query of the last op) are left
        out. ``memcpy_cpu`` is the loop thread's CPU time (``time.thread_time``)
        from ``cpu0``, taken at ``t0``, to the driver call: where it falls
        short of ``memcpy``, the thread waited (for the GIL, a lock) or was
        not running."""
        out: dict[str, float] = {"return": t1 - t0}
        misses = {"miss": 0, "w_miss": 0}
        for name, t in self.marks:
            if name == "memcpy_cpu":
                if cpu0 is not None and name not in out:
                    out[name] = t - cpu0
                continue
            if t < t0 and name != "gpu_done":
                continue
            if name in misses:
                misses[name] += 1
                name = f"{name}{misses[name]}"
            if name in ("hit", "w_hit", "wake"):
                out[name] = t - t0
            else:
                out.setdefault(name, t - t0)
        out["n_miss"] = misses["miss"]
        out["n_w_miss"] = misses["w_miss"]
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
    clock, thread_time = time.perf_counter, time.thread_time
    for _ in range(ops):
        if before is not None:
            before()
            rec.marks.clear()
        cpu0 = thread_time()
        t0 = clock()
        await start()
        rows.append(rec.row(t0, clock(), cpu0))
    return rows


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per mark: the median microseconds from the call, and the share of ops
    with the mark (``<mark>_share``); misses per op."""
    out: dict[str, float] = {}
    for mark in MARKS:
        values = [r[mark] for r in rows if mark in r]
        if values:
            out[mark] = statistics.median(values) * 1e6
            out[f"{mark}_share"] = len(values) / len(rows)
    out["misses_per_op"] = statistics.fmean(r["n_miss"] for r in rows)
    out["watcher_misses_per_op"] = statistics.fmean(r["n_w_miss"] for r in rows)
    return out


def summary(rows: list[dict[str, float]]) -> str:
    m = medians(rows)
    parts = [f"{mark}={m[mark]:5.2f}({m[mark + '_share']:.2f})" for mark in MARKS if mark in m]
    parts.append(f"misses/op={m['misses_per_op']:.2f}")
    if m["watcher_misses_per_op"]:
        parts.append(f"w_misses/op={m['watcher_misses_per_op']:.2f}")
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


def before_each(evict: int, burn_ms: float) -> Callable[[], object] | None:
    """What runs before each timed op: the evicting copy, then the burn."""
    copy = evicter(evict)
    if not burn_ms:
        return copy

    def before() -> object:
        if copy is not None:
            copy()
        return probe.burn(burn_ms * 1e-3)

    return before


async def run(
    op: str, ops: int, backend: Any, rec: Recorder, nbytes: int, before: Callable[[], object] | None
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    rec.wrap_wake()
    dev = gpuaio.Device(0)
    s = dev.stream()
    start = probe.op_factory(gpuaio, dev, op, 1, nbytes)
    warmup = min(500, max(20, ops // 4))
    rows = await timeline(lambda: start(s, 0), rec, ops, warmup, before)
    s.close()
    # The hand-written awaitable of the same op (overhead_probe.floor_op).
    once = probe.floor_op(gpuaio, backend, op, nbytes)
    hand = await timeline(once, rec, ops, warmup, before)
    return rows, hand


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default=None, help="ops (default: all four; with --gpu the pinned two)")
    ap.add_argument("--loops", default="asyncio,uvloop")
    ap.add_argument("--ops", type=int, default=5000)
    ap.add_argument("--launch-us", type=float, default=5.0)
    ap.add_argument("--gpu-us", type=float, default=2.0)
    ap.add_argument("--bytes", default=str(probe.COPY_BYTES), help="bytes per copy (a list: 4K,1M)")
    ap.add_argument(
        "--evict", type=int, default=0, help="bytes of an unrelated host copy before each op"
    )
    ap.add_argument("--burn-ms", type=float, default=0.0, help="ms of Python before each op")
    ap.add_argument("--gpu", action="store_true", help="the real GPU's CUDA backend")
    ap.add_argument("--sim", action="store_true", help="--gpu's code on the simulated backend")
    ap.add_argument("--out", default=None, help="write the medians as JSON here")
    args = ap.parse_args(argv)
    sizes = [parse_size(x) for x in args.bytes.split(",")]
    if args.gpu or args.sim:
        if args.gpu:
            from gpuaio.backends.cuda import CudaBackend as cls
        else:
            from gpuaio.backends.sim import SimBackend as cls  # type: ignore[assignment]
        rec = Recorder()
        rec.wrap(cls)  # before the engines bind its methods
        backend: Any = gpuaio.use_backend(cls.name, completion="events").backend
        where = f"{cls.name} backend, {backend.device_properties(0).name}"
        ops = args.op or "h2d-pinned,d2h-pinned"
    else:
        backend = probe.fake_gpu(gpuaio, args.launch_us * 1e-6, args.gpu_us * 1e-6)
        rec = Recorder()
        rec.wrap(backend)
        gpuaio.use_backend(backend, completion="events")
        where = f"fake GPU (launch {args.launch_us:g} us, {args.gpu_us:g} us/op)"
        ops = args.op or "d2h-pageable,d2h-pinned,h2d-pinned,h2d-pageable"
    before = before_each(args.evict, args.burn_ms)
    print(
        f"{where}, {args.bytes} B copies, 1 task, {args.ops} ops"
        + (f", a {args.evict} B host copy before each" if args.evict else "")
        + (f", {args.burn_ms:g} ms of Python before each" if args.burn_ms else "")
        + ": median us from the call (share of ops with the mark)"
    )
    records = []
    for loop in args.loops.split(","):
        name, opts = probe.LOOPS[loop]
        for op in ops.split(","):
            for nbytes in sizes:
                ours, hand = anyio.run(
                    run, op, args.ops, backend, rec, nbytes, before,
                    backend=name, backend_options=opts,
                )  # fmt: skip
                label = f"{loop:8} {op:13}" + (f" {nbytes:>9}" if len(sizes) > 1 else "")
                print(f"{label} gpuaio  {summary(ours)}")
                print(f"{label} hand    {summary(hand)}")
                for method, rows in (("gpuaio", ours), ("hand", hand)):
                    records.append(
                        {"loop": loop, "op": op, "bytes": nbytes, "method": method} | medians(rows)
                    )
    if args.out:
        doc = {"where": where, "ops": args.ops, "burn_ms": args.burn_ms, "records": records}
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
