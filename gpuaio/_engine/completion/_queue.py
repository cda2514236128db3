"""The pending markers of one stream, and the one place where operations are resolved.

A stream completes its work in order, so its markers fire in order: a
:class:`StreamQueue` keeps them oldest first, and only its head is ever
queried. Whoever notices completions (the watcher thread, a polling loop,
a host thread that must block) resolves them through :meth:`StreamQueue.drain`,
under the queue's lock, so a stream's ops resolve in stream order whichever
thread drains; after a sticky error or at close, :meth:`StreamQueue.take_all`
removes the rest to be failed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..._core.errors import CudaError, DeviceFatalError
from ..._core.loopport import Port
from ..._core.operation import Operation

__all__ = ["StreamQueue", "Waiters"]

Waiters = list[tuple[Port, Callable[[], None]]]
"""Wake-ups to post once the resolving pass is over (each loop once per batch)."""


class StreamQueue:
    """The pending markers of one stream, oldest first (they fire in order)."""

    __slots__ = ("busy_until", "entries", "fired", "last_poll", "lock", "recycle")

    def __init__(self, fired: Callable[[Any], bool], recycle: Callable[[Any], None]) -> None:
        self.fired = fired
        """Whether a marker has been reached (raises CudaError; DeviceFatalError when sticky)."""
        self.recycle = recycle
        """Takes back a marker that has fired."""
        self.entries: deque[tuple[Operation, Any]] = deque()
        # Held while resolving, so that ops of one stream resolve in order
        # even when the watcher and loops drain at the same time.
        self.lock = threading.Lock()
        self.last_poll = 0.0
        """When a loop last drained it (sweeps skip streams drained lately)."""
        self.busy_until = 0.0
        """When the stream's queued work with known durations should be done."""

    def drain(self, out: Waiters, block: bool = False) -> None:
        """Resolve the ops at the head whose markers have fired; add their waiters to ``out``.

        Ops resolve in stream order (their completion steps, the copy-outs,
        run here in that order); an op whose marker reports a (non-sticky)
        driver error fails with it. Raises DeviceFatalError on a sticky
        error; ``out`` keeps the waiters of the ops resolved before it, and
        the caller must still wake them. Without ``block`` it returns at once
        if another thread is draining this stream.
        """
        lock = self.lock
        if not lock.acquire(block):
            return  # another thread is draining this stream right now
        try:
            entries, fired, recycle = self.entries, self.fired, self.recycle
            while entries:
                op, marker = entries[0]
                try:
                    if not fired(marker):
                        break
                    exc: BaseException | None = None
                except DeviceFatalError:
                    raise
                except CudaError as e:
                    exc = e
                entries.popleft()
                recycle(marker)
                woken = op._finish(exc)
                if woken:
                    out.extend(woken)
        finally:
            lock.release()

    def take_all(self) -> list[Operation]:
        """Remove every pending op (to fail them all), waiting for a drain under way."""
        with self.lock:
            ops = [op for op, _marker in self.entries]
            self.entries.clear()
        return ops
