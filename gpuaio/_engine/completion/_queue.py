"""The pending markers of one stream, and the one place where operations are resolved.

A stream completes its work in order, so its markers fire in order: a
:class:`StreamQueue` keeps them oldest first, and only its head is ever
queried. Whoever notices completions (the watcher thread, a polling loop,
a host thread that must block) resolves them through :meth:`StreamQueue.drain`,
under the queue's lock, so a stream's ops resolve in stream order whichever
thread drains; after a sticky error or at close, :meth:`StreamQueue.take_all`
removes the rest to be failed.

**Batches.** A short op (a memset, a small copy between device and pinned
memory) need not have a marker of its own: it joins its stream's *open
batch*, and one marker, recorded when the batch is *sealed*, stands for
every op of it. Per op that saves a ``cuEventRecord`` and a
``cuEventQuery``, two of the three driver calls of an awaited memset. With
1,000 tasks on 16 streams, the ops a loop turn enqueues on one stream share
one marker. A short op joins a batch while its stream has company: other
ops of the stream pending, or :attr:`StreamQueue.batching`, which a batch
sealed with other ops in it or behind it sets, whoever seals it, and only
a task polling for a batch with neither clears. Otherwise a lone op gets a
marker at once, as before batches, and one op every ``BATCH_PROBE_S``
opens a batch to see whether others join. (When only a task's poll could
show company, the watcher sealing a stream's first batch early left its
200 tasks without batches for ``BATCH_PROBE_S``, up to a third of the ops
of the test that counts markers, in GPU runs AI-AK.) A batch is sealed:

* when a task polls for one of its ops (``EventEngine.poll_for``);
* when a drain that stands in for the watcher reaches it: the watcher's at
  once, a loop's sweep only once the batch is ``BATCH_AGE_S`` old (ops
  nobody awaits still resolve and release their buffers);
* before anything that is not short is enqueued on the stream, and before
  the stream is destroyed (:meth:`StreamQueue.seal`, called through the
  stream's sequencer): a batch's ops must not wait for a long copy or a
  kernel enqueued after them, least of all one that waits for the host;
* when it holds ``BATCH_S`` of expected GPU time.

A marker recorded late covers the work enqueued before it, so a batch's op
resolves when that work is done: never early, and late by at most the GPU
time of the short ops enqueued after it. Work other libraries enqueue on
the ``CUstream`` would count too, so a stream whose handle was handed out
batches nothing (``Sequencer.exported``).

**Deferred memsets.** A memset of one to four aligned 32-bit words of
device memory need not be enqueued on its own: it joins the batch with its
words, and sealing enqueues every deferred word of the batch in one call
(``Backend.stream_write_words``, ``cuStreamBatchMemOp`` on CUDA), then the
marker. On an H200 host a ``cuMemsetD32Async`` took 2.2-2.9 us of the
calling thread, and a batch call about as long plus 0.12 us a word (run
AO), the largest cost per op left with 1,000 tasks. Such a memset reaches
the GPU only when its batch is sealed, so anything else enqueued on the
stream must come after the batch's deferred words: whatever seals first
(above) does, and a short op enqueued at once *flushes* them first
(:meth:`StreamQueue.flush`, leaving the batch open).

``seal_lock`` orders joining and sealing: an op joins the open batch, and a
batch is sealed (its marker recorded), under it. An op's work is enqueued
before it joins, so a marker always comes after the work of every op of its
batch. An event loop never waits for it: an op that cannot join at once
gets a marker of its own, a poll that cannot seal polls again, and an op
that must seal the batch before it is enqueued goes to the stream's host
thread.

**Sealing, seen from other threads.** ``EventEngine.seal`` and ``flush``
read ``open`` (and its ``words``) without ``seal_lock``, to spare the lock
on the hot path: no open batch, or none with words, and the caller enqueues
at once. So a batch stays ``open``, and its ``words`` stay set, until its
words are enqueued and its marker placed, under the lock; a caller that
sees them set tries the lock, and gets in line behind the sealing thread.
(Cleared first, another thread's kernel could go onto the stream between
the watcher's clearing and its marker: the batch's ops then waited for
the kernel, which waited for them, in GPU run AR; or a memset enqueued at
once landed before the deferred words written after it.)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..._core.errors import CudaError, DeviceFatalError
from ..._core.loopport import Port
from ..._core.operation import Operation
from ._tuning import BATCH_OP_S, BATCH_PROBE_S, BATCH_S, RETIRE_S

__all__ = ["Mark", "StreamQueue", "Waiters"]

Waiters = list[tuple[Port, Callable[[], None]]]
"""Wake-ups to post once the resolving pass is over (each loop once per batch)."""


class Mark:
    """The marker of a batch of consecutive short ops of one stream.

    An op with a marker of its own has that marker (an event) in its queue
    entry instead.
    """

    __slots__ = ("cost", "error", "event", "fired", "left", "native", "opened", "placed", "words")

    def __init__(self, native: Any, now: float) -> None:
        self.native = native
        """The stream to record the marker on when the batch is sealed."""
        self.event: Any = None
        """The recorded marker; None while the batch is open."""
        self.error: BaseException | None = None
        """Why the marker could not be recorded or queried: its ops fail with it (once a
        marker behind their work has fired: one is placed again if recording failed)."""
        self.fired = False
        self.left = 0
        """Entries of the queue holding this mark (its event is recycled at 0)."""
        self.cost = 0.0
        """Expected GPU time of the batch's ops, in seconds."""
        self.opened = now
        """When the batch was opened (``perf_counter``)."""
        self.placed = now
        """When its marker was recorded (when it was sealed)."""
        self.words: list[int] | None = None
        """Deferred memsets of ops of the batch, ``[address, value, ...]``, not yet
        enqueued (see the module docstring: deferred memsets)."""


