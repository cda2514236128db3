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
from gpuaio._engine.growth import CLASS_SHARE, FIRST_STEP, ClassGrowth
from gpuaio._engine.pool import MIN_CLASS, PinnedPool
from gpuaio._engine.staging import Stager, StagingConfig
from tests.test_copy import pattern
from tests.test_loader import eventually

pytestmark = pytest.mark.anyio


def _queue() -> tuple[list[Callable[[], None]], Callable[[Callable[[], None]], None]]:
    jobs: list[Callable[[], None]] = []
    return jobs, jobs.append


def test_a_miss_pins_a_batch_of_its_class_off_the_calling_thread(gpuaio_runtime: Any) -> None:
    """``missed`` pins nothing itself; the job it hands over pins ``FIRST_STEP``
    blocks of the copy's class. Each batch that pinned any doubles the
    next, up to a share of the budget."""
    budget = 1024 * MIN_CLASS
    pool = PinnedPool(gpuaio_runtime.backend, budget=budget)
    jobs, submit = _queue()
    growth = ClassGrowth(pool, submit)
    growth.missed(4096)
    assert pool.stats().reserved == 0, "the calling thread pinned memory"
    assert len(jobs) == 1
    jobs.pop()()
    stats = pool.stats()
    assert stats.reserved == FIRST_STEP * MIN_CLASS and stats.in_use == 0, stats
    assert len(pool._free[MIN_CLASS]) == FIRST_STEP

    # Each batch with its class's cached blocks all taken (copies in flight).
    share = budget // CLASS_SHARE // MIN_CLASS
    held: list[Any] = []
    steps = []
    for _ in range(6):
        before = pool.stats().reserved
        held += iter(lambda: pool.take_cached(MIN_CLASS), None)
        growth.missed(100)
        jobs.pop()()
        steps.append((pool.stats().reserved - before) // MIN_CLASS)
    assert steps == [2 * FIRST_STEP, 4 * FIRST_STEP, share, share, share, share]

    # A batch pins its blocks however many are cached by the time it runs:
    # copies handing theirs back in between must not cut the class's growth.
    held += iter(lambda: pool.take_cached(MIN_CLASS), None)
    for b in held[:5]:
        pool.release(b)
    before = pool.stats().reserved
    growth.missed(100)
    jobs.pop()()
    assert pool.stats().reserved - before == share * MIN_CLASS

    # Another class has its own batches.
    growth.missed(3 * MIN_CLASS)
    jobs.pop()()
    assert len(pool._free[4 * MIN_CLASS]) == FIRST_STEP
    for b in held[5:]:
        pool.release(b)
    pool.close()


def test_one_batch_per_class_at_a_time(gpuaio_runtime: Any) -> None:
    """Misses while a class's batch is still being pinned ask for nothing more."""
    pool = PinnedPool(gpuaio_runtime.backend, budget=1024 * MIN_CLASS)
    jobs, submit = _queue()
    growth = ClassGrowth(pool, submit)
    for _ in range(5):
        growth.missed(MIN_CLASS)
    assert len(jobs) == 1
    jobs.pop()()
    assert growth.batches == 1
    growth.missed(MIN_CLASS)
    assert len(jobs) == 1, "the class's next miss asked for no batch"
    jobs.pop()()
    pool.close()


def test_a_batch_for_a_closed_or_full_pool_is_dropped(gpuaio_runtime: Any) -> None:
    """A batch with the budget spent pins nothing; one after the pool closed
    raises nowhere (it runs on the reaper thread); either way the class may
    ask again."""
    pool = PinnedPool(gpuaio_runtime.backend, budget=64 * MIN_CLASS)
    jobs, submit = _queue()
    growth = ClassGrowth(pool, submit)
    held = [pool.acquire(MIN_CLASS) for _ in range(64)]
    growth.missed(MIN_CLASS)
    jobs.pop()()  # the budget is spent
    assert pool.stats().reserved == 64 * MIN_CLASS
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

    for _ in range(8):
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
    # Grown to what was in flight (a block per task, two while a task's next
    # copy starts before its last one's block went back), plus a batch at most.
    share = small_stager.pool.budget // CLASS_SHARE // MIN_CLASS
    assert small_stager.pool.stats().reserved <= (2 * tasks + share) * MIN_CLASS
    for s in streams:
        s.close()
