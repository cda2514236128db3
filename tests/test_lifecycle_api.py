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
from gpuaio import _loopport
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
    base_sim = _live_sim_streams(rt)

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
        assert _eventually(lambda: _live_sim_streams(rt) == base_sim), "sim streams not destroyed"
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
    with anyio.move_on_after(0.05) as scope:
        async with dev.stream() as s:
            box.append(s)
            await s.memset(d, 5)
            box.append(s.copy(host, d))  # not awaited: aclose must wait for it
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
            gc.collect()
        assert [str(w.message)[:22] for w in caught if w.category is ResourceWarning] == [
            "unclosed <gpuaio.Strea"
        ]
        assert _eventually(lambda: len(destroyed_on) == 1), "the dropped stream was never destroyed"
        assert destroyed_on[0] != threading.current_thread().name, "destroyed on the loop thread"
        assert _eventually(lambda: len(rt._sequencers) <= base_seqs)
        if base_sim is not None:
            assert _eventually(lambda: _live_sim_streams(rt) == base_sim)
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
    """An op whose awaiting task sleeps on the loop (not one found done at once)."""
    s = dev.default_stream
    n = 4 << 20
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
    op = _slow_copy(gpuaio_runtime.device(0))
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
    # The completion thread may still hold the last loop's waiter in a local.
    assert _alive(refs) <= 1, f"{_alive(refs)} of 30 closed loops are still alive"


def test_finished_trio_runs_are_collected(gpuaio_runtime: Any) -> None:
    trio = pytest.importorskip("trio")
    op = _slow_copy(gpuaio_runtime.device(0))
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
    assert _alive(refs) <= 1, f"{_alive(refs)} of 30 finished trio runs are still alive"
