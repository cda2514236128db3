"""Quick wake-latency and throughput probe of gpuaio's completion strategies.

``python tools/latency_probe.py`` prints, per strategy and event loop, the
p50/p99 latency of an awaited 4-byte device memset and the throughput of
awaited memsets from 1,000 concurrent tasks. The full suite with peers and
result files is ``benchmarks/completion.py``.
"""

from __future__ import annotations

import sys
import time

import anyio
import numpy as np

import gpuaio


async def latency(n: int) -> tuple[float, float]:
    dev = gpuaio.Device(0)
    s = dev.stream()
    d = dev.empty(4)
    for _ in range(200):
        await s.memset(d, 1)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        await s.memset(d, i & 0xFF)
        samples.append(time.perf_counter() - t0)
    s.close()
    return float(np.percentile(samples, 50) * 1e6), float(np.percentile(samples, 99) * 1e6)


async def throughput(tasks: int, per_task: int) -> float:
    dev = gpuaio.Device(0)
    streams = [dev.stream() for _ in range(min(16, tasks))]
    d = dev.empty(4 * tasks)

    async def worker(i: int) -> None:
        s = streams[i % len(streams)]
        part = d[4 * i : 4 * i + 4]
        for j in range(per_task):
            await s.memset(part, j & 0xFF)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(tasks):
            tg.start_soon(worker, i)
    dt = time.perf_counter() - t0
    for s in streams:
        s.close()
    return tasks * per_task / dt


def main() -> None:
    loops = [("asyncio", {}), ("asyncio", {"use_uvloop": True}), ("trio", {})]
    strategies = sys.argv[1:] or list(gpuaio.STRATEGIES)
    print(f"backend {gpuaio.backend_name()}; {gpuaio.Device(0).name}")
    for strat in strategies:
        gpuaio.configure(completion=strat)  # type: ignore[arg-type]
        for backend, opts in loops:
            name = "uvloop" if opts else backend
            p50, p99 = anyio.run(latency, 2000, backend=backend, backend_options=opts)
            ops = anyio.run(throughput, 1000, 20, backend=backend, backend_options=opts)
            ops1 = anyio.run(throughput, 1, 2000, backend=backend, backend_options=opts)
            print(
                f"{strat:<9} {name:<8} p50 {p50:7.1f} us  p99 {p99:7.1f} us  "
                f"1000 tasks {ops:9.0f} ops/s  1 task {ops1:8.0f} ops/s"
            )


if __name__ == "__main__":
    main()
