"""Simulated events: records are marker ops in a stream; waits and queries watch them."""

from __future__ import annotations

import time
from typing import Any

from ._config import _INVALID_HANDLE, _error
from ._core import SimCore, _in_context
from ._state import SimEvent, _Op


def _noop() -> None:
    pass


class SimEvents(SimCore):
    """The event calls of the simulated backend."""

    # -- events --------------------------------------------------------
    @_in_context("device", "device")
    def event_create(self, device: int, blocking_sync: bool = False) -> SimEvent:
        """A simulated event; ``blocking_sync`` changes nothing here."""
        with self._lock:
            self._check_locked("cuEventCreate", device)
            owner = self._on_device_locked("cuEventCreate", device)
        return SimEvent(device, blocking_sync, owner)

    @_in_context("handle", "event")
    def event_destroy(self, event: Any) -> None:
        """Pending records still complete; the event can no longer be used.

        On a faulted device it raises the sticky error, as ``cuEventDestroy``
        does (the event is gone all the same: the sim keeps no resources).
        """
        call = "cuEventDestroy"
        with self._lock:
            ev = self._event_locked(event, call)
            self._owner_current_locked(call, ev.ctx, ev)
            ev.destroyed = True
            self._check_locked(call, ev.device)

    @_in_context("handle", "stream")
    def event_record(self, event: Any, stream: Any) -> None:
        """Enqueue a marker; the event now stands for the work before it."""
        call = "cuEventRecord"
        with self._lock:
            ev = self._event_locked(event, call)
            s = self._stream_locked(stream, call)
            self._owner_current_locked(call, s.ctx, s)
            if s.device != ev.device:
                raise _error(call, _INVALID_HANDLE, "event and stream are on different devices")
            if s.ctx is not ev.ctx:
                raise _error(call, _INVALID_HANDLE, "event and stream are in different contexts")
            self._check_locked(call, s.device)
            op = _Op(call, _noop, counted=False)
            s.queue.append(op)
            s.load += op.weight
            s.submitted += 1
            s.cond.notify()
            ev.last = op

    @_in_context("handle", "event")
    def event_query(self, event: Any) -> bool:
        """Whether the most recent record was reached (never recorded: True).

        After a sticky fault, a record not reached answers False for
        ``marker_fault_delay_s`` more before it raises (see :class:`SimConfig`).
        """
        call = "cuEventQuery"
        with self._lock:
            ev = self._event_locked(event, call)
            self._owner_current_locked(call, ev.ctx, ev)
            dev = self._device_locked(ev.device, call)
            last = ev.last
            if (
                dev.fault is not None
                and last is not None
                and not last.done
                and time.perf_counter() - dev.fault_at < self.config.marker_fault_delay_s
            ):
                self._check_locked(call, None)  # a fail_next still applies
                return False
            self._check_locked(call, ev.device)
            return last is None or last.done

    @_in_context("handle", "event")
    def event_synchronize(self, event: Any) -> None:
        """Block until the record current at call time is reached; a fault wakes and raises."""
        call = "cuEventSynchronize"
        with self._lock:
            ev = self._event_locked(event, call)
            self._owner_current_locked(call, ev.ctx, ev)
            dev = self._check_locked(call, ev.device)
            target = ev.last
            if target is not None:
                self._wait_locked(call, dev, lambda: target.done)
            if ev.destroyed:
                # On CUDA, destroying an event that a thread is synchronizing
                # on is a use after free (seen to crash on an H200).
                raise _error(call, _INVALID_HANDLE, f"{event!r} was destroyed while synchronized")

    @_in_context("handle", "stream")
    def stream_wait_event(self, stream: Any, event: Any) -> None:
        """Later work on ``stream`` waits for the event's record current at call time.

        If the event's (other) device faults, the wait is released rather than
        leaving ``stream`` stuck forever.
        """
        call = "cuStreamWaitEvent"
        with self._lock:
            ev = self._event_locked(event, call)
            s = self._stream_locked(stream, call)
            self._owner_current_locked(call, s.ctx, s)
            dev = self._check_locked(call, s.device)
            assert dev is not None
            target = ev.last
            if target is None or target.done:
                return
            src = self._devices[ev.device]

        def run() -> None:
            self._block(dev, lambda: target.done or src.fault is not None)

        self._push(s, _Op(call, run, counted=False))
