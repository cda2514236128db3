"""Lifecycles at the API's edges: streams left by a cancellation or dropped
unclosed, event loops that come and go, all-or-nothing gather/scatter, host
registration of buffers without weak references."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._core import loopport as _loopport
from tests.conftest import latch
from tests.test_copy import pattern

pytestmark = pytest.mark.anyio


def _eventually(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``cond`` until true or ``timeout`` s pass (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(0.01)
    return True


def _stream_threads() -> int:
    """Threads that belong to one stream: its host thread (and, on the sim, its worker)."""
    return sum(
        t.name.startswith(("gpuaio-stream-", "gpuaio-sim-stream-")) for t in threading.enumerate()
    )


def _live_sim_streams(rt: Any) -> int | None:
    handles = getattr(rt.backend, "_handles", None)
    return None if handles is None else len(handles)


# -- 1. streams left by a cancellation, or dropped unclosed -------------------


async def test_cancelled_stream_context_closes_the_stream(dev: gpuaio.Device) -> None:
    """``async with dev.stream()`` left by a timeout (the one-stream-per-request
    pattern of docs/services.md) closes the stream: no stream, no thread and no
    registry entry is left behind, on every event loop."""
    rt = dev._runtime
    n = 2 << 20  # pageable: staged on the stream's host thread
    data = pattern(n, 3)
    d = dev.empty(n)
    streams: list[gpuaio.Stream] = []
    finished = 0

    async def handler() -> None:
        nonlocal finished
        async with dev.stream() as s:
            streams.append(s)
            await s.copy(d, data)
            await anyio.sleep(30)  # the request times out here, if not before
            finished += 1

    await handler_once(dev, d, data)  # start the runtime's own threads first
    gc.collect()
    base_threads = threading.active_count()
    base_stream_threads = _stream_threads()
    base_seqs = len(rt._sequencers)
    base_sim = _live_sim_streams(rt)  # may still count handler_once's stream

    for _ in range(50):
        with anyio.move_on_after(0.005):
            await handler()
    assert finished == 0
    assert len(streams) == 50
    assert [s for s in streams if not s.closed] == [], "streams left open"
    streams.clear()
    gc.collect()
    assert _eventually(lambda: _stream_threads() <= base_stream_threads), (
        f"{_stream_threads() - base_stream_threads} stream threads left"
    )
    assert threading.active_count() <= base_threads + 2
    assert len(rt._sequencers) <= base_seqs, "the runtime still knows the closed streams"
    if base_sim is not None:
        # At most as many as before: the stream of handler_once may have been
        # destroyed since (its release runs on its host thread, after its copy).
        assert _eventually(lambda: (_live_sim_streams(rt) or 0) <= base_sim), (
            f"sim streams not destroyed: {_live_sim_streams(rt)} live, {base_sim} before"
        )
    out = np.empty(n, np.uint8)
    await dev.default_stream.copy(out, d)
    np.testing.assert_array_equal(out, data)


async def handler_once(dev: gpuaio.Device, d: gpuaio.DeviceArray, data: np.ndarray) -> None:
    async with dev.stream() as s:
        await s.copy(d, data)


async def test_cancelled_aclose_still_waits_for_the_work(dev: gpuaio.Device) -> None:
    """The drain in aclose is shielded: when the cancelled ``async with`` is left,
    the request's work is done (its buffers are idle) and the stream is closed."""
    n = 8 << 20
    d = dev.empty(n)
    host = np.zeros(n, np.uint8)
    box: list[Any] = []
    # Cancelled once the copy is submitted, not after a fixed time: 50 ms ran
    # out during the memset on a loaded machine, before the copy existed.
    with anyio.CancelScope() as scope:
        async with dev.stream() as s:
            box.append(s)
            await s.memset(d, 5)
            box.append(s.copy(host, d))  # not awaited: aclose must wait for it
            scope.cancel()
            await anyio.sleep(30)
    assert scope.cancelled_caught
    s, op = box
    assert s.closed
    assert op.done(), "aclose returned while the stream's work was still running"
    assert (host == 5).all()


