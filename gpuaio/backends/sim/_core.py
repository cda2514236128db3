"""What every part of the simulated backend shares: state, context binding, checks, workers.

:class:`SimCore` holds the one lock and all the bookkeeping (devices,
contexts, the allocation table, live streams, pending ``fail_next``), binds
contexts the way ``CudaBackend`` does (:func:`_in_context`), checks each call
as the driver would, and runs each stream's worker thread. The parts of
:class:`~gpuaio.backends.sim.SimBackend` (``_memory``, ``_streams``,
``_events``, ``_launch``, ``_devices``) are mixins built on it.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ..._core.errors import CudaError
from .._base import Backend, MemoryKind
from ._config import (
    _DEINITIALIZED,
    _INVALID_CONTEXT,
    _INVALID_DEVICE,
    _INVALID_HANDLE,
    _INVALID_VALUE,
    _MIN_SLEEP_S,
    SimConfig,
    _error,
)
from ._state import (
    SimContext,
    SimEvent,
    SimStream,
    _dead,
    _Device,
    _Dropped,
    _Op,
    _Region,
    _SimThread,
)

_F = TypeVar("_F", bound=Callable[..., Any])
_KEEP: Any = object()
"""What ``SimCore._enter`` returns when there is nothing to restore."""


def _in_context(kind: str, arg: str | None = None) -> Callable[[_F], _F]:
    """Run the backend method with the context it needs current in the calling thread.

    This is the backend's side, what ``CudaBackend`` does before each driver
    call; the method body is the driver's side, which checks the thread's
    current context as CUDA does (stricter: a stream or event used while
    another context is current is ``CUDA_ERROR_INVALID_CONTEXT``). ``kind``
    picks the context from argument ``arg``: ``"device"`` the device's
    primary context, ``"handle"`` the context of a stream or event,
    ``"owner"`` the primary context of the device owning a pointer, ``"any"``
    a primary context (host memory is portable), ``"some"`` any live context
    (queries). An argument that names no context binds nothing: the body then
    rejects it as before.
    """

    def decorate(method: _F) -> _F:
        names = list(inspect.signature(method).parameters)[1:]
        index = names.index(arg) if arg is not None else -1

        @functools.wraps(method)
        def bound(self: SimCore, *args: Any, **kwargs: Any) -> Any:
            if arg is None:
                value = None
            elif index < len(args):
                value = args[index]
            else:
                value = kwargs.get(arg)
            ctx = self._context_for(kind, value)
            prev = _KEEP if ctx is None else self._enter(ctx)
            try:
                return method(self, *args, **kwargs)
            finally:
                if prev is not _KEEP:
                    self._leave(prev)

        return cast(_F, bound)

    return decorate


class SimCore(Backend):
    """The state and machinery shared by the parts of :class:`~gpuaio.backends.sim.SimBackend`.

    One lock (``_lock``) guards all state; ``_changed`` is its condition,
    notified whenever an op finishes, a device faults, a latch opens or the
    backend closes. ``*_locked`` helpers expect the lock held.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config: SimConfig = config if config is not None else SimConfig()
        self.launch_queue: int = self.config.launch_queue
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()  # set by close(); also cuts pacing sleeps short
        self._closed = False
        self._devices = [_Device(i) for i in range(self.config.devices)]
        self._starts: list[int] = []  # sorted region starts, for bisect
        self._regions: dict[int, _Region] = {}
        self._handles: dict[int, SimStream] = {}
        self._fail_next: dict[str, list[tuple[int, int | None]]] = {}
        self._primary = [SimContext(i, primary=True) for i in range(self.config.devices)]
        self._contexts: dict[int, SimContext] = {c.handle: c for c in self._primary}
        self._thread = _SimThread()

    # -- contexts: the backend's side (what CudaBackend does) ----------
    def _context_for(self, kind: str, value: Any) -> SimContext | None:
        """The context a call with this argument needs current, or ``None``: none to bind."""
        if kind == "device":
            if isinstance(value, int) and 0 <= value < len(self._primary):
                return self._primary[value]
            return None
        if kind == "handle":
            if isinstance(value, (SimStream, SimEvent)):
                return value.ctx
            return None
        if kind == "owner":
            with self._lock:
                region = self._regions.get(value) if isinstance(value, int) else None
            if region is not None and region.device is not None:
                return self._primary[region.device]
        # Host memory is portable: any primary context serves. Queries ("some")
        # run in whatever context is current.
        cur = self._thread.ctx
        if cur is not None and not cur.destroyed and (cur.primary or kind == "some"):
            return None
        return self._primary[0]

    def _enter(self, ctx: SimContext) -> Any:
        """Make ``ctx`` current in this thread; return what to restore (``_KEEP``: nothing).

        What ``CudaBackend._enter`` does: the thread's current context is
        read, never trusted from a cache, and switched only when it differs.
        """
        t = self._thread
        cur = t.ctx
        if cur is ctx:
            return _KEEP
        t.ctx = ctx
        if t.keep or (cur is None and ctx is self._primary[0]):
            return _KEEP
        return cur

    def _leave(self, prev: SimContext | None) -> None:
        """Make ``prev`` (``None``: no context) current again."""
        self._thread.ctx = prev

    # -- contexts: the driver's side (all expect self._lock held) -------
    def _current_locked(self, call: str) -> SimContext:
        """The calling thread's current context; none, or a destroyed one, is 201."""
        ctx = self._thread.ctx
        if ctx is None:
            raise _error(call, _INVALID_CONTEXT, "no context is current in the calling thread")
        if ctx.destroyed:
            raise _error(call, _INVALID_CONTEXT, f"the current context {ctx!r} was destroyed")
        return ctx

    def _on_device_locked(self, call: str, device: int) -> SimContext:
        """The current context, which must be one of ``device``'s (what the call lands in).

        CUDA would silently create or run the work on the current context's
        device; the sim refuses.
        """
        ctx = self._current_locked(call)
        if ctx.device != device:
            raise _error(
                call,
                _INVALID_CONTEXT,
                f"device {device}'s call made while {ctx!r} (device {ctx.device}) is current",
            )
        return ctx

    def _owner_current_locked(self, call: str, owner: SimContext | None, what: Any) -> None:
        """``what`` belongs to ``owner``, which must be the current context."""
        ctx = self._current_locked(call)
        if owner is not None and ctx is not owner:
            detail = f"{what!r} belongs to {owner!r}; {ctx!r} is current"
            raise _error(call, _INVALID_CONTEXT, detail)

    # -- checks (all *_locked helpers expect self._lock held) ----------
    def _device_locked(self, device: int, call: str) -> _Device:
        if not isinstance(device, int) or not 0 <= device < len(self._devices):
            raise _error(call, _INVALID_DEVICE, f"no device {device!r}")
        return self._devices[device]

    def _fault_error(self, call: str, dev: _Device) -> CudaError:
        assert dev.fault is not None
        return _error(call, dev.fault[0], dev.fault[1])

    def _check_locked(self, call: str, device: int | None) -> _Device | None:
        """Consume a matching ``fail_next``, validate ``device``, raise its sticky fault."""
        pending = self._fail_next.get(call)
        if pending:
            for i, (code, only) in enumerate(pending):
                if only is None or only == device:
                    del pending[i]
                    raise _error(call, code, "injected by SimBackend.fail_next")
        if device is None:
            return None
        dev = self._device_locked(device, call)
        if dev.fault is not None:
            raise self._fault_error(call, dev)
        return dev

    def _stream_locked(self, stream: Any, call: str) -> SimStream:
        if self._closed:
            raise _error(call, _DEINITIALIZED, "the sim backend is closed")
        if not isinstance(stream, SimStream) or stream.destroyed:
            raise _error(call, _INVALID_HANDLE, f"{stream!r} is not a live sim stream")
        return stream

    def _event_locked(self, event: Any, call: str) -> SimEvent:
        if not isinstance(event, SimEvent) or event.destroyed or _dead(event.ctx):
            raise _error(call, _INVALID_HANDLE, f"{event!r} is not a live sim event")
        return event

    def _wait_locked(self, call: str, dev: _Device | None, pred: Callable[[], bool]) -> None:
        """Wait for ``pred``; raise ``dev``'s sticky fault (checked first) or if closed."""

        def ready() -> bool:
            return pred() or self._closed or (dev is not None and dev.fault is not None)

        self._changed.wait_for(ready)
        if dev is not None and dev.fault is not None:
            raise self._fault_error(call, dev)
        if not pred():
            raise _error(call, _DEINITIALIZED, "the sim backend was closed")

    def _region_locked(self, ptr: int) -> _Region | None:
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i >= 0:
            region = self._regions[self._starts[i]]
            if ptr < region.end:
                return region
        return None

    def _kind_locked(self, ptr: int, nbytes: int, call: str) -> MemoryKind:
        """The kind of ``[ptr, ptr + nbytes)``, which must lie inside one known region."""
        if nbytes < 0 or (ptr == 0 and nbytes > 0):
            raise _error(call, _INVALID_VALUE, f"bad range {ptr:#x}+{nbytes}")
        region = self._region_locked(ptr)
        if region is None:
            return MemoryKind.PAGEABLE
        if _dead(region.ctx):
            raise _error(call, _INVALID_VALUE, f"{ptr:#x} was freed with {region.ctx!r}")
        if ptr + nbytes > region.end:
            raise _error(call, _INVALID_VALUE, f"{ptr:#x}+{nbytes} overruns its allocation")
        return region.kind

    def _add_region_locked(self, region: _Region) -> None:
        bisect.insort(self._starts, region.start)
        self._regions[region.start] = region

    def _remove_region_locked(self, region: _Region) -> None:
        del self._starts[bisect.bisect_left(self._starts, region.start)]
        del self._regions[region.start]

    # -- enqueue -------------------------------------------------------
    def _begin(self, stream: Any, call: str) -> tuple[SimStream, _Device]:
        with self._lock:
            s = self._stream_locked(stream, call)
            self._owner_current_locked(call, s.ctx, s)
            dev = self._check_locked(call, s.device)
            assert dev is not None
            return s, dev

    # -- stream workers ------------------------------------------------
    def _push(self, s: SimStream, op: _Op, *, wait: bool = False) -> None:
        """Enqueue ``op``; with ``wait``, block until it has run (synchronous calls)."""
        with self._lock:
            self._stream_locked(s, op.call)
            dev = self._devices[s.device]
            if dev.fault is not None:
                raise self._fault_error(op.call, dev)
            depth = self.config.launch_queue
            if s.load and s.load + op.weight > depth:
                # A full launch queue blocks the enqueuing thread, as CUDA's does.
                self._wait_locked(
                    op.call,
                    dev,
                    lambda: not s.load or s.load + op.weight <= depth or s.destroyed,
                )
            s.queue.append(op)
            s.load += op.weight
            s.submitted += 1
            s.cond.notify()
            if wait:
                self._wait_locked(op.call, dev, lambda: op.done)

    def _pace(self, start: float, cost_s: float) -> None:
        """Make the work begun at ``start`` take at least ``cost_s`` of wall time."""
        remaining = cost_s - (time.monotonic() - start)
        if remaining >= _MIN_SLEEP_S:
            self._stop.wait(remaining)

    def _block(self, dev: _Device, pred: Callable[[], bool]) -> None:
        """Inside an op: wait for ``pred``; give up if the device faults or we close."""
        with self._lock:
            self._changed.wait_for(lambda: pred() or dev.fault is not None or self._closed)
            if dev.fault is not None or self._closed:
                raise _Dropped

    def _worker(self, s: SimStream) -> None:
        dev = self._devices[s.device]
        while True:
            with self._lock:
                while not s.queue and not s.destroyed and not self._closed:
                    s.cond.wait()
                if self._closed or not s.queue:  # closed, or destroyed and drained
                    break
                op = s.queue.popleft()
                s.running = op
                s.load -= op.weight
                injected: int | None = None
                if op.counted and dev.inject is not None:
                    left, code = dev.inject
                    dev.inject = (left - 1, code) if left else None
                    injected = None if left else code
            failure: tuple[int, str] | None = None
            dropped = False
            if injected is not None:
                failure = (injected, "injected by SimBackend.inject_fault")
            else:
                start = time.monotonic()
                try:
                    op.run()
                except _Dropped:
                    dropped = True
                except Exception as exc:
                    failure = (op.fail_code, f"{type(exc).__name__}: {exc}")
                else:
                    self._pace(start, op.cost_s)
            with self._lock:
                s.retired += 1
                s.running = None
                if failure is not None:
                    detail = f"device {dev.ordinal} faulted in {op.call}: {failure[1]}"
                    self._fault_locked(dev, failure[0], detail)
                elif not dropped:
                    op.done = True
                    dev.executed += op.counted
                self._changed.notify_all()
        with self._lock:
            s.retired += len(s.queue)
            s.queue.clear()
            s.load = 0
            dev.streams.discard(s)
            self._changed.notify_all()

    def _user_locked(self, start: int, end: int) -> tuple[_Op, SimStream] | None:
        """An op queued or running on any stream that uses ``[start, end)``."""
        for dev in self._devices:
            for s in dev.streams:
                ops = list(s.queue)
                if s.running is not None:
                    ops.append(s.running)
                for op in ops:
                    if any(lo < end and start < hi for lo, hi in op.spans):
                        return op, s
        return None

    def _fault_locked(self, dev: _Device, code: int, detail: str) -> None:
        """Make ``dev`` sticky-faulted: drop all its queued ops, wake every waiter."""
        if dev.fault is not None:
            return
        dev.fault = (code, detail)
        dev.fault_at = time.perf_counter()
        dev.inject = None
        for s in dev.streams:
            s.retired += len(s.queue)
            s.queue.clear()
            s.load = 0
        self._changed.notify_all()
