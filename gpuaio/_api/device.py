"""Devices: the entry point to streams, allocations and kernels."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex

import anyio.to_thread
import numpy as np
import numpy.typing as npt

from .._core.errors import InvalidArgumentError
from .._core.kernel import Kernel
from ..backends import DeviceProperties, MemoryKind
from .memory import Allocation, DeviceArray, _alloc_size, _normalize_shape
from .stream import Stream

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["Device"]

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


class Device:
    """One GPU (or simulated GPU) of the current backend.

    ``Device(0)`` returns the same object every time for a given runtime.
    """

    _runtime: Runtime
    ordinal: int
    _props: DeviceProperties | None
    _default: Stream | None

    def __new__(cls, ordinal: int = 0) -> Device:
        from .runtime import current_runtime

        if not isinstance(ordinal, int) or isinstance(ordinal, bool):
            raise InvalidArgumentError(f"device ordinal must be an int, not {ordinal!r}")
        return current_runtime().device(ordinal)

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
