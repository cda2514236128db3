"""Staged downloads whose chunks are DMAed in pieces (``gpuaio._engine.download``).

With ``Stager.d2h_pieces`` above 1 (``GPUAIO_D2H_PIECES``), each chunk of a
download staged on the stream's host thread is DMAed in pieces, an event
behind each, and the copy threads copy a piece out once its own DMA has
landed. These tests check how chunks are cut, that a piece's copy-out starts
while its chunk's later pieces are still in DMA, that every byte lands, and
that an abort or a failed DMA between two pieces leaves the pool and the
stream as they were.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio import CudaError
from gpuaio._engine import download
from gpuaio._engine.staging import Stager, StagingConfig
from tests.conftest import open_latches
from tests.test_copy import pattern
from tests.test_staging import _recorded_copies

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@pytest.mark.parametrize("pieces", [1, 2, 3, 4, 8, 64])
@pytest.mark.parametrize("unit", [MiB, 8 * MiB, 1000])
def test_a_chunk_is_cut_into_equal_pieces_of_at_least_the_minimum(pieces: int, unit: int) -> None:
    align = download.PIECE_ALIGN
    least = max(unit, align)
    sizes = (unit, 2 * unit - 1, 2 * unit, 2 * unit + 5, 3 * unit + 5, 8 * unit, 8 * unit + 12_345)
    for n in (*sizes, 64 * unit, 64 * unit + 3, 100 * MiB):
        lens = download.piece_lengths(n, pieces, unit)
        assert sum(lens) == n, (n, lens)
        assert len(lens) == max(1, min(pieces, n // least)), (n, lens)
        assert all(ln >= least for ln in lens) or lens == [n], (n, lens)
        assert all(ln == lens[0] and ln % align == 0 for ln in lens[:-1]), (n, lens)
        assert lens[-1] >= lens[0], (n, lens)


@pytest.fixture
def staged(staged_only: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """``staged(pieces)``: pageable copies staged (``staged_only``), each
    download's chunks DMAed in up to ``pieces`` pieces, for the test."""

    def set_pieces(pieces: int) -> None:
        monkeypatch.setattr(staged_only, "d2h_pieces", pieces)
        monkeypatch.setattr(staged_only, "d2h_piece_min", MiB)

    return set_pieces


@pytest.fixture
def chunky(gpuaio_runtime: Any) -> Iterator[Stager]:
    """A stager of 4 MiB chunks, depth 2, each chunk's DMA in four pieces,
    pageable copies staged: a download of many chunks, few in DMA at once."""
    old = gpuaio_runtime.stager
    stager = Stager(gpuaio_runtime, StagingConfig(max_chunk=4 * MiB, depth=2, driver_max=0))
    stager.gated = None
    stager.direct_up_max = 0
    stager.d2h_pieces = 4
    stager.d2h_piece_min = MiB
    gpuaio_runtime.extras["stager"] = stager
    yield stager
    gpuaio_runtime.extras["stager"] = old
    open_latches()  # closing the pool waits for the GPU
    stager.close()


N = 24 * MiB + 12_345
"""A download of several chunks, the last a part one, no whole number of pages."""


async def _loaded(dev: gpuaio.Device, n: int, seed: int) -> tuple[gpuaio.Stream, Any, Any]:
    """A new stream, ``n`` bytes of ``pattern(n, seed)``, and a device array
    holding them."""
    s = dev.stream()
    src = pattern(n, seed)
    d = dev.empty(n)
    await s.copy(d, src)
    return s, src, d


