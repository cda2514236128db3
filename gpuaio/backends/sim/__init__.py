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
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import inspect
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from ..._errors import CudaError, InvalidArgumentError, make_cuda_error
from .._base import Backend, DeviceProperties, MemoryKind, PointerInfo, keeps_context

__all__ = ["SimBackend", "SimConfig", "SimContext", "SimEvent", "SimKernel", "SimStream"]

CU_RESULT_NAMES: dict[int, str] = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    101: "CUDA_ERROR_INVALID_DEVICE",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    214: "CUDA_ERROR_ECC_UNCORRECTABLE",
    400: "CUDA_ERROR_INVALID_HANDLE",
    600: "CUDA_ERROR_NOT_READY",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT",
    710: "CUDA_ERROR_ASSERT",
    712: "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
    713: "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
    714: "CUDA_ERROR_HARDWARE_STACK_ERROR",
    715: "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    716: "CUDA_ERROR_MISALIGNED_ADDRESS",
    717: "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    718: "CUDA_ERROR_INVALID_PC",
    719: "CUDA_ERROR_LAUNCH_FAILED",
    999: "CUDA_ERROR_UNKNOWN",
}

_INVALID_VALUE = 1
_OUT_OF_MEMORY = 2
_DEINITIALIZED = 4
_INVALID_DEVICE = 101
_INVALID_CONTEXT = 201
_INVALID_HANDLE = 400
_ILLEGAL_ADDRESS = 700
_ALREADY_REGISTERED = 712
_NOT_REGISTERED = 713
_LAUNCH_FAILED = 719

_GIB = 1 << 30
_ALIGN = 256
_MIN_SLEEP_S = 20e-6  # below this, time.sleep overshoots more than it waits
_POLL_S = 20e-6
_JOIN_TIMEOUT_S = 2.0
_DEVICE_SIDE = (MemoryKind.DEVICE, MemoryKind.MANAGED)
_thread_ids = itertools.count()
_context_handles = itertools.count(0x5C0000, 0x100)


def _error(call: str, code: int, detail: str = "") -> CudaError:
    return make_cuda_error(call, code, CU_RESULT_NAMES.get(code, f"CUresult_{code}"), detail)


def _view(ptr: int, nbytes: int) -> npt.NDArray[np.uint8]:
    """A writable uint8 view of ``nbytes`` at address ``ptr``."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)), dtype=np.uint8)


def _noop() -> None:
    pass


def _dead(ctx: SimContext | None) -> bool:
    """Whether ``ctx`` is a destroyed context (what it owned is gone with it)."""
    return ctx is not None and ctx.destroyed


_SLICE = 1 << 20


def _paced_copy(dst: npt.NDArray[np.uint8], src: npt.NDArray[np.uint8], gbps: float) -> None:
    """Copy in 1 MiB slices spread over the modelled time, as a DMA engine would.

    Short bursts keep a simulated transfer from monopolising a host core
    (CI machines have two), so the event loop under test stays schedulable.
    """
    n = dst.nbytes
    if n <= _SLICE:
        np.copyto(dst, src)
        return
    start = time.monotonic()
    per_byte = 1.0 / (gbps * 1e9)
    for off in range(0, n, _SLICE):
        end = min(n, off + _SLICE)
        np.copyto(dst[off:end], src[off:end])
        ahead = start + end * per_byte - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        else:
            os.sched_yield()


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Shape and speed of the simulated machine (bandwidths in GB/s, 1e9 bytes)."""

    devices: int = 1
    device_memory: int = 8 * _GIB
    """Per-device budget; ``cuMemAlloc`` beyond it fails with out-of-memory."""
    dma_gbps: float = 20.0
    """Pinned <-> device (and managed) copies."""
    pageable_gbps: float = 4.0
    """The driver's own staging of pageable memory."""
    d2d_gbps: float = 200.0
    """Copies and memsets within one device."""
    peer_gbps: float = 40.0
    host_gbps: float = 8.0
    """Driver host-to-host copies and host memsets."""
    latency_s: float = 5e-6
    """Fixed cost of every enqueued copy, memset, launch and stream-memory op."""
    priority_range: tuple[int, int] = (0, -5)
    """(least, greatest) stream priority."""
    launch_queue: int = 1024
    """Entries a stream holds not yet run before an enqueue blocks its caller
    until one has run (CUDA's per-stream launch queue is about 1,000 deep)."""
    host_func_entries: int = 18
    """Launch-queue entries one queued host function takes. On an H200 a held
    stream took 1,021 memsets but only 55 memsets each followed by a host
    function before an enqueue blocked."""
    marker_fault_delay_s: float = 0.0
    """After a sticky fault, how long a query of an event whose record was not
    reached yet keeps answering "not ready" before it reports the error. Any
    other call (a query of a never-recorded event included) reports it at once.
    On an H200 gpuaio's marker queries reported a trapped kernel about 250 ms
    after a never-recorded event's query did; the sticky-fault tests use 0.25."""

    def __post_init__(self) -> None:
        rates = (self.dma_gbps, self.pageable_gbps, self.d2d_gbps, self.peer_gbps, self.host_gbps)
        if self.devices < 1 or self.device_memory <= 0:
            raise InvalidArgumentError("SimConfig needs devices >= 1 and device_memory > 0")
        if self.launch_queue < 1 or self.host_func_entries < 1:
            raise InvalidArgumentError("SimConfig needs launch_queue, host_func_entries >= 1")
        if self.marker_fault_delay_s < 0:
            raise InvalidArgumentError("SimConfig.marker_fault_delay_s must be >= 0")
        if not all(r > 0 and math.isfinite(r) for r in rates) or self.latency_s < 0:
            raise InvalidArgumentError("SimConfig bandwidths must be > 0 and latency_s >= 0")
        if self.priority_range[1] > self.priority_range[0]:
            raise InvalidArgumentError(
                "SimConfig.priority_range is (least, greatest), least >= greatest"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimConfig:
        """Defaults overridden by ``GPUAIO_SIM_<FIELD>`` variables.

        e.g. ``GPUAIO_SIM_DEVICES=8``, ``GPUAIO_SIM_DMA_GBPS=55``,
        ``GPUAIO_SIM_PRIORITY_RANGE=0,-5``.
        """
        env = os.environ if environ is None else environ
        defaults = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"GPUAIO_SIM_{f.name.upper()}")
            if raw is None or not raw.strip():
                continue
            default = getattr(defaults, f.name)
            try:
                if isinstance(default, tuple):
                    values[f.name] = tuple(int(part) for part in raw.split(","))
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = float(raw)
            except ValueError:
                raise InvalidArgumentError(
                    f"GPUAIO_SIM_{f.name.upper()}={raw!r} is not a valid {f.name}"
                ) from None
        return cls(**values)


