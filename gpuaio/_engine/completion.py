"""Completion engines: learning that the GPU has finished an operation.

One engine per device. After an operation's work is enqueued on a stream,
:meth:`CompletionEngine.watch` places a completion marker behind it and
resolves the :class:`~gpuaio._operation.Operation` once the marker fires.

Strategies (selected with ``GPUAIO_COMPLETION`` or :func:`gpuaio.configure`):

``"events"`` (default)
    A marker is a pooled CUDA event. An awaiting task first polls its
    stream's oldest markers from its own event loop for up to
    ``GPUAIO_LOOP_SPIN_US`` (150 µs), yielding between polls, so short
    operations complete with no cross-thread wake-up. One watcher thread per
    device queries
    only the oldest pending event of each stream (a stream completes in
    order), spins briefly while completions are imminent, backs off to
    sleeping when they are not, and blocks with no CPU use when nothing is
    pending. While tasks poll, their loops also sweep every stream of the
    device now and then, and the watcher stands down: it would mostly wait
    for the GIL, which a loop switching tasks rarely lets go of. One batch
    of completions wakes each event loop once. The GPU never waits for Python.

``"flags"``
    Like ``events``, but a marker is a word the stream writes into a slab of
    mapped pinned memory (``cuStreamWriteValue32``): checking it is a memory
    read with no driver call. A probe catches sticky errors.

``"thread"``
    Like ``events`` without loop-side polling: every completion goes through the
    watcher thread and a cross-thread wake-up. For comparison.

``"hostfunc"``
    A marker is a ``cuLaunchHostFunc`` callback that hands the op to a
    resolver thread (a host function must not block on anything a driver
    call may hold). It needs the GIL, so the stream stalls while Python is
    busy: kept for comparison, never the default.

Every engine also notices a sticky (context-fatal) error and fails every
pending operation of the device with :class:`~gpuaio.DeviceFatalError`
instead of leaving awaits hanging. While operations pend it queries a
never-recorded probe event every ``FAULT_PROBE_S``: the driver reports a
fault through such a query first (on an H200, about 250 ms before the queries
of the markers behind the faulting kernel), and markers that never fire
(flags, host functions) cannot report it at all. So every pending await
raises within about ``FAULT_PROBE_S`` of the driver first reporting the fault.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from .._core.errors import CudaError, DeviceFatalError
from .._core.loopport import Port
from .._core.operation import Operation, post_waiters, resolve_many

if TYPE_CHECKING:
    from ..backends import Backend

__all__ = ["STRATEGIES", "CompletionEngine", "FaultLog", "Strategy", "make_engine"]

log = logging.getLogger("gpuaio")

Strategy = Literal["events", "flags", "thread", "hostfunc"]
STRATEGIES: tuple[Strategy, ...] = ("events", "flags", "thread", "hostfunc")

SPIN_S = 200e-6
"""How long the watcher keeps spinning after new work or a completion."""
MAX_SLEEP_S = 250e-6
"""The longest the watcher sleeps between polls of ops of unknown duration."""
LOOP_COVER_S = 1e-3
"""How long after a loop last polled the watcher leaves the device to loops."""
LOOP_SWEEP_S = 250e-6
"""How often polling loops drain the streams that no poll has drained lately."""
STAND_DOWN_S = 20e-3
"""The longest the watcher sleeps while loops poll (it still wakes to probe
every ``FAULT_PROBE_S``).

A task that stops polling wakes it at once; an op nobody awaits that completes
just after the loops stopped polling may be resolved this late.
"""
LOOP_SPIN_S = float(os.environ.get("GPUAIO_LOOP_SPIN_US", "150")) * 1e-6
"""How long an awaiting task polls from its event loop before handing off."""
FAULT_PROBE_S = 5e-3
"""How often a device with pending work is checked for a sticky error.

No engine sleeps longer than this while operations pend, so a sticky error
fails every pending await within about this long of the driver first
reporting it. With nothing pending, nothing is probed and nothing wakes.
"""


class FaultLog:
    """Logs each device's sticky error once, with its traceback.

    After a sticky error every driver call of the context fails with it: the
    frees and destroys that follow (device memory, pinned blocks, events,
    streams) would each log it again. A runtime's engines and its release
    paths share one ``FaultLog``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logged: set[int | None] = set()

    def report(self, what: str, exc: DeviceFatalError, device: int | None = None) -> bool:
        """Log ``exc`` at ERROR with its traceback, unless a sticky error of
        ``device`` (for ``device=None``, of any device) was logged already: then
        at DEBUG without one. Returns whether it logged at ERROR."""
        with self._lock:
            if device is None:
                known = bool(self._logged)
            else:
                known = device in self._logged or None in self._logged
            self._logged.add(device)
        if known:
            log.debug("%s: %s (the sticky error, logged already)", what, exc)
            return False
        log.error("%s: %s", what, exc, exc_info=exc)
        return True


