"""Waking an event loop from a foreign thread, once per batch.

Completions are detected off the loop (a watcher thread, a driver callback).
Each event loop gets one :class:`LoopPort`; completions posted to it while a
wake-up is already scheduled ride along with that wake-up, so a burst of N
completions costs one ``call_soon_threadsafe`` rather than N.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import sniffio

__all__ = ["LoopPort", "current_port"]


class LoopPort:
    """Thread-safe, batching wake-up channel into one event loop."""

    __slots__ = (
        "__weakref__",
        "_call_soon",
        "_closed",
        "_lock",
        "_pending",
        "_scheduled",
        "thread",
    )

    def __init__(self, call_soon_threadsafe: Callable[[Callable[[], None]], Any]) -> None:
        self._call_soon = call_soon_threadsafe
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._scheduled = False
        self._closed = False
        self.thread = threading.get_ident()

    def post(self, callbacks: list[Callable[[], None]]) -> None:
        """Run ``callbacks`` on the loop thread soon; from any thread.

        If the loop has closed, the callbacks are dropped: nobody is left to
        wake, and raising in the caller (a watcher thread) would help no one.
        """
        if threading.get_ident() == self.thread:
            for cb in callbacks:
                cb()
            return
        with self._lock:
            if self._closed:
                return
            self._pending.extend(callbacks)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._call_soon(self._drain)
        except Exception:
            # asyncio raises RuntimeError on a closed loop, trio RunFinishedError.
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
            port = _asyncio_ports[loop] = LoopPort(loop.call_soon_threadsafe)
        return port
    if lib == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        port = _trio_ports.get(token)
        if port is None:
            port = _trio_ports[token] = LoopPort(token.run_sync_soon)
        return port
    raise RuntimeError(f"gpuaio does not support the {lib!r} event loop")
