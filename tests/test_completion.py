"""Every completion strategy resolves ops correctly, in order, and fails them fast."""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest

import gpuaio
from tests.conftest import add_one_kernel, latch

pytestmark = pytest.mark.anyio


async def test_ops_resolve_in_order(strategy_dev: gpuaio.Device) -> None:
    dev = strategy_dev
    s = dev.stream()
    k = add_one_kernel(dev)
    d = dev.empty(4096)
    await s.memset(d, 0)
    ops = [s.launch(k, 16, 256, d, np.uint64(4096)) for _ in range(40)]
    done_order: list[int] = []
    for i, op in enumerate(ops):
        op._add_done_callback(lambda i=i: done_order.append(i))
    await ops[-1]
    assert all(op.done() for op in ops)
    assert done_order == sorted(done_order)
    out = np.empty(4096, np.uint8)
    await s.copy(out, d)
    assert (out == 40).all()
    assert dev._runtime.engine(0).strategy == dev._runtime.strategy


async def test_concurrent_awaiters(strategy_dev: gpuaio.Device) -> None:
    dev = strategy_dev
    streams = [dev.stream() for _ in range(4)]
    d = dev.empty(4 * 64)
    results: list[int] = []

    async def worker(i: int) -> None:
        s = streams[i % 4]
        part = d[4 * i : 4 * i + 4]
        for j in range(20):
            await s.memset(part, j)
        out = np.empty(4, np.uint8)
        await s.copy(out, part)
        results.append(int(out[0]))

    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(worker, i)
    assert results == [19] * 64
    assert dev._runtime.engine(0).pending() == 0


async def test_long_op_is_caught_after_the_loop_stops_polling(strategy_dev: gpuaio.Device) -> None:
    dev = strategy_dev
    s = dev.stream()
    release = latch(dev, s)
    op = s.memset(dev.empty(16), 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(op.wait)
        await anyio.sleep(0.05)  # well past the loop-side polling window
        release()
    assert op.done()


@pytest.mark.gpuaio_sim_only
async def test_sticky_fault_within_100ms(strategy_dev: gpuaio.Device) -> None:
    dev = strategy_dev
    s = dev.stream()
    release = latch(dev, s)
    ops = [s.memset(dev.empty(16), i) for i in range(5)]
    dev._runtime.backend.inject_fault(0, after_ops=0, code=700)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    release()
    for op in ops:
        with pytest.raises(gpuaio.DeviceFatalError):
            await op
    assert time.perf_counter() - t0 < 0.1
