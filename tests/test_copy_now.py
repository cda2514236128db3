"""Copies the calling thread makes with the native copy threads' help
(``HostPool.copy_now``, ``gcp_copy_now``), and the mid-size transfers
(``ALONE_MAX`` to ``inline_max``) that the stager stages that way on the
caller's thread while the helpers are idle.

Byte-exact at every size, helped by idle threads, never held up by a busy
pool, alone in a forked child; the stager's choice of thread, and its
fallbacks. Like ``tests/test_native_copy.py``, these need the native copy
threads of a compiled install (CI's ``compiled`` session) and skip elsewhere.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._engine import nativecopy
from gpuaio._engine.hostwork import HELP_MIN, INLINE_SLICE, HostPool
from gpuaio._engine.nativecopy import NativePool
from gpuaio._engine.stagingconfig import ALONE_MAX, StagingConfig
from tests.test_copy import pattern

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not nativecopy.available(),
    reason="no native copy threads: they are built by a compiled install (hatch_build.py), "
    "or GPUAIO_NATIVE_COPY=0",
)


@pytest.fixture
def native() -> Iterator[NativePool]:
    p = NativePool(3, 0, 0)
    try:
        yield p
    finally:
        p.close()


@pytest.mark.parametrize(
    "n", [0, 1, INLINE_SLICE - 1, INLINE_SLICE, INLINE_SLICE + 1, 4 * MiB + 123, 64 * MiB + 4097]
)
def test_copy_now_is_byte_exact_and_writes_nothing_else(native: NativePool, n: int) -> None:
    src = pattern(max(n, 1), 41)[:n]
    dst = np.zeros(n + 128, np.uint8)
    helped = native.copy_now(dst.ctypes.data + 64, src.ctypes.data, n, INLINE_SLICE)
    assert 0 <= helped <= max(0, -(-n // INLINE_SLICE) - 1)
    assert np.array_equal(dst[64 : 64 + n], src)
    assert not dst[:64].any() and not dst[64 + n :].any(), "bytes outside the copy were written"
    assert native.idle(), "the copy stayed queued after copy_now returned"


@pytest.mark.parametrize("wake", [0, 1])
def test_idle_threads_help(native: NativePool, wake: int) -> None:
    """Over a 64 MiB copy in 256 KiB slices, woken threads claim slices: all
    woken at once, or one, which wakes the next as it claims a slice."""
    n = 64 * MiB
    src, dst = pattern(n, 42), np.zeros(n, np.uint8)
    helped = [
        native.copy_now(dst.ctypes.data, src.ctypes.data, n, 256 << 10, wake) for _ in range(5)
    ]
    assert np.array_equal(dst, src)
    assert max(helped) > 0, f"no thread helped in five 64 MiB copies: {helped}"


def test_a_busy_pool_never_holds_copy_now_up() -> None:
    """With its one thread in a long slice of a queued copy, copy_now copies
    alone, at once, and leaves the queued copy to finish byte-exact."""
    pool = NativePool(1, 0, 0)
    try:
        big_n, n = 512 * MiB, 4 * MiB
        big_src, big_dst = np.ones(big_n, np.uint8), np.zeros(big_n, np.uint8)
        big = pool.submit_copy(big_dst.ctypes.data, big_src.ctypes.data, big_n, big_n)
        assert not pool.idle(), "a copy being copied counts as queued work"
        src, dst = pattern(n, 43), np.zeros(n, np.uint8)
        helped = pool.copy_now(dst.ctypes.data, src.ctypes.data, n, 256 << 10)
        still_busy = big.copied() < big_n
        assert np.array_equal(dst, src)
        assert helped == 0, "the busy thread helped"
        assert still_busy, "copy_now returned only after the queued 512 MiB copy"
        assert big.wait_copied(at_least=big_n) == big_n
        assert big_dst.all()
        deadline = time.monotonic() + 30
        while not pool.idle() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pool.idle(), "the finished copy stayed queued"
    finally:
        pool.close()


def test_a_closed_pool_copies_alone() -> None:
    pool = NativePool(2, 0, 0)
    pool.close()
    src, dst = pattern(2 * MiB, 44), np.zeros(2 * MiB, np.uint8)
    assert pool.copy_now(dst.ctypes.data, src.ctypes.data, src.nbytes, 256 << 10) == 0
    assert np.array_equal(dst, src)
    assert not pool.idle()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform has no fork")
def test_in_a_forked_child_copy_now_copies_alone(native: NativePool) -> None:
    src = pattern(8 * MiB, 45)
    dst = np.zeros_like(src)
    native.copy_now(dst.ctypes.data, src.ctypes.data, src.nbytes, 256 << 10)  # threads started
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:  # the child: no copy thread was inherited, the mutex may be held
        code = 1
        try:
            out = np.zeros_like(src)
            helped = native.copy_now(out.ctypes.data, src.ctypes.data, src.nbytes, 256 << 10)
            if helped == 0 and np.array_equal(out, src) and not native.idle():
                code = 0
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in copy_now on the inherited pool")
    got = os.read(r, 1)
    os.close(r)
    assert got == b"\x00" and os.WEXITSTATUS(status) == 0, "the child's copy was wrong"


def test_host_pool_copy_now_is_a_memmove_up_to_help_min() -> None:
    """Small copies never touch the native pool: it is not even created."""
    pool = HostPool(2)
    try:
        src, dst = pattern(HELP_MIN, 46), np.zeros(HELP_MIN, np.uint8)
        pool.copy_now(dst.ctypes.data, src.ctypes.data, HELP_MIN)
        assert np.array_equal(dst, src)
        assert pool._native is None
        assert pool.native_idle()
        big = pattern(HELP_MIN + 3 * MiB, 47)
        out = np.zeros_like(big)
        pool.copy_now(out.ctypes.data, big.ctypes.data, big.nbytes)
        assert np.array_equal(out, big)
        assert pool._native is not None and pool.native_idle()
    finally:
        pool.close()


def test_the_default_inline_max_is_4_mib_with_native_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GPUAIO_INLINE_MAX", raising=False)
    assert StagingConfig().inline_max == 4 * MiB
    monkeypatch.setenv("GPUAIO_NATIVE_COPY", "0")
    assert StagingConfig().inline_max == ALONE_MAX


# -- the stager -------------------------------------------------------------

SIZES = [ALONE_MAX + 4096, 3 * MiB, 4 * MiB]


def _spy(host: HostPool, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (thread id, bytes) of every copy_now of ``host``."""
    calls: list[tuple[int, int]] = []
    real = host.copy_now

    def spy(dst: int, src: int, nbytes: int) -> None:
        calls.append((threading.get_ident(), nbytes))
        real(dst, src, nbytes)

    monkeypatch.setattr(host, "copy_now", spy)
    return calls


