"""Small pageable uploads handed to the driver's own staging on an idle stream
(``Stager.direct_up_max``, ``GPUAIO_DIRECT_UP_MAX``; 64 KiB by default).

The simulated driver, like CUDA's, may wait for the stream's earlier work
before it stages a pageable source (``SimStreams.memcpy_async``): a direct
upload on a stream that was not idle would block the caller there, here the
event loop. These tests hold streams busy and check that the call returned
at once, that the upload took the usual path, and that every byte is what
stream order says.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import gpuaio
from gpuaio._engine import stagingconfig
from gpuaio._engine.pool import parse_size
from tests.conftest import fresh_stager, latch
from tests.test_copy import pattern
from tests.test_staging import _recorded_copies

pytestmark = pytest.mark.anyio

KiB = 1 << 10
LIMIT = 256 * KiB
HELD_S = 3.0
"""How long a busy stream stays busy: a call that waited for it took this long."""


@pytest.fixture
def direct(gpuaio_runtime: Any) -> Iterator[Any]:
    """Direct uploads on, up to ``LIMIT``; yields the stager."""
    stager = gpuaio_runtime.stager
    old = stager.direct_up_max
    stager.direct_up_max = LIMIT
    try:
        yield stager
    finally:
        stager.direct_up_max = old


def test_the_limit_is_the_setting_else_64k() -> None:
    """``GPUAIO_DIRECT_UP_MAX`` where set, else 64 KiB (issue 13, run DN)."""
    raw = os.environ.get("GPUAIO_DIRECT_UP_MAX")
    assert (parse_size(raw) if raw else 64 * KiB) == stagingconfig.DIRECT_UP_MAX


@pytest.mark.parametrize("n", [4 * KiB, LIMIT, LIMIT + 1])
async def test_an_upload_on_an_idle_stream_reads_the_source_in_the_driver_call(
    direct: Any, dev: gpuaio.Device, gpuaio_runtime: Any, n: int
) -> None:
    """Up to the limit, the driver's call reads the user's buffer itself (no
    pinned block taken); the source is the caller's again once the await
    returns. Above it, the copy is staged as before."""
    s = dev.stream()
    d = dev.empty(n)
    src = pattern(n, 3)
    want = src.copy()
    back = np.zeros(n, np.uint8)
    await s.copy(d, src)  # the stream has run something; it is idle again
    pool = direct.pool
    hits, before = pool.stats().hits, direct.direct_uploads
    with _recorded_copies(gpuaio_runtime.backend) as calls:
        await s.copy(d, src)
    taken = (direct.direct_uploads, pool.stats().hits)
    src[:] = 0
    await s.copy(back, d)
    np.testing.assert_array_equal(back, want)
    if n <= LIMIT:
        assert calls == [(d.ptr, src.ctypes.data, n)]
        assert taken == (before + 1, hits)
    else:
        assert direct.direct_uploads == before
        assert all(src_ptr != src.ctypes.data for _, src_ptr, _ in calls)


async def _staged(direct: Any, s: gpuaio.Stream, d: Any, want: Any, before: int) -> None:
    """``d`` holds ``want``, and no upload since the count ``before`` was the driver's."""
    back = np.zeros(want.nbytes, np.uint8)
    await s.copy(back, d)
    assert direct.direct_uploads == before
    np.testing.assert_array_equal(back, want)


def _hold(dev: gpuaio.Device, s: gpuaio.Stream) -> tuple[gpuaio.Stream, threading.Timer]:
    """Make ``s`` wait for another stream held busy for ``HELD_S``: ``s`` has
    no work of its own queued but a ``wait``, which the driver would wait for."""
    other = dev.stream()
    release = latch(dev, other)
    timer = threading.Timer(HELD_S, release)
    timer.start()
    s.wait(other)
    return other, timer


