"""Where a mid-size pageable copy's time goes, against what a hand-written hop costs.

Run ``parallel_copy_probe.py`` found that a persistent thread running the
driver's pageable copy for a blocked main thread costs about what the naive
call does (4 MiB H2D: 397 against 391 us), while gpuaio's awaited copy of
the same size took twice as long in the same run. This probe splits
gpuaio's time into segments, by timestamps taken in every repetition
(medians of ``--reps``, microseconds, on the event loop named):

* ``call``: ``stream.copy()`` until it returns;
* ``to_job``: from then until the stream's host thread starts the job;
* ``job``: the host job (the driver's copy, or staging);
* ``to_watch``: from the job's end until ``watch`` returns;
* ``to_resolve``: from then until the op is resolved, and by which thread;
* ``to_return``: from the resolve until ``await`` returns;

and measures, in the same process, what a user might write instead:

* ``naive``: ``cuMemcpyAsync`` + ``cuStreamSynchronize`` on the loop thread
  (blocks the loop; the floor);
* ``to_thread``: ``await asyncio.to_thread(naive)`` (anyio's
  ``to_thread.run_sync`` on trio);
* ``thread_post``: a persistent thread runs the naive call and posts the
  result with ``call_soon_threadsafe``.

``--pinned`` puts the host buffers in pinned memory: the copy is then one
DMA enqueued by the call, and only ``call``, ``to_resolve`` and
``to_return`` apply.

Writes ``hop-probe-<loop>.json`` with ``--out``. GPU only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpuaio
from gpuaio._api.runtime import current_runtime
from gpuaio._core.operation import Operation
from gpuaio._engine.pool import parse_size

KEYS = ("call", "to_job", "job", "to_watch", "to_resolve", "to_return")


async def probe(sizes: list[int], reps: int, pinned: bool = False) -> list[dict[str, Any]]:
    dev = gpuaio.Device(0)
    s = dev.stream()
    rt = current_runtime()
    be = rt.backend
    native = s._native
    stager = rt.stager
    engine = rt.engine(0)
    loop = asyncio.get_running_loop()
    marks: dict[str, float] = {}
    resolver: list[str] = []

    def wrap(obj: Any, name: str, before: str | None, after: str | None) -> None:
        fn = getattr(obj, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            if before is not None:
                marks.setdefault(before, time.perf_counter())
            try:
                return fn(*a, **k)
            finally:
                if after is not None:
                    marks[after] = time.perf_counter()  # the last one counts

        setattr(obj, name, wrapped)

    for job in ("_h2d", "_d2h", "_driver_or_staged"):
        wrap(stager, job, "job_start", "job_end")
    wrap(engine, "watch", None, "watched")
    # How the awaiting task waited: polls from its loop, and sleeps until woken.
    counts = {"polls": 0, "sleeps": 0}
    real_poll = engine.poll_for

    def poll_for(op: Any) -> bool:
        counts["polls"] += 1
        return bool(real_poll(op))

    engine.poll_for = poll_for
    real_sleep = Operation._wait_woken

    async def wait_woken(self: Operation, eng: Any) -> None:
        counts["sleeps"] += 1
        await real_sleep(self, eng)

    Operation._wait_woken = wait_woken  # type: ignore[method-assign]

    # The hand-written alternatives' thread.
    jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (job := jobs.get()) is not None:
            job()

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    out: list[dict[str, Any]] = []
    for n in sizes:
        if pinned:  # the host side in pinned memory: DMA only, no job
            src, back = gpuaio.pinned_empty(n), gpuaio.pinned_empty(n)
            src.fill(0x5A)
            back.fill(0)
        else:
            src = np.full(n, 0x5A, np.uint8)
            back = np.zeros(n, np.uint8)
        d = dev.empty(n)
        for h2d in (True, False):
            dirn = "h2d" if h2d else "d2h"
            dp, sp = (d.ptr, src.ctypes.data) if h2d else (back.ctypes.data, d.ptr)

            def naive(dp: int = dp, sp: int = sp, n: int = n) -> None:
                be.memcpy_async(dp, sp, n, native)
                be.stream_synchronize(native)

            async def to_thread(naive: Callable[[], None] = naive) -> None:
                await asyncio.to_thread(naive)

            async def thread_post(naive: Callable[[], None] = naive) -> None:
                fut = loop.create_future()

                def job() -> None:
                    naive()
                    loop.call_soon_threadsafe(fut.set_result, None)

                jobs.put(job)
                await fut

            def time_sync(fn: Callable[[], None]) -> float:
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                return statistics.median(ts) * 1e6

            async def time_async(fn: Callable[[], Any]) -> float:
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    await fn()
                    ts.append(time.perf_counter() - t0)
                return statistics.median(ts) * 1e6

            row: dict[str, Any] = {"dir": dirn, "bytes": n}
            for _ in range(3):  # warm
                await (s.copy(d, src) if h2d else s.copy(back, d))
            row["naive"] = time_sync(naive)
            row["to_thread"] = await time_async(to_thread)
            row["thread_post"] = await time_async(thread_post)
            segs: dict[str, list[float]] = {k: [] for k in KEYS}
            totals = []
            resolver.clear()
            counts.update(polls=0, sleeps=0)
            for _ in range(reps):
                marks.clear()
                t0 = time.perf_counter()
                op = s.copy(d, src) if h2d else s.copy(back, d)
                t1 = time.perf_counter()

                def done() -> None:
                    marks["resolved"] = time.perf_counter()
                    resolver.append(threading.current_thread().name)

                op._add_done_callback(done)
                await op
                t2 = time.perf_counter()
                totals.append(t2 - t0)
                m = marks
                js, je = m.get("job_start"), m.get("job_end")
                w, r = m.get("watched"), m.get("resolved", t2)
                segs["call"].append(t1 - t0)
                if js is not None and je is not None:
                    segs["to_job"].append(js - t1)
                    segs["job"].append(je - js)
                    if w is not None and w >= je:
                        segs["to_watch"].append(w - je)
                        segs["to_resolve"].append(r - w)
                    else:
                        segs["to_resolve"].append(r - je)
                elif w is not None:
                    segs["to_resolve"].append(r - max(w, t1))
                segs["to_return"].append(t2 - r)
            row["gpuaio"] = statistics.median(totals) * 1e6
            for k, v in segs.items():
                row[k] = round(statistics.median(v) * 1e6, 1) if v else None
            names = sorted(set(resolver))
            row["resolved_by"] = {nm: resolver.count(nm) for nm in names}
            row["polls_per_op"] = round(counts["polls"] / reps, 2)
            row["sleeps_per_op"] = round(counts["sleeps"] / reps, 2)
            out.append(row)
            print(
                f"  {dirn} {n >> 20:>3} MiB: naive {row['naive']:7.1f}  to_thread "
                f"{row['to_thread']:7.1f}  thread_post {row['thread_post']:7.1f}  gpuaio "
                f"{row['gpuaio']:7.1f} = "
                + " + ".join(f"{k} {row[k]}" for k in KEYS)
                + f"  resolved by {row['resolved_by']}, polls/op {row['polls_per_op']}, "
                f"sleeps/op {row['sleeps_per_op']}",
                flush=True,
            )
    jobs.put(None)
    Operation._wait_woken = real_sleep  # type: ignore[method-assign]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", default="1M,2M,4M,16M")
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--label", default="")
    p.add_argument("--pinned", action="store_true", help="host buffers in pinned memory")
    p.add_argument("--out")
    args = p.parse_args()
    sizes = [parse_size(x) for x in args.sizes.split(",")]
    print(f"== hop probe, {args.loop} {args.label}", flush=True)
    if args.loop == "uvloop":
        import uvloop

        rows = uvloop.run(probe(sizes, args.reps, args.pinned))
    else:
        rows = asyncio.run(probe(sizes, args.reps, args.pinned))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"hop-probe-{args.loop}{'-' + args.label if args.label else ''}.json"
        (out / name).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
