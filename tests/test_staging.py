"""The pinned pool and the staging pipeline: no early reuse, abort, budget, registration."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine import hostwork, nativecopy
from gpuaio._engine.hostwork import COPY_NICE, HostPool
from gpuaio._engine.staging import Stager, StagingConfig
from gpuaio.backends._base import Backend
from tests.conftest import latch, open_latches
from tests.test_copy import pattern

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@contextlib.contextmanager
def _recorded_copies(
    be: Any, check: Callable[[int, int, int], None] | None = None
) -> Iterator[list[tuple[int, int, int]]]:
    """Every ``memcpy_async`` on ``be`` within the block, as (dst, src, bytes);
    ``check(dst, src, bytes)``, if given, runs at each call before the driver's
    (an error it raises is the call's). A gated copy's stream work goes a
    step a call meanwhile, its DMAs through ``memcpy_async`` too (a compiled
    CUDA install makes them in one C call, ``tests/test_fast_calls.py``)."""
    calls: list[tuple[int, int, int]] = []
    real = be.memcpy_async

    def spy(dst: int, src_ptr: int, nbytes: int, stream: Any) -> None:
        calls.append((dst, src_ptr, nbytes))
        if check is not None:
            check(dst, src_ptr, nbytes)
        real(dst, src_ptr, nbytes, stream)

    be.memcpy_async = spy
    be.enqueue_gated = functools.partial(Backend.enqueue_gated, be)
    try:
        yield calls
    finally:
        be.memcpy_async = real
        del be.enqueue_gated


def _dma_chunks(calls: list[tuple[int, int, int]], base: int, n: int, chunk: int) -> list[int]:
    """The bytes each ``chunk``-sized piece of an upload of ``n`` bytes to
    ``base`` was DMAed in, from the recorded DMAs (``_recorded_copies``).

    Chunks go in order; a chunk's DMAs (its slices as they are copied, in any
    order) stay within it and read one pinned block at the chunk's offsets;
    every byte is DMAed once.
    """
    chunks: list[int] = []
    delta: list[int] = []  # a chunk's source address minus its destination's
    spans: list[tuple[int, int]] = []
    for dst, src, nb in calls:
        k = (dst - base) // chunk
        assert (dst + nb - base - 1) // chunk == k, f"a DMA spans chunks {k} and {k + 1}"
        if k == len(chunks):
            chunks.append(0)
            delta.append(src - dst)
        assert k == len(chunks) - 1, f"a DMA of chunk {k} after one of chunk {len(chunks) - 1}"
        assert src - dst == delta[k], f"chunk {k} read from two places"
        chunks[k] += nb
        spans.append((dst - base, nb))
    at = 0
    for off, nb in sorted(spans):
        assert off == at, f"DMAs left bytes {at}-{off} out or moved them twice"
        at += nb
    assert at == n, f"DMAs moved {at} of {n} bytes"
    return chunks


@contextlib.contextmanager
def _recorded_queries(pool: Any) -> Iterator[list[Any]]:
    """The guard events ``pool`` queries within the block (one list per block)."""
    queried: list[Any] = []
    real = pool._fired

    def counting(events: list[Any]) -> bool:
        queried.append(events)
        return bool(real(events))

    pool._fired = counting
    try:
        yield queried
    finally:
        pool._fired = real


def _stager_with_budget(runtime: Any, budget: int) -> Iterator[Stager]:
    """Install a stager of 1 MiB chunks, depth 2 and ``budget`` for one test."""
    old = runtime.stager
    stager = Stager(runtime, StagingConfig(max_chunk=MiB, depth=2, driver_max=0), budget=budget)
    runtime.extras["stager"] = stager
    yield stager
    runtime.extras["stager"] = old
    # Freeing pinned memory waits for the GPU: a latch a failed test left
    # closed would hang it (the autouse fixture that opens latches runs later).
    open_latches()
    stager.close()


@pytest.fixture
def small_pool(gpuaio_runtime: Any) -> Iterator[Stager]:
    """A 4 MiB budget: transfers must take turns."""
    yield from _stager_with_budget(gpuaio_runtime, 4 * MiB)


@pytest.fixture
def held_pool(gpuaio_runtime: Any) -> Iterator[Stager]:
    """A 3 MiB budget: what one held 1 MiB-chunk transfer takes (two chunks in
    DMA, one copied and waiting for a DMA slot)."""
    yield from _stager_with_budget(gpuaio_runtime, 3 * MiB)


async def test_no_block_reused_while_dma_pending(held_pool: Stager, dev: gpuaio.Device) -> None:
    """A held stream keeps its staged chunks guarded; another transfer waits for them.

    The held transfer takes the whole budget, so the other one has no block of
    its own to recycle: it can only start with one of the held transfer's,
    which must not be handed out before its DMA ran. (With a block to spare,
    the other transfer cycles it and may finish first: on a slow host its own
    DMA completes before it asks for the next block. That is correct, and
    made this test fail on one H200.)"""
    n = 8 * MiB
    a_src, b_src = pattern(n, 1), pattern(n, 2)
    a_dev, b_dev = dev.empty(n), dev.empty(n)
    sa, sb = dev.stream(), dev.stream()
    release = latch(dev, sa)
    try:
        op_a = sa.copy(a_dev, a_src)
        deadline = time.perf_counter() + 10
        while held_pool.pool.stats().in_use < 3 * MiB:  # it has taken the whole budget
            assert time.perf_counter() < deadline, "the held transfer never took the budget"
            await anyio.sleep(0.005)
        op_b = sb.copy(b_dev, b_src)  # needs blocks that op_a's pending DMAs hold
        await anyio.sleep(0.05)
        assert not op_a.done() and not op_b.done(), "a block was handed out before its DMA ran"
        assert held_pool.pool.stats().reserved <= 3 * MiB
    finally:
        release()
    await gpuaio.wait_all([op_a, op_b])
    out = np.empty(n, np.uint8)
    await sa.copy(out, a_dev)
    np.testing.assert_array_equal(out, a_src)
    await sb.copy(out, b_dev)
    np.testing.assert_array_equal(out, b_src)
    stats = held_pool.pool.stats()
    assert stats.peak_reserved <= 3 * MiB
    assert stats.waits > 0, "the second transfer should have waited for a block"


async def test_poison_after_await_does_not_reach_device(
    small_pool: Stager, dev: gpuaio.Device
) -> None:
    """Overwriting the source right after the await never changes the device copy."""
    n = 6 * MiB
    s = dev.stream()
    d = dev.empty(n)
    for seed in range(3):
        src = pattern(n, seed)
        expect = src.copy()
        await s.copy(d, src)
        src[:] = 0xEE  # poison
        out = np.empty(n, np.uint8)
        await s.copy(out, d)
        np.testing.assert_array_equal(out, expect)


@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(dma_gbps=0.2)
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
async def test_abort_midway_leaves_pool_consistent(
    small_pool: Stager, dev: gpuaio.Device, direction: str
) -> None:
    n = 16 * MiB  # 16 chunks at 0.2 GB/s: ~80 ms of DMA
    s = dev.stream()
    d = dev.empty(n)
    host = pattern(n, 9)
    if direction == "d2h":
        await s.memset(d, 0x11)
        host[:] = 0
    op = s.copy(d, host) if direction == "h2d" else s.copy(host, d)
    await anyio.sleep(0.02)
    assert op.abort()
    with pytest.raises(gpuaio.OperationAbortedError, match="aborted after"):
        await op
    stats = small_pool.pool.stats()
    assert stats.in_use == 0, "no block may stay out after an abort"
    if direction == "d2h":
        written = int((host == 0x11).sum())
        assert 0 < written < n, "an aborted copy-out is partial"
    # The stream and the pool still work, byte-exact.
    await s.copy(d, host)
    out = np.empty(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, host)
    assert not op.abort(), "abort() of a finished op says so"


async def test_many_concurrent_transfers_respect_budget(
    small_pool: Stager, dev: gpuaio.Device
) -> None:
    n = 3 * MiB
    streams = [dev.stream() for _ in range(6)]
    srcs = [pattern(n, i) for i in range(6)]
    devs = [dev.empty(n) for _ in range(6)]
    await gpuaio.wait_all([s.copy(d, h) for s, d, h in zip(streams, devs, srcs, strict=True)])
    outs = [np.empty(n, np.uint8) for _ in range(6)]
    await gpuaio.wait_all([s.copy(o, d) for s, o, d in zip(streams, outs, devs, strict=True)])
    for o, h in zip(outs, srcs, strict=True):
        np.testing.assert_array_equal(o, h)
    stats = small_pool.pool.stats()
    assert stats.peak_reserved <= 4 * MiB and stats.in_use == 0


async def test_pool_trim_and_stats(small_pool: Stager, dev: gpuaio.Device) -> None:
    s = dev.stream()
    await s.copy(dev.empty(2 * MiB), np.ones(2 * MiB, np.uint8))
    stats = small_pool.pool.stats()
    assert stats.reserved > 0 and stats.misses > 0 and stats.in_use == 0
    freed = small_pool.pool.trim()
    assert freed == stats.reserved
    assert small_pool.pool.stats().reserved == 0


@pytest.fixture
def roomy_pool(gpuaio_runtime: Any) -> Iterator[Stager]:
    """A 16 MiB budget."""
    yield from _stager_with_budget(gpuaio_runtime, 16 * MiB)


async def test_reserve_pinned_then_transfers_allocate_nothing(
    roomy_pool: Stager, dev: gpuaio.Device
) -> None:
    n = 8 * MiB  # 1 MiB chunks; depth 2 + lookahead 2 = 4 blocks per transfer
    stats = await gpuaio.reserve_pinned(n, concurrent=2)
    assert isinstance(stats, gpuaio.PoolStats)
    assert stats.reserved == 8 * MiB and stats.in_use == 0 and stats.misses == 0
    again = await gpuaio.reserve_pinned(n, concurrent=2)  # idempotent
    assert again.reserved == 8 * MiB
    streams = [dev.stream(), dev.stream()]
    srcs = [pattern(n, 5), pattern(n, 6)]
    devs = [dev.empty(n), dev.empty(n)]
    await gpuaio.wait_all([s.copy(d, h) for s, d, h in zip(streams, devs, srcs, strict=True)])
    outs = [np.empty(n, np.uint8) for _ in range(2)]
    await gpuaio.wait_all([s.copy(o, d) for s, o, d in zip(streams, outs, devs, strict=True)])
    for o, h in zip(outs, srcs, strict=True):
        np.testing.assert_array_equal(o, h)
    after = roomy_pool.pool.stats()
    assert after.misses == 0, "reserved blocks should have served every chunk"
    assert after.hits > 0 and after.reserved == 8 * MiB


async def test_reserve_pinned_stops_at_budget_and_checks_input(roomy_pool: Stager) -> None:
    stats = await gpuaio.reserve_pinned(64 * MiB, concurrent=8)  # wants 32 x 1 MiB
    assert stats.reserved == 16 * MiB == stats.budget
    small = await gpuaio.reserve_pinned(4096, concurrent=3)  # budget spent: no eviction
    assert small.reserved == 16 * MiB
    for bad in (0, -1, 1.5, True):
        with pytest.raises(gpuaio.InvalidArgumentError, match="transfer_bytes"):
            await gpuaio.reserve_pinned(bad)  # type: ignore[arg-type]
    for c in (0, 2.0, False):
        with pytest.raises(gpuaio.InvalidArgumentError, match="concurrent"):
            await gpuaio.reserve_pinned(MiB, concurrent=c)  # type: ignore[arg-type]


async def test_reserve_pinned_small_transfers_use_inline_blocks(
    roomy_pool: Stager, dev: gpuaio.Device
) -> None:
    stats = await gpuaio.reserve_pinned(4096, concurrent=3)
    assert stats.reserved == 3 * 64 * 1024  # the smallest size class
    s = dev.stream()
    d = dev.empty(4096)
    host = pattern(4096, 9)
    await s.copy(d, host)
    out = np.empty(4096, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, host)
    assert roomy_pool.pool.stats().misses == 0


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
async def test_a_small_copy_after_a_large_one_pins_a_block_of_its_own_size(
    roomy_pool: Stager, dev: gpuaio.Device, direction: str
) -> None:
    """With only larger blocks cached, a small copy (its class empty, so it runs
    on the stream's thread) pins a block of its own size class for the next
    ones, which are then staged on the calling thread. It used to take a
    larger cached block: the class stayed empty, and after one large copy
    every 4-256 KiB copy went through the stream's thread, 4-13x slower."""
    from gpuaio._engine.pool import MIN_CLASS

    pool = roomy_pool.pool
    # Without the batches a miss has the reaper thread pin (tests/test_pool_growth.py):
    # this is about the block the stream's thread itself takes.
    roomy_pool.growth.missed = lambda nbytes: None  # type: ignore[method-assign]
    s = dev.stream()
    big = pattern(2 * MiB, 1)
    dbig = dev.empty(2 * MiB)
    await s.copy(dbig, big)  # caches 1 MiB chunk blocks, nothing smaller
    n = 4096
    d = dev.empty(n)
    await s.memset(d, 0x5A)
    before = pool.stats()
    srcs = [pattern(n, 10 + i) for i in range(4)]
    for i, src in enumerate(srcs):
        if direction == "h2d":
            expect = src.copy()
            if i:
                # The readback before ran on the stream's host thread, which
                # counts its job done just after the op it resolved: until
                # then the upload would go there too (a CI failure, trio).
                with anyio.fail_after(10):
                    while not (s._seq.idle and s._seq.reads_clear()):  # noqa: ASYNC110
                        await anyio.sleep(0.001)
            op = s.copy(d, src)
            if i:
                # Staged at the call, on this thread: the source is read already.
                src[:] = 0xEE
            await op
            out = np.empty(n, np.uint8)
            await s.copy(out, d)
        else:
            expect = np.full(n, 0x5A, np.uint8)
            out = np.empty(n, np.uint8)
            await s.copy(out, d)
        np.testing.assert_array_equal(out, expect)
        if i == 0:
            first = pool.stats()
            assert first.reserved == before.reserved + MIN_CLASS, (
                "the first small copy did not pin a block of its own size class"
            )
    after = pool.stats()
    assert after.misses == first.misses and after.reserved == first.reserved, (
        "later small copies should be served by the block the first one pinned"
    )
    assert after.in_use == 0
    await s.aclose()


async def test_registered_buffer_goes_direct(dev: gpuaio.Device) -> None:
    n = 4 * MiB
    arr = pattern(n, 3)
    s = dev.stream()
    d = dev.empty(n)
    stager = dev._runtime.stager
    assert stager is not None
    before = stager.pool.stats()
    async with anyio.create_task_group():
        reg = await gpuaio.register_host_async(arr)
    with reg:
        await s.copy(d, arr)
    after = stager.pool.stats()
    assert (after.hits, after.misses) == (before.hits, before.misses), "registered: no staging"
    out = np.empty(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, arr)


async def test_register_again_right_after_unregister(dev: gpuaio.Device) -> None:
    arr = np.zeros(1 << 16, np.uint8)
    for _ in range(50):
        reg = gpuaio.register_host(arr)
        assert gpuaio.memory_kind(arr) is gpuaio.MemoryKind.PINNED
        reg.unregister()


@pytest.mark.gpuaio_sim_only
def test_a_block_waited_on_keeps_its_events_until_the_wait_ends(gpuaio_runtime: Any) -> None:
    """A thread waiting (outside the pool's lock) for the oldest guarded block's
    event must not have that event destroyed under it when another thread
    reclaims the block first. On an H200 that crashed the process (segfault in
    cuEventSynchronize, test_loader's budget test)."""
    import threading

    from gpuaio._engine.pool import MIN_CLASS, PinnedPool

    rt = gpuaio_runtime
    be = rt.backend
    dev = device_of(rt, 0)
    pool = PinnedPool(be, budget=MIN_CLASS)  # room for one block
    s = dev.stream()
    release = latch(dev, s)
    block = pool.acquire(MIN_CLASS)
    assert block is not None
    ev = be.event_create(0)
    be.event_record(ev, s._native)
    pool.release(block, [ev])  # guarded by ev, which waits for the latch

    entered, synced, proceed = threading.Event(), threading.Event(), threading.Event()
    real_sync = be.event_synchronize

    def slow_to_wake(event: Any) -> None:  # the waiter is descheduled right after
        entered.set()
        real_sync(event)
        synced.set()
        proceed.wait(10)

    be.event_synchronize = slow_to_wake
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(MIN_CLASS)))
    try:
        waiter.start()
        assert entered.wait(10), "the waiter never waited for the block"
        release()
        assert synced.wait(10)
        pool.reclaim()  # another thread reclaims the block first
        assert not ev.destroyed, "the event was destroyed while a thread synchronized on it"
    finally:
        proceed.set()
        waiter.join(10)
        be.event_synchronize = real_sync
    assert got and got[0] is block
    assert ev.destroyed, "the event was never destroyed"
    pool.release(block)
    pool.close()
    s.close()