class CompletionEngine:
    """Resolves operations of one device when their markers fire."""

    strategy: Strategy

    def __init__(self, backend: Backend, device: int) -> None:
        self.backend = backend
        self.device = device
        # An op takes up to two launch-queue entries (its work and its
        # marker), and enqueueing into a full queue blocks the calling thread,
        # which must never be an event loop's.
        self.direct_limit: int = max(1, backend.launch_queue // 4)
        """Ops pending on a stream (as :meth:`pending_on` counts them) from which
        its work is enqueued on its host thread rather than the calling one."""
        self.fatal: DeviceFatalError | None = None
        self.faults: FaultLog = FaultLog()
        """Where the sticky error is logged (the runtime shares one across engines)."""
        self._closed = False

    def watch(self, op: Operation, stream: Any) -> None:
        """Place a marker behind the work just enqueued on ``stream``.

        Call right after enqueueing, from the thread that enqueued (stream
        order is the order of calls). ``op`` is resolved when the marker fires.
        """
        raise NotImplementedError

    def pending(self) -> int:
        """Number of operations watched and not yet resolved."""
        raise NotImplementedError

    def pending_on(self, key: int) -> int:
        """Operations watched on the stream ``key`` (its ``CUstream`` address) and
        not yet resolved; engines that do not track streams count all."""
        return self.pending()

    def hand_off(self) -> None:
        """Someone now sleeps until an op is resolved: make sure something watches."""

    def drain_for(self, op: Operation) -> None:
        """Resolve what has fired on ``op``'s stream, from any thread but a loop's.

        Waits for another thread's drain of that stream to finish rather than
        skipping it, so that afterwards every op whose marker had fired is
        resolved.
        """

    def close(self) -> None:
        """Stop the engine; ops still pending fail with an error."""
        self._closed = True

    def _fail_fatal(self, exc: DeviceFatalError) -> None:
        if self.fatal is None:
            self.fatal = exc
            self.faults.report(f"device {self.device} hit a sticky error", exc, self.device)


class _Queue:
    """The pending markers of one stream, oldest first (they fire in order)."""

    __slots__ = ("busy_until", "entries", "last_poll", "lock")

    def __init__(self) -> None:
        self.entries: deque[tuple[Operation, Any]] = deque()
        # Held while draining so that ops of one stream resolve in order
        # even when the watcher and a loop poll at the same time.
        self.lock = threading.Lock()
        self.last_poll = 0.0
        self.busy_until = 0.0
        """When the stream's queued work with known durations should be done."""


class EventEngine(CompletionEngine):
    """Pooled events; awaiting loops poll briefly, a watcher thread does the rest.

    An awaiting task first polls its stream's oldest markers from the event
    loop for up to ``loop_spin_s`` (yielding to other tasks between polls),
    which catches short operations without any cross-thread wake-up. Longer
    operations are caught by the watcher thread, which wakes each loop once
    per batch. Both resolve a stream's operations in order.
    """

    strategy: Strategy = "events"
    loop_spin_s: float = LOOP_SPIN_S

    def __init__(self, backend: Backend, device: int) -> None:
        super().__init__(backend, device)
        # ``with self._lock`` is ``with self._cv`` without the Condition's Python-level wrapper.
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queues: dict[int, _Queue] = {}
        self._free_events: list[Any] = []
        self._sleeping = False
        self._idle = False  # sleeping with nothing pending, until notified
        self._loop_polling_until = 0.0
        self._next_sweep = 0.0
        self._next_probe = 0.0
        self._probe_event: Any = None
        """Never recorded: its query reports only the context's sticky error."""
        self._thread: threading.Thread | None = None

    def watch(self, op: Operation, stream: Any) -> None:
        if self.fatal is not None:
            op._resolve(self.fatal)
            return
        ev = self._place(stream)
        key = self.backend.stream_handle(stream)  # wrappers of one CUstream share a FIFO
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = _Queue()
            now = time.perf_counter()
            if op._est:
                op._eta = q.busy_until = max(now, q.busy_until) + op._est
            q.entries.append((op, ev))
            op._poll = (self, q)
            if op._waiters is not None:
                # A task went to sleep on this op before it was watched (it was
                # queued behind a host step) and handed it to nobody: the watcher
                # must not stand down for loops whose sweeps may stop any moment.
                self._loop_polling_until = 0.0
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"gpuaio-completion-{self.device}", daemon=True
                )
                self._thread.start()
            elif self._sleeping and (self._idle or now >= self._loop_polling_until):
                # Not while loops poll: their sweeps find this op too.
                self._cv.notify()

    def pending(self) -> int:
        with self._lock:
            return sum(len(q.entries) for q in self._queues.values())

    def pending_on(self, key: int) -> int:
        q = self._queues.get(key)
        return 0 if q is None else len(q.entries)

    def hand_off(self) -> None:
        """A task stopped polling and sleeps until its op is resolved: wake the watcher.

        Should no other task be polling, nobody would sweep its stream.
        """
        self._loop_polling_until = 0.0
        if self._sleeping:
            with self._lock:
                if self._sleeping:
                    self._cv.notify()

    def close(self) -> None:
        super().close()
        with self._cv:
            self._cv.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        probe, self._probe_event = self._probe_event, None
        if probe is not None:
            try:
                self.backend.event_destroy(probe)
            except Exception as exc:  # a faulted context: logged already
                log.debug("could not destroy the fault probe event: %s", exc)

    # -- markers (overridden by the flag slab) ---------------------------
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

    def _probe(self) -> None:
        """Surface a sticky error (raises DeviceFatalError).

        A marker that never fires (a flag) cannot, and the driver reports a
        fault through a never-recorded event's query before it does through
        the queries of markers behind the faulting kernel.
        """
        probe = self._probe_event
        if probe is None:
            return  # the watcher creates it when it starts
        try:
            self.backend.event_query(probe)
        except DeviceFatalError:
            raise
        except CudaError:
            log.debug("gpuaio fault probe failed", exc_info=True)

    # -- draining ------------------------------------------------------
    def _drain(
        self, q: _Queue, out: list[tuple[Port, Callable[[], None]]], block: bool = False
    ) -> None:
        """Resolve the fired markers at the head of ``q``; add the waiters to wake to ``out``.

        Ops resolve in stream order (their completion steps, the copy-outs,
        run here in that order). Raises DeviceFatalError on a sticky error;
        ``out`` keeps the waiters of the ops resolved before it, and the
        caller must still wake them. Without ``block`` it returns at once if
        another thread is draining ``q``.
        """
        if not q.lock.acquire(blocking=block):
            return  # another thread is draining this stream right now
        try:
            entries = q.entries
            query = self._fired
            while entries:
                op, ev = entries[0]
                try:
                    if not query(ev):
                        break
                    exc: BaseException | None = None
                except DeviceFatalError:
                    raise
                except CudaError as e:
                    exc = e
                entries.popleft()
                self._recycle(ev)
                out.extend(op._finish(exc))
        finally:
            q.lock.release()

    def drain_for(self, op: Operation) -> None:
        poll = op._poll
        if poll is None or op._done:
            return
        waiters: list[tuple[Port, Callable[[], None]]] = []
        try:
            self._drain(poll[1], waiters, block=True)
        except DeviceFatalError as e:
            self._fail_all(e)
        finally:
            if waiters:
                post_waiters(waiters)

    def poll_for(self, op: Operation) -> bool:
        """From an awaiting loop: resolve what has fired on ``op``'s stream.

        Returns whether ``op`` is done. Cheap when called often: a stream is
        queried at most once every few microseconds. Every ``LOOP_SWEEP_S``
        a poll also drains the device's other streams, standing in for the
        watcher while loops poll.
        """
        poll = op._poll
        if poll is None:
            return op._done
        q = poll[1]
        now = time.perf_counter()
        self._loop_polling_until = now + LOOP_COVER_S
        waiters: list[tuple[Port, Callable[[], None]]] = []
        try:
            if now >= self._next_sweep:
                self._sweep(now, waiters)
            if not op._done and now - q.last_poll >= 2e-6:
                q.last_poll = now
                self._drain(q, waiters)
        except DeviceFatalError as e:
            self._fail_all(e)
            return True
        finally:
            if waiters:  # even after a sticky error: these ops were resolved
                post_waiters(waiters)
        return op._done

    def _sweep(self, now: float, out: list[tuple[Port, Callable[[], None]]]) -> None:
        """Drain the streams that no poll has drained lately; probe for sticky errors.

        Raises DeviceFatalError (``out`` keeps what was resolved before it).
        """
        self._next_sweep = now + LOOP_SWEEP_S
        for q in list(self._queues.values()):
            if q.entries and now - q.last_poll >= LOOP_SWEEP_S:
                q.last_poll = now
                self._drain(q, out)
        if now >= self._next_probe:
            self._next_probe = now + FAULT_PROBE_S
            self._probe()

    def _fail_all(self, exc: DeviceFatalError) -> None:
        # Ops whose markers fired before the fault completed: resolve them
        # first (a flag still reads after a fault; an event query raises, and
        # then the rest fail). A probe may find the fault before any drain.
        done: list[tuple[Port, Callable[[], None]]] = []
        with self._cv:
            pending = list(self._queues.values())
        for q in pending:
            with contextlib.suppress(DeviceFatalError):
                self._drain(q, done, block=True)
        if done:
            post_waiters(done)
        self._fail_fatal(exc)
        with self._cv:
            queues = list(self._queues.values())
            self._queues.clear()
        items: list[tuple[Operation, BaseException | None]] = []
        for q in queues:
            with q.lock:
                items.extend((op, exc) for op, _ev in q.entries)
                q.entries.clear()
        resolve_many(items)

    def _start_probe(self) -> None:
        """Create the probe event, on the watcher thread (never a loop's)."""
        if self._probe_event is not None:
            return
        try:
            self._probe_event = self.backend.event_create(self.device)
        except DeviceFatalError as e:
            self._fail_all(e)
        except CudaError:
            # Not fatal: the probe is retried while ops pend; markers still fire.
            log.debug("could not create the fault probe event", exc_info=True)

    def _probe_due(self) -> DeviceFatalError | None:
        """Probe the device if it is time; returns its sticky error, if any."""
        now = time.perf_counter()
        if now < self._next_probe:
            return None
        self._next_probe = now + FAULT_PROBE_S
        if self._probe_event is None:
            self._start_probe()
        try:
            self._probe()
        except DeviceFatalError as e:
            return e
        return None

    def _run(self) -> None:
        cv = self._cv
        spin_until = time.perf_counter() + SPIN_S
        self._next_probe = spin_until + FAULT_PROBE_S
        self._start_probe()
        sleep_s = 20e-6
        while True:
            with cv:
                while not self._queues and not self._closed:
                    self._sleeping = self._idle = True
                    cv.wait()
                    self._sleeping = self._idle = False
                    spin_until = time.perf_counter() + SPIN_S
                if self._closed:
                    break
                now = time.perf_counter()
                standing_down = now < self._loop_polling_until
                if standing_down:
                    # Loops poll and sweep: stand down. Waking up often would
                    # cost both threads dearly: a loop that switches tasks
                    # lets go of the GIL briefly and often, and each time it
                    # wakes a thread waiting for the GIL, which rarely gets it.
                    # But never past the next fault probe: loops sweep (and
                    # probe) only while they poll, which may stop any moment.
                    self._sleeping = True
                    cv.wait(max(0.0, min(STAND_DOWN_S, self._next_probe - now)))
                    self._sleeping = False
                    spin_until = time.perf_counter() + SPIN_S
                    sleep_s = 20e-6
                else:
                    queues = list(self._queues.items())
            if standing_down:
                fatal = self._probe_due()
                if fatal is not None:
                    self._fail_all(fatal)
                continue
            waiters: list[tuple[Port, Callable[[], None]]] = []
            fatal = None
            try:
                for _key, q in queues:
                    self._drain(q, waiters)
            except DeviceFatalError as e:
                fatal = e
            if fatal is None:
                fatal = self._probe_due()
            if fatal is not None:
                # Wake the ops resolved before the error too: none may be lost.
                if waiters:
                    post_waiters(waiters)
                self._fail_all(fatal)
                continue
            with cv:
                for key, q in queues:
                    if not q.entries and self._queues.get(key) is q:
                        del self._queues[key]
            now = time.perf_counter()
            if waiters:
                post_waiters(waiters)
                # Not kept while this thread sleeps: a waiter's wake-up holds
                # its event loop, which must be collectable once closed.
                waiters.clear()
                spin_until = now + SPIN_S
                sleep_s = 20e-6
                continue
            # Sleep until just before the earliest expected completion when
            # every stream's oldest op has a known duration.
            etas = [q.entries[0][0]._eta for _k, q in queues if q.entries]
            next_eta = min(etas) if etas and all(etas) else 0.0
            if next_eta - now > 150e-6:
                with cv:
                    if not self._closed:
                        self._sleeping = True
                        cv.wait(max(0.0, min(next_eta - now - 50e-6, self._next_probe - now, 5e-3)))
                        self._sleeping = False
                spin_until = time.perf_counter() + SPIN_S
                continue
            if now < spin_until:
                time.sleep(0)  # lets other threads have the GIL between polls
                continue
            with cv:
                if self._queues and not self._closed:
                    self._sleeping = True
                    notified = cv.wait(sleep_s)
                    self._sleeping = False
                else:
                    notified = True
            if notified:
                spin_until = time.perf_counter() + SPIN_S
                sleep_s = 20e-6
            else:
                sleep_s = min(sleep_s * 2, MAX_SLEEP_S)
        self._drain_closed()

    def _drain_closed(self) -> None:
        err = RuntimeError("gpuaio completion engine closed with the operation pending")
        with self._cv:
            queues = list(self._queues.values())
            self._queues.clear()
        items: list[tuple[Operation, BaseException | None]] = []
        for q in queues:
            items.extend((op, err) for op, _ev in q.entries)
            q.entries.clear()
        resolve_many(items)