@dataclass(frozen=True, slots=True)
class SimKernel:
    """A simulated kernel: ``fn(grid, block, *args)`` runs in the stream's worker.

    Array arguments (anything with ``__cuda_array_interface__``) reach ``fn``
    as writable numpy views of the memory. The launch takes at least
    ``duration_s`` of wall time.
    """

    fn: Callable[..., None]
    name: str = ""
    duration_s: float = 0.0

    def __call__(self, *args: Any) -> None:
        self.fn(*args)


class _Dropped(Exception):
    """A waiting op gave up because its device faulted or the backend closed."""


class _Op:
    """One unit of stream work; ``done`` is set (under the lock) once it succeeded."""

    __slots__ = ("call", "cost_s", "counted", "done", "fail_code", "run", "weight")

    def __init__(
        self,
        call: str,
        run: Callable[[], None],
        cost_s: float = 0.0,
        *,
        counted: bool = True,
        fail_code: int = _ILLEGAL_ADDRESS,
        weight: int = 1,
    ) -> None:
        self.call: str = call
        self.weight: int = weight  # launch-queue entries it takes
        self.run: Callable[[], None] = run
        self.cost_s: float = cost_s
        # Only copies, memsets and kernels count: completion markers (event records,
        # host funcs, flag writes) differ between completion strategies, and fault
        # tests must not depend on which one the library picked.
        self.counted: bool = counted
        self.fail_code: int = fail_code  # the sticky error if ``run`` raises
        self.done: bool = False


class SimContext:
    """A simulated ``CUcontext``: it owns the memory, streams and events created in it.

    Each device has one primary context (the one CUDA's runtime, PyTorch and
    CuPy share); :meth:`SimBackend.context_create` makes others, as
    ``cuCtxCreate`` does. ``handle`` stands for the ``CUcontext`` address.
    """

    __slots__ = ("destroyed", "device", "handle", "primary")

    def __init__(self, device: int, primary: bool) -> None:
        self.device: int = device
        self.primary: bool = primary
        self.handle: int = next(_context_handles)
        self.destroyed: bool = False

    def __repr__(self) -> str:
        kind = "primary" if self.primary else "created"
        return f"<SimContext {self.handle:#x} device={self.device} {kind}>"


class _SimThread(threading.local):
    """What one thread has current, as the driver keeps it per thread."""

    def __init__(self) -> None:  # runs in each thread, on its first use
        self.ctx: SimContext | None = None
        """The thread's current context (``cuCtxGetCurrent``)."""
        self.keep = keeps_context(threading.current_thread())
        """Whether the backend leaves the context it binds current here."""


