"""The ``events`` strategy: pooled CUDA events, polled by awaiting loops and one watcher.

Who does what, in the order an operation meets them:

1. **The enqueuing thread** calls :meth:`EventEngine.watch`: it records a
   pooled event behind the op's work and appends ``(op, event)`` to its
   stream's :class:`StreamQueue`; or, for a short op among many in flight,
   it adds the op to the stream's open batch, whose one marker is placed
   later (``_queue``: batches). A stream completes in order, so only the
   oldest entry of each queue is ever queried.
2. **The awaiting loop** polls (:meth:`~EventEngine.poll_for`, called by
   ``Operation.__await__``) for up to ``LOOP_SPIN_S``, yielding between
   polls: a short op completes with no cross-thread wake-up at all. A
   polling loop also *sweeps*: every ``LOOP_SWEEP_S`` one poll drains the
   device's other streams and probes for a sticky error, standing in for
   the watcher. If the op is not done by then, the task sleeps and calls
   :meth:`~EventEngine.hand_off`.
3. **The watcher thread** (one per device, :meth:`~EventEngine._run`)
   drains every stream, then rests as cheaply as it can while staying quick
   (see :class:`_Pace`). While loops poll it *stands down*: woken often, it
   would mostly wait for the GIL, which a loop switching tasks rarely lets
   go of. One batch of completions wakes each event loop once.

Every op is resolved in one place, :meth:`StreamQueue.drain` (or failed by
:meth:`StreamQueue.take_all` after a sticky error or at close), under the
queue's lock, so a stream's ops resolve in stream order whichever thread
drains. The GPU never waits for Python.

The stand-down. ``EventEngine._loop_polling_until`` says until when loops
are assumed to poll. Every poll pushes it to ``now + LOOP_COVER_S``; a task
that stops polling (``hand_off``), or an op watched with a task already
asleep on it, resets it to 0 and wakes a standing-down watcher. The watcher
reads it, and decides to sleep, under the engine's lock; ``hand_off`` and
``watch`` write it under that lock too, so a reset can never slip between
the watcher's decision and its sleep (the reset would then wake nobody).
Polls write it without the lock: they run on the loop for every poll, and
their write is true whenever it lands (a loop polled just now), so a poll
racing a reset is the same as a poll just after it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from ..._core.compiled import mypyc_attr
from ..._core.errors import ClosedWhilePendingError, CudaError, DeviceFatalError
from ..._core.operation import Operation, post_waiters, resolve_many
from ..._core.timerslack import precise_timers
from ._engine import CompletionEngine, FaultProbe
from ._firstpoll import FirstPolls, TailSpins
from ._queue import StreamQueue, Waiters
from ._survey import prewake_oldest, survey
from ._tuning import (
    BATCH_AGE_S,
    ETA_EARLY_S,
    ETA_SLEEP_MAX_S,
    ETA_SLEEP_MIN_S,
    FAULT_PROBE_S,
    LOOP_COVER_S,
    LOOP_SPIN_S,
    LOOP_SWEEP_S,
    MAX_SLEEP_S,
    MIN_SLEEP_S,
    PREWAKE_S,
    SHORT_OP_S,
    SPIN_POLL_S,
    SPIN_S,
    STAND_DOWN_S,
    STREAM_POLL_GAP_S,
)

if TYPE_CHECKING:
    from ...backends import Backend

__all__ = ["EventEngine"]

log = logging.getLogger("gpuaio")


class _Pace:
    """How the watcher rests between passes that resolved nothing.

    It spins (yielding the GIL) for ``SPIN_S`` after new work or a
    completion, then sleeps between passes, ``MIN_SLEEP_S`` at first and
    twice as long each time up to ``MAX_SLEEP_S``.
    """

    __slots__ = ("sleep_s", "spin_until")

    def __init__(self, now: float) -> None:
        self.spin_until = now + SPIN_S
        self.sleep_s = MIN_SLEEP_S

    def spin_again(self) -> None:
        """Spin again from now (the back-off continues where it was)."""
        self.spin_until = time.perf_counter() + SPIN_S

    def restart(self, now: float) -> None:
        """Spin again from ``now``, then back off from the shortest sleep."""
        self.spin_until = now + SPIN_S
        self.sleep_s = MIN_SLEEP_S

    def back_off(self) -> None:
        self.sleep_s = min(self.sleep_s * 2, MAX_SLEEP_S)


# Other strategies may build on it (configure(completion=...)), interpreted.
@mypyc_attr(allow_interpreted_subclasses=True)
class EventEngine(CompletionEngine):
    """Pooled events; awaiting loops poll briefly, a watcher thread does the rest."""

    strategy = "events"
    # Class-level for Python subclasses to override (mypyc warns: not literals).
    loop_spin_s: float = LOOP_SPIN_S
    short_op_s: float = SHORT_OP_S

    def __init__(self, backend: Backend, device: int) -> None:
        super().__init__(backend, device)
        # ``with self._lock`` is ``with self._cv`` without the Condition's
        # Python-level wrapper. Never held across a driver call.
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queues: dict[int, StreamQueue] = {}
        self._free_events: list[Any] = []
        # (Not ``_thread``: mypyc would name the C field ``__thread``, a keyword.)
        self._watcher: threading.Thread | None = None
        # The watcher's state, read and written under _lock (but see
        # _loop_polling_until).
        self._sleeping = False  # waiting on _cv: a notify() wakes it
        self._idle = False  # sleeping with nothing pending, until notified
        self._loop_polling_until = 0.0
        """Until when loops are assumed to poll (and sweep); see the module docstring."""
        # Shared by the watcher and polling loops, without a lock: a race
        # costs at most one extra sweep or probe.
        self._next_sweep = 0.0
        self._next_probe = 0.0
        self._probe = FaultProbe(backend, device)
        # Queues query with the backend's own call (a frame less), unless overridden.
        self._fired_call = (
            backend.event_query if type(self)._fired is EventEngine._fired else self._fired
        )
        self.first_poll = FirstPolls(self.poll_for, self._queues)
        self.tail_spin = TailSpins(self.poll_for, self._queues)
        self.defers: bool = backend.device_properties(device).stream_mem_ops
        """Whether tiny device memsets may be deferred to their batch's seal (``_queue``)."""

    # -- the enqueuing thread ------------------------------------------
    def watch(self, op: Operation, stream: Any, short: bool = False, block: bool = False) -> None:
        if self.fatal is not None:
            op._resolve(self.fatal)
            return
        # Any other op's marker first, right behind its work: it fires sooner.
        marker = None if short else self._place(stream)
        key = self.backend.stream_handle(stream)  # wrappers of one CUstream share a queue
        now = time.perf_counter()
        q = self._queues.get(key)
        # A short op joins its stream's batch (``_queue``) without the engine's
        # lock; a lone one takes the path below. Other pending ops are company
        # (run AK: a batch sealed with one op left its turn's 99 to own markers).
        if short and q is not None and self._join(op, q, stream, now, None, block):
            return
        if marker is None:
            marker = self._place(stream)
        with self._lock:
            if q is None or q.detached:  # else still the stream's: only retiring detaches
                q = self._queues.get(key)
                if q is None:
                    q = self._queues[key] = StreamQueue(
                        self._fired_call,
                        self._recycle,
                        self._place,
                        self.backend.stream_write_words,
                    )
            if op._est:
                op._eta = q.busy_until = max(now, q.busy_until) + op._est
            q.entries.append((op, marker))
            q.last_watch = now
            op._poll = (self, q, None)
            if op._waiters is None and self._watcher is not None and not self._sleeping:
                return  # the common case, with no call: nobody to tell
            prewake = self._watched(op, now)
        if prewake:
            op._prewake()

    def defer(
        self, op: Operation, key: int, stream: Any, words: list[int], block: bool = False
    ) -> bool:
        """Into the open batch if the stream batches now (as :meth:`watch` decides)."""
        q = self._queues.get(key)
        if (
            q is None
            or not self.defers
            or self.fatal is not None
            # Joining may seal the open batch, which enqueues: not from a loop
            # past the stream's share of the launch queue (Sequencer.gpu).
            or (not block and len(q.entries) >= self.direct_limit)
        ):
            return False
        return self._join(op, q, stream, time.perf_counter(), words, block)

    def _join(
        self,
        op: Operation,
        q: StreamQueue,
        stream: Any,
        now: float,
        words: list[int] | None,
        block: bool = False,
    ) -> bool:
        """``op`` joins ``q``'s open batch if it has company or a probe is due (``_queue``)."""
        if not (q.batching or q.open is not None or q.entries or now >= q.next_probe):
            return False
        batch = q.join(op, stream, now, words, block)
        if batch is None:
            return False
        if op._est:
            busy = q.busy_until  # not max(): a builtin call costs more than the test
            op._eta = q.busy_until = (busy if busy > now else now) + op._est
        op._poll = (self, q, batch)
        # The watcher exists (the queue does); it need not hear of a short op,
        # unless a task already sleeps on it or it sleeps until told (_watched).
        if op._waiters is not None or (self._sleeping and self._idle):
            with self._lock:
                prewake = self._watched(op, now)
            if prewake:
                op._prewake()
        return True

    def _watched(self, op: Operation, now: float) -> bool:
        """After ``op`` was queued (lock held): make sure the watcher knows; returns
        whether to pre-wake the task asleep on it."""
        prewake = False
        if op._waiters is not None:
            # A task went to sleep on this op before it was watched (it was
            # queued behind a host step) and handed it to nobody: the watcher
            # must not stand down for loops whose sweeps may stop any moment.
            self._loop_polling_until = 0.0
            # Due soon (a staged copy's last DMA): wake its loop from here,
            # to poll while the GPU finishes, rather than after the watcher
            # has woken and seen it done (two wake-ups of 50-100 us in a row).
            prewake = bool(op._eta) and op._eta - now <= PREWAKE_S
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._run, name=f"gpuaio-completion-{self.device}", daemon=True
            )
            self._watcher.start()
        elif self._sleeping and (self._idle or op._waiters is not None):
            # Only a sleep without end, or an op a task sleeps on: any other op's
            # task polls, or hands off (wakes it). A wake-up here made an await
            # after a pause pay a futex call and the GIL (completion.md).
            self._cv.notify()
        return prewake

    def seal(self, key: int, block: bool = True) -> bool:
        q = self._queues.get(key)
        if q is None or q.open is None:
            return True
        try:
            return q.seal(block)
        except DeviceFatalError:
            # The batch's ops fail with it, and what comes next fails at its own call.
            return True

    def flush(self, key: int, block: bool = True) -> bool:
        q = self._queues.get(key)
        if q is None:
            return True
        m = q.open  # read once: another thread may seal it meanwhile
        if m is None or m.words is None:
            return True
        try:
            return q.flush(block)
        except DeviceFatalError:
            return True  # as in seal

    def forget(self, key: int) -> None:
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                return
            # Ops still pending (their work outlives the stream) keep it
            # until the watcher finds it empty; then it leaves at once.
            q.last_watch = -math.inf
            if not q.entries and q.retire(time.perf_counter()):
                del self._queues[key]

    def pending(self) -> int:
        with self._lock:
            return sum(len(q.entries) for q in self._queues.values())

    def pending_on(self, key: int) -> int:
        q = self._queues.get(key)
        return 0 if q is None else len(q.entries)

    # -- markers (a subclass may override these three) ----------------
    def _place(self, stream: Any) -> Any:
        """Put a marker behind the work enqueued so far on ``stream``."""
        try:
            ev = self._free_events.pop()
        except IndexError:
            ev = self.backend.event_create(self.device)
        try:
            self.backend.event_record(ev, stream)
        except BaseException:
            self._free_events.append(ev)
            raise
        return ev

    def _fired(self, marker: Any) -> bool:
        """Whether ``marker`` has been reached (raises on a failed context)."""
        return self.backend.event_query(marker)

    def _recycle(self, marker: Any) -> None:
        self._free_events.append(marker)

    # -- resolving (every path ends in StreamQueue.drain or take_all) --
    def _drain_all(self, queues: list[StreamQueue]) -> tuple[Waiters, DeviceFatalError | None]:
        """Drain every queue given: the waiters to wake, and the sticky error met, if any."""
        waiters: Waiters = []
        try:
            for q in queues:
                q.drain(waiters)
        except DeviceFatalError as e:
            return waiters, e
        return waiters, None

    def _fail_all(self, exc: DeviceFatalError) -> None:
        """After a sticky error: resolve what had fired, fail every other pending op."""
        # Ops whose markers fired before the fault completed: resolve them
        # first (a flag still reads after a fault; an event query raises, and
        # then the rest fail). A probe may find the fault before any drain.
        done: Waiters = []
        with self._lock:
            queues = list(self._queues.values())
        for q in queues:
            with contextlib.suppress(DeviceFatalError):
                q.drain(done, block=True)
        if done:
            post_waiters(done)
        self._fail_fatal(exc)
        self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        with self._lock:
            queues = list(self._queues.values())
            self._queues.clear()
        resolve_many([(op, exc) for q in queues for op in q.take_all()])

    def _check_probe(self) -> DeviceFatalError | None:
        """Probe the device if it is time; returns its sticky error, if any."""
        now = time.perf_counter()
        if now < self._next_probe:
            return None
        self._next_probe = now + FAULT_PROBE_S
        if self._probe.event is None:
            self._start_probe()
        try:
            self._probe.check()
        except DeviceFatalError as e:
            return e
        return None

    def _start_probe(self) -> None:
        """Create the probe event, on the watcher thread (never a loop's)."""
        try:
            self._probe.start()
        except DeviceFatalError as e:
            self._fail_all(e)
        except CudaError:
            # Not fatal: the probe is retried while ops pend; markers still fire.
            log.debug("could not create the fault probe event", exc_info=True)

    # -- awaiting loops ------------------------------------------------
    def poll_for(self, op: Operation, gap: float = STREAM_POLL_GAP_S) -> bool:
        """From an awaiting loop: resolve what has fired on ``op``'s stream.

        Returns whether ``op`` is done. Cheap when called often: a stream is
        queried at most once every ``gap`` seconds (a tail spin, 0). Every
        ``LOOP_SWEEP_S`` a poll also drains the device's other streams,
        standing in for the watcher while loops poll.
        """
        poll = op._poll
        if poll is None:
            return op._done
        q = poll[1]
        now = time.perf_counter()
        self._loop_polling_until = now + LOOP_COVER_S  # unlocked: see the module docstring
        sweep = now >= self._next_sweep
        if op._done:
            # A drain of its stream resolved it since this await began, and all
            # before it: sweeps may leave the stream to its polling tasks a while,
            # as after a drain from here (most sweep drains with 1,000 tasks
            # found nothing new).
            q.last_poll = now
            if not sweep:
                return True
        elif not sweep and now - q.last_poll < gap:
            return False
        waiters: Waiters = []
        try:
            if sweep:
                self._sweep(now, waiters)
            if not op._done and now - q.last_poll >= gap:
                q.last_poll = now
                q.drain(waiters, seal_after=BATCH_AGE_S)
            batch = poll[2]
            if batch is not None and not op._done:
                if batch is q.open:
                    # This task waits for the open batch: have its marker placed.
                    q.seal(block=False, learn=True)
                # An op completes no earlier than its batch's marker was placed:
                # one due long ago by its own estimate is polled for a window
                # from then on, rather than slept on.
                placed = batch.placed if batch.event is not None else now
                if placed > op._eta:
                    op._eta = placed
        except DeviceFatalError as e:
            self._fail_all(e)
            return True
        finally:
            if waiters:  # even after a sticky error: these ops were resolved
                post_waiters(waiters)
        return op._done

    def _sweep(self, now: float, out: Waiters) -> None:
        """Drain the streams that no poll has drained lately; probe for sticky errors.

        Raises DeviceFatalError (``out`` keeps what was resolved before it).
        """
        self._next_sweep = now + LOOP_SWEEP_S
        for q in list(self._queues.values()):
            if q.entries and now - q.last_poll >= LOOP_SWEEP_S:
                q.last_poll = now
                q.drain(out, seal_after=BATCH_AGE_S)
        if now >= self._next_probe:
            self._next_probe = now + FAULT_PROBE_S
            self._probe.check()

    def hand_off(self) -> None:
        """A task stopped polling and sleeps until its op is resolved: wake the watcher.

        Should no other task be polling, nobody would sweep its stream.
        """
        with self._lock:  # see the module docstring: the reset must not slip by
            self._loop_polling_until = 0.0
            if self._sleeping:
                self._cv.notify()

    # -- threads that may block ----------------------------------------
    def drain_for(self, op: Operation) -> None:
        poll = op._poll
        if poll is None or op._done:
            return
        waiters: Waiters = []
        try:
            poll[1].drain(waiters, block=True)
        except DeviceFatalError as e:
            self._fail_all(e)
        finally:
            if waiters:
                post_waiters(waiters)

    def close(self) -> None:
        super().close()
        with self._cv:
            self._cv.notify()
        t = self._watcher
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._probe.close()

    # -- the watcher thread --------------------------------------------
    def _run(self) -> None:
        """One pass after another until closed: drain every stream, then rest."""
        precise_timers()
        pace = _Pace(time.perf_counter())
        self._next_probe = pace.spin_until + FAULT_PROBE_S
        self._start_probe()
        while True:
            with self._cv:
                while not self._queues and not self.closed:
                    self._sleep_until_work(pace)
                closed = self.closed  # (mypyc compiles no ``break`` out of a ``with``)
                queues = None
                if not closed and time.perf_counter() < self._loop_polling_until:
                    self._stand_down(pace)
                elif not closed:
                    queues = list(self._queues.items())
            if closed:
                break
            if queues is None:  # stood down: loops sweep, but only the watcher probes for sure
                fatal = self._check_probe()
                if fatal is not None:
                    self._fail_all(fatal)
            elif not self._pass(queues, pace):
                self._rest(queues, pace)
        self._fail_pending(ClosedWhilePendingError())

    def _wait(self, timeout: float | None) -> bool:
        """Sleep on the condition (held) until notified or ``timeout``; returns if notified."""
        self._sleeping = True
        try:
            return self._cv.wait(timeout)
        finally:
            self._sleeping = False

    def _sleep_until_work(self, pace: _Pace) -> None:
        """Nothing pending: block, using no CPU, until ``watch`` or ``close`` notifies."""
        self._idle = True
        try:
            self._wait(None)
        finally:
            self._idle = False
        pace.spin_again()

    def _stand_down(self, pace: _Pace) -> None:
        """Loops poll and sweep: sleep until a hand-off or ``STAND_DOWN_S``.

        Waking up often would cost both threads dearly. A thread woken while
        a loop is busy waits for the GIL until the interpreter's switch
        interval (5 ms) forces the loop to let go; meanwhile every time the
        loop lets go of it briefly (each turn, around its I/O poll) wakes the
        waiting thread, which rarely gets it, and that costs the loop about
        3 us a turn. So the watcher does not wake for the fault probe either:
        polling loops probe in their sweeps (``_sweep``). A task that stops
        polling hands off (``hand_off``) and wakes it at once; ops nobody
        awaits are left to this sleep's end.
        """
        self._wait(STAND_DOWN_S)
        pace.restart(time.perf_counter())

    def _pass(self, queues: list[tuple[int, StreamQueue]], pace: _Pace) -> bool:
        """Drain every stream once and probe if due.

        Returns whether any op was resolved (or failed on a sticky error):
        then the next pass comes at once, and the watcher spins again.
        """
        waiters, fatal = self._drain_all([q for _key, q in queues])
        if fatal is None:
            fatal = self._check_probe()
        if fatal is not None:
            # Wake the ops resolved before the error too: none may be lost.
            if waiters:
                post_waiters(waiters)
            self._fail_all(fatal)
            return True
        now = time.perf_counter()
        with self._lock:
            for key, q in queues:
                if not q.entries and self._queues.get(key) is q and q.retire(now):
                    del self._queues[key]
        if not waiters:
            return False
        pace.restart(time.perf_counter())
        # Not kept while this thread sleeps: a waiter's wake-up holds its
        # event loop, which must be collectable once closed.
        post_waiters(waiters)
        return True

    def _rest(self, queues: list[tuple[int, StreamQueue]], pace: _Pace) -> None:
        """Nothing was resolved: wait for the next pass as cheaply as stays quick.

        * Every stream's oldest op has a known duration and the earliest is
          due later than ``ETA_SLEEP_MIN_S``: sleep until just before then.
          Tasks asleep on an op due within ``PREWAKE_S`` are woken then, so
          their loops poll for it while it finishes (``Operation._prewake``).
        * Within ``SPIN_S`` of new work or a completion: yield the GIL once.
        * Otherwise: sleep ``pace.sleep_s``, twice as long each time in a row.
        """
        now = time.perf_counter()
        next_eta, prewake_eta = survey(queues, now)
        if next_eta - now > ETA_SLEEP_MIN_S:
            until = min(next_eta - ETA_EARLY_S, self._next_probe, now + ETA_SLEEP_MAX_S)
            # A task asleep on an op due soon is woken PREWAKE_S ahead (it polls
            # from then on): a loop idle that long takes 50-250 us to wake.
            if prewake_eta:
                until = min(until, prewake_eta - PREWAKE_S)
            notified = False
            with self._cv:
                if not self.closed:
                    notified = self._wait(max(0.0, until - now))
            if prewake_eta and not notified:
                now = time.perf_counter()
                prewake_oldest(queues, now + PREWAKE_S + ETA_EARLY_S)
            pace.spin_again()
            return
        if now < pace.spin_until:
            time.sleep(SPIN_POLL_S)  # lets other threads have the GIL between polls
            return
        with self._cv:
            notified = self._wait(pace.sleep_s) if self._queues and not self.closed else True
        if notified:
            pace.restart(time.perf_counter())
        else:
            pace.back_off()