def _cuts(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Each chunk's pieces as the download cut them, in order."""
    cuts: list[list[int]] = []
    real = download.piece_lengths

    def spy(nbytes: int, pieces: int, least: int) -> list[int]:
        lens = real(nbytes, pieces, least)
        cuts.append(lens)
        return lens

    monkeypatch.setattr(download, "piece_lengths", spy)
    return cuts


@pytest.mark.parametrize("pieces", [1, 2, 4])
async def test_a_download_dmas_each_chunk_in_its_pieces_and_lands_every_byte(
    dev: gpuaio.Device,
    gpuaio_runtime: Any,
    staged: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
    pieces: int,
) -> None:
    """The DMAs are the chunks' pieces, in order, back to back in the source
    and, within a chunk, in its block; the destination (at an odd address)
    gets every byte."""
    staged(pieces)
    s, src, d = await _loaded(dev, N, 61)
    raw = np.zeros(N + 64, np.uint8)
    out = raw[7 : 7 + N]  # chunks sit in their blocks at the destination's offset in a line
    cuts = _cuts(monkeypatch)
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    assert not raw[:7].any() and not raw[7 + N :].any(), "a byte outside the destination"
    assert [k for _, _, k in calls] == [ln for lens in cuts for ln in lens]
    assert [src_ptr - d.ptr for _, src_ptr, _ in calls] == list(
        np.cumsum([0] + [k for _, _, k in calls])[:-1]
    )
    at = 0
    for lens in cuts:
        chunk = calls[at : at + len(lens)]
        for (dst0, _, k0), (dst1, _, _) in itertools.pairwise(chunk):
            assert dst1 == dst0 + k0, "a chunk's pieces are not back to back in its block"
        at += len(lens)
    if pieces > 1:
        assert len(calls) > len(cuts), "no chunk went in pieces"
    else:
        assert all(len(lens) == 1 for lens in cuts)


@pytest.mark.gpuaio_sim_only  # a real DMA is over before a test could look
@pytest.mark.gpuaio_sim_config(dma_gbps=0.05)  # a 1 MiB piece: about 20 ms
async def test_a_piece_is_copied_out_while_its_chunks_later_pieces_are_in_dma(
    dev: gpuaio.Device, gpuaio_runtime: Any, chunky: Stager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the start of each piece's copy-out the stream thread asks whether
    its chunk's last DMA has landed: for a first piece, not yet (the three
    pieces after it take 60 ms more)."""
    n = 8 * MiB
    s, src, d = await _loaded(dev, n, 62)
    backend = gpuaio_runtime.backend
    chunk_events: dict[int, list[Any]] = {}  # block address -> its chunk's events so far
    seen: list[tuple[int, bool]] = []  # (piece of its chunk, whether the chunk's last DMA landed)
    real_dma, real_stage = download.guarded_dma, download.stage

    def dma(*a: Any, drain: bool = False) -> Any:
        ev = real_dma(*a, drain=drain)
        block = a[5]
        if not drain:  # a chunk's first piece
            chunk_events[block.ptr] = []
        chunk_events[block.ptr].append((a[6], ev))
        return ev

    def stage(*a: Any) -> Any:
        at = a[6]
        for events in chunk_events.values():
            for i, (start, _ev) in enumerate(events):
                if start == at:
                    seen.append((i, bool(backend.event_query(events[-1][1]))))
        return real_stage(*a)

    monkeypatch.setattr(download, "guarded_dma", dma)
    monkeypatch.setattr(download, "stage", stage)
    cuts = _cuts(monkeypatch)
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    monkeypatch.undo()
    np.testing.assert_array_equal(out, src)
    assert cuts == [[MiB] * 4] * 2
    firsts = [landed for i, landed in seen if i == 0]
    assert firsts and not all(firsts), (
        f"every chunk's copy-out waited for its last DMA: {seen}, cut {cuts}"
    )


@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(dma_gbps=0.2)
async def test_an_abort_leaves_the_pool_and_stream_as_they_were(
    dev: gpuaio.Device, chunky: Stager
) -> None:
    """Aborted after its first chunk's DMA: the chunks in DMA are copied out,
    no other, and every block goes back."""
    n = 32 * MiB  # 160 ms of DMA, 4 MiB (21 ms) a chunk
    s = dev.stream()
    d = dev.empty(n)
    await s.memset(d, 0x11)
    host = np.zeros(n, np.uint8)
    pool = chunky.pool
    op = s.copy(host, d)
    await anyio.sleep(0.02)
    assert op.abort()
    with pytest.raises(gpuaio.OperationAbortedError, match="aborted after"):
        await op
    assert pool.stats().in_use == 0, "no block may stay out after an abort"
    assert int((host == 0x11).sum()) < n, "an aborted download is partial"
    assert set(np.unique(host).tolist()) <= {0, 0x11}, "a byte that is neither old nor new"
    src = pattern(n, 63)
    await s.copy(d, src)
    out = np.empty(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)


async def test_a_dma_failing_after_a_chunks_first_piece_frees_its_block_after_a_drain(
    dev: gpuaio.Device,
    gpuaio_runtime: Any,
    staged: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second piece's DMA of the second chunk fails: the download raises
    that error, every block goes back to the pool (the failed chunk's once
    the stream drained past its first piece), its events go back to the
    cache, and the next download is byte-exact."""
    staged(4)
    n = N
    s, src, d = await _loaded(dev, n, 64)
    backend = gpuaio_runtime.backend
    stager = gpuaio_runtime.stager
    cuts = _cuts(monkeypatch)
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)  # warm: the blocks cached, and the cut known
    np.testing.assert_array_equal(out, src)
    if len(cuts) < 2 or len(cuts[1]) < 2:
        pytest.skip(f"no second chunk in pieces here: {cuts}")
    nth = len(cuts[0]) + 2  # the second chunk's second piece
    drains: list[int] = []
    real_drain = download.guarded_dma

    def dma(*a: Any, drain: bool = False) -> Any:
        if drain:
            drains.append(a[8])
        return real_drain(*a, drain=drain)

    monkeypatch.setattr(download, "guarded_dma", dma)
    count = [0]

    def check(dst: int, src_ptr: int, nbytes: int) -> None:
        count[0] += 1
        if count[0] == nth:
            raise CudaError("cuMemcpyAsync", 1, "CUDA_ERROR_INVALID_VALUE", "injected")

    events_before = sum(len(v) for v in stager.events._free.values())
    out[:] = 0
    with _recorded_copies(backend, check):
        op = s.copy(out, d)
        with pytest.raises(CudaError, match="injected"):
            await op
    deadline = time.perf_counter() + 10
    while stager.pool.stats().in_use:
        assert time.perf_counter() < deadline, "a block stayed out after the failure"
        await anyio.sleep(0.005)
    assert drains, "no piece after a first one was DMAed"
    # Every event the download took came back (the failed piece's own too).
    assert sum(len(v) for v in stager.events._free.values()) >= events_before
    out[:] = 0
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)


