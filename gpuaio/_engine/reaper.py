"""The reaper: one background thread that runs frees for everyone.

``cuMemFree``/``cuMemFreeHost`` may synchronize the whole device, and objects
are dropped on any thread (the event loop's included), so every driver free
and event or stream destroy that is not already on a worker thread is handed
to the reaper of its runtime.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable

__all__ = ["LeakingReaper", "Reaper"]

log = logging.getLogger("gpuaio")


class Reaper:
    """Frees memory on a background thread.

    ``cuMemFree``/``cuMemFreeHost`` may synchronize the whole device, so a
    buffer dropped on the event-loop thread is freed here instead.

    :meth:`submit` is called from ``__del__`` methods, which the garbage
    collector may run on any thread at any allocation, even inside
    :meth:`submit` itself: it queues first (``SimpleQueue.put`` is
    reentrant) and starts the thread under a reentrant lock.
    """

    def __init__(self, report: Callable[[str, BaseException], None] | None = None) -> None:
        self._report = report
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._starting = False
        self._lock = threading.RLock()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a driver free) on the reaper thread, off the loop."""
        self._q.put(fn)
        # While a start is under way its new thread will run ``fn``. Asking
        # for the lock then could deadlock: the collector may run a __del__
        # on that new thread before ``Thread.start()`` returns on the thread
        # holding the lock (it hung a CI run).
        if self._thread is None and not self._starting:
            self._start()

    def _start(self) -> None:
        if sys.is_finalizing():
            # Objects collected while the interpreter shuts down: a thread
            # started now never runs and Thread.start() waits for it forever
            # (3.11), or raises (3.12+). The process's memory goes with it.
            return
        with self._lock:
            if self._thread is not None or self._starting:
                return  # a submit nested in the start below: its fn is queued
            self._starting = True
            try:
                t = threading.Thread(target=self._run, name="gpuaio-reaper", daemon=True)
                t.start()
                self._thread = t
            finally:
                self._starting = False

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception as exc:
                what = "gpuaio failed to free memory or destroy an event"
                if self._report is not None:
                    self._report(what, exc)
                else:
                    log.exception(what)

    def close(self) -> None:
        """Run the frees already submitted, then stop the thread (waits up to 10 s)."""
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None:
            self._q.put(None)
            t.join(timeout=10)


class LeakingReaper(Reaper):
    """A forked child's reaper: frees nothing (the memory belongs to the parent's driver state)."""

    def submit(self, fn: Callable[[], None]) -> None:
        pass

    def close(self) -> None:
        pass
