"""Devices and their streams: the objects every copy, memset and launch goes through.

A :class:`Device` is the entry point to streams, allocations and kernels. A
:class:`Stream` is an ordered queue of awaitable copies, memsets, launches
and events on one device (its copies and memsets are in
``gpuaio._api.transfers``). They live together because each makes or names
the other.

Every stream method validates its arguments, then enqueues at once and
returns an :class:`~gpuaio.Operation`; ``await`` it when the result is needed.

Order is kept by the stream's ``Sequencer`` (``gpuaio._engine.sequencer``),
never by the thread that happens to run a step, and the event loop never
blocks:

* Work the driver runs asynchronously (device memsets, launches, copies
  between device memory and pinned memory, device-to-device copies) is
  enqueued directly by the calling thread: a few microseconds.
* Work the driver would run synchronously (anything touching pageable
  memory, host-to-host copies, memsets of host memory) becomes a *host step*
  on the stream's host thread. It first settles on the host actions before
  it (and on the GPU work before it where the GPU may touch its memory).
* While a host step is queued or running, later device work on that stream
  is handed to the same thread, so it is enqueued in submission order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, SupportsIndex, cast

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt

from .._core.errors import InvalidArgumentError, NoDeviceError, StreamClosedError
from .._core.kernel import Kernel, normalize_dim3
from .._core.operation import Operation
from .._engine.sequencer import Frontier, Sequencer
from ..backends import DeviceProperties, MemoryKind
from .memory import Allocation, DeviceArray, _alloc_size, _normalize_shape
from .runtime import Runtime, current_runtime
from .transfers import Transfers

__all__ = ["Device", "Event", "Stream", "device_of"]

log = logging.getLogger("gpuaio")

CU_STREAM_LEGACY = 0x1
"""The legacy default stream: one stream per context, whichever thread enqueues."""
CU_STREAM_PER_THREAD = 0x2
"""The per-thread default stream: a different stream for every enqueueing thread."""


def _per_thread_default() -> bool:
    """Whether the handle 0 means the per-thread default stream in this process.

    cuda-bindings calls the driver's ``_ptds`` entry points when this
    variable is set, and then the null stream is per-thread.
    """
    return os.environ.get("CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM", "0") not in ("", "0")


def device_of(rt: Runtime, ordinal: int) -> Device:
    """The :class:`Device` object for ``ordinal`` of runtime ``rt`` (one per runtime)."""
    if rt.forked is not None:  # before the lookup: an inherited Device is unusable too
        raise rt.forked_error("Device")
    dev = rt.devices.get(ordinal)
    if dev is not None:
        return cast(Device, dev)
    count = rt.backend.device_count()
    if not 0 <= ordinal < count:
        raise NoDeviceError(
            f"no device {ordinal}: the {rt.backend.name} backend has {count} device(s)"
        )
    with _devices_lock:
        dev = rt.devices.get(ordinal)
        if dev is None:
            dev = rt.devices[ordinal] = Device._create(rt, ordinal)
    return cast(Device, dev)


_devices_lock = threading.Lock()


class Device:
    """One GPU (or simulated GPU) of the current backend.

    ``Device(0)`` returns the same object every time for a given runtime.
    """

    _runtime: Runtime
    ordinal: int
    _props: DeviceProperties | None
    _default: Stream | None

    def __new__(cls, ordinal: int = 0) -> Device:
        if not isinstance(ordinal, int) or isinstance(ordinal, bool):
            raise InvalidArgumentError(f"device ordinal must be an int, not {ordinal!r}")
        return device_of(current_runtime(), ordinal)

    @classmethod
    async def open(cls, ordinal: int = 0) -> Device:
        """``Device(ordinal)``, made on a worker thread: the event loop never waits.

        The first ``Device`` of a process starts gpuaio's runtime: it loads
        and initializes the driver and the backend's threads (about 50 ms on
        the simulated backend, more on a GPU). Inside a running event loop,
        open the first device with ``await gpuaio.Device.open(0)``; later
        ``Device(n)`` calls are cheap lookups.
        """
        if not isinstance(ordinal, int) or isinstance(ordinal, bool):
            raise InvalidArgumentError(f"device ordinal must be an int, not {ordinal!r}")
        return await anyio.to_thread.run_sync(cls, ordinal)

    @classmethod
    def _create(cls, runtime: Runtime, ordinal: int) -> Device:
        self = object.__new__(cls)
        self._runtime = runtime
        self.ordinal = ordinal
        self._props = None
        self._default = None
        return self

    def __repr__(self) -> str:
        return f"<gpuaio.Device {self.ordinal} {self.name!r} ({self._runtime.backend.name})>"

    @property
    def properties(self) -> DeviceProperties:
        if self._props is None:
            self._props = self._runtime.backend.device_properties(self.ordinal)
        return self._props

    @property
    def name(self) -> str:
        return self.properties.name

    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"sim"``."""
        return self._runtime.backend.name

    # -- streams -------------------------------------------------------
    def stream(self, priority: int = 0) -> Stream:
        """A new non-blocking stream; lower ``priority`` numbers run first."""
        least, greatest = self._runtime.backend.stream_priority_range(self.ordinal)
        lo, hi = min(least, greatest), max(least, greatest)
        if not isinstance(priority, int) or not lo <= priority <= hi:
            raise InvalidArgumentError(
                f"priority must be an int in [{lo}, {hi}] on this device, not {priority!r}"
            )
        native = self._runtime.backend.stream_create(self.ordinal, priority)
        return Stream(self, native, owned=True, priority=priority)

    def wrap_stream(self, stream: Any) -> Stream:
        """Wrap a stream another library created, so its work can be awaited.

        Accepts an int ``CUstream`` address or an object with
        ``__cuda_stream__`` (cuda.core), ``.cuda_stream`` (PyTorch) or ``.ptr``
        (CuPy). gpuaio never destroys a wrapped stream. The legacy default
        stream (``0``, ``CU_STREAM_LEGACY``) is accepted: it is one stream
        whichever thread enqueues. The per-thread default stream
        (``CU_STREAM_PER_THREAD``, or ``0`` under
        ``CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM``) is refused with
        :class:`~gpuaio.InvalidArgumentError`: gpuaio could not keep its order.
        Wrappers of one ``CUstream`` share one order.
        """
        handle: Any
        if isinstance(stream, int):
            handle = stream
        elif hasattr(stream, "__cuda_stream__"):
            handle = stream.__cuda_stream__()[1]
        elif hasattr(stream, "cuda_stream"):
            handle = stream.cuda_stream
        elif hasattr(stream, "ptr"):
            handle = stream.ptr
        else:
            raise InvalidArgumentError(f"cannot find a CUstream in {type(stream).__name__}")
        handle = int(handle)
        if handle == CU_STREAM_PER_THREAD or (handle == 0 and _per_thread_default()):
            raise InvalidArgumentError(
                "cannot wrap the per-thread default stream: it is a different stream on every "
                "thread, and gpuaio enqueues a stream's work from more than one thread (the "
                "caller's and the stream's host thread), so that work would land on different "
                "streams, out of order. Use a stream of your own (Device.stream(), or wrap an "
                "explicit stream) and order it against your library's work with Stream.wait"
            )
        native = self._runtime.backend.stream_from_handle(self.ordinal, handle)
        return Stream(self, native, owned=False)

    @property
    def default_stream(self) -> Stream:
        """A gpuaio-owned stream shared by convenience helpers."""
        if self._default is None or self._default.closed:
            self._default = self.stream()
        return self._default

    # -- memory --------------------------------------------------------
    def empty(
        self, shape: SupportsIndex | tuple[SupportsIndex, ...], dtype: npt.DTypeLike = np.uint8
    ) -> DeviceArray:
        """Uninitialized device memory as a :class:`DeviceArray`."""
        return self._alloc(shape, dtype, MemoryKind.DEVICE)

    def managed_empty(
        self, shape: SupportsIndex | tuple[SupportsIndex, ...], dtype: npt.DTypeLike = np.uint8
    ) -> DeviceArray:
        """Uninitialized managed (unified) memory attached to this device."""
        return self._alloc(shape, dtype, MemoryKind.MANAGED)

    def _alloc(
        self,
        shape: SupportsIndex | tuple[SupportsIndex, ...],
        dtype: npt.DTypeLike,
        kind: MemoryKind,
    ) -> DeviceArray:
        self._runtime.check_device(self.ordinal)
        dims = _normalize_shape(shape)
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise InvalidArgumentError("device arrays cannot hold Python objects")
        n = _alloc_size(dims, dt)
        alloc = Allocation.new(self._runtime, n, kind, self.ordinal)
        return DeviceArray(alloc, dims, dt)

    # -- kernels -------------------------------------------------------
    def compile(
        self,
        source: str,
        name: str,
        *,
        options: Sequence[str] = (),
        sim: Callable[..., None] | None = None,
    ) -> Kernel:
        """Compile CUDA C++ ``source`` and return its kernel ``name``.

        On the ``cuda`` backend this uses NVRTC through cuda.core. The
        simulated backend cannot run CUDA C++: it runs ``sim``, a Python
        function ``sim(grid, block, *args)`` that receives arrays as numpy
        views, and raises if none is given.
        """
        native = self._runtime.backend.compile(self.ordinal, source, name, tuple(options), sim)
        return Kernel(native, self.ordinal, name)