def test_a_large_request_is_not_served_from_small_cached_blocks(gpuaio_runtime: Any) -> None:
    """With room in the budget, a chunked transfer gets the chunk size it asked
    for, not a small block an earlier small transfer left in the cache: on an
    H200 a 1 GiB copy chunked into cached 1 MiB blocks ran at 6.8 GB/s instead
    of over 30 (issue 13)."""
    from gpuaio._engine.pool import PinnedPool

    pool = PinnedPool(gpuaio_runtime.backend, budget=64 * MiB)
    small = pool.acquire(MiB)
    assert small is not None
    pool.release(small)  # cached now
    big = pool.acquire(16 * MiB, min_bytes=MiB)
    try:
        assert big is not None and big.size == 16 * MiB, big
        assert pool.stats().misses == 2
    finally:
        if big is not None:
            pool.release(big)
        pool.close()


def test_a_small_cached_block_serves_a_large_request_when_nothing_fits(
    gpuaio_runtime: Any,
) -> None:
    """Under a budget with no room for the size asked for, the cached smaller
    block serves (the chunk adapts) instead of evicting and re-pinning."""
    from gpuaio._engine.pool import PinnedPool

    pool = PinnedPool(gpuaio_runtime.backend, budget=2 * MiB)
    small = pool.acquire(MiB)
    assert small is not None
    pool.release(small)
    got = pool.acquire(16 * MiB, min_bytes=MiB)
    try:
        assert got is small
        assert pool.stats().misses == 1 and pool.stats().evictions == 0
    finally:
        if got is not None:
            pool.release(got)
        pool.close()


