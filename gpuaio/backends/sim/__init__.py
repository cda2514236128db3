"""The simulated backend: CUDA's stream semantics on threads and host memory.

CI has no GPU, so the whole test suite runs here. This is a stand-in, not a
mock: every stream is a worker thread that runs its ops strictly in order,
every op moves real bytes (device memory is host memory, so a pointer is a
real address) and takes real wall time (``latency_s + nbytes / bandwidth``),
and the enqueue calls block their caller exactly where CUDA's do (see
``shared/reference/cuda-api-sync-behavior.md``):

============================  ==============================================
device/managed <-> pinned     asynchronous (``dma_gbps``)
device <-> device, peer       asynchronous (``d2d_gbps`` / ``peer_gbps``)
pageable -> device            caller waits for the stream to drain, snapshots
                              the source (``pageable_gbps``), then the DMA of
                              the snapshot is enqueued
device -> pageable            caller waits until the copy is done
host -> host (any kinds)      caller waits for the stream and the copy
memset device/managed         asynchronous
memset pinned                 caller waits for the stream and the fill
memset pageable               ``CUDA_ERROR_INVALID_VALUE``
============================  ==============================================

Contexts are modelled per thread, as the driver keeps them: each device has a
primary context, :meth:`SimBackend.context_create` makes others (as
``cuCtxCreate`` does), memory, streams and events belong to the context that
was current when they were made, and a call with no context current, or that
uses a stream or event of a context other than the current one, fails with
``CUDA_ERROR_INVALID_CONTEXT`` (stricter than CUDA, which lets some of those
through). The backend binds contexts the way ``CudaBackend`` does.

Faults are injected with :meth:`SimBackend.inject_fault` (sticky, like a
kernel's illegal address) and :meth:`SimBackend.fail_next` (one failing call);
:meth:`SimBackend.hold` is a latch kernel that keeps a stream busy in tests.

One concern a module: ``_config`` (:class:`SimConfig`, the error codes),
``_state`` (the simulated driver objects), ``_core`` (the lock and
bookkeeping, context binding, the driver's checks and the stream workers that
every part shares), ``_devices`` (devices and contexts), ``_memory``,
``_streams`` (streams, copies, memsets, stream memory ops), ``_events`` and
``_launch`` (kernels, host functions). This module assembles
:class:`SimBackend` from them and holds its test hooks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..._core.errors import InvalidArgumentError
from ._config import _JOIN_TIMEOUT_S, SimConfig
from ._devices import SimDevices
from ._events import SimEvents
from ._launch import SimLaunch
from ._memory import SimMemory
from ._state import SimContext, SimEvent, SimKernel, SimStream, _Latch, _Op
from ._streams import SimStreams

__all__ = ["SimBackend", "SimConfig", "SimContext", "SimEvent", "SimKernel", "SimStream"]


class SimBackend(SimDevices, SimMemory, SimStreams, SimEvents, SimLaunch):
    """CUDA on threads: ordered per-stream workers, real bytes, real time, real blocking.

    One lock guards all state; ``_changed`` is notified whenever an op finishes,
    a device faults, a latch opens or the backend closes, so every blocking call
    waits on a condition and none spins (except ``cuStreamWaitValue32``, which
    polls memory as the GPU does).
    """

    name = "sim"

    # -- test hooks ----------------------------------------------------
    def inject_fault(self, device: int = 0, *, after_ops: int = 0, code: int = 700) -> None:
        """After ``after_ops`` more copies/memsets/launches run on ``device``, the next
        one fails and the device is sticky-faulted (queued work dropped, waiters raise).

        Event records and waits, host funcs, stream-memory ops and :meth:`hold`
        latches are not counted.
        """
        with self._lock:
            dev = self._device_locked(device, "inject_fault")
            if after_ops < 0:
                raise InvalidArgumentError("after_ops must be >= 0")
            if dev.fault is None:
                dev.inject = (after_ops, code)

    def fault_now(self, device: int = 0, *, code: int = 700) -> float:
        """Sticky-fault ``device`` at once, as a kernel running there would.

        Returns the moment it struck (``time.perf_counter()``), also given by
        :meth:`fault_time`.
        """
        with self._lock:
            dev = self._device_locked(device, "fault_now")
            detail = f"device {device} faulted: injected by SimBackend.fault_now"
            self._fault_locked(dev, code, detail)
            return dev.fault_at

    def fault_time(self, device: int = 0) -> float | None:
        """When ``device``'s sticky fault struck and became visible to queries
        (``time.perf_counter()``), or None if it has not faulted."""
        with self._lock:
            dev = self._device_locked(device, "fault_time")
            return dev.fault_at if dev.fault is not None else None

    def fail_next(self, call: str, code: int = 1, device: int | None = None) -> None:
        """The next ``call`` (on ``device``, or any) raises CudaError ``code``; nothing runs."""
        with self._lock:
            self._fail_next.setdefault(call, []).append((code, device))

    def hold(self, stream: Any) -> Callable[[], None]:
        """Enqueue a latch that keeps ``stream`` busy until the returned function is called.

        ``stream`` is a sim stream or a :class:`gpuaio.Stream` on this backend.
        """
        stream = getattr(stream, "_native", stream)
        latch = _Latch()
        with self._lock:
            s = self._stream_locked(stream, "cuLaunchKernel")
            dev = self._devices[s.device]

        def release() -> None:
            with self._lock:
                latch.open = True
                self._changed.notify_all()

        self._push(
            s, _Op("cuLaunchKernel", lambda: self._block(dev, lambda: latch.open), counted=False)
        )
        return release

    def ops_executed(self, device: int = 0) -> int:
        """Counted ops (see :meth:`inject_fault`) that completed on ``device``."""
        with self._lock:
            return self._device_locked(device, "ops_executed").executed

    # -- lifecycle -----------------------------------------------------
    def close(self) -> None:
        """Stop every worker (queued ops are dropped, waits released) and join them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            threads = [s.thread for d in self._devices for s in d.streams if s.thread]
            for d in self._devices:
                for s in d.streams:
                    s.cond.notify()
            self._changed.notify_all()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
