"""Does the driver's pageable copy on one thread stall another thread's Python or driver calls?

gpuaio may hand mid-size pageable copies to the driver's own path
(``cuMemcpyAsync`` from or into pageable memory) on a stream's host thread.
That is only acceptable if the call releases the GIL and holds no lock that
the event loop's own driver calls (``cuEventQuery``, a small pinned
``cuMemcpyAsync`` on another stream) then wait for. This probe measures the
latency of those calls on the main thread, and of a bare Python tick, while a
second thread runs, back to back:

* nothing (idle);
* the driver's pageable H2D / D2H of ``--size`` bytes on its own stream;
* ``ctypes.memmove`` of the same size (GIL released: the staging baseline).

Prints one line per condition, and writes JSON with ``--out``. GPU only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _rawcuda import driver_on_device0, ok, parse_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="16M", help="bytes per background copy (default 16M)")
    p.add_argument("--seconds", type=float, default=1.5, help="per condition (default 1.5)")
    p.add_argument("--out", help="directory for driver-lock-probe.json")
    args = p.parse_args()
    n = parse_size(args.size)
    found = driver_on_device0()
    if found is None:
        return 2
    cu, ctx = found
    bg_stream = ok(cu.cuStreamCreate(1))
    fg_stream = ok(cu.cuStreamCreate(1))
    d_big = ok(cu.cuMemAlloc(n))
    d_small = ok(cu.cuMemAlloc(4096))
    h_small = ok(cu.cuMemHostAlloc(4096, 0))
    pageable = np.full(n, 7, np.uint8)
    pageable_out = np.zeros(n, np.uint8)
    pinned = ok(cu.cuMemHostAlloc(n, 0))
    ev = ok(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
    ok(cu.cuEventRecord(ev, fg_stream))
    ok(cu.cuStreamSynchronize(fg_stream))

    def bg_h2d() -> None:
        ok(cu.cuMemcpyAsync(d_big, pageable.ctypes.data, n, bg_stream))
        ok(cu.cuStreamSynchronize(bg_stream))

    def bg_d2h() -> None:
        ok(cu.cuMemcpyAsync(pageable_out.ctypes.data, d_big, n, bg_stream))

    def bg_memmove() -> None:
        ctypes.memmove(int(pinned), pageable.ctypes.data, n)

    conditions = {
        "idle": None,
        "driver_pageable_h2d": bg_h2d,
        "driver_pageable_d2h": bg_d2h,
        "memmove": bg_memmove,
    }
    results: dict[str, dict[str, float]] = {}
    for name, work in conditions.items():
        stop = threading.Event()
        copies = [0]

        def loop(
            work: object = work, stop: threading.Event = stop, copies: list[int] = copies
        ) -> None:
            ok(cu.cuCtxSetCurrent(ctx))
            while not stop.is_set():
                work()  # type: ignore[operator]
                copies[0] += 1

        t = threading.Thread(target=loop, daemon=True) if work is not None else None
        if t is not None:
            t.start()
        query: list[float] = []
        enqueue: list[float] = []
        tick: list[float] = []
        t_end = time.perf_counter() + args.seconds
        t0 = time.perf_counter()
        while time.perf_counter() < t_end:
            a = time.perf_counter()
            cu.cuEventQuery(ev)
            b = time.perf_counter()
            ok(cu.cuMemcpyAsync(d_small, int(h_small), 4096, fg_stream))
            c = time.perf_counter()
            time.sleep(0)  # releases the GIL, like a loop's epoll
            e = time.perf_counter()
            query.append(b - a)
            enqueue.append(c - b)
            tick.append(e - c)
            time.sleep(100e-6)
        ok(cu.cuStreamSynchronize(fg_stream))
        elapsed = time.perf_counter() - t0
        stop.set()
        if t is not None:
            t.join()

        def q(xs: list[float], p: float) -> float:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e6

        row = {
            "samples": len(query),
            "copies_per_s": copies[0] / elapsed,
            "gbps": copies[0] * n / elapsed / 1e9,
            "event_query_p50_us": q(query, 0.5),
            "event_query_p99_us": q(query, 0.99),
            "event_query_max_us": max(query) * 1e6,
            "pinned_enqueue_p50_us": q(enqueue, 0.5),
            "pinned_enqueue_p99_us": q(enqueue, 0.99),
            "pinned_enqueue_max_us": max(enqueue) * 1e6,
            "gil_tick_p50_us": q(tick, 0.5),
            "gil_tick_p99_us": q(tick, 0.99),
            "gil_tick_max_us": max(tick) * 1e6,
            "mean_query_us": statistics.fmean(query) * 1e6,
        }
        results[name] = row
        print(
            f"{name:<22} bg {row['gbps']:6.2f} GB/s | cuEventQuery p50/p99/max "
            f"{row['event_query_p50_us']:7.1f} {row['event_query_p99_us']:8.1f} "
            f"{row['event_query_max_us']:9.1f} us | pinned 4 KiB enqueue "
            f"{row['pinned_enqueue_p50_us']:7.1f} {row['pinned_enqueue_p99_us']:8.1f} "
            f"{row['pinned_enqueue_max_us']:9.1f} us | GIL tick "
            f"{row['gil_tick_p50_us']:6.1f} {row['gil_tick_p99_us']:8.1f} "
            f"{row['gil_tick_max_us']:9.1f} us"
        )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "driver-lock-probe.json").write_text(
            json.dumps({"size": n, "seconds": args.seconds, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
