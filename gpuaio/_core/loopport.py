"""Waking an event loop (or a blocked thread) from a foreign thread, once per batch.

Completions are detected off the loop (a watcher thread, a driver callback).
Each event loop gets one :class:`LoopPort`; completions posted to it while a
wake-up is already scheduled ride along with that wake-up, so a burst of N
completions costs one ``call_soon_threadsafe`` rather than N. A thread that
blocks on an operation (a stream's host thread settling on an earlier host
action) waits through :data:`THREAD_PORT`, whose callbacks run at once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import sniffio

__all__ = ["THREAD_PORT", "LoopPort", "Port", "current_port"]

log = logging.getLogger("gpuaio")


class Port:
    """Where an operation's waiter is woken: ``post`` runs callbacks there."""

    __slots__ = ("__weakref__",)

    def post(self, callbacks: list[Callable[[], None]]) -> None:
        """Run ``callbacks`` where this port's waiters live; callable from any thread."""
        raise NotImplementedError


class _ThreadPort(Port):
    """Waiters that are blocked threads: their callbacks (``threading.Event.set``)
    are thread-safe and quick, so they run in the resolving thread."""

    __slots__ = ()

    def post(self, callbacks: list[Callable[[], None]]) -> None:
        for cb in callbacks:
            cb()


THREAD_PORT: Port = _ThreadPort()
"""The port of threads blocked in :meth:`gpuaio.Operation._wait_blocking`."""


class LoopPort(Port):
    """Thread-safe, batching wake-up channel into one event loop."""

    __slots__ = (
        "_closed",
        "_is_running",
        "_lock",
        "_method",
        "_owner",
        "_pending",
        "_scheduled",
        "thread",
    )

    def __init__(
        self,
        owner: Any,
        method: str = "call_soon_threadsafe",
        is_running: Callable[[], bool] = lambda: True,
    ) -> None:
        # The loop (or trio token) is held weakly and its method looked up
        # at each post: the port is the value of a map weakly keyed by that
        # same loop, and a bound method held here would keep the key, and
        # every loop that ever awaited an op, alive for good.
        self._owner: Callable[[], Any] = weakref.ref(owner)
        self._method = method
        self._is_running = is_running
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._scheduled = False
        self._closed = False
        self.thread = threading.get_ident()

    def post(self, callbacks: list[Callable[[], None]]) -> None:
        """Run ``callbacks`` on the loop thread soon; from any thread.

        From the loop's own thread, while that loop runs, they run at once.
        If the loop has closed, the callbacks are dropped: nobody is left to
        wake, and raising in the caller (a watcher thread, or another loop
        that now runs on the same thread) would help no one.
        """
        if threading.get_ident() == self.thread and self._is_running():
            for cb in callbacks:
                try:
                    cb()
                except Exception:  # a waiter's wake-up must not fail its resolver
                    log.exception("gpuaio: waking a task failed")
            return
        with self._lock:
            if self._closed:
                return
            self._pending.extend(callbacks)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            owner = self._owner()
            if owner is None:
                raise RuntimeError("the event loop is gone")
            getattr(owner, self._method)(self._drain)
        except Exception:
            # asyncio raises RuntimeError on a closed loop, trio RunFinishedError;
            # a collected loop is as closed.
            with self._lock:
                self._closed = True
                self._pending.clear()

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for cb in pending:
            cb()


_asyncio_ports: weakref.WeakKeyDictionary[Any, LoopPort] = weakref.WeakKeyDictionary()
_trio_ports: weakref.WeakKeyDictionary[Any, LoopPort] = weakref.WeakKeyDictionary()


def current_port() -> LoopPort:
    """The :class:`LoopPort` of the running event loop (asyncio, uvloop or trio)."""
    lib = sniffio.current_async_library()
    if lib == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()
        port = _asyncio_ports.get(loop)
        if port is None:
            port = _asyncio_ports[loop] = LoopPort(loop, "call_soon_threadsafe", _runs(loop))
        return port
    if lib == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        port = _trio_ports.get(token)
        if port is None:
            port = _trio_ports[token] = LoopPort(token, "run_sync_soon", _trio_runs(token))
        return port
    raise RuntimeError(f"gpuaio does not support the {lib!r} event loop")


def _runs(loop: Any) -> Callable[[], bool]:
    """Whether ``loop`` is the loop running in the calling thread (weakly held)."""
    import asyncio

    ref = weakref.ref(loop)
    get_running = asyncio._get_running_loop

    def is_running() -> bool:
        return get_running() is ref()

    return is_running


def _trio_runs(token: Any) -> Callable[[], bool]:
    """Whether the trio run of ``token`` is the one running in the calling thread."""
    import trio

    ref = weakref.ref(token)

    def is_running() -> bool:
        try:
            return trio.lowlevel.current_trio_token() is ref()
        except RuntimeError:
            return False

    return is_running
