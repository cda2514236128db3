"""The pinned pool under tight budgets: chunks fit the budget, no re-pinning
churn, and no driver free under a lock the event loop takes (issue 14, r13,
r14, r23)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._core.errors import InvalidArgumentError
from gpuaio._engine.staging import Stager, StagingConfig
from tests.test_copy import pattern
from tests.test_loader import eventually

pytestmark = pytest.mark.anyio

MiB = 1 << 20


def _install(runtime: Any, budget: int, **config: Any) -> Iterator[Stager]:
    old = runtime.stager
    config.setdefault("driver_max", 0)  # these tests are about the pool: always staged
    stager = Stager(runtime, StagingConfig(**config), budget=budget)
    # Small uploads too: not the driver's own (GPUAIO_DIRECT_UP_MAX). Some of
    # these tests also hold a stream by its native handle, behind gpuaio's
    # back, which a direct upload on it would wait for.
    stager.direct_up_max = 0
    runtime.extras["stager"] = stager
    yield stager
    runtime.extras["stager"] = old
    stager.close()


@pytest.fixture
def budget_2m(gpuaio_runtime: Any) -> Iterator[Stager]:
    """Default chunking (an eighth of the copy, 1-64 MiB) under a 2 MiB budget."""
    yield from _install(gpuaio_runtime, 2 * MiB)


async def test_large_copies_fit_a_budget_smaller_than_their_chunk(
    budget_2m: Stager, dev: gpuaio.Device
) -> None:
    """A 24 MiB copy would use 4 MiB chunks; under a 2 MiB budget it uses chunks
    that fit and is byte-exact both ways (r13: it failed after enqueue)."""
    n = 24 * MiB
    src = pattern(n, 3)
    d = dev.empty(n)
    s = dev.stream()
    await s.copy(d, src)
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    stats = budget_2m.pool.stats()
    assert stats.peak_reserved <= 2 * MiB
    assert stats.in_use == 0


@pytest.fixture
def budget_512k(gpuaio_runtime: Any) -> Iterator[Stager]:
    yield from _install(gpuaio_runtime, 512 << 10)


async def test_a_budget_under_the_smallest_chunk_is_rejected_at_the_call(
    budget_512k: Stager, dev: gpuaio.Device
) -> None:
    """Nothing is enqueued: the call raises with the numbers, the destination is
    untouched, and small copies still work."""
    n = 2 * MiB
    d = dev.empty(n)
    s = dev.stream()
    await s.memset(d, 0)
    with pytest.raises(InvalidArgumentError, match=r"1048576-byte.*524288 bytes"):
        s.copy(d, pattern(n, 5))  # raises at the call, not at an await
    out = gpuaio.pinned_empty(n)  # pinned: needs no staging
    out[:] = 1
    await s.copy(out, d)
    assert not out.any(), "a rejected copy wrote to its destination"
    with pytest.raises(InvalidArgumentError, match="GPUAIO_PINNED_BUDGET"):
        s.copy(np.empty(n, np.uint8), d)  # D2H too
    small = pattern(64 << 10, 9)
    await s.copy(d[: small.nbytes], small)
    back = np.empty_like(small)
    await s.copy(back, d[: small.nbytes])
    np.testing.assert_array_equal(back, small)
    assert budget_512k.pool.stats().in_use == 0


@pytest.fixture
def budget_8m(gpuaio_runtime: Any) -> Iterator[Stager]:
    yield from _install(gpuaio_runtime, 8 * MiB)


async def test_alternating_sizes_do_not_free_and_repin(
    budget_8m: Stager, dev: gpuaio.Device
) -> None:
    """64 MiB and 8 MiB copies alternating on two streams under 8 MiB (r23): the
    pool pinned 142 blocks for 40 transfers, evicting as often. Now every
    block is pinned once and none is evicted; data byte-exact."""
    big, mid = pattern(64 * MiB, 1), pattern(8 * MiB, 2)
    d_big, d_mid = dev.empty(big.nbytes), dev.empty(mid.nbytes)
    s1, s2 = dev.stream(), dev.stream()
    ops = []
    for _ in range(10):
        ops += [s1.copy(d_big, big), s2.copy(d_mid, mid)]
    await gpuaio.wait_all(ops)
    stats = budget_8m.pool.stats()
    assert stats.evictions == 0, stats
    assert stats.misses <= 8 * MiB // (1 * MiB), stats  # the budget, pinned once
    assert stats.peak_reserved <= 8 * MiB
    out = np.empty(big.nbytes, np.uint8)
    await s1.copy(out, d_big)
    np.testing.assert_array_equal(out, big)
    await s2.copy(out[: mid.nbytes], d_mid)
    np.testing.assert_array_equal(out[: mid.nbytes], mid)


@pytest.fixture
def budget_1m(gpuaio_runtime: Any) -> Iterator[Stager]:
    yield from _install(gpuaio_runtime, 1 * MiB)


@pytest.mark.gpuaio_sim_only  # a latch on CUDA defers frees, so the free would not wait
async def test_an_eviction_never_blocks_the_loop(
    budget_1m: Stager, dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """r14: evicting cached blocks frees pinned memory, and a driver free may wait
    for all of the device's work (an H200's cuMemFreeHost waited 1.47 s for an
    unrelated kernel). The pool held its lock across that free, and the loop
    takes the lock for every small pageable copy: one call blocked the loop
    for 1.9 s. The free now runs on the reaper thread, outside the lock."""
    rt = gpuaio.current_runtime()
    # A free that waits, as the CUDA backend's is without a host memory pool
    # (cuMemFreeHost; the simulator's stream-ordered free waits for nothing).
    monkeypatch.setattr(rt.backend, "host_free_async", rt.backend.host_free)
    small = pattern(64 << 10, 4)
    d_small = dev.empty(small.nbytes)
    sz, sy, sx = dev.stream(), dev.stream(), dev.stream()
    # Two cached 64 KiB blocks, as small copies in flight at once leave behind.
    await anyio.to_thread.run_sync(budget_1m.pool.reserve, 64 << 10, 2)
    assert budget_1m.pool.stats().reserved == 2 * (64 << 10)
    release = rt.backend.hold(sx._native)  # unrelated GPU work that a free waits for
    timer = threading.Timer(3.0, release)
    timer.start()
    try:
        big = pattern(4 * MiB, 6)
        d_big = dev.empty(big.nbytes)
        op_big = sy.copy(d_big, big)  # needs a 1 MiB block: evicts the 64 KiB ones
        await eventually(lambda: budget_1m.pool.stats().evictions > 0, within=2.0)
        t0 = time.perf_counter()
        op_small = sz.copy(d_small, small)
        call_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await anyio.sleep(0.01)
        sleep_s = time.perf_counter() - t0
        assert call_s < 1.0, f"a 64 KiB copy() call took {call_s:.2f} s on the loop"
        assert sleep_s < 1.0, f"the loop was blocked for {sleep_s:.2f} s"
        assert not op_big.done(), "the held stream should still hold the free"
    finally:
        timer.join()
    await gpuaio.wait_all([op_small, op_big])
    out = np.empty(big.nbytes, np.uint8)
    await sy.copy(out, d_big)
    np.testing.assert_array_equal(out, big)
    assert budget_1m.pool.stats().in_use == 0


def test_chunks_fit_the_budget() -> None:
    """The chunk rule itself: an eighth of the copy, at most what lets
    depth + 2 blocks fit the budget, never under the minimum chunk."""
    cfg = StagingConfig(max_chunk=64 * MiB, min_chunk=MiB, depth=4)
    assert cfg.chunk_for(512 * MiB) == 64 * MiB
    assert cfg.chunk_for(512 * MiB, 1 << 30) == 64 * MiB
    assert cfg.chunk_for(512 * MiB, 64 * MiB) == 8 * MiB  # 6 blocks of 8 MiB fit
    assert cfg.chunk_for(100 * MiB, 8 * MiB) == MiB
    assert cfg.chunk_for(8 * MiB, 8 * MiB) == MiB
    assert cfg.chunk_for(100 * MiB, 2 * MiB) == MiB  # the floor: one block at a time


@pytest.mark.gpuaio_sim_only  # holds a stream with the sim's hold (a latch defers frees on CUDA)
def test_hostfunc_completion_and_an_eviction_do_not_deadlock(
    gpuaio_runtime: Any, budget_1m: Stager
) -> None:
    """r20, with the hostfunc strategy: a held stream's small copy completes through
    a host function, whose done-callback hands its block back to the pool; meanwhile
    another stream's copy evicts cached blocks, and the driver's free waits for the
    held stream. When the host function took the pool's lock, and the eviction
    freed under it, neither could finish: the free waited for the stream, the
    stream for the host function, the host function for the lock."""
    rt = gpuaio_runtime
    before = rt.strategy
    rt.set_completion("hostfunc")
    outcome: list[object] = []

    async def scenario() -> None:
        dev = device_of(rt, 0)
        sy, sz = dev.stream(), dev.stream()
        await anyio.to_thread.run_sync(budget_1m.pool.reserve, 64 << 10, 2)
        small = pattern(64 << 10, 8)
        d_small = dev.empty(small.nbytes)
        release = rt.backend.hold(sz._native)
        op_small = sz.copy(d_small, small)  # direct: DMA and host function behind the hold
        big = pattern(4 * MiB, 9)
        d_big = dev.empty(big.nbytes)
        op_big = sy.copy(d_big, big)  # needs a 1 MiB block: evicts the 64 KiB ones
        await anyio.sleep(0.2)
        release()
        await gpuaio.wait_all([op_small, op_big])
        out = np.empty(big.nbytes, np.uint8)
        await sy.copy(out, d_big)
        np.testing.assert_array_equal(out, big)
        back = np.empty_like(small)
        await sz.copy(back, d_small)
        np.testing.assert_array_equal(back, small)
        sy.close()
        sz.close()

    def run() -> None:  # its own loop: a deadlock may hold a loop thread too
        try:
            anyio.run(scenario)
            outcome.append("completed")
        except BaseException as exc:
            outcome.append(exc)

    try:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(30)
        assert outcome == ["completed"], outcome or "deadlocked: nothing completed in 30 s"
    finally:
        if outcome:
            rt.set_completion(before)


def test_a_block_pinned_while_the_pool_closes_is_freed_not_leaked(gpuaio_runtime: Any) -> None:
    """``reserve`` (run on the reaper thread to prime mid-size copies) pins
    outside the pool's lock; if the pool closes meanwhile, the new block is
    given back to the driver and its bytes to the budget, and it raises."""
    from gpuaio._engine.pool import PinnedPool

    be = gpuaio_runtime.backend
    pool = PinnedPool(be, budget=8 * MiB)
    freed: list[int] = []
    real_alloc, real_free = be.host_alloc, be.host_free_async

    class Racing:
        def __getattr__(self, name: str) -> Any:
            return getattr(be, name)

        def host_alloc(self, nbytes: int) -> int:
            ptr = real_alloc(nbytes)
            pool.close()  # closes between the budget check and the pinning
            return ptr

        def host_free_async(self, ptr: int) -> None:  # the pool's blocks are idle
            freed.append(ptr)
            real_free(ptr)

    pool.backend = Racing()
    with pytest.raises(RuntimeError, match="closed"):
        pool.reserve(4 * MiB, 1)
    assert len(freed) == 1, "the block pinned during close was not freed"
    stats = pool.stats()
    assert stats.reserved == 0 and stats.in_use == 0, stats


# -- the spare stack of small blocks -------------------------------------------------


def test_small_blocks_handed_back_are_reused_without_the_lock(gpuaio_runtime: Any) -> None:
    """``release_small`` parks a smallest-class block on the spare stack and
    ``take_small`` hands that same block out again, without taking the pool's
    lock; ``stats`` counts parked blocks as free, and ``trim`` frees them."""
    from gpuaio._engine.pool import MIN_CLASS, SPARE_MAX, PinnedPool

    pool = PinnedPool(gpuaio_runtime.backend, budget=32 * MIN_CLASS)
    blocks = [pool.acquire(MIN_CLASS) for _ in range(SPARE_MAX + 2)]
    assert all(b is not None for b in blocks)
    for b in blocks:
        assert b is not None
        pool.release_small(b)
    assert len(pool._spare) == SPARE_MAX, "the spare stack outgrew its bound"

    class NoLock:  # any use of the lock fails the fast path
        def __enter__(self) -> None:
            raise AssertionError("take_small took the pool's lock with a spare block at hand")

        def __exit__(self, *exc: object) -> None:
            pass

    real_lock = pool._lock
    pool._lock = NoLock()  # type: ignore[assignment]
    try:
        again = pool.take_small()
    finally:
        pool._lock = real_lock
    assert again is blocks[SPARE_MAX - 1], "not the last block parked"
    stats = pool.stats()
    assert stats.in_use == MIN_CLASS, stats  # only the one taken back
    assert stats.hits == 1, stats
    assert not pool._spare, "stats() did not fold the spare stack into the cache"
    pool.release_small(again)
    assert pool.trim() == len(blocks) * MIN_CLASS, "parked blocks were not freed"
    stats = pool.stats()
    assert stats.reserved == 0 and stats.in_use == 0, stats
    last = pool.acquire(MIN_CLASS)
    assert last is not None
    pool.close()
    pool.release_small(last)  # a copy ending after the close: not parked for the next
    assert pool.take_small() is None, "a closed pool handed out a block"


def test_parked_small_blocks_make_room_for_a_larger_one(gpuaio_runtime: Any) -> None:
    """Under a budget that small blocks fill, parked ones are evicted for a
    larger block as idle cached ones are: none may hold the budget hostage."""
    from gpuaio._engine.pool import MIN_CLASS, PinnedPool

    pool = PinnedPool(gpuaio_runtime.backend, budget=4 * MIN_CLASS)
    blocks = [pool.acquire(MIN_CLASS) for _ in range(4)]
    for b in blocks:
        assert b is not None
        pool.release_small(b)
    big = pool.acquire(4 * MIN_CLASS, wait=False)
    assert big is not None, "the parked blocks kept the budget from a larger block"
    assert big.size == 4 * MIN_CLASS
    stats = pool.stats()
    assert stats.evictions == 4 and stats.reserved == 4 * MIN_CLASS, stats
    pool.release(big)
    pool.close()


def test_a_waiting_acquire_gets_a_small_block_handed_back(gpuaio_runtime: Any) -> None:
    """A thread waiting in ``acquire`` for the budget gets the block another
    thread hands back with ``release_small``: the block goes to the waiter,
    not onto the spare stack out of its sight."""
    from gpuaio._engine.pool import MIN_CLASS, PinnedPool

    pool = PinnedPool(gpuaio_runtime.backend, budget=MIN_CLASS)
    block = pool.acquire(MIN_CLASS)
    assert block is not None
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(MIN_CLASS)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while not pool._cv._waiters and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.001)
    assert pool._cv._waiters, "acquire() did not wait for the budget"  # type: ignore[attr-defined]
    pool.release_small(block)
    waiter.join(10)
    assert not waiter.is_alive(), "acquire() never got the block back"
    assert got == [block]
    assert not pool._spare
    pool.release(block)
    pool.close()


def test_small_blocks_are_never_handed_out_twice_across_threads(gpuaio_runtime: Any) -> None:
    """Threads taking and handing back small blocks at once: each block has one
    holder at a time, and every block ends up back in the cache."""
    from gpuaio._engine.pool import MIN_CLASS, PinnedPool

    pool = PinnedPool(gpuaio_runtime.backend, budget=64 * MIN_CLASS)
    pool.reserve(MIN_CLASS, 6)
    holders: dict[int, int] = {}
    errors: list[str] = []
    guard = threading.Lock()

    def worker(me: int) -> None:
        for _ in range(3000):
            b = pool.take_small()
            if b is None:
                continue
            with guard:
                if b.ptr in holders:
                    errors.append(f"block {b.ptr:#x} held by {holders[b.ptr]} and {me}")
                holders[b.ptr] = me
            with guard:
                del holders[b.ptr]
            pool.release_small(b)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    stats = pool.stats()
    assert stats.in_use == 0 and stats.reserved == 6 * MIN_CLASS, stats
    pool.close()