async def test_large_staged_copy_after_small_ones_uses_its_own_chunk_size(
    gpuaio_runtime: Any, dev: gpuaio.Device
) -> None:
    """End to end: after 1 MiB copies cached 1 MiB blocks, a 64 MiB pageable copy
    still stages through blocks of its own chunk size, and its data arrive."""
    s = dev.stream()
    small = pattern(MiB, 3)
    d_small = dev.empty(MiB)
    for _ in range(3):
        await s.copy(d_small, small)
    stager = gpuaio_runtime.stager
    n = 64 * MiB
    chunk = stager.chunk_for(n)
    assert chunk > MiB
    src = pattern(n, 5)
    d = dev.empty(n)
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        await s.copy(d, src)
    dmas = _dma_chunks(calls, d.ptr, n, chunk)
    assert dmas == [chunk] * (n // chunk), f"chunks of {sorted(set(dmas))} bytes, not {chunk}"
    back = np.zeros(n, np.uint8)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    await s.aclose()


async def test_staged_copies_reuse_their_events(gpuaio_runtime: Any, dev: gpuaio.Device) -> None:
    """A staged copy takes its ring and guard events from the stager's cache: once
    warm, a transfer creates and destroys (almost) no event (each a driver call of
    4-12 us, a tenth of a chunk's time on an H200), and its data arrive."""
    s = dev.stream()
    n = 8 * MiB  # staged: above inline_max, several chunks
    src = pattern(n, 9)
    d = dev.empty(n)
    back = np.zeros(n, np.uint8)
    for _ in range(2):  # warm: blocks and events cached
        await s.copy(d, src)
        await s.copy(back, d)
    be = gpuaio_runtime.backend
    calls: list[str] = []
    real_create, real_destroy = be.event_create, be.event_destroy

    def create(*a: Any, **k: Any) -> Any:
        calls.append("create")
        return real_create(*a, **k)

    def destroy(*a: Any, **k: Any) -> Any:
        calls.append("destroy")
        return real_destroy(*a, **k)

    be.event_create, be.event_destroy = create, destroy
    try:
        src2 = pattern(n, 10)
        await s.copy(d, src2)
        back[:] = 0
        await s.copy(back, d)
    finally:
        be.event_create, be.event_destroy = real_create, real_destroy
    assert np.array_equal(back, src2)
    # Without the cache: 2 guards each way and a ring of 4 for the upload, all created and
    # destroyed. With it, a guard still held by a block the pool has not
    # reclaimed yet may need a fresh event now and then.
    assert calls.count("destroy") == 0, calls
    assert calls.count("create") <= 4, calls  # without the cache: 8, all destroyed too
    await s.aclose()


async def test_a_chunk_copied_on_the_stream_thread_overlaps_the_dma_before_it(
    gpuaio_runtime: Any, dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch, staged_only: Any
) -> None:
    """Chunks the stream's host thread copies itself (SOLO_CHUNK) go one ahead:
    copy 0, DMA 0, copy 1 (while DMA 0 runs), DMA 1. Two ahead, a transfer of
    two chunks copied both before its first DMA."""
    from gpuaio._engine import chunks, staging

    s = dev.stream()
    stager = gpuaio_runtime.stager
    n = 4 * MiB
    chunk = stager.chunk_for(n)
    assert chunk <= staging.SOLO_CHUNK and n // chunk == 2
    src = pattern(n, 12)
    d = dev.empty(n)
    await s.copy(d, src)  # warm: blocks cached
    steps: list[str] = []
    real_copy = chunks.copy_here

    def copy_here(*a: Any) -> Any:
        steps.append("copy")
        return real_copy(*a)

    be = gpuaio_runtime.backend
    real_dma = be.memcpy_async

    def dma(*a: Any) -> None:
        steps.append("dma")
        real_dma(*a)

    monkeypatch.setattr(chunks, "copy_here", copy_here)
    monkeypatch.setattr(be, "memcpy_async", dma)
    src2 = pattern(n, 13)
    await s.copy(d, src2)
    monkeypatch.undo()
    assert steps == ["copy", "dma", "copy", "dma"], steps
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    assert np.array_equal(out, src2)
    await s.aclose()


def _block_behind_fired_guard(rt: Any, budget: int) -> tuple[Any, Any, Any, Any, int]:
    """A fresh pool of ``budget``, a stream, and one block released guarded by an
    event recorded (and fired) on it: (pool, stream, block, backend, guard number)."""
    from gpuaio._engine.pool import MIN_CLASS, PinnedPool

    be = rt.backend
    pool = PinnedPool(be, budget=budget)
    s = device_of(rt, 0).stream()
    block = pool.acquire(MIN_CLASS)
    assert block is not None
    ev = be.event_create(0)
    be.event_record(ev, s._native)
    guard = pool.release(block, [ev])
    be.stream_synchronize(s._native)
    return pool, s, block, be, guard


def test_settled_frees_only_the_guard_it_names(gpuaio_runtime: Any) -> None:
    """``settled`` frees a block whose guard the caller knows fired, with no event
    query; a block guarded again since (another transfer's DMA) stays guarded."""
    from gpuaio._engine.pool import MIN_CLASS

    dev = device_of(gpuaio_runtime, 0)
    pool, s, block, be, first = _block_behind_fired_guard(gpuaio_runtime, 2 * MIN_CLASS)
    with _recorded_queries(pool) as queried:
        pool.settled([(block, first)])
    assert not queried, "settled() queried events"
    again = pool.take_cached(MIN_CLASS)
    assert again is block, "the settled block is not free"

    release = latch(dev, s)  # the block's next guard stays pending
    ev2 = be.event_create(0)
    be.event_record(ev2, s._native)
    second = pool.release(block, [ev2])
    assert second != first
    pool.settled([(block, first)])  # stale: names the first guard
    assert pool.take_cached(MIN_CLASS) is None, "a block was freed while its DMA was pending"
    release()
    be.stream_synchronize(s._native)
    pool.settled([(block, second)])
    assert pool.take_cached(MIN_CLASS) is block
    pool.release(block)
    pool.close()
    s.close()


async def test_a_finished_staged_copy_leaves_its_blocks_free(
    gpuaio_runtime: Any, dev: gpuaio.Device
) -> None:
    """Once a staged upload is awaited its blocks are free again, found by the
    next transfer with no reclaim pass (no event queried by the pool): a pass
    took 35-90 us at the start of every copy on an H200."""
    s = dev.stream()
    stager = gpuaio_runtime.stager
    pool = stager.pool
    n = 8 * MiB
    src = pattern(n, 21)
    d = dev.empty(n)
    await s.copy(d, src)  # warm: blocks allocated
    with _recorded_queries(pool) as queried:
        src2 = pattern(n, 22)
        await s.copy(d, src2)
        assert not pool._guarded, "blocks still guarded after their copy completed"
        await s.copy(d, src)
    assert not queried, f"the pool queried {len(queried)} guards"
    back = np.zeros(n, np.uint8)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    await s.aclose()


async def test_a_mid_size_copy_on_an_idle_stream_takes_the_drivers_path(
    gpuaio_runtime: Any, dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between ``inline_max`` and ``driver_max``, on a stream with no GPU work
    pending, each direction is one driver call on the stream's host thread
    (the driver pipelines its own staging, with no hand-off between threads).
    Gated copies (``GPUAIO_GATED_MAX``), when on, take such sizes first."""
    monkeypatch.setattr(gpuaio_runtime.stager, "gated", None)
    s = dev.stream()
    n = 4 * MiB
    config = gpuaio_runtime.stager.config
    assert config.inline_max < n <= config.driver_max
    src = pattern(n, 41)
    d = dev.empty(n)
    back = np.zeros(n, np.uint8)
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        await s.copy(d, src)
        await s.copy(back, d)
    assert calls == [(d.ptr, src.ctypes.data, n), (back.ctypes.data, d.ptr, n)]
    assert np.array_equal(back, src)
    await s.aclose()


async def test_a_driver_staged_upload_is_resolved_by_its_host_thread_after_its_dma(
    gpuaio_runtime: Any, dev: gpuaio.Device
) -> None:
    """The driver's pageable upload returns with its last DMA still running.
    The stream's host thread waits for that DMA and resolves the op itself:
    no marker for the watcher, or a woken loop, to find later (that round
    trip cost 130-280 us after the call on an H200, issue 13's run Z)."""
    s = dev.stream()
    n = 4 * MiB
    src = pattern(n, 43)
    d = dev.empty(n)
    be = gpuaio_runtime.backend
    seen: dict[str, Any] = {}

    def at_resolve() -> None:
        # Has the last DMA landed as the op counts as done? Read the device
        # memory through another stream, which does not wait for this one's.
        side = be.stream_create(dev.ordinal)
        landed = np.zeros(n, np.uint8)
        try:
            be.memcpy_async(landed.ctypes.data, d.ptr, n, side)
            be.stream_synchronize(side)
        finally:
            be.stream_destroy(side)
        seen["landed"] = bool(np.array_equal(landed, src))
        seen["thread"] = threading.current_thread().name

    gate = threading.Event()
    s._seq.executor.submit(gate.wait)  # the callback goes on before the copy can run
    try:
        op = s.copy(d, src)
        op._add_done_callback(at_resolve)
        gate.set()
        await op
    finally:
        gate.set()
    assert seen == {"landed": True, "thread": f"gpuaio-stream-{dev.ordinal}"}
    # Watched, the op would have a marker for the watcher or a polling loop to
    # find: the events engine's ``watch`` sets its ``_poll``, and nothing
    # clears it. Read rather than a spy on ``watch``: a compiled engine's
    # methods cannot be replaced on the instance.
    assert op._poll is None, "the upload was left to the watcher"
    back = np.zeros(n, np.uint8)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    await s.aclose()


@pytest.mark.patches_compiled
async def test_a_mid_size_copy_behind_pending_gpu_work_is_staged(
    gpuaio_runtime: Any, dev: gpuaio.Device
) -> None:
    """The driver's pageable path waits for the stream's earlier work before it
    copies a byte; behind pending work the copy is staged instead (its host copy
    overlaps that work), and stream order holds."""
    s = dev.stream()
    n = 4 * MiB
    src = pattern(n, 42)
    d = dev.empty(n)
    stager = gpuaio_runtime.stager
    staged: list[int] = []
    real_h2d = stager._h2d

    def spy(*a: Any) -> Any:
        staged.append(n)
        return real_h2d(*a)

    stager._h2d = spy
    release = latch(dev, s)
    try:
        first = s.memset(d, 0)  # pending behind the latch
        op = s.copy(d, src)
        await anyio.sleep(0.05)
        assert not first.done() and not op.done()
        release()
        await gpuaio.wait_all([first, op])
    finally:
        del stager._h2d
    assert staged == [n], "the copy behind pending work was not staged"
    back = np.zeros(n, np.uint8)
    await s.copy(back, d)
    assert np.array_equal(back, src), "the memset before the copy landed after it"
    await s.aclose()


async def test_a_larger_cached_block_keeps_the_planned_chunks(
    gpuaio_runtime: Any, dev: gpuaio.Device, staged_only: Any
) -> None:
    """A transfer that gets a larger cached block (left by a bigger copy) still
    copies in its own chunk size: one chunk filling the big block would copy
    everything before its first DMA, with no overlap (seen on an H200, where a
    16 MiB copy reported its progress once, after a 1 GiB test)."""
    s = dev.stream()
    big = 64 * MiB
    d_big = dev.empty(big)
    await s.copy(d_big, pattern(big, 51))  # leaves 32 MiB blocks cached
    n = 16 * MiB
    chunk = staged_only.chunk_for(n)
    assert chunk < 32 * MiB and n // chunk >= 2
    reports: list[int] = []
    src = pattern(n, 52)
    d = dev.empty(n)
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        await s.copy(d, src, progress=lambda done, total: reports.append(done))
    dmas = _dma_chunks(calls, d.ptr, n, chunk)
    assert dmas == [chunk] * (n // chunk), dmas
    assert reports == [chunk * (i + 1) for i in range(n // chunk)], reports
    back = np.zeros(n, np.uint8)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    await s.aclose()


def test_settled_leaves_blocks_to_a_reclaim_pass_under_way(gpuaio_runtime: Any) -> None:
    """While a reclaim pass queries guard events outside the lock, ``settled``
    retires nothing (it would hand those events on, to be reused or destroyed,
    under the pass) and does not wait for the pass: it may run on a loop."""
    from gpuaio._engine.pool import MIN_CLASS

    pool, s, block, _be, guard = _block_behind_fired_guard(gpuaio_runtime, MIN_CLASS)
    pool._reclaiming = True  # as if another thread were in reclaim()'s queries
    pool.settled([(block, guard)])
    assert pool.take_cached(MIN_CLASS) is None, "settled() retired a block under a reclaim pass"
    pool._reclaiming = False
    pool.settled([(block, guard)])
    assert pool.take_cached(MIN_CLASS) is block
    pool.release(block)
    pool.close()
    s.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="set on Linux only")
def test_copy_threads_run_at_a_lower_cpu_priority_than_the_loop() -> None:
    """A loop thread that wakes while every core copies must get a core at
    once: the copy threads run ``COPY_NICE`` nice levels below the caller's
    threads; the copy itself is byte-exact."""
    if "GPUAIO_HOST_NICE" not in os.environ:
        assert COPY_NICE > 0, "copy threads run at the loop's priority by default"
    pool = HostPool(threads=3)
    try:
        me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        together = threading.Barrier(3, timeout=10)

        def nice_of_this_thread() -> tuple[int, int]:
            together.wait()  # three threads at once: each of the pool's
            tid = threading.get_native_id()
            return tid, os.getpriority(os.PRIO_PROCESS, tid)

        futures = [pool._executor().submit(nice_of_this_thread) for _ in range(3)]
        seen = dict(f.result() for f in futures)
        assert len(seen) == 3
        nices = set(seen.values())
        assert nices == {min(19, me + COPY_NICE)}, f"copy threads at nice {nices}, loop at {me}"
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me
        src = pattern(8 << 20, 21)
        dst = np.zeros_like(src)
        pool.copy(dst, src)
        assert np.array_equal(dst, src)
    finally:
        pool.close()


# -- uploads staged on the calling thread in pieces (INLINE_PIECES) -----------------


@pytest.fixture
def in_pieces(gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch) -> Stager:
    """Uploads up to ``inline_max`` staged on the calling thread, in up to 4 pieces."""
    stager: Stager = gpuaio_runtime.stager
    monkeypatch.setattr(stager, "inline_pieces", 4)
    monkeypatch.setattr(stager, "direct_up_max", 0)  # small ones staged too
    monkeypatch.setattr(stager, "gated", None)
    return stager


@contextlib.contextmanager
def _piece_dmas(be: Any, d_ptr: int, src: np.ndarray) -> Iterator[list[tuple[int, int]]]:
    """Each ``memcpy_async`` into ``d_ptr``'s upload as (offset, bytes); checks at
    each that its piece of the block already holds the source's bytes and that
    the next piece does not yet (so the DMA was enqueued before that copy)."""
    import ctypes

    pieces: list[tuple[int, int]] = []
    n = src.nbytes

    def check(dst: int, src_ptr: int, nbytes: int) -> None:
        off = dst - d_ptr
        if 0 <= off < n:
            want = src[off : off + nbytes].tobytes()
            assert ctypes.string_at(src_ptr, nbytes) == want, f"piece at {off} DMAed uncopied"
            end = off + nbytes
            if end < n:
                ahead = min(nbytes, n - end)
                early = (
                    ctypes.string_at(src_ptr + nbytes, ahead) == src[end : end + ahead].tobytes()
                )
                assert not early, f"the piece after {off} was copied before this one's DMA"
            pieces.append((off, nbytes))

    with _recorded_copies(be, check):
        yield pieces


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (MiB, [256 << 10] * 4),
        (MiB - 5, [262143] * 3 + [MiB - 5 - 3 * 262143]),
        (300 << 10, [150 << 10] * 2),
        (256 << 10, [128 << 10] * 2),
        (200 << 10, [200 << 10]),  # under two pieces' minimum: one piece
    ],
)
async def test_an_inline_upload_in_pieces_dmas_each_piece_once_copied(
    in_pieces: Stager, dev: gpuaio.Device, n: int, expected: list[int]
) -> None:
    """Each piece is copied into the block, then its DMA enqueued, before the
    next piece is copied; the pieces cover the upload once, in order; the
    data is byte-exact and the block is free again afterwards."""
    s = dev.stream()
    d = dev.empty(n)
    await s.copy(d, pattern(n, 30))  # warm: a block of this size cached
    src = pattern(n, 31)
    be = in_pieces.runtime.backend
    with _piece_dmas(be, d.ptr, src) as pieces:
        await s.copy(d, src)
    assert [b for _, b in pieces] == expected, pieces
    assert [o for o, _ in pieces] == [sum(expected[:i]) for i in range(len(expected))]
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    assert in_pieces.pool.stats().in_use == 0
    await s.aclose()


async def test_an_inline_upload_goes_in_one_piece_by_default(
    gpuaio_runtime: Any, dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GPUAIO_INLINE_PIECES`` is 1 unless set: one copy, then one DMA."""
    from gpuaio._engine.stagingconfig import INLINE_PIECES

    stager = gpuaio_runtime.stager
    if "GPUAIO_INLINE_PIECES" not in os.environ:
        assert INLINE_PIECES == 1 and stager.inline_pieces == 1
    monkeypatch.setattr(stager, "inline_pieces", 1)
    monkeypatch.setattr(stager, "gated", None)
    s = dev.stream()
    n = MiB
    d = dev.empty(n)
    await s.copy(d, pattern(n, 32))
    src = pattern(n, 33)
    with _piece_dmas(gpuaio_runtime.backend, d.ptr, src) as pieces:
        await s.copy(d, src)
    assert pieces == [(0, n)]
    await s.aclose()


@pytest.mark.parametrize("fatal", [False, True])
async def test_an_upload_failing_after_some_pieces_frees_their_block_only_after_a_drain(
    in_pieces: Stager, dev: gpuaio.Device, fatal: bool
) -> None:
    """A driver call failing at the third piece fails the copy. The first two
    pieces' DMAs may still read the block, so it goes back to the pool only
    once the stream has drained (an upload meanwhile gets another block),
    unless the error was a dead device's, which runs no DMA any more: then
    the block is free at once."""
    from gpuaio._core.errors import DeviceFatalError
    from tests.test_loader import eventually

    s = dev.stream()
    n = MiB
    d = dev.empty(n)
    await s.copy(d, pattern(n, 34))
    pool = in_pieces.pool
    pool.reserve(n, 2)  # a second block at hand for the upload after the failure
    before = pool.stats().in_use
    be = in_pieces.runtime.backend
    tries = 0

    def failing(dst: int, src_ptr: int, nbytes: int) -> None:
        nonlocal tries
        tries += 1
        if tries == 3:
            if fatal:
                raise DeviceFatalError("cuMemcpyAsync", 999, "CUDA_ERROR_INJECTED")
            raise RuntimeError("injected: the third piece's DMA failed")

    release = latch(dev, s)  # the pieces' DMAs stay pending
    try:
        injected = pytest.raises((RuntimeError, DeviceFatalError), match=r"INJECTED|injected")
        with _recorded_copies(be, failing) as failed, injected:
            await s.copy(d, pattern(n, 35))
        assert len(failed) == 3
        if fatal:
            assert pool.stats().in_use == before
            return
        assert pool.stats().in_use == before + MiB, "the block went back before a drain"
        src = pattern(n, 36)
        with _recorded_copies(be) as calls:
            op = s.copy(d, src)
        block = failed[0][1]
        assert calls and all(not block <= sp < block + MiB for _, sp, _ in calls), (
            "a block whose DMAs may still run was handed out again"
        )
    finally:
        release()
    await op
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    await eventually(lambda: pool.stats().in_use == before)
    await s.aclose()


def test_the_native_threads_slice_one_per_thread_unless_told_a_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``GPUAIO_NATIVE_SLICE`` 0: one slice per copy thread, of at least 1 MiB,
    in whole pages; a size (512 KiB unless set): slices of that size (whole
    pages) whatever the copy's."""
    if "GPUAIO_NATIVE_SLICE" not in os.environ:
        assert nativecopy.NATIVE_SLICE == 512 << 10
    monkeypatch.setattr(nativecopy, "NATIVE_SLICE", 0)
    assert hostwork.native_step(32 << 20, 12) == ((32 << 20) // 12 + 4095) & ~4095
    assert hostwork.native_step(4 << 20, 12) == 1 << 20
    monkeypatch.setattr(nativecopy, "NATIVE_SLICE", 512 << 10)
    assert hostwork.native_step(32 << 20, 12) == 512 << 10
    assert hostwork.native_step(1 << 30, 3) == 512 << 10
    monkeypatch.setattr(nativecopy, "NATIVE_SLICE", 5000)
    assert hostwork.native_step(32 << 20, 12) == 8192