class SimStream:
    """A simulated ``CUstream``: a worker thread running its ops strictly in FIFO order.

    ``submitted``/``retired`` count ops pushed and finished (or dropped), so a
    synchronize waits only for work enqueued before it was called.
    """

    def __init__(
        self, device: int, priority: int, lock: threading.Lock, ctx: SimContext | None = None
    ) -> None:
        self.device = device
        self.priority = priority
        self.ctx = ctx
        """The context the stream was created in."""
        self.queue: deque[_Op] = deque()
        self.load = 0  # launch-queue entries the queued ops take
        self.cond: threading.Condition = threading.Condition(lock)
        self.submitted = 0
        self.retired = 0
        self.destroyed = False
        self.thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<SimStream device={self.device} priority={self.priority} at {id(self):#x}>"


class SimEvent:
    """A simulated ``CUevent``: remembers the marker op of its most recent record."""

    def __init__(self, device: int, blocking_sync: bool, ctx: SimContext | None = None) -> None:
        self.device = device
        self.ctx = ctx
        """The context the event was created in."""
        self.blocking_sync = blocking_sync  # waits never spin here, so only kept for repr
        self.last: _Op | None = None
        self.destroyed = False

    def __repr__(self) -> str:
        return f"<SimEvent device={self.device} at {id(self):#x}>"


@dataclass(slots=True)
class _Region:
    start: int
    end: int
    kind: MemoryKind
    device: int | None
    array: npt.NDArray[np.uint8] | None  # None for registered user memory
    ctx: SimContext | None = None  # the context it was allocated (registered) in


class _Device:
    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal
        self.used = 0
        self.executed = 0
        self.fault: tuple[int, str] | None = None
        self.fault_at = 0.0  # time.perf_counter() when the fault struck
        self.inject: tuple[int, int] | None = None  # (ops still to run, code)
        self.streams: set[SimStream] = set()


class _Latch:
    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = False


def _array_arg(cai: Mapping[str, Any]) -> npt.NDArray[Any]:
    """A numpy view of the memory described by a ``__cuda_array_interface__`` dict."""
    ptr = int(cai["data"][0])
    shape = tuple(int(n) for n in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    if strides is None:
        strides, step = [], dtype.itemsize
        for n in reversed(shape):
            strides.insert(0, step)
            step *= n
    strides = tuple(int(s) for s in strides)
    if 0 in shape:
        return np.empty(shape, dtype=dtype)
    lo = sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if s > 0) + dtype.itemsize
    buf = _view(ptr + lo, hi - lo)
    return np.ndarray(shape, dtype=dtype, buffer=buf, offset=-lo, strides=strides)


def _kernel_arg(arg: Any) -> Any:
    """A kernel argument as the sim kernel body sees it: arrays become numpy views.

    A gpuaio ``DeviceArray`` refuses its public ``__cuda_array_interface__`` on
    the sim (it is not CUDA memory to other libraries), so its own describes it
    through the private ``_gpuaio_cai``.
    """
    own = getattr(type(arg), "_gpuaio_cai", None)
    if own is not None:
        return _array_arg(own(arg))
    if hasattr(arg, "__cuda_array_interface__"):
        return _array_arg(arg.__cuda_array_interface__)
    return arg


_F = TypeVar("_F", bound=Callable[..., Any])
_KEEP: Any = object()
"""What ``SimBackend._enter`` returns when there is nothing to restore."""


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
        def bound(self: SimBackend, *args: Any, **kwargs: Any) -> Any:
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


class SimBackend(Backend):
    """CUDA on threads: ordered per-stream workers, real bytes, real time, real blocking.

    One lock guards all state; ``_changed`` is notified whenever an op finishes,
    a device faults, a latch opens or the backend closes, so every blocking call
    waits on a condition and none spins (except ``cuStreamWaitValue32``, which
    polls memory as the GPU does).
    """

    name = "sim"

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

    # -- devices -------------------------------------------------------
    def device_count(self) -> int:
        """How many simulated devices (``SimConfig.devices``)."""
        return len(self._devices)

    def device_properties(self, device: int) -> DeviceProperties:
        """Simulated properties, shaped like an H100's."""
        with self._lock:
            self._device_locked(device, "cuDeviceGetAttribute")
        return DeviceProperties(
            ordinal=device,
            name="gpuaio simulated device",
            total_memory=self.config.device_memory,
            compute_capability=(9, 0),
            multiprocessors=132,
            pci_bus_id=f"0000:00:{device:02x}.0",
            can_map_host_memory=True,
            stream_mem_ops=True,
        )

    def driver_version(self) -> str:
        """Always ``"sim"``."""
        return "sim"

    def can_access_peer(self, device: int, peer: int) -> bool:
        """Every pair of distinct simulated devices can."""
        with self._lock:
            self._device_locked(device, "cuDeviceCanAccessPeer")
            self._device_locked(peer, "cuDeviceCanAccessPeer")
        return device != peer

    @_in_context("device", "device")
    def enable_peer_access(self, device: int, peer: int) -> None:
        """Validates the ordinals; peers can always reach each other here."""
        with self._lock:
            self._device_locked(device, "cuCtxEnablePeerAccess")
            self._device_locked(peer, "cuCtxEnablePeerAccess")
            self._on_device_locked("cuCtxEnablePeerAccess", device)

    # -- memory --------------------------------------------------------
    def _alloc(self, call: str, device: int | None, nbytes: int, kind: MemoryKind) -> int:
        with self._lock:
            dev = self._check_locked(call, device)
            if device is None:
                owner = self._current_locked(call)
            else:
                owner = self._on_device_locked(call, device)
            if not isinstance(nbytes, int) or nbytes <= 0:
                raise _error(call, _INVALID_VALUE, f"cannot allocate {nbytes!r} bytes")
            budgeted = dev is not None and kind is MemoryKind.DEVICE
            if dev is not None and budgeted:
                if dev.used + nbytes > self.config.device_memory:
                    free = self.config.device_memory - dev.used
                    raise _error(call, _OUT_OF_MEMORY, f"{nbytes} bytes asked, {free} free")
                dev.used += nbytes
        try:
            base = np.zeros(nbytes + _ALIGN, dtype=np.uint8)  # calloc: big blocks stay lazy
        except MemoryError:
            with self._lock:
                if dev is not None and budgeted:
                    dev.used -= nbytes
            raise _error(call, _OUT_OF_MEMORY, f"host could not back {nbytes} bytes") from None
        offset = -base.ctypes.data % _ALIGN
        array = base[offset : offset + nbytes]
        if kind is MemoryKind.PINNED:
            # Page-locked memory is resident: fault it in now, as pinning does,
            # rather than on the first copy (page faults stall every thread).
            array.fill(0)
        ptr = int(array.ctypes.data)
        with self._lock:
            self._add_region_locked(_Region(ptr, ptr + nbytes, kind, device, array, owner))
        return ptr

    @_in_context("device", "device")
    def mem_alloc(self, device: int, nbytes: int) -> int:
        """Device memory (host-backed, 256-byte aligned), charged to the device budget."""
        return self._alloc("cuMemAlloc", device, nbytes, MemoryKind.DEVICE)

    @_in_context("device", "device")
    def mem_alloc_managed(self, device: int, nbytes: int) -> int:
        """Managed memory; it can oversubscribe, so it is not charged to the budget."""
        return self._alloc("cuMemAllocManaged", device, nbytes, MemoryKind.MANAGED)

    @_in_context("owner", "ptr")
    def mem_free(self, ptr: int) -> None:
        """Free device/managed memory once work enqueued on its device has finished.

        Like ``cuMemFree`` on a faulted context, this raises the sticky error
        and keeps the memory.
        """
        call = "cuMemFree"
        with self._lock:
            self._check_locked(call, None)
            region = self._regions.get(ptr)
            if region is None or region.device is None or region.kind not in _DEVICE_SIDE:
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not a device allocation")
            if _dead(region.ctx):
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was freed with {region.ctx!r}")
            self._on_device_locked(call, region.device)
            dev = self._devices[region.device]
            targets = [(s, s.submitted) for s in dev.streams]
            self._wait_locked(
                call, dev, lambda: self._closed or all(s.retired >= n for s, n in targets)
            )
            if self._regions.get(ptr) is not region:  # freed meanwhile by another thread
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was already freed")
            self._remove_region_locked(region)
            if region.kind is MemoryKind.DEVICE:
                dev.used -= region.end - region.start

    @_in_context("any")
    def host_alloc(self, nbytes: int) -> int:
        """Pinned, portable, mapped host memory (its device address is ``ptr`` itself)."""
        return self._alloc("cuMemHostAlloc", None, nbytes, MemoryKind.PINNED)

    @_in_context("any")
    def host_free(self, ptr: int) -> None:
        """Free pinned memory after all work already enqueued on any stream has finished."""
        call = "cuMemFreeHost"
        with self._lock:
            self._check_locked(call, None)
            self._current_locked(call)
            region = self._regions.get(ptr)
            if region is None or region.kind is not MemoryKind.PINNED or region.array is None:
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not from cuMemHostAlloc")
            if _dead(region.ctx):
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was freed with {region.ctx!r}")
            targets = [(s, s.submitted) for d in self._devices for s in d.streams]
            self._changed.wait_for(lambda: self._closed or all(s.retired >= n for s, n in targets))
            if self._regions.get(ptr) is not region:
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was already freed")
            self._remove_region_locked(region)

    @_in_context("any")
    def host_register(self, ptr: int, nbytes: int) -> None:
        """Mark ``[ptr, ptr + nbytes)`` pinned; overlapping pinned memory gives 712."""
        call = "cuMemHostRegister"
        with self._lock:
            self._check_locked(call, None)
            owner = self._current_locked(call)
            if ptr == 0 or not isinstance(nbytes, int) or nbytes <= 0:
                raise _error(call, _INVALID_VALUE, f"bad range {ptr:#x}+{nbytes!r}")
            overlap = self._region_locked(ptr)
            i = bisect.bisect_left(self._starts, ptr)
            if overlap is None and i < len(self._starts) and self._starts[i] < ptr + nbytes:
                overlap = self._regions[self._starts[i]]
            if overlap is not None:
                code = _ALREADY_REGISTERED if overlap.kind is MemoryKind.PINNED else _INVALID_VALUE
                raise _error(call, code, f"{ptr:#x}+{nbytes} overlaps {overlap.kind.value} memory")
            self._add_region_locked(
                _Region(ptr, ptr + nbytes, MemoryKind.PINNED, None, None, owner)
            )

    @_in_context("any")
    def host_unregister(self, ptr: int) -> None:
        """Undo :meth:`host_register` of the range starting at ``ptr`` (else 713, as CUDA)."""
        call = "cuMemHostUnregister"
        with self._lock:
            self._check_locked(call, None)
            self._current_locked(call)
            region = self._regions.get(ptr)
            if region is None or region.kind is not MemoryKind.PINNED or region.array is not None:
                raise _error(call, _NOT_REGISTERED, f"{ptr:#x} is not a registered range")
            self._remove_region_locked(region)

    @_in_context("any")
    def host_device_pointer(self, ptr: int) -> int:
        """Pinned memory is mapped at the same address; anything else is invalid."""
        with self._lock:
            self._current_locked("cuMemHostGetDevicePointer")
            region = self._region_locked(ptr)
        if region is None or region.kind is not MemoryKind.PINNED or _dead(region.ctx):
            raise _error("cuMemHostGetDevicePointer", _INVALID_VALUE, f"{ptr:#x} is not pinned")
        return ptr

    @_in_context("some")
    def pointer_info(self, ptr: int) -> PointerInfo:
        """Classify ``ptr`` by the sim's allocation table; unknown memory is pageable."""
        with self._lock:
            self._current_locked("cuPointerGetAttributes")
            region = self._region_locked(ptr)
        if region is None or _dead(region.ctx):  # memory of a destroyed context is unmapped
            return PointerInfo(MemoryKind.PAGEABLE, None)
        return PointerInfo(region.kind, region.device)

    # -- streams -------------------------------------------------------
    @_in_context("device", "device")
    def stream_priority_range(self, device: int) -> tuple[int, int]:
        """``SimConfig.priority_range`` (as ``cuCtxGetStreamPriorityRange`` gives it)."""
        with self._lock:
            self._device_locked(device, "cuCtxGetStreamPriorityRange")
            self._on_device_locked("cuCtxGetStreamPriorityRange", device)
        return self.config.priority_range

    @_in_context("device", "device")
    def stream_create(self, device: int, priority: int = 0) -> SimStream:
        """A stream with its own worker thread; ``priority`` is clamped to the range."""
        call = "cuStreamCreateWithPriority"
        least, greatest = self.config.priority_range
        with self._lock:
            if self._closed:
                raise _error(call, _DEINITIALIZED, "the sim backend is closed")
            dev = self._check_locked(call, device)
            assert dev is not None
            owner = self._on_device_locked(call, device)
            s = SimStream(device, min(least, max(greatest, priority)), self._lock, owner)
            s.thread = threading.Thread(
                target=self._worker, args=(s,), name=f"gpuaio-sim-stream-{next(_thread_ids)}"
            )
            s.thread.daemon = True
            dev.streams.add(s)
            self._handles[id(s)] = s
        s.thread.start()
        return s

    def stream_from_handle(self, device: int, handle: int) -> SimStream:
        """The live sim stream whose :meth:`stream_handle` is ``handle``."""
        with self._lock:
            s = self._handles.get(handle)
            if s is None or s.device != device:
                raise _error(
                    "cuStreamGetCtx",
                    _INVALID_HANDLE,
                    f"no sim stream {handle!r} on device {device!r}",
                )
        return s

    def stream_handle(self, stream: Any) -> int:
        """A unique integer standing for the simulated ``CUstream``."""
        if not isinstance(stream, SimStream):
            raise _error("cuStreamGetId", _INVALID_HANDLE, f"{stream!r} is not a sim stream")
        return id(stream)

    @_in_context("handle", "stream")
    def stream_destroy(self, stream: Any) -> None:
        """Returns at once; the worker finishes the queued ops, then exits."""
        with self._lock:
            if self._closed:  # every worker is gone already
                return
            s = self._stream_locked(stream, "cuStreamDestroy")
            self._owner_current_locked("cuStreamDestroy", s.ctx, s)
            s.destroyed = True
            self._handles.pop(id(s), None)
            s.cond.notify()
            # Like cuStreamDestroy on a faulted context (the worker exits all the same).
            self._check_locked("cuStreamDestroy", s.device)

    @_in_context("handle", "stream")
    def stream_synchronize(self, stream: Any) -> None:
        """Block until everything enqueued before this call has run."""
        call = "cuStreamSynchronize"
        with self._lock:
            s = self._stream_locked(stream, call)
            self._owner_current_locked(call, s.ctx, s)
            dev = self._check_locked(call, s.device)
            target = s.submitted
            self._wait_locked(call, dev, lambda: s.retired >= target)

    # -- enqueue -------------------------------------------------------
    def _begin(self, stream: Any, call: str) -> tuple[SimStream, _Device]:
        with self._lock:
            s = self._stream_locked(stream, call)
            self._owner_current_locked(call, s.ctx, s)
            dev = self._check_locked(call, s.device)
            assert dev is not None
            return s, dev

    def _copy_op(self, call: str, dst: int, src: int, nbytes: int, gbps: float) -> _Op:
        def run() -> None:
            _paced_copy(_view(dst, nbytes), _view(src, nbytes), gbps)

        return _Op(call, run, self.config.latency_s + nbytes / (gbps * 1e9))

    @_in_context("handle", "stream")
    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """``cuMemcpyAsync``, blocking the caller where CUDA does (see the module docstring)."""
        call = "cuMemcpyAsync"
        cfg = self.config
        s, dev = self._begin(stream, call)
        with self._lock:
            dkind = self._kind_locked(dst, nbytes, call)
            skind = self._kind_locked(src, nbytes, call)
        d_dev, s_dev = dkind in _DEVICE_SIDE, skind in _DEVICE_SIDE
        if d_dev and s_dev:
            self._push(s, self._copy_op(call, dst, src, nbytes, cfg.d2d_gbps))
        elif s_dev:
            pinned = dkind is MemoryKind.PINNED
            gbps = cfg.dma_gbps if pinned else cfg.pageable_gbps
            self._push(s, self._copy_op(call, dst, src, nbytes, gbps), wait=not pinned)
        elif d_dev and skind is MemoryKind.PINNED:
            self._push(s, self._copy_op(call, dst, src, nbytes, cfg.dma_gbps))
        elif d_dev:
            # Pageable source: the driver syncs the stream, stages the bytes in the
            # caller's thread, and returns once they are staged (src reusable).
            with self._lock:
                target = s.submitted
                self._wait_locked(call, dev, lambda: s.retired >= target)
            start = time.monotonic()
            staged = _view(src, nbytes).copy()
            self._pace(start, nbytes / (cfg.pageable_gbps * 1e9))

            def dma() -> None:
                _paced_copy(_view(dst, nbytes), staged, cfg.dma_gbps)

            self._push(s, _Op(call, dma, cfg.latency_s + nbytes / (cfg.dma_gbps * 1e9)))
        else:
            self._push(s, self._copy_op(call, dst, src, nbytes, cfg.host_gbps), wait=True)

    @_in_context("handle", "stream")
    def memcpy_peer_async(
        self, dst: int, dst_device: int, src: int, src_device: int, nbytes: int, stream: Any
    ) -> None:
        """Asynchronous copy between two devices at ``peer_gbps``."""
        call = "cuMemcpyPeerAsync"
        s, _ = self._begin(stream, call)
        with self._lock:
            self._device_locked(dst_device, call)
            self._device_locked(src_device, call)
            self._kind_locked(dst, nbytes, call)
            self._kind_locked(src, nbytes, call)
        self._push(s, self._copy_op(call, dst, src, nbytes, self.config.peer_gbps))

    @_in_context("handle", "stream")
    def memset_async(self, ptr: int, value: int, itemsize: int, count: int, stream: Any) -> None:
        """Fill ``count`` little-endian items; async on device/managed, sync on pinned."""
        call = f"cuMemsetD{8 * itemsize}Async" if itemsize in (1, 2, 4) else "cuMemsetD8Async"
        if itemsize not in (1, 2, 4):
            raise _error(call, _INVALID_VALUE, f"itemsize must be 1, 2 or 4, not {itemsize!r}")
        s, _ = self._begin(stream, call)
        nbytes = itemsize * count
        with self._lock:
            kind = self._kind_locked(ptr, nbytes, call)
        if kind is MemoryKind.PAGEABLE:
            raise _error(call, _INVALID_VALUE, f"{ptr:#x} is pageable host memory")
        if ptr % itemsize:
            raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not {itemsize}-byte aligned")
        dtype = np.dtype(f"<u{itemsize}")
        pattern = value & ((1 << (8 * itemsize)) - 1)

        def run() -> None:
            _view(ptr, nbytes).view(dtype)[:] = pattern

        host = kind is MemoryKind.PINNED
        gbps = self.config.host_gbps if host else self.config.d2d_gbps
        self._push(s, _Op(call, run, self.config.latency_s + nbytes / (gbps * 1e9)), wait=host)

    @_in_context("handle", "stream")
    def launch(
        self,
        kernel: Any,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[Any],
        shared_mem: int,
        stream: Any,
    ) -> None:
        """Enqueue ``kernel.fn(grid, block, *args)``; array args become numpy views.

        A body that raises faults the device with ``CUDA_ERROR_LAUNCH_FAILED``.
        """
        call = "cuLaunchKernel"
        s, _ = self._begin(stream, call)
        if not isinstance(kernel, SimKernel):
            if not callable(kernel):
                raise _error(call, _INVALID_HANDLE, f"{kernel!r} is not a sim kernel")
            kernel = SimKernel(kernel, getattr(kernel, "__name__", ""))
        dims = (*grid, *block)
        if len(dims) != 6 or not all(isinstance(d, int) and d > 0 for d in dims):
            raise _error(call, _INVALID_VALUE, f"bad grid {grid!r} / block {block!r}")
        if math.prod(block) > 1024 or shared_mem < 0:
            raise _error(call, _INVALID_VALUE, f"block {block!r} or shared_mem {shared_mem}")
        try:
            converted = [_kernel_arg(a) for a in args]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _error(call, _INVALID_VALUE, f"bad __cuda_array_interface__: {exc}") from None
        fn = kernel.fn

        def run() -> None:
            fn(grid, block, *converted)

        cost = max(self.config.latency_s, kernel.duration_s)
        self._push(s, _Op(call, run, cost, fail_code=_LAUNCH_FAILED))

    @_in_context("handle", "stream")
    def launch_host_func(self, stream: Any, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the worker, in order; a raising ``fn`` faults the device (719)."""
        call = "cuLaunchHostFunc"
        s, _ = self._begin(stream, call)
        op = _Op(
            call,
            fn,
            self.config.latency_s,
            counted=False,
            fail_code=_LAUNCH_FAILED,
            weight=self.config.host_func_entries,
        )
        self._push(s, op)

    def _word_locked(self, ptr: int, call: str) -> None:
        kind = self._kind_locked(ptr, 4, call)
        if kind is MemoryKind.PAGEABLE or ptr % 4:
            raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not aligned mapped/device memory")

    @_in_context("handle", "stream")
    def stream_write_value32(self, stream: Any, device_ptr: int, value: int) -> None:
        """In stream order, store ``value`` as a little-endian uint32 at ``device_ptr``."""
        call = "cuStreamWriteValue32"
        s, _ = self._begin(stream, call)
        with self._lock:
            self._word_locked(device_ptr, call)
        if not 0 <= value <= 0xFFFFFFFF:
            raise _error(call, _INVALID_VALUE, f"{value!r} is not a uint32")
        data = value.to_bytes(4, "little")

        def run() -> None:
            ctypes.memmove(device_ptr, data, 4)

        self._push(s, _Op(call, run, self.config.latency_s, counted=False))

    @_in_context("handle", "stream")
    def stream_wait_value32(self, stream: Any, device_ptr: int, value: int) -> None:
        """The stream waits until ``(int32)(*device_ptr - value) >= 0`` (CUDA's cyclic GEQ)."""
        call = "cuStreamWaitValue32"
        s, dev = self._begin(stream, call)
        with self._lock:
            self._word_locked(device_ptr, call)
        if not 0 <= value <= 0xFFFFFFFF:
            raise _error(call, _INVALID_VALUE, f"{value!r} is not a uint32")

        def run() -> None:
            while (int.from_bytes(ctypes.string_at(device_ptr, 4), "little") - value) & (1 << 31):
                if dev.fault is not None or self._closed:
                    raise _Dropped
                self._stop.wait(_POLL_S)

        self._push(s, _Op(call, run, self.config.latency_s, counted=False))

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

    # -- kernels -------------------------------------------------------
    @_in_context("device", "device")
    def compile(
        self,
        device: int,
        source: str,
        name: str,
        options: Sequence[str],
        sim: Callable[..., None] | None,
    ) -> SimKernel:
        """Wrap ``sim`` (the Python body) as kernel ``name``; ``source`` is not compiled."""
        with self._lock:
            self._check_locked("cuModuleLoadData", device)
            self._on_device_locked("cuModuleLoadData", device)
        if sim is None:
            raise InvalidArgumentError(
                f"the sim backend cannot run CUDA source: give kernel {name!r} a Python body (sim=)"
            )
        if isinstance(sim, SimKernel):
            return sim
        return SimKernel(sim, name)

    # -- contexts ------------------------------------------------------
    def current_context(self) -> int:
        """The handle of the calling thread's current context (0: none)."""
        ctx = self._thread.ctx
        return 0 if ctx is None else ctx.handle

    def set_current_context(self, ctx: int) -> None:
        """Make the context with handle ``ctx`` current in the calling thread (0: none)."""
        if ctx == 0:
            self._thread.ctx = None
            return
        with self._lock:
            found = self._contexts.get(ctx)
            if found is None or found.destroyed:
                raise _error("cuCtxSetCurrent", _INVALID_CONTEXT, f"no live sim context {ctx!r}")
        self._thread.ctx = found

    def primary_context(self, device: int) -> int:
        """The handle of ``device``'s primary context."""
        with self._lock:
            self._device_locked(device, "cuDevicePrimaryCtxRetain")
        return self._primary[device].handle

    # -- test hooks ----------------------------------------------------
    def context_create(self, device: int = 0) -> int:
        """A new (non-primary) context on ``device``, made current in the calling thread.

        What ``cuCtxCreate`` does, and what a library with its own context
        (PyCUDA's ``make_context``) leaves current. Returns its handle.
        """
        with self._lock:
            self._device_locked(device, "cuCtxCreate")
            ctx = SimContext(device, primary=False)
            self._contexts[ctx.handle] = ctx
        self._thread.ctx = ctx
        return ctx.handle

    def context_destroy(self, ctx: int) -> None:
        """Destroy a context from :meth:`context_create`, and everything it owns.

        Its memory is unmapped (a later use is ``CUDA_ERROR_INVALID_VALUE``),
        its streams and events are destroyed, their queued work dropped. If it
        is current in the calling thread, no context is current there after.
        """
        call = "cuCtxDestroy"
        with self._lock:
            found = self._contexts.get(ctx)
            if found is None or found.destroyed or found.primary:
                raise _error(call, _INVALID_CONTEXT, f"{ctx!r} is no live created sim context")
            found.destroyed = True
            for region in self._regions.values():
                # Kept in the table, its backing array alive: the address stays
                # reserved, so a use finds it dead instead of reading freed memory.
                if region.ctx is found and region.kind is MemoryKind.DEVICE:
                    assert region.device is not None
                    self._devices[region.device].used -= region.end - region.start
            for dev in self._devices:
                for stream in dev.streams:
                    if stream.ctx is found and not stream.destroyed:
                        stream.destroyed = True
                        stream.retired += len(stream.queue)
                        stream.queue.clear()
                        stream.load = 0
                        self._handles.pop(id(stream), None)
                        stream.cond.notify()
            self._changed.notify_all()
        if self._thread.ctx is found:
            self._thread.ctx = None

    def context_of(self, obj: Any) -> int:
        """The handle of the context that owns ``obj`` (0: none known).

        ``obj`` is a pointer (an ``int``), a sim stream or event, or anything
        with a ``ptr`` (gpuaio buffers) or ``_native`` (gpuaio streams, events).
        """
        obj = getattr(obj, "_native", obj)
        ptr = getattr(obj, "ptr", obj)
        if isinstance(obj, (SimStream, SimEvent)):
            owner = obj.ctx
        elif isinstance(ptr, int):
            with self._lock:
                region = self._region_locked(ptr)
            owner = None if region is None else region.ctx
        else:
            raise InvalidArgumentError(f"context_of: {obj!r} is no pointer, stream or event")
        return 0 if owner is None else owner.handle

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