class FlagEngine(EventEngine):
    """Markers are words written by the stream into a slab of mapped pinned memory.

    ``cuStreamWriteValue32`` stores a fresh value into the op's slot once all
    earlier work on the stream is done; checking a marker is then a plain
    memory read, with no driver call, so polling many streams costs almost
    nothing. A slab never reports a failed context, so the watcher probes
    the device for sticky errors every ``FAULT_PROBE_S`` while ops pend.
    """

    strategy: Strategy = "flags"
    SLOTS = 1 << 16

    def __init__(self, backend: Backend, device: int) -> None:
        super().__init__(backend, device)
        import numpy as np

        self._slab_host = backend.host_alloc(4 * self.SLOTS)
        self._slab_dev = backend.host_device_pointer(self._slab_host)
        from .hostwork import byte_view

        self._slab = byte_view(self._slab_host, 4 * self.SLOTS).view(np.uint32)
        self._slab[:] = 0
        self._gen = [0] * self.SLOTS
        self._free_slots = list(range(self.SLOTS - 1, -1, -1))
        self._slot_lock = threading.Lock()
        self._probe_event = backend.event_create(device)

    def _place(self, stream: Any) -> Any:
        with self._slot_lock:
            try:
                slot = self._free_slots.pop()
            except IndexError:
                raise RuntimeError(
                    f"more than {self.SLOTS} operations pending on device {self.device}"
                ) from None
            gen = self._gen[slot] = (self._gen[slot] % 0xFFFFFFFF) + 1
        try:
            self.backend.stream_write_value32(stream, self._slab_dev + 4 * slot, gen)
        except BaseException:
            with self._slot_lock:
                self._free_slots.append(slot)
            raise
        return (slot, gen)

    def _fired(self, marker: Any) -> bool:
        slot, gen = marker
        return bool(self._slab[slot] == gen)

    def _recycle(self, marker: Any) -> None:
        with self._slot_lock:
            self._free_slots.append(marker[0])

    def close(self) -> None:
        idle = self.pending() == 0
        super().close()  # destroys the probe event too
        try:
            if idle:
                # Every marker placed has been seen: no write into the slab
                # is outstanding. Otherwise it stays allocated for good.
                self.backend.host_free(self._slab_host)
        except Exception as exc:  # a faulted context: logged already
            log.debug("could not release the flag slab: %s", exc)


