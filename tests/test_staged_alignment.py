"""Where a staged copy's bytes sit in its pinned block (``gpuaio._engine.lent.staged_at``).

A copy between pageable memory and the GPU goes through a pinned block, and
the host copy between the block and the caller's memory runs faster with
both sides aligned alike within a 64-byte line: numpy puts a large array 16
bytes past a page, and on an H100 host a 1 MiB download into such an array
took a third longer from a page-aligned block (issue 13, round forty-eight,
``tools/dest_probe.py``). So the bytes sit in the block as far into a line
as the host memory they come from or go to, and the pool pins each block
``LINE`` bytes beyond its class to make room for that. These tests check
every path that stages on the calling thread or the copy threads, at sizes
that fill their block's class (where only the slack holds the shift): each
DMA's pinned side lies as far into its line as its host side, and the
bytes arrive whole (the simulator refuses a DMA that leaves its allocation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpuaio
from gpuaio._engine import early
from gpuaio._engine.gated import GatedCopies
from gpuaio._engine.pool import MIN_CLASS
from tests.test_copy import pattern
from tests.test_gated import SIZE, gated_on, late_gated  # noqa: F401 (fixtures)
from tests.test_staging import _recorded_copies

pytestmark = pytest.mark.anyio

KiB = 1 << 10
MiB = 1 << 20
LINE = 64
"""A cache line: what the host copy's two sides are aligned alike within."""
OFFSETS = (16, 40)
"""Host addresses this far past a page: numpy's usual 16, and another."""


def at_offset(n: int, off: int, fill: int = 0) -> np.ndarray:
    """A pre-touched ``n``-byte array ``off`` bytes past a page."""
    room = np.full(n + 8192, fill, np.uint8)
    start = (-room.ctypes.data) % 4096 + off
    return room[start : start + n]


def assert_aligned_like_host(
    calls: list[tuple[int, int, int]], dev_ptr: int, host_ptr: int, n: int, up: bool
) -> int:
    """Every DMA between device range ``dev_ptr`` and the block has its pinned
    side as far into its 64-byte line as the host bytes it stands for;
    returns how many DMAs there were (all ``n`` bytes covered)."""
    covered = 0
    count = 0
    for dst, src, k in calls:
        dev_side, pinned = (dst, src) if up else (src, dst)
        if not dev_ptr <= dev_side < dev_ptr + n:
            continue
        host = host_ptr + (dev_side - dev_ptr)
        assert (pinned - host) % LINE == 0, (
            f"a {k}-byte DMA staged at {pinned:#x} for host bytes at {host:#x}: "
            f"{pinned % LINE} and {host % LINE} bytes into their lines"
        )
        covered += k
        count += 1
    assert covered == n, f"the DMAs covered {covered} of {n} bytes"
    return count


def small_path(gpuaio_runtime: Any, n: int) -> None:
    """Skip where a copy of ``n`` bytes is not staged on the calling thread."""
    stager = gpuaio_runtime.stager
    gated = stager.gated
    if n > stager.config.inline_max or (gated is not None and gated.covers(n, False)):
        pytest.skip(f"a {n}-byte copy is no small copy under these settings")


@pytest.mark.parametrize("off", OFFSETS)
@pytest.mark.parametrize("n", [4 * KiB, MIN_CLASS, 256 * KiB, MiB])
async def test_small_copies_stage_their_bytes_aligned_like_the_host_memory(
    dev: gpuaio.Device, gpuaio_runtime: Any, n: int, off: int
) -> None:
    """An upload from, and downloads into, arrays ``off`` bytes past a page:
    the usual download and the early one (its DMA issued before the
    destination is described) alike."""
    small_path(gpuaio_runtime, n)
    be = gpuaio_runtime.backend
    s = dev.stream()
    d = dev.empty(n)
    want = at_offset(n, off)
    want[:] = pattern(n, off)
    with _recorded_copies(be) as calls:
        await s.copy(d, want)
    assert_aligned_like_host(calls, d.ptr, want.ctypes.data, n, up=True)
    out = at_offset(n, off, 0xA5)
    took_early = False
    for _ in range(50):  # the early path once the array is known and a block cached
        out[:] = 0
        before = early.issued
        with _recorded_copies(be) as calls:
            op = s.copy(out, d)
            took_early = early.issued == before + 1
            await op
        np.testing.assert_array_equal(out, want)
        assert_aligned_like_host(calls, d.ptr, out.ctypes.data, n, up=False)
        if took_early:
            break
    assert took_early, "no download took the early path"


async def test_an_upload_in_pieces_stages_each_piece_aligned_like_the_host_memory(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 MiB upload from an array 16 bytes past a page, in four pieces
    (``GPUAIO_INLINE_PIECES``), each DMAed as soon as it is copied."""
    n = MiB
    small_path(gpuaio_runtime, n)
    monkeypatch.setattr(gpuaio_runtime.stager, "inline_pieces", 4)
    s = dev.stream()
    d = dev.empty(n)
    src = at_offset(n, 16)
    src[:] = pattern(n, 3)
    for _ in range(50):  # in pieces once a block of its class is cached
        with _recorded_copies(gpuaio_runtime.backend) as calls:
            await s.copy(d, src)
        if assert_aligned_like_host(calls, d.ptr, src.ctypes.data, n, up=True) == 4:
            break
    else:
        raise AssertionError("no upload went in pieces")
    back = np.zeros(n, np.uint8)
    await s.copy(back, d)
    np.testing.assert_array_equal(back, src)


@pytest.mark.parametrize("off", OFFSETS)
async def test_gated_copies_stage_each_chunk_aligned_like_its_host_memory(
    late_gated: GatedCopies,  # noqa: F811 (the fixture)
    dev: gpuaio.Device,
    gpuaio_runtime: Any,
    off: int,
) -> None:
    """A gated upload and download of ``SIZE`` bytes, from and into arrays
    ``off`` bytes past a page: each chunk's block holds it as far into a line
    as its host bytes, for the copy threads' copies and the DMAs alike."""
    late_gated.prepare(dev.ordinal, SIZE)
    late_gated._pool.reserve(SIZE, 2)
    s = dev.stream()
    d = dev.empty(SIZE)
    src = at_offset(SIZE, off)
    src[:] = pattern(SIZE, off)
    back = at_offset(SIZE, off, 0xA5)
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        await s.copy(d, src)
    assert late_gated.uploads == 1
    assert_aligned_like_host(calls, d.ptr, src.ctypes.data, SIZE, up=True)
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        await s.copy(back, d)
    assert late_gated.downloads == 1
    assert_aligned_like_host(calls, d.ptr, back.ctypes.data, SIZE, up=False)
    np.testing.assert_array_equal(back, src)
