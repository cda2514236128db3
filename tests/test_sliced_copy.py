"""Host copies in slices claimed front to back, and staged uploads that DMA a
chunk's slices as they are copied, in any order, while the rest of the chunk
is still being copied."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import gpuaio
from gpuaio._engine import hostwork
from gpuaio._engine.hostwork import HostPool, SlicedCopy
from tests.test_copy import pattern
from tests.test_staging import _dma_chunks, _recorded_copies

MiB = 1 << 20
STEP = hostwork.STAGE_SLICE


class Slices:
    """Wraps ``hostwork._copy_slice``: counts the slices copied and in progress,
    optionally slows each down (``delay_s``, or ``stagger_s`` more for each
    slice's place from ``base``), fails the one at ``fail_at`` (an offset
    from ``base``), holds the one that reads ``hold_src`` until ``gate`` is
    set (5 s at most; ``held_done`` says whether that slice is copied)."""

    def __init__(
        self,
        delay_s: float = 0.0,
        stagger_s: float = 0.0,
        fail_at: int | None = None,
        hold_src: int | None = None,
    ) -> None:
        self.delay_s = delay_s
        self.stagger_s = stagger_s
        self.hold_src = hold_src
        self.gate = threading.Event()
        self.held_done = False
        self.sizes: list[int] = []
        self.fail_at = fail_at
        self.base = 0
        self.done = 0
        self.running = 0
        self.started = 0
        self.lock = threading.Lock()
        self.real: Callable[..., Any] = hostwork._copy_slice

    def __call__(self, dst: int, src: int, n: int) -> Any:
        with self.lock:
            self.started += 1
            self.running += 1
            self.sizes.append(n)
        try:
            pause = self.delay_s + self.stagger_s * ((dst - self.base) // n if self.base else 0)
            if pause:
                time.sleep(pause)
            held = src == self.hold_src
            if held:
                self.gate.wait(5)
            if self.fail_at is not None and dst - self.base == self.fail_at:
                raise OSError("slice copy failed")
            result = self.real(dst, src, n)
            if held:
                self.held_done = True
            return result
        finally:
            with self.lock:
                self.running -= 1
                self.done += 1


@pytest.fixture
def slices(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Slices]:
    def make(**kw: Any) -> Slices:
        spy = Slices(**kw)
        monkeypatch.setattr(hostwork, "_copy_slice", spy)
        # The Python copy threads: the native ones (a compiled install's)
        # copy without calling back into Python.
        monkeypatch.setenv("GPUAIO_NATIVE_COPY", "0")
        return spy

    return make


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("n", [0, 1, 4095, STEP, 5 * STEP + 123])
def test_a_sliced_copy_is_byte_exact(threads: int, n: int) -> None:
    pool = HostPool(threads)
    try:
        src = pattern(max(n, 1), 7)[:n]
        dst = np.zeros(n + 64, np.uint8)  # the bytes past the end stay zero
        cp = pool.submit_copy(dst.ctypes.data, src.ctypes.data, n)
        assert cp.wait_copied(at_least=n) == n
        assert cp.copied() == n
        assert np.array_equal(dst[:n], src)
        assert not dst[n:].any(), "bytes past the copy were written"
    finally:
        pool.close()


def test_a_chunk_is_cut_into_one_slice_per_thread_of_at_least_stage_slice(
    slices: Callable[..., Slices],
) -> None:
    """Each slice is a return to Python under the GIL: a chunk is cut into one
    slice per thread, never smaller than ``STAGE_SLICE``; byte-exact."""
    for threads, n, want in [
        (3, 12 * STEP, [4 * STEP] * 3),
        (3, 2 * STEP, [STEP, STEP]),
        (3, STEP // 2, [STEP // 2]),
        (4, 10 * STEP + 4096, None),  # 4 KiB-aligned quarters, the rest last
    ]:
        if want is None:
            step = (-(-n // 4) + 4095) & ~4095
            want = [step] * 3 + [n - 3 * step]
        spy = slices()
        pool = HostPool(threads)
        try:
            src = pattern(n, 8)
            dst = np.zeros(n, np.uint8)
            pool.submit_copy(dst.ctypes.data, src.ctypes.data, n).wait_copied(at_least=n)
            assert sorted(spy.sizes, reverse=True) == sorted(want, reverse=True), (threads, n)
            assert np.array_equal(dst, src)
        finally:
            pool.close()


def test_on_few_cores_a_large_slice_yields_the_cpu_between_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With few cores, a copy thread gives the CPU up every 4 MiB of a slice,
    so a waking event loop need not wait for its time slice; byte-exact."""
    yields: list[int] = []
    monkeypatch.setattr(hostwork, "_FEW_CORES", True)
    monkeypatch.setattr(hostwork.os, "sched_yield", lambda: yields.append(1))
    n = 10 * MiB + 5
    src = pattern(n, 9)
    dst = np.zeros(n, np.uint8)
    hostwork._copy_slice(dst.ctypes.data, src.ctypes.data, n)
    assert np.array_equal(dst, src)
    assert len(yields) == 3, "one yield after each 4 MiB piece"
    monkeypatch.setattr(hostwork, "_FEW_CORES", False)
    hostwork._copy_slice(dst.ctypes.data, src.ctypes.data, n)
    assert len(yields) == 3, "yielded with cores to spare"