async def test_an_upload_behind_a_wait_for_a_busy_stream_is_staged_at_once(
    direct: Any, dev: gpuaio.Device
) -> None:
    """The stream waits for one still busy: the upload is not the driver's
    (which would have waited there with the caller), the call returns at
    once, and the bytes land after the wait."""
    s = dev.stream()
    d = dev.empty(4 * KiB)
    src = pattern(4 * KiB, 4)
    before = direct.direct_uploads
    _other, timer = _hold(dev, s)
    try:
        t0 = time.monotonic()
        up = s.copy(d, src)
        took = time.monotonic() - t0
    finally:
        timer.join()
    await up
    assert took < HELD_S / 2, f"the call waited {took:.2f} s for the busy stream"
    await _staged(direct, s, d, src, before)


async def test_an_upload_from_a_buffer_a_pending_download_fills_carries_its_bytes(
    direct: Any, dev: gpuaio.Device
) -> None:
    """A download into the upload's source is still pending (its stream
    waits for a busy one): stream order says the upload reads what the
    download wrote, so its source is not read in the call."""
    n = 4 * KiB
    s = dev.stream()
    first, second = dev.empty(n), dev.empty(n)
    want = pattern(n, 5)
    await s.copy(first, want)
    buf = np.zeros(n, np.uint8)
    before = direct.direct_uploads
    _other, timer = _hold(dev, s)
    try:
        down = s.copy(buf, first)
        up = s.copy(second, buf)
    finally:
        timer.join()
    await down
    await up
    await _staged(direct, s, second, want, before)


async def test_a_stream_another_library_may_use_is_never_direct(
    direct: Any, dev: gpuaio.Device
) -> None:
    """Once its handle is handed out, gpuaio cannot know a stream is idle:
    others may have enqueued on it. Its uploads are staged."""
    s = dev.stream()
    assert s.handle
    d = dev.empty(4 * KiB)
    src = pattern(4 * KiB, 6)
    before = direct.direct_uploads
    await s.copy(d, src)
    await _staged(direct, s, d, src, before)


async def test_uploads_and_downloads_without_awaits_between_keep_stream_order(
    direct: Any, dev: gpuaio.Device
) -> None:
    """Round trips through one host buffer, none awaited until the end: only
    an upload that finds the stream idle is the driver's, and every upload
    carries what the download before it wrote."""
    n = 16 * KiB
    s = dev.stream()
    ds = [dev.empty(n) for _ in range(6)]
    srcs = [pattern(n, 10 + i) for i in range(6)]
    for d, src in zip(ds, srcs, strict=True):
        await s.copy(d, src)
    buf = np.zeros(n, np.uint8)
    out = dev.empty(n)
    back = np.zeros(n, np.uint8)
    ops = []
    for d in ds:
        ops.append(s.copy(buf, d))  # into buf
        ops.append(s.copy(out, buf))  # and out again: must carry d's bytes
        ops.append(s.copy(d, buf))
    for op in ops:
        await op
    await s.copy(back, out)
    np.testing.assert_array_equal(back, srcs[-1])
    for d, src in zip(ds, srcs, strict=True):
        await s.copy(back, d)
        np.testing.assert_array_equal(back, src)


async def test_a_budget_below_a_small_block_rejects_an_upload_on_an_idle_stream_too(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a copy is rejected at the call does not depend on whether its
    stream is idle: with the pinned budget below a small copy's block, an
    upload the driver could take is rejected as a staged one is."""
    monkeypatch.setenv("GPUAIO_PINNED_BUDGET", "128K")
    with fresh_stager(dev._runtime):
        stager = dev._runtime.stager
        stager.direct_up_max = LIMIT
        s = dev.stream()
        d = dev.empty(200 * KiB)
        with pytest.raises(gpuaio.InvalidArgumentError, match="GPUAIO_PINNED_BUDGET"):
            s.copy(d, np.ones(200 * KiB, np.uint8))
        assert stager.direct_uploads == 0
        await s.aclose()
