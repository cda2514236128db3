"""Every completion strategy resolves ops correctly, in order, and fails them fast."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._core.loopport import LoopPort
from tests.conftest import add_one_kernel, latch
from tests.test_copy import pattern

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


async def test_wait_all_wakes_its_loop_once_for_a_batch_on_one_stream(
    strategy_dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight copies on one stream complete one after another, each long
    enough that a task awaiting it goes to sleep (0.8 ms on the simulator,
    0.3 ms on an H200). ``wait_all`` sleeps through them all: its loop is
    woken from another thread at most twice (ahead of the last copy, and at
    its completion), not once per copy; every byte lands."""
    dev = strategy_dev
    s = dev.stream()
    n, count = 16 << 20, 8
    src = gpuaio.pinned_empty(n)
    src[:] = pattern(n, 13)
    dsts = [dev.empty(n) for _ in range(count)]
    await s.copy(dsts[0], src)  # warm: the stream's first op pays for its set-up
    wakes: list[int] = []
    real = LoopPort.post

    def counting(self: LoopPort, callbacks: list[Callable[[], None]]) -> None:
        if threading.get_ident() != self.thread:
            wakes.append(len(callbacks))
        real(self, callbacks)

    monkeypatch.setattr(LoopPort, "post", counting)
    ops = [s.copy(d, src) for d in dsts]
    await gpuaio.wait_all(ops)
    monkeypatch.undo()
    assert all(op.done() for op in ops)
    assert len(wakes) <= 2, f"{len(wakes)} wake-ups from other threads for one batch: {wakes}"
    back = gpuaio.pinned_empty(n)
    for d in dsts:
        back[:] = 0
        await s.copy(back, d)
        assert np.array_equal(back, src)


async def test_wait_all_awaits_coroutines_in_order_after_the_ops_before_them(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    """Ops are awaited last first, but a coroutine still runs only after every
    op before it in the list is done, and before the ones after it are
    awaited; the first error in list order is raised after all finished."""
    d = dev.empty(64)
    release = latch(dev, stream)
    early = [stream.memset(d[:32], 1), stream.memset(d[:32], 2)]
    seen: list[str] = []

    async def check(name: str, ops: list[gpuaio.Operation]) -> None:
        seen.append(name if all(op.done() for op in ops) else f"{name} too early")

    async def fail(name: str) -> None:
        seen.append(name)
        raise ValueError(name)

    late = [stream.memset(d[32:], 3)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(_release_later, release)
        with pytest.raises(ValueError, match="first"):
            await gpuaio.wait_all(
                [*early, check("a", early), fail("first"), *late, fail("second"), check("b", late)]
            )
    assert seen == ["a", "first", "second", "b"]
    out = np.empty(64, np.uint8)
    await stream.copy(out, d)
    assert (out[:32] == 2).all() and (out[32:] == 3).all()


async def _release_later(release: Callable[[], None]) -> None:
    await anyio.sleep(0.02)
    release()


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