async def test_stream_dropped_unclosed_warns_and_is_destroyed_off_the_loop(
    dev: gpuaio.Device,
) -> None:
    rt = dev._runtime
    backend = rt.backend
    destroyed_on: list[str] = []
    real_destroy = backend.stream_destroy

    def spy(stream: Any) -> None:
        destroyed_on.append(threading.current_thread().name)
        real_destroy(stream)

    backend.stream_destroy = spy  # type: ignore[method-assign]
    try:
        base_seqs = len(rt._sequencers)
        base_sim = _live_sim_streams(rt)
        s = dev.stream()
        n = 1 << 20
        data = pattern(n, 9)
        d = dev.empty(n)
        await s.copy(d, data)  # pageable: the stream's host thread exists now
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            del s

            def warned() -> bool:
                # The stream's host thread may still be leaving the copy's job
                # (which names the op, and so the stream) when the await
                # returns: the stream is collected, and warns, once it has.
                gc.collect()
                return any(w.category is ResourceWarning for w in caught)

            _eventually(warned)
        messages = [str(w.message) for w in caught if w.category is ResourceWarning]
        assert [m[:22] for m in messages] == ["unclosed <gpuaio.Strea"]
        assert " closed>" not in messages[0]  # it names the stream as it was: open
        assert _eventually(lambda: len(destroyed_on) == 1), "the dropped stream was never destroyed"
        assert destroyed_on[0] != threading.current_thread().name, "destroyed on the loop thread"
        assert _eventually(lambda: len(rt._sequencers) <= base_seqs)
        if base_sim is not None:
            assert _eventually(lambda: (_live_sim_streams(rt) or 0) <= base_sim)
        out = np.empty(n, np.uint8)
        await dev.default_stream.copy(out, d)
        np.testing.assert_array_equal(out, data)

        # A closed stream, and a wrapped one (gpuaio does not own it), are not warned about.
        s = dev.stream()
        w = dev.wrap_stream(s.handle)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            del w
            gc.collect()
            await s.aclose()
            del s
            gc.collect()
        assert _eventually(lambda: len(destroyed_on) == 2)
    finally:
        backend.stream_destroy = real_destroy  # type: ignore[method-assign]


# -- 2. event loops are freed --------------------------------------------------


def _slow_copy(dev: gpuaio.Device) -> Callable[[], Any]:
    """An op whose awaiting task sleeps on the loop (not one found done at once).

    64 MiB: milliseconds on any path, far past the loop's polling window. A
    4 MiB upload, gated, was done within it on an H100 (issue 13, run DL),
    and no await slept."""
    s = dev.default_stream
    n = 64 << 20
    d = dev.empty(n)
    host = np.ones(n, np.uint8)
    return lambda: s.copy(d, host)


def _alive(refs: list[weakref.ref[Any]]) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_closed_event_loops_are_collected(gpuaio_runtime: Any, kind: str) -> None:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    op = _slow_copy(device_of(gpuaio_runtime, 0))
    refs: list[weakref.ref[Any]] = []
    slept = 0

    async def once() -> None:
        nonlocal slept
        await op()
        # The await slept and was woken through the loop's port.
        slept += asyncio.get_running_loop() in _loopport._asyncio_ports

    for _ in range(30):
        loop = new_loop()
        loop.run_until_complete(once())
        loop.close()
        refs.append(weakref.ref(loop))
        del loop
    assert slept, "no await slept on its loop: the test tests nothing"
    assert _alive(refs) == 0, f"{_alive(refs)} of 30 closed loops are still alive"


def test_finished_trio_runs_are_collected(gpuaio_runtime: Any) -> None:
    trio = pytest.importorskip("trio")
    op = _slow_copy(device_of(gpuaio_runtime, 0))
    refs: list[weakref.ref[Any]] = []

    slept = 0

    async def once() -> None:
        nonlocal slept
        token = trio.lowlevel.current_trio_token()
        refs.append(weakref.ref(token))
        await op()
        slept += token in _loopport._trio_ports

    for _ in range(30):
        trio.run(once)
    assert slept, "no await slept on its loop: the test tests nothing"
    assert _alive(refs) == 0, f"{_alive(refs)} of 30 finished trio runs are still alive"


# -- 7. gather and scatter are all or nothing ----------------------------------


def _two_devices(rt: Any) -> tuple[gpuaio.Device, gpuaio.Device]:
    if rt.backend.device_count() < 2:
        pytest.skip("needs 2 devices")
    return device_of(rt, 0), device_of(rt, 1)


def _sim_used(rt: Any, ordinal: int) -> int:
    return int(rt.backend._devices[ordinal].used)


@pytest.mark.gpuaio_sim_config(devices=2)
async def test_gather_with_a_bad_part_writes_nothing(gpuaio_runtime: Any) -> None:
    d0, d1 = _two_devices(gpuaio_runtime)
    n = 4 << 20
    p0 = d0.empty((n,), np.uint8)
    await d0.default_stream.memset(p0, 7)
    p1 = d1.empty((16,), np.int32)  # 64 bytes for 16 rows of a uint8 `out`: refused
    out = np.zeros(n + 16, np.uint8)
    with pytest.raises(gpuaio.InvalidArgumentError, match=r"parts\[1\]"):
        await gpuaio.gather([p0, p1], out)
    # Whatever gather had enqueued would have landed by now.
    await d0.default_stream.synchronize()
    await d1.default_stream.synchronize()
    assert not out.any(), f"{np.count_nonzero(out)} bytes of out written by a failed gather"
    with pytest.raises(gpuaio.InvalidArgumentError, match=r"parts\[0\] is a ndarray"):
        await gpuaio.gather([np.zeros(4, np.uint8)], np.zeros(4, np.uint8))  # type: ignore[list-item]


