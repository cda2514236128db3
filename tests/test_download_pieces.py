"""Small downloads DMAed in two pieces, the first copied out while the second runs.

From ``Stager.down_piece_min`` bytes (``GPUAIO_DOWN_PIECE_MIN``), a download
into pageable memory that issues its DMA early (``gpuaio._engine.early``)
enqueues two DMAs with an op of its own between them, whose completion step
copies the first piece out of the pinned block (``lent.FirstPiece``). These
tests check that the first piece does land while the second is still in
DMA, that the bytes and stream order are right, and that a download failing
between its two DMAs raises, writes nothing and leaks nothing. The early
path's other tests (``test_early_download.py``) run the two-piece sizes
too: cancellation, a destination registered after the DMA, stream order.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio import CudaError
from gpuaio._engine import early
from tests.test_early_download import _loaded, _settled, _small_or_skip, _until_early
from tests.test_staging import _recorded_copies

pytestmark = pytest.mark.anyio

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
def least(gpuaio_runtime: Any) -> int:
    """The size from which early downloads go in two pieces (skips where none do)."""
    stager = gpuaio_runtime.stager
    least: int = stager.down_piece_min
    if not least:
        pytest.skip("no download goes in pieces under these settings (GPUAIO_DOWN_PIECE_MIN)")
    _small_or_skip(gpuaio_runtime, least)
    return least


@pytest.mark.gpuaio_sim_only  # a real DMA is over before a test could look
@pytest.mark.gpuaio_sim_config(dma_gbps=0.002)  # 512 KiB: about 0.26 s
async def test_the_first_piece_is_copied_out_while_the_second_is_in_dma(
    dev: gpuaio.Device, gpuaio_runtime: Any, least: int
) -> None:
    """Watched from the loop, unawaited: the destination holds the first piece
    and nothing of the second for a while (the second's DMA takes 0.13 s),
    then all of it once the op is done."""
    n = least
    s = dev.stream()
    d, want, out = await _loaded(s, dev, n, 41)
    backend = gpuaio_runtime.backend

    async def attempt() -> bool:
        out[:] = 0
        before = early.pieced
        with _recorded_copies(backend) as calls:
            op = s.copy(out, d)
        if early.pieced == before:  # the usual path (no cached block yet)
            await op
            return False
        first = calls[0][2]
        assert 0 < first < n
        halfway = False
        with anyio.fail_after(30):
            while not op.done():
                if (out[:first] == want[:first]).all() and not out[first:].any():
                    halfway = True
                await anyio.sleep(0.002)
            await op
        np.testing.assert_array_equal(out, want)
        assert halfway, "the first piece was never copied out before the second's"
        return True

    await _until_early(attempt, tries=10)
    await _settled(gpuaio_runtime.stager.pool)


@pytest.mark.parametrize("size", ["least", "inline_max", "odd"])
async def test_pieced_downloads_are_byte_exact(
    dev: gpuaio.Device, gpuaio_runtime: Any, least: int, size: str
) -> None:
    """At the least size, the largest small one, and one that is no whole
    number of pages: the two DMAs cover the source back to back, into the
    block back to back, and the array gets every byte."""
    inline_max = gpuaio_runtime.stager.config.inline_max
    n = {"least": least, "inline_max": inline_max, "odd": (least + inline_max) // 2 + 13}[size]
    _small_or_skip(gpuaio_runtime, n)
    s = dev.stream()
    d, want, out = await _loaded(s, dev, n, 43)

    async def attempt() -> bool:
        out[:] = 0
        before = early.pieced
        with _recorded_copies(gpuaio_runtime.backend) as calls:
            op = s.copy(out, d)
            await op
        np.testing.assert_array_equal(out, want)
        if early.pieced == before:
            return False
        first = calls[0][2]
        assert [(src - d.ptr, k) for _, src, k in calls] == [(0, first), (first, n - first)]
        assert calls[1][0] == calls[0][0] + first, "the pieces are not back to back in the block"
        assert first % 4096 == 0
        return True

    await _until_early(attempt)
    await _settled(gpuaio_runtime.stager.pool)


async def test_below_the_least_size_or_switched_off_a_download_goes_in_one_dma(
    dev: gpuaio.Device, gpuaio_runtime: Any, least: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = dev.stream()
    for n, off in ((least - 4096, False), (least, True)):
        d, want, out = await _loaded(s, dev, n, 47)
        if off:
            monkeypatch.setattr(gpuaio_runtime.stager, "down_piece_min", 0)

        async def attempt(d: Any = d, want: Any = want, out: Any = out, n: int = n) -> bool:
            before, pieced = early.issued, early.pieced
            with _recorded_copies(gpuaio_runtime.backend) as calls:
                await s.copy(out, d)
            np.testing.assert_array_equal(out, want)
            assert early.pieced == pieced
            assert [k for _, _, k in calls] == [n]
            return early.issued > before

        await _until_early(attempt)


@pytest.mark.parametrize("fail", ["second DMA", "marker between"])
async def test_a_download_failing_between_its_pieces_writes_nothing_and_leaks_nothing(
    dev: gpuaio.Device,
    gpuaio_runtime: Any,
    least: int,
    monkeypatch: pytest.MonkeyPatch,
    fail: str,
) -> None:
    """The second DMA's call, or the record of the first piece's marker,
    fails: the call raises it, the array keeps its bytes, and the block and
    the source come back once the first DMA has run; the stream goes on."""
    n = least
    s = dev.stream()
    d, want, out = await _loaded(s, dev, n, 53)
    backend = gpuaio_runtime.backend
    injected = CudaError("cuMemcpyAsync", 1, "CUDA_ERROR_INVALID_VALUE", "injected")
    armed: list[BaseException] = []
    real_record = backend.event_record

    def record(event: Any, stream: Any) -> None:
        if armed:
            raise armed.pop()
        real_record(event, stream)

    monkeypatch.setattr(backend, "event_record", record)

    def check(dst: int, src: int, k: int) -> None:
        if src == d.ptr and k < n and fail == "marker between":
            armed.append(injected)  # the piece op's marker, recorded next
        if src != d.ptr and src < d.ptr + n and fail == "second DMA":
            raise injected

    async def attempt() -> bool:
        out[:] = 0x5A
        before = early.pieced
        with _recorded_copies(backend, check) as calls:
            try:
                op = s.copy(out, d)
            except CudaError as e:
                caught = e
            else:
                await op  # the usual path: no pieces
                np.testing.assert_array_equal(out, want)
                return False
        assert caught is injected
        armed.clear()
        assert early.pieced == before
        assert calls[0][2] < n
        return True

    await _until_early(attempt)
    # Behind it on the stream, and every byte of a later download right.
    await s.copy(np.zeros(4, np.uint8), dev.empty(4))
    await _settled(gpuaio_runtime.stager.pool)
    assert (out == 0x5A).all(), "the failed download wrote the caller's array"
    again = np.zeros(n, np.uint8)
    await s.copy(again, d)
    np.testing.assert_array_equal(again, want)
    d.free()  # freed once nothing holds it: the failed download let it go
    deadline = time.monotonic() + 10.0
    while not d._alloc._freed:
        assert time.monotonic() < deadline, "the source's allocation is still held"
        await anyio.sleep(0.005)