def test_wait_copied_returns_a_copied_front_while_the_back_is_copied(
    slices: Callable[..., Slices],
) -> None:
    """The front is handed out as soon as it is copied: slices that take longer
    the further back they are, on four threads, and the first comes back
    while the others are still being copied."""
    spy = slices(stagger_s=0.02)
    pool = HostPool(4)
    try:
        n = 4 * STEP
        src = pattern(n, 3)
        dst = np.zeros(n, np.uint8)
        spy.base = dst.ctypes.data
        cp = pool.submit_copy(dst.ctypes.data, src.ctypes.data, n)
        front = cp.wait_copied(0, 1)
        done_then = spy.done
        assert STEP <= front < n
        assert done_then < 4, "the front came only with the whole copy"
        assert np.array_equal(dst[:front], src[:front]), "the front was not copied yet"
        more = cp.wait_copied(front)
        assert front < more <= n
        assert cp.wait_copied(more, n) == n
        assert np.array_equal(dst, src)
    finally:
        pool.close()


def test_take_copied_hands_out_slices_as_they_complete_in_any_order(
    slices: Callable[..., Slices],
) -> None:
    """A first slice that is still being copied holds none of the others back:
    they come out of ``take_copied`` first, adjacent ones merged, then the
    first; every byte once, byte-exact."""
    pool = HostPool(4)
    try:
        n = 4 * STEP
        src = pattern(n, 11)
        dst = np.zeros(n, np.uint8)
        spy = slices(hold_src=src.ctypes.data)
        cp = pool.submit_copy(dst.ctypes.data, src.ctypes.data, n)
        got = cp.take_copied(3 * STEP)
        assert got == [(STEP, 3 * STEP)], got
        assert cp.copied() == 0, "the copied front grew past a slice still being copied"
        assert np.array_equal(dst[STEP:], src[STEP:])
        spy.gate.set()
        assert cp.take_copied() == [(0, STEP)]
        assert cp.take_copied() == [], "a slice was handed out twice"
        assert np.array_equal(dst, src)
    finally:
        spy.gate.set()
        pool.close()


def _one_worker_copy(
    n: int, seed: int, spy: Slices | None = None
) -> tuple[SlicedCopy, np.ndarray, np.ndarray, Any]:
    """A copy cut for four threads but run by one worker: its slices go one by
    one, front to back. ``spy``'s offsets count from the destination, set
    before the copy starts. Returns (copy, source, destination, executor)."""
    ex = ThreadPoolExecutor(1)
    src = pattern(n, seed)
    dst = np.zeros(n, np.uint8)
    if spy is not None:
        spy.base = dst.ctypes.data
    return SlicedCopy(ex, 4, dst.ctypes.data, src.ctypes.data, n), src, dst, ex


def test_take_copied_raises_a_failing_slices_error_after_the_copied_ones(
    slices: Callable[..., Slices],
) -> None:
    """One worker copies the slices in order; the second fails: the first
    comes out, then the error, and nothing after the failed slice is copied."""
    spy = slices(fail_at=STEP)
    cp, _, dst, ex = _one_worker_copy(3 * STEP, 12, spy)
    try:
        assert cp.take_copied() == [(0, STEP)]
        with pytest.raises(OSError, match="slice copy failed"):
            cp.take_copied()
        assert not dst[STEP:].any(), "bytes from the failed slice on were written"
    finally:
        ex.shutdown()