async def _raise_while_held(
    dev: gpuaio.Device, call: Callable[[], Any], exc: type[BaseException]
) -> list[Any]:
    """Run ``call`` with ``dev``'s default stream held for a while; return what
    was seen when it raised: (pending ops, seconds it took)."""
    rt = dev._runtime
    release = rt.backend.hold(dev.default_stream._native)
    seen: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def open_later() -> None:
            await anyio.sleep(0.2)
            release()

        tg.start_soon(open_later)
        with pytest.raises(exc):
            await call()
        from gpuaio.pytest_plugin import pending_operations

        seen.append(pending_operations(rt)[0])
    return seen


@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(devices=2)
async def test_gather_waits_for_the_enqueued_parts_when_an_enqueue_fails(
    gpuaio_runtime: Any,
) -> None:
    d0, d1 = _two_devices(gpuaio_runtime)
    n = 1 << 20
    a, b = pattern(n, 1), pattern(n, 2)
    p0, p1 = d0.empty((n,), np.uint8), d1.empty((n,), np.uint8)
    await d0.default_stream.copy(p0, a)
    await d1.default_stream.copy(p1, b)
    out = gpuaio.pinned_empty(2 * n)  # pinned: each part is one direct enqueue
    out[:] = 0
    gpuaio_runtime.backend.fail_next("cuMemcpyAsync", device=1)  # part 1's enqueue
    seen = await _raise_while_held(d0, lambda: gpuaio.gather([p0, p1], out), gpuaio.CudaError)
    assert seen == [0], "gather raised with part 0's copy still running"
    np.testing.assert_array_equal(out[:n], a)  # part 0 had landed when gather raised
    assert not out[n:].any()


@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(devices=2)
async def test_scatter_waits_and_frees_when_an_enqueue_fails(gpuaio_runtime: Any) -> None:
    rt = gpuaio_runtime
    d0, _d1 = _two_devices(rt)
    n = 1 << 20
    host = gpuaio.pinned_empty((2, n))
    host[:] = 5
    used = _sim_used(rt, 0), _sim_used(rt, 1)
    rt.backend.fail_next("cuMemcpyAsync", device=1)  # part 1's enqueue
    seen = await _raise_while_held(d0, lambda: gpuaio.scatter(host, [0, 1]), gpuaio.CudaError)
    assert seen == [0], "scatter raised with part 0's copy still running"
    host[:] = 9  # the caller reuses its buffer after the error: nothing reads it any more
    assert _eventually(lambda: (_sim_used(rt, 0), _sim_used(rt, 1)) == used), (
        "the parts allocated by the failed scatter were not freed"
    )


@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(devices=2, device_memory=64 << 20)
async def test_scatter_allocation_failure_enqueues_nothing(gpuaio_runtime: Any) -> None:
    rt = gpuaio_runtime
    d0, d1 = _two_devices(rt)
    hog = d1.empty((60 << 20,), np.uint8)  # part 1 (8 MiB) does not fit on device 1
    host = gpuaio.pinned_empty((2, 8 << 20))  # pinned: a part's copy is watched at once
    host[:] = 5
    used0 = _sim_used(rt, 0)
    release = rt.backend.hold(d0.default_stream._native)  # part 0 could not finish
    try:
        with pytest.raises(gpuaio.CudaError, match="OUT_OF_MEMORY"):
            await gpuaio.scatter(host, [d0, d1])
        pending = sum(eng.pending() for eng in rt._engines.values())
    finally:
        release()
    assert pending == 0, "scatter enqueued a copy before it failed"
    assert _eventually(lambda: _sim_used(rt, 0) == used0), "part 0 was not freed"
    del hog


@pytest.mark.gpuaio_sim_config(devices=2)
async def test_cancelled_gather_leaves_nothing_running(gpuaio_runtime: Any) -> None:
    """The caller cannot reach gather's copies to wait for them: a cancelled
    gather waits for them itself before the cancellation goes on."""
    d0, d1 = _two_devices(gpuaio_runtime)
    n = 1 << 20
    a, b = pattern(n, 3), pattern(n, 4)
    p0, p1 = d0.empty((n,), np.uint8), d1.empty((n,), np.uint8)
    await d0.default_stream.copy(p0, a)
    await d1.default_stream.copy(p1, b)
    out = np.zeros(2 * n, np.uint8)
    release = latch(d0, d0.default_stream)
    async with anyio.create_task_group() as tg:

        async def open_later() -> None:
            await anyio.sleep(0.3)
            release()

        tg.start_soon(open_later)
        with anyio.move_on_after(0.05) as scope:
            await gpuaio.gather([p0, p1], out)
        snapshot = out.copy()  # at once: the latch may be open by now, but no later
    assert scope.cancelled_caught
    np.testing.assert_array_equal(snapshot[:n], a)
    np.testing.assert_array_equal(snapshot[n:], b)


