"""The pending markers of one stream, and the one place where operations are resolved.

A stream completes its work in order, so its markers fire in order: a
:class:`StreamQueue` keeps them oldest first, and only its head is ever
queried. Whoever notices completions (the watcher thread, a polling loop,
a host thread that must block) resolves them through :meth:`StreamQueue.drain`,
under the queue's lock, so a stream's ops resolve in stream order whichever
thread drains; after a sticky error or at close, :meth:`StreamQueue.take_all`
removes the rest to be failed.

Ops share markers. An op watched while its stream has nothing pending gets a
marker of its own at once (a lone awaited op is not delayed). One watched
behind pending ops joins the stream's *open* :class:`Batch`, which has no
marker yet: the next drain of the queue closes it and records one marker for
all of its ops, then queries it once for all of them. With many tasks
awaiting small ops on few streams, that is one record and a few queries per
batch instead of one of each per op (issue 13: they were half of the loop's
time per op on an H200). A marker recorded later than its ops' work still
covers it: it may only fire later, never earlier.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..._core.errors import CudaError, DeviceFatalError
from ..._core.loopport import Port
from ..._core.operation import Operation

__all__ = ["Batch", "StreamQueue", "Waiters"]

Waiters = list[tuple[Port, Callable[[], None]]]
"""Wake-ups to post once the resolving pass is over (each loop once per batch)."""


class Batch:
    """Consecutive ops of one stream that share one marker."""

    __slots__ = ("error", "left", "marker", "stream")

    def __init__(self, stream: Any, marker: Any = None) -> None:
        self.stream = stream
        """The stream to record the marker on (the latest op's: any wrapper of the handle)."""
        self.marker = marker
        """None while open (or if recording it failed: then ``error``)."""
        self.error: CudaError | None = None
        self.left = 0
        """Its ops still in the queue: the marker is recycled when the last one goes."""


class StreamQueue:
    """The pending ops of one stream with their batches, oldest first (they fire in order)."""

    __slots__ = (
        "busy_until",
        "entries",
        "fired",
        "last_poll",
        "lock",
        "open",
        "place",
        "recycle",
        "tail",
    )

    def __init__(
        self,
        place: Callable[[Any], Any],
        fired: Callable[[Any], bool],
        recycle: Callable[[Any], None],
    ) -> None:
        self.place = place
        """Records a marker on a stream and returns it (raises CudaError)."""
        self.fired = fired
        """Whether a marker has been reached (raises CudaError; DeviceFatalError when sticky)."""
        self.recycle = recycle
        """Takes back a marker that has fired."""
        self.entries: deque[tuple[Operation, Batch]] = deque()
        # Held while resolving, so that ops of one stream resolve in order
        # even when the watcher and loops drain at the same time.
        self.lock = threading.Lock()
        # Guards ``open`` and appends to it; held for a few statements only,
        # never across a driver call: the enqueuing thread (a loop) takes it.
        self.tail = threading.Lock()
        self.open: Batch | None = None
        """The batch that ops watched behind pending ones join, until a drain marks it."""
        self.last_poll = 0.0
        """When a loop last drained it (sweeps skip streams drained lately)."""
        self.busy_until = 0.0
        """When the stream's queued work with known durations should be done."""

    def add(self, op: Operation, stream: Any, marker: Any) -> None:
        """Append ``op`` (its work enqueued on ``stream`` already).

        With a ``marker`` (recorded behind that work) the op gets a batch of
        its own; with None it joins the open batch, to be marked by the next
        drain.
        """
        with self.tail:
            batch = self.open if marker is None else None
            if batch is None:
                batch = Batch(stream, marker)
                if marker is None:
                    self.open = batch
            else:
                batch.stream = stream
            batch.left += 1
            self.entries.append((op, batch))

    def _mark(self, batch: Batch) -> None:
        """Close the open ``batch`` and record its marker (under ``lock``).

        The marker is recorded after the batch is closed, so after the work of
        every op in it was enqueued (an op joins only once its work is).
        Raises DeviceFatalError; another CudaError fails the batch's ops.
        """
        with self.tail:
            if self.open is batch:
                self.open = None
        try:
            batch.marker = self.place(batch.stream)
        except DeviceFatalError:
            raise
        except CudaError as e:
            batch.error = e

    def drain(self, out: Waiters, block: bool = False) -> None:
        """Resolve the ops at the head whose markers have fired; add their waiters to ``out``.

        Ops resolve in stream order (their completion steps, the copy-outs,
        run here in that order); an op whose marker reports a (non-sticky)
        driver error fails with it. Raises DeviceFatalError on a sticky
        error; ``out`` keeps the waiters of the ops resolved before it, and
        the caller must still wake them. Without ``block`` it returns at once
        if another thread is draining this stream.
        """
        if not self.lock.acquire(blocking=block):
            return  # another thread is draining this stream right now
        try:
            entries, fired = self.entries, self.fired
            done: Batch | None = None  # the batch whose marker was seen fired
            exc: BaseException | None = None
            while entries:
                op, batch = entries[0]
                if batch is not done:
                    if batch.marker is None and batch.error is None:
                        self._mark(batch)
                    exc = batch.error
                    if exc is None:
                        try:
                            if not fired(batch.marker):
                                break
                        except DeviceFatalError:
                            raise
                        except CudaError as e:
                            exc = e
                    done = batch
                entries.popleft()
                batch.left -= 1
                if not batch.left and batch.marker is not None:
                    self.recycle(batch.marker)
                out.extend(op._finish(exc))
        finally:
            self.lock.release()

    def take_all(self) -> list[Operation]:
        """Remove every pending op (to fail them all), waiting for a drain under way."""
        with self.lock, self.tail:
            ops = [op for op, _batch in self.entries]
            self.entries.clear()
            self.open = None
        return ops
