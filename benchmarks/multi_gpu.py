"""Multi-GPU suite (issue 8): peer copies and aggregate host-to-device bandwidth.

Records, all measured in this one run on this machine's GPUs:

* ``peer_copy_<size>``: gpuaio ``await stream.copy(dst_on_1, src_on_0)`` against
  the raw ``cuMemcpyPeerAsync`` + synchronize (target ratio >= 0.95).
* ``aggregate_h2d_pinned_2gpu``: every GPU receives ``--size`` bytes from
  pinned memory at once, against one GPU alone (target ratio >= 1.8 with 2).
* ``aggregate_h2d_pageable_2gpu``: the same from pageable memory through
  gpuaio's staging, against the multi-threaded host-copy ceiling measured
  here (target >= 0.85).

Needs at least two devices (``--quick`` with ``GPUAIO_BACKEND=sim
GPUAIO_SIM_DEVICES=2`` runs it on the simulated backend for a smoke check).
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._api.runtime import current_runtime


def host_ceiling(n: int, threads: int) -> float:
    """GB/s of a numpy copy pageable -> pinned split over ``threads`` threads."""
    src = np.ones(n, np.uint8)
    dst = gpuaio.pinned_empty(n)
    dst[:] = 0
    step = -(-n // threads)

    def part(i: int) -> None:
        np.copyto(dst[i * step : (i + 1) * step], src[i * step : (i + 1) * step])

    best = 0.0
    for _ in range(3):
        ts = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, n / (time.perf_counter() - t0) / 1e9)
    return best


async def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def main_async(args: argparse.Namespace) -> list[h.Record]:
    rt = current_runtime()
    ndev = rt.backend.device_count()
    records: list[h.Record] = []
    if ndev < 2:
        note = f"needs 2 devices, found {ndev}"
        print(note)
        for name in ("peer_copy", "aggregate_h2d_pinned_2gpu", "aggregate_h2d_pageable_2gpu"):
            records.append(h.record(name, "GB/s", None, note=note))
        return records
    devs = [device_of(rt, i) for i in range(ndev)]
    d0, d1 = devs[0], devs[1]
    be = rt.backend
    reps = args.reps
    for n in args.peer_sizes:
        a, b = d0.empty(n), d1.empty(n)
        s = d0.stream()
        await s.memset(a, 1)
        ours: list[float] = []
        raw: list[float] = []
        for i in range(reps + 1):
            t_ours = await timed(functools.partial(s.copy, b, a))
            t0 = time.perf_counter()
            be.memcpy_peer_async(b.ptr, 1, a.ptr, 0, n, s._native)
            be.stream_synchronize(s._native)
            t_raw = time.perf_counter() - t0
            if i:
                ours.append(n / t_ours / 1e9)
                raw.append(n / t_raw / 1e9)
        records.append(
            h.record(
                f"peer_copy_{h.fmt_size(n)}",
                "GB/s",
                h.median(ours),
                "cuMemcpyPeerAsync + cuStreamSynchronize",
                h.median(raw),
                target=0.95,
            )
        )
        s.close()
        a.free()
        b.free()
    n = args.size
    pinned = [gpuaio.pinned_empty(n) for _ in devs[:2]]
    pageable = [np.ones(n, np.uint8) for _ in devs[:2]]
    dst = [d.empty(n) for d in devs[:2]]
    streams = [d.stream() for d in devs[:2]]
    for p in pinned:
        p[:] = 1

    async def one(srcs: list[Any], k: int) -> float:
        ops = [streams[i].copy(dst[i], srcs[i]) for i in range(k)]
        t0 = time.perf_counter()
        await gpuaio.wait_all(ops)
        return k * n / (time.perf_counter() - t0) / 1e9

    for label, srcs in (("pinned", pinned), ("pageable", pageable)):
        one_gpu: list[float] = []
        two_gpu: list[float] = []
        await one(srcs, 1)
        await one(srcs, 2)
        for _ in range(reps):
            one_gpu.append(await one(srcs, 1))
            two_gpu.append(await one(srcs, 2))
        if label == "pinned":
            records.append(
                h.record(
                    "aggregate_h2d_pinned_2gpu",
                    "GB/s",
                    h.median(two_gpu),
                    "the same copy to one GPU",
                    h.median(one_gpu),
                    target=1.8,
                )
            )
        else:
            ceiling = max(host_ceiling(n, t) for t in (8, 12, 16))
            records.append(
                h.record(
                    "aggregate_h2d_pageable_2gpu",
                    "GB/s",
                    h.median(two_gpu),
                    "multi-threaded host copy ceiling (8/12/16 threads)",
                    ceiling,
                    target=0.85,
                )
            )
            records.append(
                h.record(
                    "aggregate_h2d_pageable_1gpu",
                    "GB/s",
                    h.median(one_gpu),
                    "multi-threaded host copy ceiling (8/12/16 threads)",
                    ceiling,
                )
            )
    for s in streams:
        s.close()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke check)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out-dir", help="where to write the results (default benchmarks/results)")
    args = parser.parse_args()
    args.peer_sizes = [1 << 20, 16 << 20] if args.quick else [64 << 20, 256 << 20, 1 << 30]
    args.size = (16 << 20) if args.quick else (1 << 30)
    card = h.detect_card()
    h.banner("multi_gpu", card)
    records = h.run_on("asyncio", main_async, args)
    for r in records:
        print(
            f"  {r['name']:<34} {r['value']} GB/s  baseline {r['baseline_value']}  "
            f"ratio {r['ratio']}"
        )
    h.print_targets(records)
    h.write_results("multi_gpu", records, args.out_dir, card=card)


if __name__ == "__main__":
    main()