class Event(Operation):
    """A point in a stream's order: awaitable, and usable in :meth:`Stream.wait`."""

    __slots__ = ("_frontier", "_native", "_recorded", "_rt")

    def __init__(self, stream: Stream) -> None:
        super().__init__("event", stream)
        self._rt: Runtime = stream._rt
        self._native: Any = None
        self._recorded = False
        # The host actions submitted before the event (see Stream.wait).
        self._frontier: tuple[Frontier, ...] = ()

    def __del__(self) -> None:
        native, self._native = self._native, None
        if native is not None:
            # Not here: the last reference may drop on any thread, even one
            # inside a backend call; the reaper thread destroys it.
            backend = self._rt.backend
            with contextlib.suppress(Exception):
                self._rt.reaper.submit(lambda: backend.event_destroy(native))


class Stream(Transfers):
    """An ordered queue of GPU and host work on one device.

    Created by :meth:`gpuaio.Device.stream` or wrapped around a foreign
    stream with :meth:`gpuaio.Device.wrap_stream`. Use ``async with`` (or
    :meth:`aclose`) to wait for its work and release it.
    """

    def __init__(
        self,
        device: Device,
        native: Any,
        *,
        owned: bool,
        priority: int = 0,
    ) -> None:
        self.device = device
        self.priority = priority
        self._rt: Runtime = device._runtime
        self._ordinal = device.ordinal
        self._native = native
        self._owned = owned
        self._share = self._rt.sequencer(device.ordinal, native)
        self._seq: Sequencer = self._share.seq
        if not owned:
            self._seq.exported = True  # another library's stream: it enqueues there too
        self._key = self._seq.key
        self._closed = False  # last: __del__ of a half-made stream has nothing to release

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<gpuaio.Stream device={self._ordinal} handle={self._key:#x}{state}>"

    @property
    def handle(self) -> int:
        """The ``CUstream`` address.

        Other libraries may enqueue work on it from then on, behind gpuaio's
        back, so gpuaio stops sharing completion markers among this stream's
        short ops (which only pays with many ops in flight): an op's
        completion must never wait for work enqueued after it. Memsets
        deferred to that batch are enqueued before the handle is returned.
        """
        seq = self._seq
        if not seq.exported:
            seq.exported = True
            if not self._closed:
                self._rt.engine(self._ordinal).seal(self._key)
        return self._key

    def __cuda_stream__(self) -> tuple[int, int]:
        """cuda.core's stream protocol: ``(version, CUstream address)``."""
        return (0, self.handle)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lifecycle -----------------------------------------------------
    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the work submitted so far, then close the stream.

        The stream is closed however this returns: also when the caller is
        cancelled (``async with dev.stream()`` left by a timeout) and when
        the work failed. The wait is shielded from cancellation, so the
        stream is handed back idle; its error, if any, is raised.
        """
        if self._closed:
            return
        try:
            # Shielded: under a cancelled scope an unshielded await raises at
            # once (anyio and trio cancel level-triggered), which leaked the
            # stream and its threads on every timed-out request.
            with anyio.CancelScope(shield=True):
                await self.synchronize()
        finally:
            self.close()

    def close(self) -> None:
        """Refuse new work; release the stream once submitted work is enqueued.

        Work already submitted still runs and its operations still complete.
        """
        if self._closed:
            return
        self._closed = True
        if self._rt.forked is not None:
            return  # in a forked child: the parent's stream is left alone (leaked)
        if self._owned:
            self._rt.forget_sequencer(self._seq)
        self._seq.release(destroy_stream=self._owned)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # An owned stream dropped unclosed would keep its CUstream (and, on
        # the sim, a worker thread) for good. Nothing of it can be pending:
        # an operation keeps its stream alive until it completes.
        if getattr(self, "_closed", True) or not self._owned:
            return
        what = repr(self)  # before marking it closed: the warning says "unclosed"
        self._closed = True
        rt = self._rt
        if rt.closed or rt.forked is not None:
            return  # released with the backend, or the parent's (a forked child leaks it)
        # Not here: this may run on any thread, even one holding a lock that
        # forget_sequencer or the release take; the reaper thread does it
        # (and the stream's host thread destroys it, off the loop).
        seq = self._seq

        def release() -> None:
            rt.forget_sequencer(seq)
            seq.release(destroy_stream=True)

        with contextlib.suppress(Exception):
            rt.reaper.submit(release)
        # Last: under ``-W error`` this raises (reported as unraisable).
        _warn(
            f"unclosed {what}: use `async with dev.stream()` or aclose()",
            ResourceWarning,
            source=self,
        )

    def _check(self) -> None:
        if self._closed:
            raise StreamClosedError("this stream is closed")
        self._rt.check_device(self._ordinal)

    # -- kernels -------------------------------------------------------
    def launch(
        self,
        kernel: Kernel | Any,
        grid: int | Sequence[int],
        block: int | Sequence[int],
        *args: Any,
        shared_mem: int = 0,
    ) -> Operation:
        """Launch ``kernel`` with ``args``; the op completes when the kernel has run.

        ``kernel`` is a :class:`Kernel` (or a backend-native kernel, e.g. a
        cuda.core ``Kernel``). gpuaio arrays and objects with
        ``__cuda_array_interface__`` are passed as pointers and kept alive
        until the kernel has finished; use numpy scalars (``np.int32``,
        ``np.float32``) for scalar parameters of a fixed width.
        """
        self._check()
        grid3 = normalize_dim3(grid, "grid")
        block3 = normalize_dim3(block, "block")
        threads = block3[0] * block3[1] * block3[2]
        if threads > 1024:
            raise InvalidArgumentError(f"a block has at most 1024 threads, not {threads}")
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer)):
            raise InvalidArgumentError(f"shared_mem must be a non-negative int, not {shared_mem!r}")
        shared_mem = int(shared_mem)
        if shared_mem < 0:
            raise InvalidArgumentError(f"shared_mem must be a non-negative int, not {shared_mem!r}")
        if shared_mem > _MAX_SHARED:
            raise InvalidArgumentError(
                f"shared_mem of {shared_mem} bytes exceeds the most any CUDA GPU allows a block "
                f"({_MAX_SHARED} bytes)"
            )
        if isinstance(kernel, Kernel):
            if kernel.device != self._ordinal:
                raise InvalidArgumentError(
                    f"kernel {kernel.name} was compiled for device {kernel.device}, "
                    f"this stream is on device {self._ordinal}"
                )
            native = kernel.native
            name = kernel.name
        else:
            native = kernel
            name = str(getattr(kernel, "name", None) or getattr(kernel, "__name__", "kernel"))
        infos = self._array_args(args)
        op = Operation(name, self, keep=(native, args))
        self._track(op, infos)
        backend = self._rt.backend
        return self._seq.gpu(op, backend.launch, native, grid3, block3, args, shared_mem)

    # -- ordering ------------------------------------------------------
    def record(self) -> Event:
        """Mark the current end of this stream; await the event, or pass it to :meth:`wait`.

        The event stands for everything submitted so far, host-side effects
        included: awaiting it, or waiting for it on another stream, orders
        after those too.
        """
        self._check()
        ev = Event(self)
        backend = self._rt.backend
        ev._native = backend.event_create(self._ordinal)
        ev._frontier = self._seq.frontier()

        def enqueue(h: Any) -> None:
            backend.event_record(ev._native, h)
            ev._recorded = True

        self._seq.marker(ev, enqueue)
        return ev

    def wait(self, other: Event | Stream) -> None:
        """Make later work on this stream wait for ``other``.

        ``other`` is an :class:`Event` or a stream (meaning: its work so far).
        Later GPU work waits on the GPU; later host steps (staging copies,
        copy-outs, host memsets, host-to-host copies) also come after the
        host-side effects of everything ``other`` stands for. The calling
        thread does not wait. Should an event's record fail on its stream's
        host thread (awaiting the event raises the error), later work here
        waits for all of that stream's work submitted up to then instead.
        """
        self._check()
        if isinstance(other, Stream):
            other = other.record()
        if not isinstance(other, Event):
            raise InvalidArgumentError(
                f"wait() takes an Event or a Stream, not {type(other).__name__}"
            )
        backend = self._rt.backend
        ev = other
        seq = self._seq
        seq.add_deps(ev._frontier)
        source = ev.stream
        assert isinstance(source, Stream)  # events come from Stream.record
        marker = Operation("wait", self, keep=(ev,))
        if ev._recorded:
            seq.gpu(marker, _wait_event, backend, ev._native)
            return

        def wait_recorded() -> bool:
            # The other stream's host thread records the event later; its own
            # completion implies it was recorded (or failed to be).
            while not ev._recorded and not ev.done():
                time.sleep(50e-6)
            if ev._recorded:
                backend.stream_wait_event(self._native, ev._native)
                return True
            # Its record failed (awaiting the event raises why). All it stood
            # for had been enqueued on its stream by then: wait here for all
            # of that stream's work so far, more than the event but never
            # less. Waiting for nothing let later work on this stream run
            # ahead of it, silently (issue 13's storm with transient faults).
            backend.stream_synchronize(source._native)
            return False

        seq.host(marker, wait_recorded, after_gpu=False)

    def synchronize(self) -> Operation:
        """An operation that completes when all work submitted so far is done.

        That includes host-side effects: copy-outs into pageable memory, and
        those of the streams this one waits for.
        """
        self._check()
        return self._seq.marker(Operation("synchronize", self), _nothing)


def _wait_event(backend: Any, event: Any, native: Any) -> None:
    backend.stream_wait_event(native, event)


def _nothing(native: Any) -> None:
    """Enqueue nothing: the marker placed behind it stands for the stream's work so far."""


# Dynamic shared memory per block, the largest opt-in maximum of any GPU (Hopper).
_MAX_SHARED = 228 << 10