def test_a_failing_slice_raises_once_no_thread_copies(slices: Callable[..., Slices]) -> None:
    spy = slices(delay_s=0.002, fail_at=STEP)
    n = 4 * STEP
    cp, src, dst, ex = _one_worker_copy(n, 4, spy)
    try:
        with pytest.raises(OSError, match="slice copy failed"):
            cp.wait_copied(0, n)
        assert spy.running == 0, "a slice was still being copied after the error"
        time.sleep(0.05)
        assert spy.started == 2, "the copy went on after the error"
        assert cp.copied() == STEP
        assert np.array_equal(dst[:STEP], src[:STEP])
        assert not dst[STEP:].any(), "bytes from the failed slice on were written"
    finally:
        ex.shutdown()


def test_stop_returns_once_no_thread_copies_and_the_rest_stays_untouched(
    slices: Callable[..., Slices],
) -> None:
    spy = slices(delay_s=0.01)
    cp, src, dst, ex = _one_worker_copy(4 * STEP, 5)
    try:
        cp.wait_copied(0, 1)
        cp.stop()
        assert spy.running == 0
        started = spy.started
        assert started < 4
        time.sleep(0.05)
        assert spy.started == started, "a slice started after stop() returned"
        copied = [k for k in range(4) if dst[k * STEP : (k + 1) * STEP].any()]
        assert copied == list(range(started)), "a claimed slice was left half done, or lost"
        assert np.array_equal(dst[: started * STEP], src[: started * STEP])
    finally:
        ex.shutdown()


def test_stop_before_the_threads_start_cancels_the_tasks(slices: Callable[..., Slices]) -> None:
    """Tasks still queued behind other work never run after stop()."""
    slices()
    pool = HostPool(1)
    gate = threading.Event()
    try:
        blocker = pool._executor().submit(gate.wait, 10)
        n = 4 * STEP
        dst = np.zeros(n, np.uint8)
        src = pattern(n, 6)
        cp = pool.submit_copy(dst.ctypes.data, src.ctypes.data, n)
        cp.stop()  # the only thread is busy: the copy's task is still queued
        gate.set()
        blocker.result()
        time.sleep(0.02)
        assert not dst.any()
    finally:
        gate.set()
        pool.close()


@contextlib.contextmanager
def _on_dma(be: Any, hook: Callable[[], None]) -> Iterator[None]:
    """Call ``hook`` before each ``memcpy_async`` on ``be`` within the block."""
    spied = be.memcpy_async

    def dma(*a: Any) -> None:
        hook()
        spied(*a)

    be.memcpy_async = dma
    try:
        yield
    finally:
        be.memcpy_async = spied


