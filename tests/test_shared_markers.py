"""Ops watched behind pending ones share one marker, recorded by the next drain.

``gpuaio._engine.completion._queue``: a lone op gets its marker at once; ops
watched while their stream has ops pending join its open batch, whose one
marker the next drain of the queue records. These tests hold that sharing
never resolves an op before its work, keeps stream order and the data, fails
only the ops of a batch whose marker could not be recorded, and recycles
every marker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio import CudaError
from tests.conftest import latch

pytestmark = pytest.mark.anyio


def _events_engine(dev: gpuaio.Device) -> Any:
    engine = dev._runtime.engine(dev.ordinal)
    if engine.strategy != "events":
        pytest.skip("markers are shared by the events strategy only")
    return engine


@contextmanager
def _placed(engine: Any, fail: Callable[[int], bool] = lambda _n: False) -> Iterator[list[Any]]:
    """The markers ``engine`` records within the block; the n-th (from 0) raises if ``fail(n)``."""
    placed: list[Any] = []
    real = engine._place

    def place(stream: Any) -> Any:
        if fail(len(placed)):
            placed.append(None)
            raise CudaError("cuEventRecord", 1, "CUDA_ERROR_INVALID_VALUE", "injected")
        marker = real(stream)
        placed.append(marker)
        return marker

    # Queues made from now on take the spy; those made before took the method.
    queues = list(engine._queues.values())
    engine._place = place
    for q in queues:
        q.place = place
    try:
        yield placed
    finally:
        del engine._place
        for q in queues:
            q.place = real


async def test_a_lone_op_is_marked_at_once(dev: gpuaio.Device) -> None:
    engine = _events_engine(dev)
    s = dev.stream()
    d = dev.empty(64)
    with _placed(engine) as placed:
        op = s.memset(d, 3)
        assert len(placed) == 1, "an op on an idle stream waits for a drain to be marked"
        await op
    out = np.empty(64, np.uint8)
    await s.copy(out, d)
    assert (out == 3).all()
    await s.aclose()


async def test_ops_behind_pending_work_share_a_marker_and_wait_for_their_work(
    dev: gpuaio.Device,
) -> None:
    engine = _events_engine(dev)
    s = dev.stream()
    n = 64
    d = dev.empty(4 * n)
    await s.memset(d, 0)
    order: list[int] = []
    with _placed(engine) as placed:
        # Not awaited: the ops below are watched while it pends, and join a
        # batch that is marked once it has fired, behind the held work.
        head = s.memset(d, 0)
        release = latch(dev, s)
        ops = [s.memset(d[4 * i : 4 * i + 4], i + 1) for i in range(n)]
        for i, op in enumerate(ops):
            op._add_done_callback(lambda i=i: order.append(i))
        done_early: list[int] = []

        async def waiter(i: int) -> None:
            await ops[i]
            done_early.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(0, n, 8):
                tg.start_soon(waiter, i)
            # Polls and sweeps drain the queue meanwhile: the head resolves,
            # the batch gets its marker, and none of it may fire.
            with anyio.fail_after(10):
                await head
            while len(placed) < 2:  # noqa: ASYNC110 - the watcher thread may place it
                await anyio.sleep(0.005)
            await anyio.sleep(0.05)
            assert not any(op.done() for op in ops), "an op resolved before its work ran"
            assert not done_early
            release()
        await ops[-1]
    # The head's marker at once, then one for all the others (two if the first
    # was watched just after the head resolved).
    assert len(placed) <= 3, f"{len(placed)} markers for {n + 1} ops"
    assert order == list(range(n)), "ops of one stream resolved out of order"
    out = np.empty(4 * n, np.uint8)
    await s.copy(out, d)
    assert (out.reshape(n, 4) == np.arange(1, n + 1, dtype=np.uint8)[:, None]).all()
    assert engine.pending() == 0
    free = engine._free_events
    assert all(any(m is f for f in free) for m in placed), "a shared marker was not recycled"
    await s.aclose()


async def test_a_batch_whose_marker_fails_fails_only_its_ops(dev: gpuaio.Device) -> None:
    engine = _events_engine(dev)
    s = dev.stream()
    d = dev.empty(64)
    await s.memset(d, 0)
    release = latch(dev, s)
    # The first op is marked at once; the batch behind it (marker 1) fails.
    with _placed(engine, fail=lambda k: k == 1) as placed:
        first = s.memset(d[:16], 1)
        batch = [s.memset(d[16:32], 2), s.memset(d[32:48], 3)]
        release()
        await first
        for op in batch:
            with pytest.raises(CudaError, match="injected"):
                await op
        later = s.memset(d[48:], 4)
        await later
    assert placed[1] is None and len(placed) == 3
    out = np.empty(64, np.uint8)
    await s.copy(out, d)
    # The failed marker says nothing of the work: the memsets themselves ran.
    assert (out == np.repeat(np.arange(1, 5, dtype=np.uint8), 16)).all()
    assert engine.pending() == 0
    await s.aclose()


async def test_many_tasks_on_few_streams_record_fewer_markers_than_ops(
    dev: gpuaio.Device,
) -> None:
    engine = _events_engine(dev)
    streams = [dev.stream() for _ in range(2)]
    tasks, rounds = 100, 10
    d = dev.empty(4 * tasks)
    releases = [latch(dev, s) for s in streams]
    results: list[int] = []

    async def worker(i: int) -> None:
        s = streams[i % 2]
        part = d[4 * i : 4 * i + 4]
        for j in range(rounds):
            await s.memset(part, j + i)
        out = np.empty(4, np.uint8)
        await s.copy(out, part)
        results.append(int(out[0]) - i)

    with _placed(engine) as placed:
        async with anyio.create_task_group() as tg:
            for i in range(tasks):
                tg.start_soon(worker, i)
            await anyio.sleep(0.02)  # every task's first memset is queued behind the latch
            for r in releases:
                r()
    assert results == [rounds - 1] * tasks
    ops = tasks * (rounds + 1)
    # At least the first round, queued behind the latches, shared markers.
    assert len(placed) <= ops - tasks + 2, f"{len(placed)} markers for {ops} ops"
    assert engine.pending() == 0
    for s in streams:
        await s.aclose()
