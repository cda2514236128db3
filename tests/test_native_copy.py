"""The native copy threads of a compiled install (``gpuaio._engine.nativecopy``):
byte-exact, slices handed out once each, a stop that leaves the rest
untouched, progress while the caller holds the GIL, their CPU priority, a
forked child, and the staged transfers that use them.

They exist only in a compiled install (``hatch_build.py``; CI's ``compiled``
session): elsewhere these tests skip, and the Python copy threads, which
``tests/test_sliced_copy.py`` covers, do the work.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import gpuaio
from gpuaio._engine import hostwork, lent, nativecopy, staging, stagingconfig
from gpuaio._engine.hostwork import COPY_NICE, HostPool, SlicedCopy
from gpuaio._engine.nativecopy import NativeCopy
from tests.test_copy import pattern
from tests.test_gated import _until
from tests.test_staging import _recorded_copies

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not nativecopy.available(),
    reason="no native copy threads: they are built by a compiled install (hatch_build.py), "
    "or GPUAIO_NATIVE_COPY=0",
)


@pytest.fixture
def pool() -> Iterator[HostPool]:
    p = HostPool(3)
    try:
        yield p
    finally:
        p.close()


def _native(cp: object) -> NativeCopy:
    assert isinstance(cp, NativeCopy), f"the copy ran on {type(cp).__name__}, not native threads"
    return cp


@pytest.mark.parametrize("n", [0, 1, 4095, 2 * MiB, 5 * 2 * MiB + 123, 64 * MiB + 4097])
def test_a_native_copy_is_byte_exact_and_hands_out_every_slice_once(pool: HostPool, n: int) -> None:
    src = pattern(max(n, 1), 31)[:n]
    dst = np.zeros(n + 64, np.uint8)
    cp = _native(pool.submit_copy(dst.ctypes.data, src.ctypes.data, n))
    assert cp.wait_copied(at_least=n) == n
    assert cp.copied() == n
    assert np.array_equal(dst[:n], src)
    assert not dst[n:].any(), "bytes past the copy were written"

    dst[:] = 0
    cp = _native(pool.submit_copy(dst.ctypes.data, src.ctypes.data, n))
    seen = np.zeros(n, np.int8)
    while ranges := cp.take_copied(1):
        assert ranges == sorted(ranges)
        for (o, ln), nxt in zip(ranges, [*ranges[1:], None], strict=True):
            assert ln > 0
            if nxt is not None:
                assert o + ln < nxt[0], "adjacent ranges were not merged"
            assert np.array_equal(dst[o : o + ln], src[o : o + ln]), "handed out before copied"
            seen[o : o + ln] += 1
    assert (seen == 1).all(), "a byte was handed out twice, or never"
    assert cp.take_copied(1) == []


def test_take_copied_waits_for_at_least_what_is_asked(pool: HostPool) -> None:
    n = 48 * MiB
    src, dst = pattern(n, 32), np.zeros(n, np.uint8)
    cp = _native(pool.submit_copy(dst.ctypes.data, src.ctypes.data, n))
    first = cp.take_copied(20 * MiB)
    assert sum(ln for _, ln in first) >= 20 * MiB
    rest = cp.take_copied(n)  # more than is left: all that is left
    assert sum(ln for _, ln in first + rest) == n
    assert np.array_equal(dst, src)


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> int:
    """``GPUAIO_NATIVE_SLICE=512K`` for the test (read at each copy)."""
    monkeypatch.setattr(nativecopy, "NATIVE_SLICE", 512 << 10)
    return 512 << 10


def test_a_large_copy_goes_to_the_native_threads_in_fixed_slices(
    pool: HostPool, small_slices: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 32 MiB copy on three threads goes in ``NATIVE_SLICE`` slices (64,
    claimed front to back), not in one per thread (three of 10.7 MiB, which
    finish together at the copy's end); every range handed out is whole
    slices. Byte-exact."""
    n = 32 * MiB
    native = pool._native_pool()
    steps: list[int] = []
    real = native.submit_copy

    def spy(dst: int, src_ptr: int, nbytes: int, step: int, *args: Any) -> NativeCopy:
        steps.append(step)
        return real(dst, src_ptr, nbytes, step, *args)

    monkeypatch.setattr(native, "submit_copy", spy)
    src, dst = pattern(n, 34), np.zeros(n, np.uint8)
    cp = _native(pool.submit_copy(dst.ctypes.data, src.ctypes.data, n))
    assert steps == [small_slices]
    handed = 0
    while ranges := cp.take_copied(1):
        for o, ln in ranges:
            assert o % small_slices == 0 and (ln % small_slices == 0 or o + ln == n)
            handed += ln
    assert handed == n
    assert np.array_equal(dst, src)


