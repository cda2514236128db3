"""A small copy that misses the pinned pool's cache has the pool pin a batch of
its size class off the event loop, so concurrent small copies stop taking the
host thread's path (issue 13, thirty-fifth round)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._engine.growth import CLASS_SHARE, ClassGrowth
from gpuaio._engine.pool import MIN_CLASS, PinnedPool
from gpuaio._engine.staging import Stager, StagingConfig
from tests.test_copy import pattern
from tests.test_loader import eventually

pytestmark = pytest.mark.anyio


def _queue() -> tuple[list[Callable[[], None]], Callable[[Callable[[], None]], None]]:
    jobs: list[Callable[[], None]] = []
    return jobs, jobs.append


def test_each_miss_pins_a_block_of_its_class_off_the_calling_thread(
    gpuaio_runtime: Any,
) -> None:
    """``missed`` pins nothing itself and queues one job per class however
    many copies miss before it runs; the job pins a block per miss."""
    pool = PinnedPool(gpuaio_runtime.backend, budget=1024 * MIN_CLASS)
    jobs, submit = _queue()
    growth = ClassGrowth(pool, submit)
    for _ in range(5):
        growth.missed(4096)
    assert pool.stats().reserved == 0, "the calling thread pinned memory"
    assert len(jobs) == 1, "one job per class at a time"
    jobs.pop()()
    stats = pool.stats()
    assert stats.reserved == 5 * MIN_CLASS and stats.in_use == 0, stats
    assert len(pool._free[MIN_CLASS]) == 5
    growth.missed(MIN_CLASS)
    growth.missed(3 * MIN_CLASS)  # another class: a job of its own
    assert len(jobs) == 2
    for job in jobs:
        job()
    assert pool.stats().reserved == 6 * MIN_CLASS + 4 * MIN_CLASS
    assert len(pool._free[4 * MIN_CLASS]) == 1
    pool.close()


def test_misses_during_a_batch_are_pinned_by_the_same_job(gpuaio_runtime: Any) -> None:
    """Copies missing while a batch is being pinned queue nothing; the job pins
    their blocks after its batch, up to a share of the budget per batch."""
    budget = 64 * MIN_CLASS
    pool = PinnedPool(gpuaio_runtime.backend, budget=budget)
    jobs, submit = _queue()
    growth = ClassGrowth(pool, submit)
    reserve = pool.reserve
    calls: list[int] = []

    def reserve_while_copies_miss(nbytes: int, count: int, *, more: bool = False) -> int:
        calls.append(count)
        if len(calls) == 1:
            for _ in range(20):  # misses while the first batch pins
                growth.missed(MIN_CLASS)
        return reserve(nbytes, count, more=more)

    pool.reserve = reserve_while_copies_miss  # type: ignore[method-assign]
    growth.missed(MIN_CLASS)
    jobs.pop()()
    assert not jobs, "a miss during the batch queued another job"
    share = budget // CLASS_SHARE // MIN_CLASS
    assert calls == [1, share, share, 20 - 2 * share], calls
    assert growth.batches == 4
    assert pool.stats().reserved == 21 * MIN_CLASS
    growth.missed(MIN_CLASS)
    assert len(jobs) == 1, "the class's next miss queued no job"
    jobs.pop()()
    pool.close()


def test_a_batch_for_a_closed_or_full_pool_is_dropped(gpuaio_runtime: Any) -> None:
    """A batch with the budget spent pins nothing and forgets the misses owed;
    one after the pool closed raises nowhere (it runs on the reaper thread);
    either way the class may ask again."""
    pool = PinnedPool(gpuaio_runtime.backend, budget=64 * MIN_CLASS)
    jobs, submit = _queue()
    growth = ClassGrowth(pool, submit)
    held = [pool.acquire(MIN_CLASS) for _ in range(64)]
    growth.missed(MIN_CLASS)
    jobs.pop()()  # the budget is spent
    assert pool.stats().reserved == 64 * MIN_CLASS
    assert not growth._owed and not growth._pending
    for b in held:
        assert b is not None
        pool.release(b)
    pool.close()
    growth.missed(MIN_CLASS)
    jobs.pop()()  # closed
    assert growth.batches == 2
    assert pool.stats().reserved == 0


@pytest.fixture
def small_stager(gpuaio_runtime: Any) -> Iterator[Stager]:
    """A stager of its own with an empty pool (64 MiB budget), small copies staged."""
    old = gpuaio_runtime.stager
    stager = Stager(gpuaio_runtime, StagingConfig(driver_max=0), budget=64 << 20)
    stager.direct_up_max = 0
    gpuaio_runtime.extras["stager"] = stager
    yield stager
    gpuaio_runtime.extras["stager"] = old
    stager.close()


async def test_concurrent_small_copies_stop_missing_the_cache(
    small_stager: Stager, dev: gpuaio.Device
) -> None:
    """256 tasks, each downloading then uploading 4 KiB of its own, in rounds
    on 8 streams: byte-exact every time, and once the misses of the first
    rounds grew the class, a whole round's copies find a cached block. Before, a copy
    missing the cache went to the host thread, which took the blocks other
    copies handed back as readily as it pinned new ones, so the misses went on."""
    tasks, n = 256, 4096
    streams = [dev.stream() for _ in range(8)]
    d = dev.empty(tasks * n)
    srcs = [pattern(n, i) for i in range(tasks)]
    for i in range(tasks):
        await streams[0].copy(d[i * n : (i + 1) * n], srcs[i])
    misses: list[int] = []
    grow = small_stager.growth
    counted = grow.missed

    def count(nbytes: int) -> None:
        misses[-1] += 1
        counted(nbytes)

    grow.missed = count  # type: ignore[method-assign]

    async def worker(i: int) -> None:
        s = streams[i % len(streams)]
        part = d[i * n : (i + 1) * n]
        out = np.zeros(n, np.uint8)
        await s.copy(out, part)
        assert np.array_equal(out, srcs[i]), f"task {i}: wrong bytes"
        await s.copy(part, out)

    for _ in range(20):
        misses.append(0)
        async with anyio.create_task_group() as tg:
            for i in range(tasks):
                tg.start_soon(worker, i)
        # The batches pin on the reaper thread: let them land between rounds.
        await eventually(lambda: not grow._pending, within=30)
        if not misses[-1]:
            break
    assert misses[0] > 0, "the first round never missed the cache: nothing was tested"
    assert misses[-1] == 0, f"the copies kept missing the cache, per round: {misses}"
    # A block per miss: at most twice the blocks in flight (one per task, two
    # while a task's next copy starts before its last one's block went back).
    assert small_stager.pool.stats().reserved <= 2 * 2 * tasks * MIN_CLASS
    for s in streams:
        s.close()