# -- 8. registering buffers that cannot be weakly referenced -------------------


def _kind(rt: Any, buf: Any) -> tuple[gpuaio.MemoryKind, gpuaio.MemoryKind]:
    """How gpuaio classifies ``buf``, and what the backend says of its memory."""
    ptr = np.frombuffer(buf, np.uint8).ctypes.data
    return gpuaio.memory_kind(buf), rt.backend.pointer_info(ptr).kind


_PAGEABLE = (gpuaio.MemoryKind.PAGEABLE, gpuaio.MemoryKind.PAGEABLE)
_PINNED = (gpuaio.MemoryKind.PINNED, gpuaio.MemoryKind.PINNED)


async def test_register_bytearray(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    rt = dev._runtime
    n = 1 << 20
    data = pattern(n, 5)
    buf = bytearray(data.tobytes())
    d = dev.empty(n)
    for _ in range(2):  # and again once unregistered
        reg = gpuaio.register_host(buf)
        assert _kind(rt, buf) == _PINNED
        with pytest.raises(BufferError):
            buf.append(0)  # moving the memory while it is page-locked is refused
        await stream.copy(d, buf)
        buf[:] = bytes(n)
        await stream.copy(buf, d)
        assert buf == data.tobytes()
        reg.unregister()
        assert _eventually(lambda: _kind(rt, buf) == _PAGEABLE), "never unregistered"
    buf.append(0)  # and it is the user's again
    view = np.frombuffer(bytearray(n), np.uint8)  # a view of a bytearray
    with gpuaio.register_host(view):
        assert _kind(rt, view) == _PINNED
        await stream.copy(view, d)
        np.testing.assert_array_equal(view, data)
    assert _eventually(lambda: _kind(rt, view) == _PAGEABLE)


async def test_register_readonly_buffers(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    rt = dev._runtime
    n = 1 << 16
    data = pattern(n, 6)
    for ro in (np.frombuffer(data.tobytes(), np.uint8), data.tobytes()):
        with gpuaio.register_host(ro):
            assert _kind(rt, ro) == _PINNED
            d = dev.empty(n)
            await stream.copy(d, ro)
            out = np.empty(n, np.uint8)
            await stream.copy(out, d)
            np.testing.assert_array_equal(out, data)
            with pytest.raises(gpuaio.InvalidArgumentError, match="read-only"):
                stream.copy(ro, d)
        assert _eventually(lambda ro=ro: _kind(rt, ro) == _PAGEABLE)


def test_rejected_registrations_leave_nothing_locked(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = gpuaio_runtime
    arr = np.zeros(1 << 16, np.uint8)
    with pytest.raises(gpuaio.InvalidArgumentError, match="`array` is empty"):
        gpuaio.register_host(bytearray())
    strided = arr[::2]
    with pytest.raises(gpuaio.InvalidArgumentError, match="`array` is not C-contiguous"):
        gpuaio.register_host(strided)
    assert _kind(rt, arr) == _PAGEABLE
    with gpuaio.register_host(arr), pytest.raises(gpuaio.InvalidArgumentError, match="pinned"):
        gpuaio.register_host(arr)
    assert _eventually(lambda: _kind(rt, arr) == _PAGEABLE)


def test_a_failure_after_page_locking_unlocks(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A registration that fails once the memory is page-locked unlocks it before raising."""
    from gpuaio._api import registration as _registration

    rt = gpuaio_runtime

    def broken(obj: Any) -> None:
        raise MemoryError("injected")

    buf = np.zeros(1 << 16, np.uint8)
    # The last step, after the range is page-locked and in the registry (where
    # register_host(bytearray) used to fail).
    monkeypatch.setattr(_registration, "forget", broken)
    with pytest.raises(MemoryError, match="injected"):
        gpuaio.register_host(buf)
    monkeypatch.undo()
    gc.collect()
    time.sleep(0.05)  # a finalizer's unregistration would have run by now
    assert _kind(rt, buf) == _PAGEABLE
    with gpuaio.register_host(buf):  # nothing left behind in the way
        assert _kind(rt, buf) == _PINNED
    assert _eventually(lambda: _kind(rt, buf) == _PAGEABLE)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "unlocked twice"