@pytest.mark.anyio
@pytest.mark.parametrize("n", SIZES)
async def test_mid_uploads_are_staged_on_the_calling_thread_with_helpers(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """Between ALONE_MAX and inline_max, on an idle stream with idle helpers,
    the awaiting thread copies the source into a cached block (no thread
    hop), byte-exact both ways; the download's copy-out goes the same way."""
    host = gpuaio_runtime.host
    s = dev.stream()
    d = dev.empty(n)
    back = np.zeros(n, np.uint8)
    await gpuaio.reserve_pinned(n)  # a block of this size cached
    calls = _spy(host, monkeypatch)
    back[:] = 0
    src2 = pattern(n, 49)
    await s.copy(d, src2)
    await s.copy(back, d)
    assert np.array_equal(back, src2)
    me = threading.get_ident()
    assert (me, n) in calls, f"the upload was not copied on the caller's thread: {calls}"
    assert [nb for _, nb in calls] == [n, n], f"copies made: {calls}"


@pytest.mark.anyio
async def test_with_the_helpers_busy_a_mid_copy_goes_to_the_stream_thread(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller never copies 1-4 MiB alone: with the native threads busy,
    the copy is a host job as before, byte-exact."""
    host = gpuaio_runtime.host
    n = 3 * MiB
    s = dev.stream()
    d = dev.empty(n)
    await s.copy(d, pattern(n, 50))  # warm
    calls = _spy(host, monkeypatch)
    monkeypatch.setattr(host, "native_idle", lambda: False)
    src = pattern(n, 51)
    back = np.zeros(n, np.uint8)
    await s.copy(d, src)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    me = threading.get_ident()
    assert all(t != me for t, _ in calls), f"the caller copied with the helpers busy: {calls}"


@pytest.mark.anyio
async def test_a_smaller_inline_max_keeps_mid_copies_off_the_calling_thread(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpuaio.configure(inline_max="1M")
    host = gpuaio_runtime.host
    n = 2 * MiB
    s = dev.stream()
    d = dev.empty(n)
    await s.copy(d, pattern(n, 52))
    calls = _spy(host, monkeypatch)
    src = pattern(n, 53)
    back = np.zeros(n, np.uint8)
    await s.copy(d, src)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    me = threading.get_ident()
    assert all(t != me for t, _ in calls), f"copied on the caller's thread: {calls}"


@pytest.mark.anyio
async def test_a_mid_copy_with_no_block_cached_pins_one_for_the_next(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first 3 MiB upload finds no 4 MiB block cached: it goes to the
    stream thread (the driver's copy, no block), and a block of its size is
    pinned on the reaper thread; soon an upload is staged on the caller's."""
    stager = gpuaio_runtime.stager
    n = 3 * MiB
    stager.pool.trim()  # no block cached by earlier tests of this runtime
    s = dev.stream()
    d = dev.empty(n)
    src = pattern(n, 54)
    back = np.zeros(n, np.uint8)
    calls = _spy(gpuaio_runtime.host, monkeypatch)
    await s.copy(d, src)
    assert not calls, "the caller copied with no block cached"
    me = threading.get_ident()
    deadline = time.monotonic() + 30
    while (me, n) not in calls and time.monotonic() < deadline:
        await anyio.sleep(0.01)
        await s.copy(d, src)
    assert (me, n) in calls, "no block was pinned for the next 3 MiB upload"
    await s.copy(back, d)
    assert np.array_equal(back, src)