async def test_by_default_chunks_go_in_pieces_of_8_mib_on_the_native_threads_only(
    dev: gpuaio.Device, gpuaio_runtime: Any, staged_only: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults that runs LA and LB measured: up to 8 pieces of at least
    8 MiB on the native copy threads (a 128 MiB download's 16 MiB chunks in
    halves), whole chunks on the Python ones; byte-exact either way."""
    from gpuaio._engine import stagingconfig

    env = {k: v for k, v in os.environ.items() if k.startswith("GPUAIO_D2H_PIECE")}
    if not env:
        assert stagingconfig.D2H_PIECES == 8
        assert stagingconfig.D2H_PIECE_MIN == 8 << 20
    native = gpuaio_runtime.host.native
    fresh = Stager(gpuaio_runtime)
    try:
        assert fresh.d2h_pieces == (stagingconfig.D2H_PIECES if native else 1)
        assert fresh.d2h_piece_min == stagingconfig.D2H_PIECE_MIN
    finally:
        fresh.close()
    if env:
        pytest.skip(f"the pieces are set here: {env}")
    n = 128 * MiB
    s, src, d = await _loaded(dev, n, 65)
    cuts = _cuts(monkeypatch)
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    assert cuts, "the download was not staged through chunks"
    if native:
        assert all(len(lens) == 1 or min(lens) >= 8 * MiB for lens in cuts), cuts
        assert any(len(lens) > 1 for lens in cuts), f"no chunk went in pieces: {cuts}"
    else:
        assert all(len(lens) == 1 for lens in cuts), cuts


async def test_a_failed_wait_for_a_pieces_dma_hands_its_block_back(
    dev: gpuaio.Device, gpuaio_runtime: Any, chunky: Stager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for the first chunk's last piece (which holds the chunk's
    block) fails: the download raises that error, and the block still goes
    back to the pool, as every other does; the next download is byte-exact."""
    n = 8 * MiB
    s, src, d = await _loaded(dev, n, 66)
    backend = gpuaio_runtime.backend
    events: list[Any] = []
    real_dma = download.guarded_dma

    def dma(*a: Any, drain: bool = False) -> Any:
        ev = real_dma(*a, drain=drain)
        events.append(ev)
        return ev

    real_sync = backend.event_synchronize
    injected = CudaError("cuEventSynchronize", 1, "CUDA_ERROR_INVALID_VALUE", "injected")

    def sync(ev: Any) -> None:
        if len(events) >= 4 and ev is events[3]:
            raise injected
        real_sync(ev)

    monkeypatch.setattr(download, "guarded_dma", dma)
    monkeypatch.setattr(backend, "event_synchronize", sync)
    out = np.zeros(n, np.uint8)
    with pytest.raises(CudaError, match="injected"):
        await s.copy(out, d)
    monkeypatch.undo()
    assert len(events) >= 4
    deadline = time.perf_counter() + 10
    while chunky.pool.stats().in_use:
        assert time.perf_counter() < deadline, "a block stayed out after the failed wait"
        await anyio.sleep(0.005)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize("warm_us", [100, 0])
async def test_the_copy_threads_are_warmed_once_while_the_first_piece_is_in_dma(
    dev: gpuaio.Device,
    gpuaio_runtime: Any,
    staged: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
    warm_us: int,
) -> None:
    """A download wakes the copy threads after its first DMA was enqueued and
    before its first copy-out, once, for that piece's expected DMA time plus
    ``D2H_WARM_US`` (``HostPool.warm``); with 0, never. Byte-exact either way."""
    from gpuaio._engine.stagingconfig import PCIE_BPS

    staged(4)
    monkeypatch.setattr(download, "D2H_WARM_US", warm_us)
    s, src, d = await _loaded(dev, N, 67)
    cuts = _cuts(monkeypatch)
    copy_outs = 0
    real_stage = download.stage

    def counted_stage(*args: Any, **kwargs: Any) -> Any:
        nonlocal copy_outs
        copy_outs += 1
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(download, "stage", counted_stage)
    warmed: list[tuple[float, int, int]] = []
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        # The spy answers as a pool of Python threads would (nothing to warm).
        monkeypatch.setattr(
            gpuaio_runtime.host,
            "warm",
            lambda seconds: bool(warmed.append((seconds, len(calls), copy_outs))),
        )
        out = np.zeros(N, np.uint8)
        await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    if not warm_us:
        assert warmed == []
        return
    assert len(warmed) == 1, f"warmed {len(warmed)} times"
    seconds, dmas, outs = warmed[0]
    assert dmas >= 1 and outs == 0, "not warmed between the first DMA and the first copy-out"
    assert seconds == pytest.approx(cuts[0][0] / PCIE_BPS + warm_us * 1e-6)