def test_stop_leaves_unclaimed_slices_untouched_and_raises_for_them(pool: HostPool) -> None:
    n = 512 * MiB
    src = np.ones(n, np.uint8)
    dst = np.zeros(n, np.uint8)
    cp = _native(pool.submit_copy(dst.ctypes.data, src.ctypes.data, n))
    cp.stop()
    after = dst.copy()
    time.sleep(0.05)
    assert np.array_equal(dst, after), "a slice was written after stop() returned"
    step = hostwork.native_step(n, pool.threads)
    whole = [bool(dst[o : o + step].all()) for o in range(0, n, step)]
    for o, full in zip(range(0, n, step), whole, strict=True):
        assert full or not dst[o : o + step].any(), f"the slice at {o} is half copied"
    if not all(whole):
        with pytest.raises(RuntimeError, match="slices uncopied"):
            cp.wait_copied(at_least=n)
        with pytest.raises(RuntimeError, match="slices uncopied"):
            _take_all(cp)


def _take_all(cp: NativeCopy) -> None:
    while cp.take_copied(1):
        pass


def test_native_threads_copy_while_the_caller_holds_the_gil(pool: HostPool) -> None:
    """The native threads never need the GIL: a copy completes while the
    caller spins in Python and another Python thread would wait 100 s for
    the GIL; the Python copy threads could not start their slices."""
    n = 64 * MiB
    src, dst = pattern(n, 33), np.zeros(n, np.uint8)
    pool.submit_copy(dst.ctypes.data, src.ctypes.data, 1).wait_copied()  # threads started
    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        cp = _native(pool.submit_copy(dst.ctypes.data, src.ctypes.data, n))
        deadline = time.monotonic() + 30
        while cp.copied() < n and time.monotonic() < deadline:
            pass  # pure Python: the GIL is never released here
        done = cp.copied()
    finally:
        sys.setswitchinterval(old)
    assert done == n, f"{done} of {n} bytes copied while the caller held the GIL"
    assert np.array_equal(dst, src)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="set on Linux only")
def test_native_copy_threads_run_at_a_lower_cpu_priority(pool: HostPool) -> None:
    before = set(os.listdir("/proc/self/task"))
    src = pattern(8 * MiB, 34)
    dst = np.zeros_like(src)
    _native(pool.submit_copy(dst.ctypes.data, src.ctypes.data, src.nbytes)).wait_copied(
        at_least=src.nbytes
    )
    assert np.array_equal(dst, src)
    new = set(os.listdir("/proc/self/task")) - before
    assert len(new) == pool.threads, f"{len(new)} threads started for a pool of {pool.threads}"
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    nices = {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in new}
    assert nices == {min(19, me + max(0, COPY_NICE))}, f"copy threads at {nices}, caller at {me}"
    pool.close()
    # close() joins them, but a joined thread's /proc entry may outlast the
    # join by a moment (the kernel wakes the joiner before it reaps the
    # task): on a loaded CI machine this once listed one after close().
    deadline = time.monotonic() + 5
    while (left := set(os.listdir("/proc/self/task")) & new) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not left, f"threads {left} outlived the pool's close()"