class ThreadEngine(EventEngine):
    """Like ``events`` but without loop-side polling: the watcher thread alone."""

    strategy: Strategy = "thread"
    loop_spin_s = 0.0


class HostFuncEngine(CompletionEngine):
    """Markers are host functions run by the driver; a resolver thread resolves.

    The driver runs host functions on its own thread, and a driver call made
    elsewhere (``cuMemFreeHost``, ``cuMemHostAlloc``, ``cuEventDestroy``, ...)
    may wait for the host function running there to return. So a host
    function must never wait for a lock that another thread holds across a
    driver call, and resolving an op runs its done-callbacks, which do (the
    staging pool's). The host function only hands the op over (takes the GIL,
    appends to a queue, sets an event); the resolver thread resolves it, and
    also probes the device for sticky errors while anything is pending.
    """

    strategy: Strategy = "hostfunc"

    def __init__(self, backend: Backend, device: int) -> None:
        super().__init__(backend, device)
        # With a host function behind each op, a held stream blocked the
        # enqueuing thread after 55 ops on an H200 (1,021 with events).
        # pending_on() counts the whole device's ops here: conservative.
        self.direct_limit = min(self.direct_limit, 16)
        self._lock = threading.Lock()  # never held across a driver call
        self._start_lock = threading.Lock()  # held across event_create: not for host fns
        self._pending: set[Operation] = set()
        self._fired: deque[Operation] = deque()
        self._probe_event: Any = None
        self._monitor: threading.Thread | None = None
        self._wake = threading.Event()

    def watch(self, op: Operation, stream: Any) -> None:
        if self.fatal is not None:
            op._resolve(self.fatal)
            return
        if self._monitor is None:
            self._start()
        with self._lock:
            first = not self._pending
            self._pending.add(op)
        fired, wake = self._fired, self._wake
        if first:
            wake.set()  # the resolver sleeps untimed while nothing pends: probe again

        def fire() -> None:  # on the driver's thread: hand over, never block
            fired.append(op)
            wake.set()

        try:
            self.backend.launch_host_func(stream, fire)
        except BaseException:
            with self._lock:
                self._pending.discard(op)
            raise

    def _start(self) -> None:
        with self._start_lock:
            if self._monitor is not None:
                return
            self._probe_event = self.backend.event_create(self.device)
            monitor = threading.Thread(
                target=self._run, name=f"gpuaio-hostfunc-{self.device}", daemon=True
            )
            monitor.start()
            self._monitor = monitor

    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        super().close()
        self._wake.set()
        m = self._monitor
        if m is not None and m is not threading.current_thread():
            m.join(timeout=5)
        self._resolve_fired()  # those whose host function ran have completed
        with self._lock:
            ops, self._pending = list(self._pending), set()
        err = RuntimeError("gpuaio completion engine closed with the operation pending")
        resolve_many((op, err) for op in ops)

    def _resolve_fired(self) -> None:
        while self._fired:
            op = self._fired.popleft()
            with self._lock:
                if op not in self._pending:  # failed by the probe, or by close()
                    continue
                self._pending.discard(op)
            op._resolve(None)

    def _run(self) -> None:
        # A host function is never called once the context has failed, so
        # poll the context's health (a query of a never-recorded event
        # returns the sticky error) every FAULT_PROBE_S while anything is
        # pending. With nothing pending, sleep until watch() wakes us.
        next_probe = time.monotonic() + FAULT_PROBE_S
        while not self._closed:
            if self._pending:
                self._wake.wait(max(0.0, next_probe - time.monotonic()))
            else:
                self._wake.wait()
                # Probe one interval after work arrives, not at once.
                next_probe = max(next_probe, time.monotonic() + FAULT_PROBE_S)
            self._wake.clear()
            try:
                self._resolve_fired()
            except Exception:  # an op's resolution never raises; stay alive regardless
                log.exception("gpuaio host-function resolver failed")
            now = time.monotonic()
            if now < next_probe:
                continue
            next_probe = now + FAULT_PROBE_S
            if not self._pending:
                continue
            try:
                self.backend.event_query(self._probe_event)
            except DeviceFatalError as e:
                self._fail_fatal(e)
                with self._lock:
                    ops, self._pending = list(self._pending), set()
                resolve_many((op, e) for op in ops)
            except CudaError:
                log.debug("gpuaio fault probe failed", exc_info=True)


def make_engine(
    strategy: Strategy, backend: Backend, device: int, faults: FaultLog | None = None
) -> CompletionEngine:
    """Build the engine for ``strategy``; it logs its sticky error to ``faults``."""
    eng: CompletionEngine
    if strategy == "events":
        eng = EventEngine(backend, device)
    elif strategy == "thread":
        eng = ThreadEngine(backend, device)
    elif strategy == "flags":
        if not backend.device_properties(device).stream_mem_ops:
            log.warning("device %d lacks stream memory operations: using events", device)
            eng = EventEngine(backend, device)
        else:
            eng = FlagEngine(backend, device)
    elif strategy == "hostfunc":
        eng = HostFuncEngine(backend, device)
    else:
        raise ValueError(f"unknown completion strategy {strategy!r}; choose from {STRATEGIES}")
    if faults is not None:
        eng.faults = faults
    return eng