@pytest.fixture
def one_worker(gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The runtime's copies cut for four threads but run by one worker: a
    chunk's slices are copied one by one, front to back, on any machine."""
    host = HostPool(4)
    host._pool = ThreadPoolExecutor(1, thread_name_prefix="gpuaio-host")
    monkeypatch.setattr(gpuaio_runtime, "host", host)
    yield host
    host.close()


def _chunk_slices(staged_only: Any, n: int, threads: int) -> tuple[int, int]:
    """The chunk of an ``n``-byte transfer, and how many slices it is cut into."""
    chunk = staged_only.chunk_for(n)
    step = max(STEP, -(-chunk // threads))
    return chunk, -(-chunk // step)


@pytest.mark.anyio
async def test_a_staged_upload_dmas_a_chunks_front_before_its_back_is_copied(
    gpuaio_runtime: Any,
    dev: gpuaio.Device,
    staged_only: Any,
    slices: Callable[..., Slices],
    one_worker: HostPool,
) -> None:
    """The DMA trails the host copy within a chunk: the first DMA of a 64 MiB
    upload is enqueued before its first chunk is wholly copied, each chunk
    still reads one block, and the data arrive byte-exact."""
    s = dev.stream()
    n = 64 * MiB
    chunk, first = _chunk_slices(staged_only, n, one_worker.threads)
    assert first > 1
    d = dev.empty(n)
    await s.copy(d, pattern(n, 1))  # blocks cached
    spy = slices(delay_s=0.002)
    be = gpuaio_runtime.backend
    done_at_dma: list[int] = []
    src = pattern(n, 2)
    with _recorded_copies(be) as calls, _on_dma(be, lambda: done_at_dma.append(spy.done)):
        await s.copy(d, src)
    assert _dma_chunks(calls, d.ptr, n, chunk) == [chunk] * (n // chunk)
    assert len(calls) > n // chunk, "each chunk went in one DMA, after its whole copy"
    assert done_at_dma[0] < first, (
        f"the first DMA came after {done_at_dma[0]} of the first chunk's {first} slices"
    )
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    assert np.array_equal(out, src)
    await s.aclose()


@pytest.mark.anyio
async def test_a_slice_still_being_copied_holds_back_no_other_slices_dma(
    gpuaio_runtime: Any,
    dev: gpuaio.Device,
    staged_only: Any,
    slices: Callable[..., Slices],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On four copy threads, the first slice of a 64 MiB upload is held until a
    DMA comes: the other slices of its chunk are DMAed while it is still
    being copied (before, a chunk's DMAs waited for its copied front, so the
    first DMA came only once the held slice was released after 5 s); every
    byte arrives once, byte-exact."""
    host = HostPool(4)
    monkeypatch.setattr(gpuaio_runtime, "host", host)
    try:
        s = dev.stream()
        n = 64 * MiB
        chunk = staged_only.chunk_for(n)
        d = dev.empty(n)
        await s.copy(d, pattern(n, 1))  # blocks cached
        src = pattern(n, 2)
        spy = slices(hold_src=src.ctypes.data)
        be = gpuaio_runtime.backend
        held_at_dma: list[bool] = []

        def at_dma() -> None:
            held_at_dma.append(not spy.held_done)
            spy.gate.set()

        try:
            with _recorded_copies(be) as calls, _on_dma(be, at_dma):
                await s.copy(d, src)
        finally:
            spy.gate.set()
        assert held_at_dma[0], "the first DMA came only once the first slice was copied"
        assert calls[0][0] != d.ptr, "the first DMA was of the held slice"
        assert _dma_chunks(calls, d.ptr, n, chunk) == [chunk] * (n // chunk)
        out = np.zeros(n, np.uint8)
        await s.copy(out, d)
        assert np.array_equal(out, src)
        await s.aclose()
    finally:
        host.close()


@pytest.mark.anyio
async def test_a_failed_dma_after_a_chunks_front_frees_its_block_only_after_the_front_ran(
    gpuaio_runtime: Any,
    dev: gpuaio.Device,
    staged_only: Any,
    monkeypatch: pytest.MonkeyPatch,
    slices: Callable[..., Slices],
    one_worker: HostPool,
) -> None:
    """The second DMA of a chunk fails after its front was enqueued: the copy
    fails with the driver's error, the block goes back only after a drain of
    the stream (the front's DMA may still read it), no block stays in use, and
    the stream goes on byte-exact."""
    from gpuaio._core.errors import CudaError

    s = dev.stream()
    n = 64 * MiB
    chunk, _ = _chunk_slices(staged_only, n, one_worker.threads)
    d = dev.empty(n)
    await s.copy(d, pattern(n, 1))  # blocks cached
    be = gpuaio_runtime.backend
    pool = staged_only.pool
    real_dma, real_sync = be.memcpy_async, be.stream_synchronize
    seen: list[str] = []
    sizes: list[int] = []

    def dma(*a: Any) -> None:
        seen.append("dma")
        sizes.append(a[2])
        if len(seen) == 2:
            raise CudaError("cuMemcpyAsync", 1, "CUDA_ERROR_INVALID_VALUE", "injected")
        real_dma(*a)

    def sync(native: Any) -> None:
        seen.append("drain")
        real_sync(native)

    slices(delay_s=0.002)  # the front is DMAed well before the chunk is copied
    monkeypatch.setattr(be, "memcpy_async", dma)
    monkeypatch.setattr(be, "stream_synchronize", sync)
    with pytest.raises(CudaError, match="injected"):
        await s.copy(d, pattern(n, 2))
    monkeypatch.undo()
    assert sizes[0] < chunk, "the first DMA was a whole chunk"
    assert seen[:3] == ["dma", "dma", "drain"], seen
    assert pool.stats().in_use == 0, "a block stayed in use after the failed copy"
    src = pattern(n, 3)
    await s.copy(d, src)
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    assert np.array_equal(out, src)
    await s.aclose()