class StreamQueue:
    """The pending markers of one stream, oldest first (they fire in order)."""

    __slots__ = (
        "batching",
        "busy_until",
        "detached",
        "entries",
        "fired",
        "last_poll",
        "last_watch",
        "lock",
        "next_probe",
        "open",
        "place",
        "recycle",
        "seal_lock",
        "write",
    )

    def __init__(
        self,
        fired: Callable[[Any], bool],
        recycle: Callable[[Any], None],
        place: Callable[[Any], Any],
        write: Callable[[Any, list[int]], None],
    ) -> None:
        self.fired = fired
        """Whether a marker has been reached (raises CudaError; DeviceFatalError when sticky)."""
        self.recycle = recycle
        """Takes back a marker that has fired."""
        self.place = place
        """Records a marker on a stream and returns it (raises CudaError)."""
        self.write = write
        """``write(native, [address, value, ...])`` enqueues deferred memsets (raises CudaError)."""
        self.entries: deque[tuple[Operation, Any]] = deque()
        """Each pending op with its marker: an event of its own, or its batch's :class:`Mark`."""
        # Held while resolving, so that ops of one stream resolve in order
        # even when the watcher and loops drain at the same time.
        self.lock = threading.Lock()
        self.seal_lock = threading.Lock()
        self.open: Mark | None = None
        """The batch short ops join, not yet sealed (see the module docstring)."""
        self.batching = False
        """Whether the stream has company (see the module docstring): short ops join batches."""
        self.next_probe = 0.0
        """When a short op joins a batch even though :attr:`batching` is False (a new
        queue's second short op does: one retired while idle may be busy again)."""
        self.detached = False
        """Retired by its engine (:meth:`retire`): ops join it no more."""
        self.last_watch = 0.0
        """When an op was last added (``perf_counter``)."""
        self.last_poll = 0.0
        """When a loop last drained it, or found an op of it resolved (sweeps skip
        streams polled lately: ``EventEngine.poll_for``)."""
        self.busy_until = 0.0
        """When the stream's queued work with known durations should be done."""

    # -- adding --------------------------------------------------------
    def join(
        self,
        op: Operation,
        native: Any,
        now: float,
        words: list[int] | None = None,
        block: bool = False,
    ) -> Mark | None:
        """Add the short op ``op``, just enqueued on ``native``, to the open batch.

        The engine calls it while a batch is open or the last one a task
        polled for had company (:attr:`batching`), and otherwise once every
        ``BATCH_PROBE_S``, to see whether others would join: a lone op gets a
        marker of its own at once, as ops did before batches (batching one op
        would only place its marker later). Opens a batch if none is, and
        seals the open one first if it holds ``BATCH_S`` of GPU time already.

        With ``words``, ``op`` is a memset not yet enqueued: its words are
        enqueued with the batch's other deferred memsets, before its marker.

        Returns the batch joined; or None, adding nothing, if the caller must
        give ``op`` a marker of its own (and enqueue its work itself):
        ``seal_lock`` was busy (waited for only with ``block``: never on an
        event loop's thread), or the queue was retired.
        """
        sl = self.seal_lock
        if not sl.acquire(block):
            return None
        try:
            if self.detached:
                return None
            m = self.open
            if m is None:
                self.next_probe = now + BATCH_PROBE_S
                m = self.open = Mark(native, now)
            elif m.cost >= BATCH_S:
                self._seal(m)
                m = self.open = Mark(native, now)
            m.cost += op._est + BATCH_OP_S
            m.left += 1
            if words is not None:
                if m.words is None:
                    m.words = words
                else:
                    m.words += words
            self.entries.append((op, m))
            self.last_watch = now
        finally:
            sl.release()
        return m

    def seal(self, block: bool = True, learn: bool = False) -> bool:
        """Seal the open batch, if any; False if ``seal_lock`` was busy and ``block`` is False.

        A batch with company (other ops in it, or other ops of the stream
        pending) sets :attr:`batching`; with ``learn`` (a task polls for an op
        of the batch: it holds what one loop turn enqueued), one without
        clears it.
        Raises DeviceFatalError if recording the marker hit a sticky error
        (the batch's ops then fail with it as the queue drains).
        """
        sl = self.seal_lock
        if not sl.acquire(block):
            return False
        try:
            m = self.open
            if m is not None:
                self._seal(m, learn)
        finally:
            sl.release()
        if m is not None and isinstance(m.error, DeviceFatalError):
            raise m.error
        return True

    def _seal(self, m: Mark, learn: bool = False) -> None:
        """Record ``m``'s marker (``seal_lock`` held); a failure is kept in ``m.error``.

        Updates :attr:`batching` as :meth:`seal` says.
        """
        # Read without the queue's lock: a drain may shorten entries meanwhile,
        # which at worst takes company for none (the next probe corrects it).
        company = m.left > 1 or len(self.entries) > m.left
        if company or learn:
            self.batching = company
        try:
            if m.words is not None:
                self._write(m)
            try:
                m.event = self.place(m.native)
                m.placed = time.perf_counter()
            except CudaError as e:  # DeviceFatalError too: the batch's ops fail with it
                m.error = e
        finally:
            # Only now: a thread that finds no open batch enqueues at once,
            # without seal_lock (EventEngine.seal), and must come after the
            # words and the marker (see "Sealing, seen from other threads").
            self.open = None

    def _write(self, m: Mark) -> None:
        """Enqueue ``m``'s deferred memsets (``seal_lock`` held); a failure goes to ``m.error``.

        Its marker is still placed after a failure: the batch's other ops'
        work was enqueued, and they resolve only once it is done.
        """
        words = m.words
        try:
            if words:
                self.write(m.native, words)
        except CudaError as e:
            m.error = e
        finally:
            m.words = None  # only now, as ``open`` in _seal: EventEngine.flush reads it unlocked

    def flush(self, block: bool = True) -> bool:
        """Enqueue the open batch's deferred memsets, leaving it open; False if
        ``seal_lock`` was busy and ``block`` is False.

        Before anything else is enqueued on the stream without sealing (a
        short op's work): it must come after them. If enqueueing them fails,
        the batch is sealed, so that the ops after it do not fail with it.
        Raises DeviceFatalError if enqueueing them hit a sticky error.
        """
        sl = self.seal_lock
        if not sl.acquire(block):
            return False
        try:
            m = self.open
            if m is not None and m.words is not None:
                self._write(m)
                if m.error is not None:
                    self._seal(m)
        finally:
            sl.release()
        if m is not None and isinstance(m.error, DeviceFatalError):
            raise m.error
        return True

    def retire(self, now: float) -> bool:
        """Whether the queue may leave its engine (empty, idle ``RETIRE_S``): then no
        op joins it any more.

        Idle a while, not just empty: a new queue would forget what the stream's
        batches were like. The engine calls it with its own lock held, which
        every other way into an engine's queues takes; an op may join without
        it, so joining and retiring exclude each other through ``seal_lock``.
        """
        if now - self.last_watch < RETIRE_S or not self.seal_lock.acquire(False):
            return False
        try:
            if self.entries:
                return False
            self.detached = True
            return True
        finally:
            self.seal_lock.release()

    # -- resolving -----------------------------------------------------
    def drain(self, out: Waiters, block: bool = False, seal_after: float = 0.0) -> None:
        """Resolve the ops at the head whose markers have fired; add their waiters to ``out``.

        Ops resolve in stream order (their completion steps, the copy-outs,
        run here in that order); an op whose marker reports a (non-sticky)
        driver error fails with it. Raises DeviceFatalError on a sticky
        error; ``out`` keeps the waiters of the ops resolved before it, and
        the caller must still wake them. Without ``block`` it returns at once
        if another thread is draining this stream (or sealing its batch).

        The open batch is sealed if the drain reaches it and it has been
        open ``seal_after`` seconds (loops that poll for other ops leave a
        young batch open, to fill), and, with ``seal_after`` 0 (the watcher,
        a blocked host thread), also if the drain stops at an earlier marker
        that has not fired (see the module docstring).
        """
        m = self.open
        if seal_after and m is not None:
            # Nothing to resolve while the oldest op is in the open batch and it
            # is too young to seal: nine in ten drains of the loops' sweeps with
            # 1,000 tasks, skipped without the lock. Unlocked reads: at worst a
            # batch sealed meanwhile is drained at the next poll.
            try:
                head = self.entries[0][1]
            except IndexError:
                return
            if head is m and time.perf_counter() - m.opened < seal_after:
                return
        lock = self.lock
        if not lock.acquire(block):
            return  # another thread is draining this stream right now
        try:
            entries, fired, recycle = self.entries, self.fired, self.recycle
            while entries:
                # ``mk``, not ``m``: ``m`` is typed Mark above, and a compiled
                # drain (hatch_build.py) would reject an event of its own there.
                op, mk = entries[0]
                if mk.__class__ is not Mark:  # a marker of its own
                    try:
                        if not fired(mk):
                            break
                        exc: BaseException | None = None
                    except DeviceFatalError:
                        raise
                    except CudaError as e:
                        exc = e
                    entries.popleft()
                    recycle(mk)
                else:
                    m = mk  # typed again (a Mark here): a compiled drain reads its fields directly
                    if not m.fired:
                        if not self._batch_fired(m, seal_after, block):
                            break
                        m.fired = True
                    entries.popleft()
                    m.left -= 1
                    if not m.left and m.event is not None:
                        recycle(m.event)
                    exc = m.error
                woken = op._finish(exc)
                if woken:
                    out.extend(woken)
        finally:
            lock.release()

    def _batch_fired(self, m: Mark, seal_after: float, block: bool) -> bool:
        """Whether the batch ``m`` at the head is over (fired, or failed: ``m.error``).

        Seals it, or the open batch behind it, as :meth:`drain` says.
        Raises DeviceFatalError on a sticky error.
        """
        err = m.error
        if err is not None:
            if isinstance(err, DeviceFatalError):
                raise err
            if m.event is None:
                # Its marker failed to record, but the batch's work was
                # enqueued and may still run: its ops fail only once a marker
                # placed behind that work has fired. Resolved at once, they
                # gave their buffers back under it (a staged copy's pinned
                # block, reused by another copy while the DMA still wrote it).
                return self._place_again(m) and self._fired_or_failed(m)
            # Its deferred memsets failed; its marker covers the rest's work.
        if m.event is None:
            # The open batch is the oldest pending. Its marker, if recorded
            # now, cannot have fired yet.
            now = time.perf_counter()
            if not seal_after or now - m.opened >= seal_after:
                self.seal(block)
            return False
        if self._fired_or_failed(m):
            return True
        if not seal_after and self.open is not None:
            self.seal(block)  # not held back behind a long op to its end, either
        return False

    def _fired_or_failed(self, m: Mark) -> bool:
        """Whether ``m``'s recorded marker has fired; a query's (non-sticky) error
        goes to ``m.error`` and counts as over. Raises DeviceFatalError."""
        try:
            return self.fired(m.event)
        except DeviceFatalError:
            raise
        except CudaError as e:
            m.error = e
            return True

    def _place_again(self, m: Mark) -> bool:
        """Record the marker of a sealed batch whose marker failed, now (behind
        its work and maybe more: late, never early); False if that fails too
        (the next drain tries again). Raises DeviceFatalError."""
        try:
            m.event = self.place(m.native)
        except DeviceFatalError:
            raise
        except CudaError:
            return False
        m.placed = time.perf_counter()
        return True

    def take_all(self) -> list[Operation]:
        """Remove every pending op (to fail them all), waiting for a drain under way."""
        with self.lock:
            with self.seal_lock:
                self.open = None
            ops = [op for op, _mark in self.entries]
            self.entries.clear()
        return ops