def test_gpuaio_native_copy_0_takes_the_python_threads(
    pool: HostPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUAIO_NATIVE_COPY", "0")
    src = pattern(4 * MiB, 35)
    dst = np.zeros_like(src)
    cp = pool.submit_copy(dst.ctypes.data, src.ctypes.data, src.nbytes)
    assert isinstance(cp, SlicedCopy)
    cp.wait_copied(at_least=src.nbytes)
    assert np.array_equal(dst, src)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform has no fork")
def test_in_a_forked_child_the_inherited_pool_refuses_work_and_closes_at_once(
    pool: HostPool,
) -> None:
    src = pattern(8 * MiB, 36)
    dst = np.zeros_like(src)
    pool.submit_copy(dst.ctypes.data, src.ctypes.data, src.nbytes).wait_copied(at_least=src.nbytes)
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:  # the child: no copy thread was inherited
        code = 1
        try:
            try:
                pool.submit_copy(dst.ctypes.data, src.ctypes.data, src.nbytes)
            except RuntimeError:
                pool.close()  # must return, not join threads that are not there
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
        pytest.fail("the forked child hung on the inherited native pool")
    got = os.read(r, 1)
    os.close(r)
    assert got == b"\x00" and os.WEXITSTATUS(status) == 0, "the child's copy was not refused"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform has no fork")
def test_a_child_forked_while_the_watcher_polls_copies_on_a_pool_of_its_own() -> None:
    """fork() while the watcher polls held gated copies (taking the pools'
    mutex for each scan, every microsecond or two) and the threads claim
    slices: every child's own pool copies byte-exact and none hangs (the
    mutex is taken around the fork, not inherited held). A child of
    tests/test_fork.py hung so in CI's compiled session, in its first
    submit, round 37."""
    native = nativecopy.NativePool(2, 0, 0)
    src = pattern(16 * MiB, 44)
    dst = np.zeros_like(src)
    small = pattern(MiB, 45)
    words = np.zeros(64 * 16, np.uint32)  # [0]: a ready word never set; then flags
    base = words.ctypes.data
    held: list[NativeCopy] = []

    def hold() -> None:  # a gated copy that waits for ever: the watcher polls it
        flag = base + 64 * (len(held) + 1)
        held.append(
            native.submit_copy(dst.ctypes.data, src.ctypes.data, 4096, 4096, False, flag, base)
        )

    for _ in range(15):
        hold()
    try:
        for _ in range(40):
            busy = native.submit_copy(dst.ctypes.data, src.ctypes.data, src.nbytes, 4096)
            hold()  # one more: the watcher polls without sleeping now
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
                pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    own = nativecopy.NativePool(2, 0, 0)
                    out = np.zeros(MiB, np.uint8)
                    own.submit_copy(out.ctypes.data, small.ctypes.data, MiB, 64 << 10).wait_copied(
                        at_least=MiB
                    )
                    code = 0 if np.array_equal(out, small) else 2
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("a forked child hung at its own first copy")
                time.sleep(0.002)
            assert os.WEXITSTATUS(status) == 0, "the child's own copy was not byte-exact"
            busy.stop()
    finally:
        for cp in held:
            cp.stop()
        native.close()


@pytest.mark.anyio
async def test_staged_transfers_run_on_the_native_threads_byte_exact(
    dev: gpuaio.Device, gpuaio_runtime: Any
) -> None:
    """Chunks above the stream thread's solo size go to the native threads:
    an upload and a download of 24 MiB, byte-exact both ways."""
    host = gpuaio_runtime.host
    n = 24 * MiB
    src = pattern(n, 37)
    back = np.zeros(n, np.uint8)
    d = dev.empty(n)
    s = dev.stream()
    await s.copy(d, src)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    assert host._native is not None, "the staged copies did not use the native threads"


@pytest.mark.anyio
async def test_on_the_native_threads_a_download_goes_in_smaller_chunks(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64 MiB download is DMAed in ``D2H_SPLIT`` chunks, not the upload's
    two: its first copy-out then waits for an eighth of the DMA; byte-exact.
    At 16 MiB the eighths would be copied solo: it keeps the upload's chunks.
    (Each chunk in one DMA: ``test_staged_download.py`` has the pieces.)"""
    stager = gpuaio_runtime.stager
    monkeypatch.setattr(stager, "d2h_pieces", 1)
    be = gpuaio_runtime.backend
    for n, want in [
        (64 * MiB, 64 * MiB // stagingconfig.D2H_SPLIT),
        (16 * MiB, stager.chunk_for(16 * MiB)),
    ]:
        src = pattern(n, 38)
        back = np.zeros(n, np.uint8)
        d = dev.empty(n)
        s = dev.stream()
        await s.copy(d, src)
        with _recorded_copies(be) as calls:
            await s.copy(back, d)
        assert np.array_equal(back, src)
        sizes = sorted({nb for _, _, nb in calls})
        assert sizes == [want], f"a {n}-byte download went in DMAs of {sizes}, not {want}"


@pytest.mark.anyio
async def test_staged_chunks_go_to_the_native_threads_in_small_slices(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, small_slices: int
) -> None:
    """A 64 MiB upload's and download's chunks go to the native threads in
    ``NATIVE_SLICE`` slices, several per thread, so each chunk's copy
    completes from its front (the test above) and an upload DMAs it as it
    goes. One slice per thread (as before: 32 MiB on one thread of a
    two-core machine) left an upload's chunk to one DMA after its whole copy.
    Byte-exact."""
    host = gpuaio_runtime.host
    n = 64 * MiB
    src = pattern(n, 39)
    d = dev.empty(n)
    s = dev.stream()
    await s.copy(d, src)  # blocks and threads ready
    native = host._native_pool()
    steps: list[tuple[int, int]] = []
    real = native.submit_copy

    def spy(dst: int, src_ptr: int, nbytes: int, step: int, *args: Any) -> NativeCopy:
        steps.append((nbytes, step))
        return real(dst, src_ptr, nbytes, step, *args)

    monkeypatch.setattr(native, "submit_copy", spy)
    back = np.zeros(n, np.uint8)
    await s.copy(d, src)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    assert len(steps) >= 2 + stagingconfig.D2H_SPLIT, f"the chunks did not all go native: {steps}"
    for nbytes, step in steps:
        assert step == small_slices, f"a {nbytes}-byte chunk in slices of {step}"


def _nt() -> Any:
    copy = nativecopy.nt_copier()
    if copy is None:
        pytest.skip("this CPU has no non-temporal stores in the native module (not x86-64)")
    return copy


@pytest.mark.parametrize("dst_off", [0, 1, 8, 15])
@pytest.mark.parametrize("src_off", [0, 3])
def test_a_copy_with_non_temporal_stores_is_byte_exact_at_any_size_and_alignment(
    dst_off: int, src_off: int
) -> None:
    """``copy_nt`` copies an unaligned head, 64-byte blocks and a tail: every
    byte lands, none past either end."""
    copy = _nt()
    for n in [0, 1, 15, 16, 17, 255, 256, 257, 319, 4096 + 5, 64 * 1024 + 3, MiB + 17]:
        src = pattern(n + src_off + 1, n + 40)
        dst = np.full(n + dst_off + 64, 0xA5, np.uint8)
        copy(dst.ctypes.data + dst_off, src.ctypes.data + src_off, n)
        assert np.array_equal(dst[dst_off : dst_off + n], src[src_off : src_off + n]), n
        assert (dst[:dst_off] == 0xA5).all() and (dst[dst_off + n :] == 0xA5).all(), (
            f"a {n}-byte copy wrote outside its destination"
        )


@pytest.mark.parametrize("n", [1, 4095, 5 * 2 * MiB + 123])
def test_native_threads_copy_with_non_temporal_stores_byte_exact(pool: HostPool, n: int) -> None:
    _nt()
    src = pattern(n, 41)
    dst = np.zeros(n + 65, np.uint8)
    cp = _native(pool.submit_copy(dst.ctypes.data + 1, src.ctypes.data, n, nt=True))
    assert cp.wait_copied(at_least=n) == n
    assert np.array_equal(dst[1 : n + 1], src)
    assert dst[0] == 0 and not dst[n + 1 :].any(), "bytes outside the copy were written"


@pytest.mark.anyio
async def test_staged_copies_write_with_non_temporal_stores_from_their_thresholds(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``NT_MIN`` bytes, an upload staged on the calling thread, a chunk
    the stream's thread copies and the copy threads' chunks all go through
    the non-temporal copy, smaller uploads not; downloads from
    ``D2H_NT_MIN`` copy their chunks out so, smaller ones not. Byte-exact."""
    real = _nt()
    stager = gpuaio_runtime.stager
    assert stager._nt is not None and stager.nt_out is not None, (
        "the stager did not pick up the non-temporal copy"
    )
    here: list[tuple[str, int]] = []

    def spy(kind: str) -> Any:
        def copy(dst: int, src: int, n: int) -> None:
            here.append((kind, n))
            real(dst, src, n)

        return copy

    stager._nt, stager.nt_out = spy("up"), spy("down")
    # The staged paths: gated copies (GPUAIO_GATED_MAX) take their own way.
    monkeypatch.setattr(stager, "gated", None)
    native = gpuaio_runtime.host._native_pool()
    flags: list[bool] = []
    sizes: list[int] = []  # of the chunks the copy threads copied
    submit = native.submit_copy

    def spy_submit(
        dst: int, src: int, n: int, step: int, nt: bool = False, *more: int
    ) -> NativeCopy:
        flags.append(nt)
        sizes.append(n)
        return submit(dst, src, n, step, nt, *more)

    monkeypatch.setattr(native, "submit_copy", spy_submit)
    s = dev.stream()
    up_min, down_min = staging.NT_MIN, staging.D2H_NT_MIN
    for n in sorted({up_min // 2, up_min, MiB, down_min // 2 + 1, down_min, 24 * MiB}):
        src = pattern(n, 42)
        back = np.zeros(n, np.uint8)
        d = dev.empty(n)
        here.clear()
        flags.clear()
        sizes.clear()
        await s.copy(d, src)
        assert all(k == "up" for k, _ in here), here
        if n < up_min:
            assert not here and not any(flags), f"a {n}-byte upload used non-temporal stores"
        elif n <= stager.config.inline_max:
            assert here == [("up", n)], f"a {n}-byte upload staged here copied {here}"
        else:  # up to driver_max the driver's own path may take it: nothing staged
            # Per chunk: a short last one is copied plainly.
            want = [b >= up_min for b in sizes]
            assert flags == want, f"a {n}-byte upload's chunks {sizes}: {flags}"
            assert all(b >= up_min for _, b in here), here
            staged = n > stager.config.driver_max
            assert not staged or here or flags, f"a {n}-byte upload was staged plainly"
        here.clear()
        flags.clear()
        await s.copy(back, d)
        assert np.array_equal(back, src), n
        assert all(k == "down" for k, _ in here), here
        if n < down_min:
            assert not here and not any(flags), f"a {n}-byte download used non-temporal stores"
        else:
            assert all(flags), f"a {n}-byte download: {flags}"
            staged = n > stager.config.driver_max
            assert not staged or here or flags, f"a {n}-byte download was staged plainly"


def test_the_small_host_copy_is_native_byte_exact_and_checks_its_arguments() -> None:
    """Staging's small copies on the calling thread (a download's copy-out, an
    upload's source into its block) call the extension's ``copy``, not
    ``ctypes.memmove``: memmove's semantics, overlap included, every byte
    in place and none outside, and bad arguments refused at the call."""
    copy = nativecopy.host_copier()
    assert copy is not ctypes.memmove, "a compiled install should have the native host copy"
    assert staging.copy_small is copy, "staging does not use the native host copy"
    assert lent.copy_small is copy, "a download's copy-out does not use the native host copy"
    for n in [0, 1, 15, 4095, 4096, 64 * 1024, 64 * 1024 + 1, MiB + 17]:
        for dst_off, src_off in [(0, 0), (1, 3), (8, 0)]:
            src = pattern(n + src_off + 1, n + 7)
            dst = np.full(n + dst_off + 64, 0xA5, np.uint8)
            assert copy(dst.ctypes.data + dst_off, src.ctypes.data + src_off, n) is None
            assert np.array_equal(dst[dst_off : dst_off + n], src[src_off : src_off + n]), n
            assert (dst[:dst_off] == 0xA5).all() and (dst[dst_off + n :] == 0xA5).all(), (
                f"a {n}-byte copy wrote outside its destination"
            )
    # Overlapping ranges, both ways, as memmove.
    for shift in (10, -10):
        buf = pattern(1000, 3)
        want = buf.copy()
        lo = max(0, -shift)
        want[lo + shift : lo + shift + 500] = buf[lo : lo + 500]
        copy(buf.ctypes.data + lo + shift, buf.ctypes.data + lo, 500)
        assert np.array_equal(buf, want), f"an overlapping copy (shift {shift}) is not memmove's"
    buf = np.zeros(8, np.uint8)
    with pytest.raises(TypeError):
        copy(buf.ctypes.data, buf.ctypes.data)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        copy(buf.ctypes.data, "src", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        copy(buf.ctypes.data, buf.ctypes.data, -1)
    with pytest.raises(ValueError, match="null"):
        copy(0, buf.ctypes.data, 8)
    copy(0, 0, 0)  # nothing to copy: no address is read


def test_a_large_host_copy_lets_other_threads_run() -> None:
    """Above 64 KiB the native host copy releases the GIL, as ``ctypes.memmove``
    did: another Python thread runs while the bytes move. (Below it keeps the
    GIL: a memmove of microseconds costs less than handing the GIL over.)

    The other thread gives the GIL up after each timestamp, and a switch
    interval of 100 s keeps this one from being made to give it up between
    its two timestamps (with the usual 5 ms, the request to drop it comes
    due during a copy that holds it, and is granted as the copy returns): a
    timestamp between them means the copy released it, never chance. On a
    loaded machine the other thread may miss a copy of a few milliseconds,
    so up to 20 are tried."""
    copy = nativecopy.host_copier()
    n = 64 * MiB
    src, dst = pattern(n, 5), np.zeros(n, np.uint8)
    d_ptr, s_ptr = dst.ctypes.data, src.ctypes.data
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)  # gives the GIL up

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    t = threading.Thread(target=spin)
    t.start()
    inside = 0
    try:
        for _ in range(20):
            seen = len(stamps)
            t0 = time.perf_counter()
            copy(d_ptr, s_ptr, n)
            t1 = time.perf_counter()
            inside = sum(1 for x in stamps[seen:] if t0 < x < t1)
            if inside:
                break
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert np.array_equal(dst, src)
    assert inside, "no other thread ran during any of 20 copies of 64 MiB: the GIL was held"


@pytest.mark.anyio
async def test_small_staged_copies_go_through_the_native_host_copy(
    dev: gpuaio.Device, gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small upload staged on the calling thread and a small download's
    copy-out both call the native host copy: byte-exact both ways."""
    calls: list[int] = []
    real = lent.copy_small

    def spy(dst: int, src: int, nbytes: int) -> object:
        calls.append(nbytes)
        return real(dst, src, nbytes)

    # An upload's copy into its block is staging's; a download's copy-out, its Lent's.
    monkeypatch.setattr(staging, "copy_small", spy)
    monkeypatch.setattr(lent, "copy_small", spy)
    # Not the driver's own path for the upload (an idle stream's small ones).
    monkeypatch.setattr(gpuaio_runtime.stager, "direct_up_max", 0)
    s = dev.stream()
    n = 4096
    d = dev.empty(n)
    for i in range(50):  # the first copy of a size may pin its block on another thread
        src, back = pattern(n, i), np.zeros(n, np.uint8)
        calls.clear()
        await s.copy(d, src)
        await s.copy(back, d)
        assert np.array_equal(back, src), f"round trip {i} is not byte-exact"
        if calls == [n, n]:
            break
    assert calls == [n, n], f"the native host copy saw {calls}, not the upload and the copy-out"


def _flags_set(words: np.ndarray, idx: list[int], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not all(words[i] == 1 for i in idx):
        assert time.monotonic() < deadline, f"flags {[int(words[i]) for i in idx]} not all set"
        time.sleep(0.001)


def test_chunks_submitted_in_one_call_are_byte_exact_and_each_sets_its_flag(
    pool: HostPool,
) -> None:
    """``submit_chunks``: one copy per chunk between unrelated addresses (a
    gated upload's blocks), each setting its own flag once copied."""
    n, chunk = 3 * MiB + 77, MiB
    src = pattern(n, 40)
    blocks = [np.zeros(chunk, np.uint8) for _ in range(4)]
    words = np.zeros(256, np.uint32)
    lens = [min(chunk, n - off) for off in range(0, n, chunk)]
    flags = [words.ctypes.data + 64 * k for k in range(4)]
    copies = pool.submit_chunks(
        [b.ctypes.data for b in blocks],
        [src.ctypes.data + off for off in range(0, n, chunk)],
        lens,
        256 << 10,
        False,
        flags,
    )
    assert [cp.nbytes for cp in copies] == lens
    _flags_set(words, [0, 16, 32, 48])
    for k, ln in enumerate(lens):
        np.testing.assert_array_equal(blocks[k][:ln], src[k * chunk : k * chunk + ln])
    assert not blocks[3][lens[3] :].any(), "bytes past the last chunk were written"


def test_unposted_chunks_wait_for_post_then_for_their_ready_words(pool: HostPool) -> None:
    """Made without ``post``, nothing is copied (the ready words set or not)
    until ``post_chunks``; then each chunk waits for its own ready word. A
    chunk stopped before it is posted sets its flag with nothing copied."""
    n, chunk = 2 * MiB, MiB
    src = pattern(n, 41)
    dst = np.zeros(n, np.uint8)
    words = np.zeros(256, np.uint32)  # ready words at [0], [16]; flags at [32], [48]
    readies = [words.ctypes.data, words.ctypes.data + 64]
    flags = [words.ctypes.data + 128, words.ctypes.data + 192]
    copies = pool.submit_chunks(
        [dst.ctypes.data, dst.ctypes.data + chunk],
        [src.ctypes.data, src.ctypes.data + chunk],
        [chunk, chunk],
        256 << 10,
        False,
        flags,
        readies,
        False,
    )
    words[0] = words[16] = 1
    time.sleep(0.05)
    assert not dst.any() and words[32] == 0 and words[48] == 0, "an unposted chunk ran"
    words[0] = words[16] = 0
    pool.post_chunks(copies)
    time.sleep(0.02)
    assert not dst.any(), "a posted chunk ran before its ready word"
    words[16] = 1
    _flags_set(words, [48])
    np.testing.assert_array_equal(dst[chunk:], src[chunk:])
    assert not dst[:chunk].any() and words[32] == 0
    words[0] = 1
    _flags_set(words, [32])
    np.testing.assert_array_equal(dst, src)
    # Stopped unposted: flag set, nothing copied; posting it then does nothing.
    words[:] = 0
    dst[:] = 0
    (cp,) = pool.submit_chunks(
        [dst.ctypes.data], [src.ctypes.data], [chunk], 256 << 10, False, flags[:1], None, False
    )
    cp.stop()
    assert words[32] == 1
    words[32] = 0
    pool.post_chunks([cp])
    time.sleep(0.02)
    assert not dst.any() and words[32] == 0


def test_chunks_posted_after_the_pool_closed_set_their_flags_and_copy_nothing() -> None:
    pool = HostPool(2)
    src = pattern(MiB, 42)
    dst = np.zeros(MiB, np.uint8)
    words = np.zeros(64, np.uint32)
    copies = pool.submit_chunks(
        [dst.ctypes.data], [src.ctypes.data], [MiB], MiB, False, [words.ctypes.data], None, False
    )
    pool.close()
    pool.post_chunks(copies)
    assert words[0] == 1 and not dst.any()
    native = nativecopy.NativePool(2, 0, 0)
    native.close()
    words[0] = 0
    with pytest.raises(RuntimeError, match="closed"):
        native.submit_chunks(
            [dst.ctypes.data], [src.ctypes.data], [MiB], MiB, False, [words.ctypes.data], None, True
        )
    assert words[0] == 0


def test_submit_chunks_checks_its_arguments_at_the_call(pool: HostPool) -> None:
    src = pattern(MiB, 43)
    dst = np.zeros(MiB, np.uint8)
    words = np.zeros(64, np.uint32)
    d, s, f = dst.ctypes.data, src.ctypes.data, words.ctypes.data
    native = pool._native_pool()
    for args, match in (
        (([d, d], [s], [8, 8], 8, False, [f, f], None, True), "srcs"),
        (([d], [s], [8], 8, False, [f], [f, f], True), "readies"),
        (([], [], [], 8, False, [], None, True), "chunks"),
        (([d] * 65, [s] * 65, [8] * 65, 8, False, [f] * 65, None, True), "chunks"),
        (([d], [s], [8], 0, False, [f], None, True), "step"),
        (([d], [0], [8], 8, False, [f], None, True), "null"),
        (([d], [s], [8], 8, False, [0], None, True), "null"),
    ):
        with pytest.raises(ValueError, match=match):
            native.submit_chunks(*args)  # type: ignore[arg-type]
    assert not dst.any() and not words.any()


def test_a_handle_read_before_the_pool_closed_finds_it_closed() -> None:
    """A thread that read a pool's handle just before another thread closed
    the pool calls in with it afterwards: it must find that pool closed
    (nothing copied, no flag set), not freed memory, nor a pool made since at
    the same address. A second close returns at once."""
    native = nativecopy.NativePool(2, 0, 0)
    src = pattern(MiB, 44)
    dst = np.zeros(MiB, np.uint8)
    words = np.zeros(64, np.uint32)
    native.submit_copy(dst.ctypes.data, src.ctypes.data, MiB, MiB).wait_copied(0, MiB)  # started
    stale = native._handle
    native.close()
    made_since = [nativecopy.NativePool(2, 0, 0) for _ in range(4)]
    try:
        assert stale not in {p._handle for p in made_since}, "a closed pool's address was reused"
        dst[:] = 0
        native._handle = stale  # what the other thread still holds
        with pytest.raises(RuntimeError, match="could not take"):
            native.submit_copy(dst.ctypes.data, src.ctypes.data, MiB, MiB, flag=words.ctypes.data)
        with pytest.raises(RuntimeError, match="could not take"):
            native.submit_chunks(
                [dst.ctypes.data], [src.ctypes.data], [MiB], MiB, False, [words.ctypes.data],
                None, True,
            )  # fmt: skip
        native.spin(2, 100)
        assert native.spinning == 0
        native.close()  # again, with the stale handle: returns at once
        assert not dst.any() and not words.any()
    finally:
        native._handle = 0
        for p in made_since:
            p.close()


def test_a_warmed_pool_polls_for_work_until_a_copy_comes_or_its_time_is_up() -> None:
    """``NativePool.warm`` wakes the idle threads to poll for work: all of
    them, until a copy is queued (which they then copy, byte-exact, and
    sleep again after) or the warm time is up; not before the threads
    started, nor once the pool closed, whose close ends the polling."""
    native = nativecopy.NativePool(3, 0, 0)
    try:
        assert not native.warm(5_000_000), "warmed a pool whose threads never started"
        src = pattern(4 * MiB, 46)
        dst = np.zeros(4 * MiB, np.uint8)
        native.submit_copy(dst.ctypes.data, src.ctypes.data, MiB, MiB).wait_copied(0, MiB)
        _until(lambda: native.spinning == 0, 10, "threads polled with nothing due")
        # Long enough that only the copy can end it on a loaded machine.
        assert native.warm(60_000_000)
        _until(lambda: native.spinning == 3, 10, "the idle threads did not all poll")
        cp = native.submit_copy(dst.ctypes.data, src.ctypes.data, 4 * MiB, MiB)
        assert cp.wait_copied(0, 4 * MiB) == 4 * MiB
        np.testing.assert_array_equal(dst, src)
        _until(lambda: native.spinning == 0, 10, "the threads polled on after the copy came")
        assert native.warm(20_000)  # 20 ms
        _until(lambda: native.spinning == 0, 10, "the threads polled past their warm time")
        assert native.warm(60_000_000)
        _until(lambda: native.spinning == 3, 10, "the idle threads did not poll again")
        t0 = time.monotonic()
        native.close()
        assert time.monotonic() - t0 < 10, "closing waited for the warm time"
        assert not native.warm(1000)
    finally:
        native.close()
