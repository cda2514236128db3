"""Small downloads into pageable memory whose DMA is issued before the
destination is checked (``gpuaio._engine.early``).

The DMA fills a pinned block only; the caller's array is written by the
op's completion step. These tests check that a download into an array
``describe`` already knows issues its DMA first, that every other download
takes the usual path, that a destination failing its checks raises before
any DMA, that one changed after the DMA was issued raises as before, writes
nothing and leaks nothing, and that
stream order holds across uploads, downloads and host steps with none
awaited in between.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._engine import early
from tests.test_copy import pattern
from tests.test_staging import _recorded_copies

pytestmark = pytest.mark.anyio

KiB = 1 << 10
MiB = 1 << 20


async def _until_early(attempt: Callable[[], Awaitable[bool]], tries: int = 50) -> None:
    """Run ``attempt`` until it says its download took the early path. One
    may take the usual path for a while: while a growing pool has no block of
    its class cached, while the stream's host thread or marker is busy, and
    after a pinned allocation, which makes ``describe`` ask the driver again."""
    for _ in range(tries):
        if await attempt():
            return
    raise AssertionError(f"no download took the early path in {tries} tries")


def _small_or_skip(runtime: Any, n: int) -> None:
    """Skip the test unless an ``n``-byte download takes the small path here:
    no larger than ``inline_max`` and not gated (CI's compiled session reruns
    these files with gated copies from 512 KiB)."""
    stager = runtime.stager
    gated = stager.gated
    if n > stager.config.inline_max or (gated is not None and gated.covers(n, False)):
        pytest.skip(f"a {n}-byte download is no small copy under these settings")


async def _settled(pool: Any) -> None:
    """Wait (up to 10 s) until no pinned block is in use (``stats()`` counts
    the spare stack's as free): every block came back."""
    deadline = time.monotonic() + 10.0
    while (in_use := pool.stats().in_use) != 0:
        assert time.monotonic() < deadline, f"{in_use} pinned bytes still in use: a block leaked"
        await anyio.sleep(0.005)


async def _loaded(s: gpuaio.Stream, dev: gpuaio.Device, n: int, seed: int) -> tuple[Any, Any, Any]:
    """A device array holding ``pattern(n, seed)``, the pattern, and a zeroed
    array to download it into."""
    d = dev.empty(n)
    want = pattern(n, seed)
    await s.copy(d, want)
    return d, want, np.zeros(n, np.uint8)


@pytest.mark.parametrize("n", [4 * KiB, 64 * KiB + 8, MiB])
async def test_a_download_into_a_known_array_issues_its_dma_first(
    dev: gpuaio.Device, gpuaio_runtime: Any, n: int
) -> None:
    """Into an array copied into before, the DMA is issued by the early path
    (into a pinned block, not the array), and the bytes are the source's."""
    _small_or_skip(gpuaio_runtime, n)
    stager = gpuaio_runtime.stager
    s = dev.stream()
    d = dev.empty(n)
    want = pattern(n, 7)
    await s.copy(d, want)
    out = np.zeros(n, np.uint8)

    async def attempt() -> bool:
        out[:] = 0
        before = early.issued
        with _recorded_copies(gpuaio_runtime.backend) as calls:
            op = s.copy(out, d)
            took = early.issued - before
            await op
        np.testing.assert_array_equal(out, want)
        # Early, from down_piece_min bytes in two DMAs, back to back in the source and the block.
        pieces = 2 if took and stager.down_piece_min and n >= stager.down_piece_min else 1
        assert len(calls) == pieces, calls
        assert sum(k for _, _, k in calls) == n
        assert [src for _, src, _ in calls] == [d.ptr + k for k in (0, calls[0][2])][:pieces]
        assert [dst for dst, _, _ in calls] == [calls[0][0] + k for k in (0, calls[0][2])][:pieces]
        assert calls[0][0] != out.ctypes.data, "the DMA wrote the caller's array itself"
        return took == 1

    await _until_early(attempt)


async def test_a_class_lent_larger_blocks_grows_and_its_downloads_go_early(
    dev: gpuaio.Device, gpuaio_runtime: Any
) -> None:
    """Only a larger class's block is cached (a 256 KiB copy's) when 64 KiB + 8
    byte copies start: the usual path lends it to them, and their own class
    (128 KiB) grows all the same, so their downloads take the early path,
    which uses their class's blocks only. (Before, the class never grew: on
    CUDA, where one runtime serves the session, this file's early test at
    64 KiB + 8 bytes failed after another file's 256 KiB copies.)"""
    stager = gpuaio_runtime.stager
    n, big = 64 * KiB + 8, 256 * KiB
    gated = stager.gated
    if big > stager.config.inline_max or (gated is not None and gated.covers(big, False)):
        pytest.skip("256 KiB copies are no small copies under these settings")
    s = dev.stream()
    d_big = dev.empty(big)
    await s.copy(d_big, pattern(big, 1))
    out_big = np.zeros(big, np.uint8)
    for _ in range(3):  # the 256 KiB class's block is pinned and cached
        await s.copy(out_big, d_big)
    d, want, out = await _loaded(s, dev, n, 2)

    async def attempt() -> bool:
        out[:] = 0
        before = early.issued
        op = s.copy(out, d)
        took = early.issued == before + 1
        await op
        np.testing.assert_array_equal(out, want)
        if not took:
            await anyio.sleep(0.01)  # the reaper pins the class's block meanwhile
        return took

    await _until_early(attempt)


async def test_other_downloads_take_the_usual_path(dev: gpuaio.Device) -> None:
    """Not early: into a pinned array, with a progress callback, larger than
    the small copies, and into a view that is not writable (rejected as
    before, nothing issued). (An array never copied into may still be
    early: a new array can take the address of a freed one ``describe``
    found pageable, and pageable it is.)"""
    s = dev.stream()
    n = 4 * KiB
    d = dev.empty(2 * MiB)
    await s.copy(d, pattern(2 * MiB, 8))
    before = early.issued
    pinned = gpuaio.pinned_empty(n)
    await s.copy(pinned, d[:n])
    await s.copy(pinned, d[:n])
    out = np.zeros(n, np.uint8)
    seen: list[tuple[int, int]] = []
    await s.copy(out, d[:n], progress=lambda done, total: seen.append((done, total)))
    await s.copy(out, d[:n], progress=lambda done, total: seen.append((done, total)))
    big = np.zeros(2 * MiB, np.uint8)
    await s.copy(big, d)
    await s.copy(big, d)
    frozen = out.view()
    frozen.flags.writeable = False
    with pytest.raises(gpuaio.InvalidArgumentError, match="read-only"):
        s.copy(frozen, d[:n])
    assert early.issued == before
    assert seen[-1] == (n, n)


@pytest.mark.parametrize("view", ["dtype", "size"], ids=["another-dtype", "a-smaller-array"])
async def test_a_destination_failing_its_checks_raises_and_enqueues_nothing(
    dev: gpuaio.Device, gpuaio_runtime: Any, view: str
) -> None:
    """A view of a known array with another dtype, or a part of it: the call
    raises the mismatch before any DMA (a call rejected for its arguments
    enqueues nothing, as ``tests/test_bad_input.py`` asks of every call), and
    the array keeps its bytes. The same source into the whole array takes
    the early path meanwhile: the early path was open to the bad call too."""
    s = dev.stream()
    n = 4 * KiB
    d = dev.empty(n // 4, np.float32)
    await s.copy(d, pattern(n, 9).view(np.float32))
    out = np.zeros(n, np.uint8)
    out[:] = 0x5A
    # 2-byte items (neither side a byte buffer), or the same dtype, half the size.
    bad = out.view(np.uint16) if view == "dtype" else out.view(np.float32)[: n // 8]
    good = np.zeros(n // 4, np.float32)

    async def attempt() -> bool:
        before = early.issued
        mismatch = pytest.raises(
            gpuaio.InvalidArgumentError,
            match="dtype mismatch" if view == "dtype" else "size mismatch",
        )
        with _recorded_copies(gpuaio_runtime.backend) as calls, mismatch:
            s.copy(bad, d)
        assert calls == [], "a rejected call enqueued a copy"
        assert early.issued == before
        await s.copy(good, d)
        return early.issued == before + 1

    await _until_early(attempt)
    assert (out == 0x5A).all(), "the rejected download wrote the caller's array"
    assert good.tobytes() == pattern(n, 9).tobytes()


@pytest.mark.patches_compiled
@pytest.mark.parametrize("n", [4 * KiB, MiB])  # 1 MiB: in two pieces (test_download_pieces)
async def test_a_destination_registered_after_the_early_dma_leaks_nothing(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """Another thread registers the array between the early path's look at it
    and ``describe``'s (stood in for here by ``describe`` raising once the DMA
    is issued): the call raises, the array keeps its bytes, and the block and
    the source come back once the DMA has run, as an op nobody awaits."""
    from gpuaio._api import transfers

    _small_or_skip(gpuaio_runtime, n)
    s = dev.stream()
    d = dev.empty(n)
    await s.copy(d, pattern(n, 3))
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)  # known since
    out[:] = 0x5A
    real = transfers.describe

    def changed(obj: Any, rt: Any, name: str = "the buffer") -> Any:
        if obj is out:
            raise gpuaio.InvalidArgumentError("registered meanwhile")
        return real(obj, rt, name)

    async def attempt() -> bool:
        before = early.issued
        with monkeypatch.context() as m:
            m.setattr(transfers, "describe", changed)
            with pytest.raises(gpuaio.InvalidArgumentError, match="registered meanwhile"):
                s.copy(out, d)
        took = early.issued == before + 1
        # A download that succeeds: the pool has blocks of the class after it.
        await s.copy(np.zeros(n, np.uint8), d)
        return took

    await _until_early(attempt)
    await s.copy(np.zeros(n, np.uint8), dev.empty(n))  # behind it on the stream
    await _settled(gpuaio_runtime.stager.pool)
    assert (out == 0x5A).all(), "the failed download wrote the caller's array"
    d.free()  # freed once no op holds it: the failed one released it
    deadline = time.monotonic() + 10.0
    while not d._alloc._freed:
        assert time.monotonic() < deadline, "the source's allocation is still held"
        await anyio.sleep(0.005)


async def test_a_download_of_a_freed_source_raises_and_issues_nothing(
    dev: gpuaio.Device, gpuaio_runtime: Any
) -> None:
    s = dev.stream()
    n = 4 * KiB
    d = dev.empty(n)
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)  # known since
    d.free()
    before = early.issued
    freed = pytest.raises(gpuaio.BufferFreedError)
    with _recorded_copies(gpuaio_runtime.backend) as calls, freed:
        s.copy(out, d)
    assert early.issued == before and calls == []


@pytest.mark.parametrize("n", [16 * KiB, MiB])  # 1 MiB: in two pieces (test_download_pieces)
async def test_early_downloads_keep_stream_order_with_uploads_and_host_steps(
    dev: gpuaio.Device, gpuaio_runtime: Any, n: int
) -> None:
    """Round trips through one known host array, nothing awaited until the
    end: each download carries what the upload before it wrote, each upload
    what the download before it wrote, and a host memset after a download
    lands after its copy-out."""
    _small_or_skip(gpuaio_runtime, n)
    s = dev.stream()
    ds = [dev.empty(n) for _ in range(5)]
    srcs = [pattern(n, 20 + i) for i in range(5)]
    for d, src in zip(ds, srcs, strict=True):
        await s.copy(d, src)
    buf = np.zeros(n, np.uint8)
    out = dev.empty(n)
    back = np.zeros(n, np.uint8)

    async def attempt() -> bool:
        before = early.issued
        ops = []
        for d in ds:
            ops.append(s.copy(buf, d))  # may go early: into buf
            ops.append(s.copy(out, buf))  # must read d's bytes out of buf
            ops.append(s.copy(d, buf))
        ops.append(s.copy(buf, ds[0]))
        ops.append(s.memset(buf, 0x33))  # a host step: after the copy-out
        took = early.issued - before
        for op in ops:
            await op
        assert (buf == 0x33).all()
        await s.copy(back, out)
        np.testing.assert_array_equal(back, srcs[-1])
        for d, src in zip(ds, srcs, strict=True):
            await s.copy(back, d)
            np.testing.assert_array_equal(back, src)
        return took > 0

    await _until_early(attempt)


@pytest.mark.parametrize("n", [64 * KiB, MiB])  # 1 MiB: in two pieces (test_download_pieces)
async def test_a_cancelled_wait_for_an_early_download_still_fills_the_array(
    dev: gpuaio.Device, gpuaio_runtime: Any, n: int
) -> None:
    """Cancelling the task that awaits the download leaves the copy to
    complete: the array gets every byte and the block comes back."""
    _small_or_skip(gpuaio_runtime, n)
    s = dev.stream()
    d, want, out = await _loaded(s, dev, n, 31)

    async def attempt() -> bool:
        out[:] = 0
        before = early.issued
        op = s.copy(out, d)
        took = early.issued - before
        with anyio.CancelScope() as scope:
            scope.cancel()
            await op
        await s.copy(np.zeros(4, np.uint8), dev.empty(4))
        await op
        np.testing.assert_array_equal(out, want)
        return took == 1

    await _until_early(attempt)
    await _settled(gpuaio_runtime.stager.pool)
