"""The ``hostfunc`` strategy: a ``cuLaunchHostFunc`` marker behind each operation.

The driver runs host functions on its own thread, and a driver call made
elsewhere (``cuMemFreeHost``, ``cuMemHostAlloc``, ``cuEventDestroy``, ...)
may wait for the host function running there to return. So a host function
must never wait for a lock that another thread holds across a driver call,
and resolving an op runs its done-callbacks, which do (the staging pool's).
The host function only hands the op over (takes the GIL, appends to a
queue, sets an event); one resolver thread per device resolves it, and also
probes the device for sticky errors while anything is pending (a host
function is never called once the context has failed).

It needs the GIL, so the stream stalls while Python is busy: never the default.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..._core.errors import ClosedWhilePendingError, DeviceFatalError
from ..._core.operation import Operation, resolve_many
from ..._core.timerslack import precise_timers
from ._engine import CompletionEngine, FaultProbe
from ._tuning import FAULT_PROBE_S

if TYPE_CHECKING:
    from ...backends import Backend

__all__ = ["HostFuncEngine"]

log = logging.getLogger("gpuaio")


class HostFuncEngine(CompletionEngine):
    """Markers are host functions run by the driver; a resolver thread resolves."""

    strategy = "hostfunc"

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
        self._probe = FaultProbe(backend, device)
        self._monitor: threading.Thread | None = None
        self._wake = threading.Event()

    # -- the enqueuing thread ------------------------------------------
    def watch(self, op: Operation, stream: Any, short: bool = False, block: bool = False) -> None:
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
            self._probe.start()
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
        self._fail_pending(ClosedWhilePendingError())
        self._probe.close()

    # -- resolving -----------------------------------------------------
    def _resolve_fired(self) -> None:
        """Resolve the ops whose host functions ran, in the order they ran."""
        while self._fired:
            op = self._fired.popleft()
            with self._lock:
                if op not in self._pending:  # failed by the probe, or by close()
                    continue
                self._pending.discard(op)
            op._resolve(None)

    def _fail_pending(self, exc: BaseException) -> None:
        with self._lock:
            ops, self._pending = list(self._pending), set()
        resolve_many((op, exc) for op in ops)

    # -- the resolver thread -------------------------------------------
    def _run(self) -> None:
        """Resolve what fired; probe every FAULT_PROBE_S while anything is pending.

        With nothing pending, sleep until ``watch`` wakes us.
        """
        precise_timers()
        next_probe = time.monotonic() + FAULT_PROBE_S
        while not self.closed:
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
                self._probe.check()
            except DeviceFatalError as e:
                self._fail_fatal(e)
                self._fail_pending(e)
