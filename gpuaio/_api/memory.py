"""Memory gpuaio allocates: device, managed and pinned buffers and the arrays over them.

An :class:`Allocation` is one driver allocation, freed on the reaper thread
once no operation uses it; a :class:`DeviceArray` is a typed view of one.
Classifying buffers is ``gpuaio._api.describe``; page-locking a user's buffer
is ``gpuaio._api.registration``.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from typing import TYPE_CHECKING, Any, SupportsIndex

import numpy as np
import numpy.typing as npt

from .._core.errors import BufferFreedError, GpuaioError, InvalidArgumentError
from ..backends import MemoryKind

if TYPE_CHECKING:
    from .._engine.buffers import BufferInfo
    from .runtime import Runtime

__all__ = [
    "Allocation",
    "BufferTypeError",
    "DeviceArray",
    "MemoryKind",
    "pinned_empty",
]


class BufferTypeError(GpuaioError, TypeError):
    """The object is not a buffer gpuaio can read or write."""


class Allocation:
    """A block of device, managed or pinned memory owned by gpuaio.

    Freed when the last reference goes away, or by :meth:`free`. Freeing
    waits for every in-flight gpuaio operation that uses the block, and the
    driver call runs on a background thread. Device memory whose address
    never left gpuaio (no ``ptr``, ``allocation``, CUDA Array Interface or
    DLPack export) is freed without waiting for the device
    (``cuMemFreeAsync``): only gpuaio's operations, all done, ever used it.
    Other memory (exported device arrays, pinned arrays, managed memory),
    which other libraries' work may still use, is freed once the device's
    work enqueued before the free is done, as ``cuMemFree`` and
    ``cuMemFreeHost`` do; the CUDA backend waits for it without holding up
    other threads' driver calls (managed memory, and pinned memory without a
    host memory pool, then hold them for the free itself).
    """

    __slots__ = (
        "__weakref__",
        "_free_requested",
        "_freed",
        "_in_use",
        "_lock",
        "_runtime",
        "device",
        "kind",
        "nbytes",
        "ptr",
        "shared",
    )

    def __init__(
        self, runtime: Runtime, ptr: int, nbytes: int, kind: MemoryKind, device: int | None
    ) -> None:
        self._runtime = runtime
        self.ptr: int = ptr
        self.nbytes: int = nbytes
        self.kind: MemoryKind = kind
        self.device: int | None = device
        # One item per operation using the block. A list, not a count under
        # the lock: append and pop are atomic on their own (with the GIL, and
        # under free threading), and the lock cost about 0.4 us an op, a
        # twentieth of an awaited tiny memset on the loop (issue 13).
        self._in_use: list[None] = []
        self._freed = False
        self._free_requested = False
        self._lock = threading.Lock()
        """Taken only to free: it makes sure that exactly one caller does."""
        self.shared: bool = False
        """Whether the address left gpuaio (read by the user, or exported):
        work gpuaio does not know of may use the block, so its free waits
        for the device."""

    @classmethod
    def new(cls, runtime: Runtime, nbytes: int, kind: MemoryKind, device: int | None) -> Allocation:
        """Allocate ``nbytes`` of ``kind`` memory (device, managed or pinned)."""
        if nbytes < 0:
            raise InvalidArgumentError(f"cannot allocate a negative size ({nbytes} bytes)")
        if nbytes >= _SIZE_LIMIT:
            raise InvalidArgumentError(
                f"cannot allocate {nbytes} bytes: more than a size_t holds (2**64 - 1)"
            )
        be = runtime.backend
        size = max(nbytes, 1)  # the driver rejects 0-byte allocations
        if kind is MemoryKind.DEVICE:
            assert device is not None
            ptr = be.mem_alloc(device, size)
        elif kind is MemoryKind.MANAGED:
            assert device is not None
            ptr = be.mem_alloc_managed(device, size)
        elif kind is MemoryKind.PINNED:
            ptr = be.host_alloc(size)
            host_generation[0] += 1
        else:
            raise InvalidArgumentError(f"gpuaio does not allocate {kind.value} memory")
        return cls(runtime, ptr, nbytes, kind, device)

    @property
    def freed(self) -> bool:
        return self._freed or self._free_requested

    @property
    def _users(self) -> int:
        """How many in-flight operations use the block."""
        return len(self._in_use)

    def acquire(self) -> None:
        """Mark one more in-flight operation using this block (raises if it was freed).

        Marks first, then checks, while :meth:`free` requests first, then
        checks: of two racing calls at least one sees the other, so the block
        is never freed under an operation that went ahead.
        """
        self._in_use.append(None)
        if self._free_requested:
            self.release()  # and free it, if :meth:`free` saw this mark and left it to us
            raise BufferFreedError(f"{self.kind.value} buffer at {self.ptr:#x} was freed")

    def release(self) -> None:
        """An operation using this block has completed."""
        in_use = self._in_use
        in_use.pop()
        if self._free_requested and not in_use:
            self._free_if_unused()

    def free(self) -> None:
        """Free now, or as soon as the operations in flight on it complete."""
        with self._lock:
            if self._freed or self._free_requested:
                return
            self._free_requested = True
        if not self._in_use:
            self._free_if_unused()

    def _free_if_unused(self) -> None:
        """Free the block (requested) on the reaper, unless in use or done already."""
        with self._lock:
            go = not self._in_use and not self._freed
            if go:
                self._freed = True
        if go:
            self._runtime.reaper.submit(self._free_now)

    def _free_now(self) -> None:
        rt = self._runtime
        if rt.released:
            return  # freed with the context, or the parent's (a forked child)
        try:
            if self.kind is MemoryKind.PINNED:
                rt.backend.host_free(self.ptr)
            elif self.kind is MemoryKind.DEVICE and not self.shared:
                # Nothing can use the block: cuMemFree's wait for the device,
                # which holds up the loop's next driver call until a running
                # kernel ends, buys nothing here.
                rt.backend.mem_free_async(self.ptr)
            else:
                rt.backend.mem_free(self.ptr)
        except Exception as exc:
            # After a sticky error every free fails with it: logged once.
            rt.log_failure(f"gpuaio failed to free {self.kind.value} memory", exc, self.device)

    def __del__(self) -> None:
        # Ops keep their arrays (and so this) alive while in flight, so
        # nothing can use the block any more.
        if not self._freed and not getattr(self._runtime, "closed", True):
            self._freed = True
            with contextlib.suppress(Exception):
                self._runtime.reaper.submit(self._free_now)


_SIZE_LIMIT = 1 << 64
"""Sizes and addresses the driver takes are ``size_t``: every one is below this."""

host_generation = [0]
"""Bumped whenever a host range's kind may have changed: gpuaio page-locked
memory (whose addresses may be those of pageable memory freed before) or a
registration changed. Classifications of host addresses cached before it
are stale (:mod:`gpuaio._api.describe`)."""


def _alloc_size(dims: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """Bytes of an array of ``dims`` and ``dtype``; raise if no driver could allocate them."""
    n = dtype.itemsize
    for d in dims:
        n *= d
    if n >= _SIZE_LIMIT:
        raise InvalidArgumentError(
            f"shape {dims} of {dtype} is {n} bytes, more than a size_t holds (2**64 - 1)"
        )
    return n


def _normalize_shape(shape: SupportsIndex | tuple[SupportsIndex, ...]) -> tuple[int, ...]:
    try:
        items = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        dims = tuple(operator.index(s) for s in items)
    except TypeError:
        raise InvalidArgumentError(f"shape extents must be integers, not {shape!r}") from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"negative dimension in shape {dims}")
    return dims


def _is_c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """C order, ignoring the (meaningless) strides of extents of 1, as numpy does."""
    if any(d == 0 for d in shape):
        return True
    expect = itemsize
    for d, st in zip(reversed(shape), reversed(strides), strict=True):
        if d != 1 and st != expect:
            return False
        expect *= d
    return True


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    acc = itemsize
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class DeviceArray:
    """A C-contiguous typed view of device (or managed) memory.

    Exposes ``__cuda_array_interface__`` (v3) and DLPack, so CuPy, PyTorch,
    numba and JAX can use it without a copy. On the simulated backend both
    raise ``TypeError``: its memory is host memory, not CUDA memory. Created by
    :meth:`gpuaio.Device.empty` and friends.
    """

    __slots__ = ("__weakref__", "_alloc", "_dtype", "_info", "_offset", "_shape")

    def __init__(
        self, alloc: Allocation, shape: tuple[int, ...], dtype: npt.DTypeLike, offset: int = 0
    ) -> None:
        self._alloc = alloc
        self._shape: tuple[int, ...] = shape
        self._dtype: np.dtype[Any] = np.dtype(dtype)
        self._offset: int = offset
        self._info: BufferInfo | None = None
        """What ``describe`` returns, built at its first call (a view never changes)."""
        if offset + self.nbytes > alloc.nbytes:
            raise InvalidArgumentError("view exceeds its allocation")

    # -- properties ----------------------------------------------------
    # Read-only: a view's layout is fixed (its BufferInfo is cached), and
    # views of other layouts come from reshape(), view() and indexing.
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def offset(self) -> int:
        """Bytes from the start of the allocation to the first element."""
        return self._offset

    @property
    def ptr(self) -> int:
        """Device address of the first element.

        Once read, the array's memory is freed only after the device's work
        enqueued before the free (as ``cuMemFree`` frees), as work gpuaio
        does not know of may use it.
        """
        return self._address(share=True)

    def _address(self, *, share: bool) -> int:
        alloc = self._alloc
        if alloc.freed:
            raise BufferFreedError("this device array was freed")
        if share:
            alloc.shared = True
        return alloc.ptr + self._offset

    @property
    def device(self) -> int:
        """Ordinal of the device holding the memory."""
        assert self._alloc.device is not None
        return self._alloc.device

    @property
    def kind(self) -> MemoryKind:
        return self._alloc.kind

    @property
    def size(self) -> int:
        n = 1
        for d in self._shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self._dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def strides(self) -> tuple[int, ...]:
        return _c_strides(self._shape, self._dtype.itemsize)

    @property
    def allocation(self) -> Allocation:
        """The allocation this array views (its ``ptr`` is shared: see :attr:`ptr`)."""
        self._alloc.shared = True
        return self._alloc

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d array")
        return self._shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        """Refused, as CuPy refuses it: the data is in device memory, and NumPy
        would otherwise build an object array of 0-d device arrays."""
        raise TypeError(
            "a gpuaio.DeviceArray is in device memory and cannot become a NumPy array "
            "implicitly: copy it into a host array with `await stream.copy(host, device_array)`"
        )

    def __repr__(self) -> str:
        state = " freed" if self._alloc.freed else ""
        return (
            f"<gpuaio.DeviceArray shape={self._shape} dtype={self._dtype} "
            f"{self.kind.value} device={self._alloc.device}{state}>"
        )

    # -- views ---------------------------------------------------------
    def reshape(self, *shape: SupportsIndex | tuple[SupportsIndex, ...]) -> DeviceArray:
        """Same memory, another shape (the element count must match)."""
        flat: Any = shape[0] if len(shape) == 1 else tuple(shape)
        new = _normalize_shape(flat)
        n = 1
        for d in new:
            n *= d
        if n != self.size:
            raise InvalidArgumentError(f"cannot reshape {self._shape} ({self.size} items) to {new}")
        return DeviceArray(self._alloc, new, self._dtype, self._offset)

    def view(self, dtype: npt.DTypeLike) -> DeviceArray:
        """Reinterpret the bytes as ``dtype`` (the last axis absorbs the size change)."""
        dt = np.dtype(dtype)
        if self.nbytes % dt.itemsize:
            raise InvalidArgumentError(f"{self.nbytes} bytes is not a multiple of {dt}")
        if not self._shape:
            raise InvalidArgumentError("cannot change the dtype of a 0-d array")
        last = self._shape[-1] * self._dtype.itemsize
        if last % dt.itemsize:
            raise InvalidArgumentError(f"last axis of {last} bytes is not a multiple of {dt}")
        return DeviceArray(self._alloc, (*self._shape[:-1], last // dt.itemsize), dt, self._offset)

    def __getitem__(self, key: slice | int) -> DeviceArray:
        """Basic indexing on the first axis (a step of 1 keeps it contiguous)."""
        if not self._shape:
            raise IndexError("cannot index a 0-d array")
        row = self.nbytes // self._shape[0] if self._shape[0] else 0
        if isinstance(key, slice):
            start, stop, step = key.indices(self._shape[0])
            if step != 1:
                raise InvalidArgumentError("only slices with step 1 keep a device array contiguous")
            n = max(0, stop - start)
            return DeviceArray(
                self._alloc, (n, *self._shape[1:]), self._dtype, self._offset + start * row
            )
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < 0:
                i += self._shape[0]
            if not 0 <= i < self._shape[0]:
                raise IndexError(f"index {key} out of range for axis of size {self._shape[0]}")
            return DeviceArray(self._alloc, self._shape[1:], self._dtype, self._offset + i * row)
        raise InvalidArgumentError(f"device arrays support int and slice indices, not {key!r}")

    def free(self) -> None:
        """Free the whole allocation once the operations in flight on it complete."""
        self._alloc.free()

    # -- interchange ---------------------------------------------------
    # The public dunders are what other libraries (CuPy, PyTorch, numba, JAX)
    # read. On the simulated backend "device" memory is host memory, and a
    # consumer that believed it CUDA memory would hand a host pointer to its
    # kernels, so there they refuse. gpuaio itself (the sim's kernel launch,
    # tests' foreign-object helpers) uses the private ``_gpuaio_*`` methods.
    def _refuse_simulated_export(self, what: str) -> None:
        if self._alloc._runtime.backend.name == "sim":
            raise TypeError(
                f"{what}: this gpuaio.DeviceArray is on gpuaio's simulated backend, whose "
                "'device' memory is host memory, so it is not exported as CUDA memory to "
                "other libraries; run on a CUDA GPU (GPUAIO_BACKEND=cuda), or copy it to a "
                "host array with `await stream.copy(host, device_array)`"
            )

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """The CUDA Array Interface (v3); a ``TypeError`` on the simulated backend."""
        self._refuse_simulated_export("__cuda_array_interface__")
        return self._gpuaio_cai(share=True)

    def _gpuaio_cai(self, *, share: bool = False) -> dict[str, Any]:
        """The ``__cuda_array_interface__`` dict, on either backend (gpuaio's own use)."""
        return {
            "shape": self._shape,
            "typestr": self._dtype.str,
            "data": (self._address(share=share), False),
            "version": 3,
            "strides": None,
            "stream": None,
        }

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(kDLCUDA or kDLCUDAManaged, ordinal)``; a ``TypeError`` on the simulated backend."""
        self._refuse_simulated_export("__dlpack_device__")
        return self._gpuaio_dlpack_device()

    def _gpuaio_dlpack_device(self) -> tuple[int, int]:
        from .._core.dlpack import DLDeviceType

        dt = DLDeviceType.CUDA_MANAGED if self.kind is MemoryKind.MANAGED else DLDeviceType.CUDA
        return (int(dt), self.device)

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> Any:
        """Export as a DLPack capsule (zero-copy); a ``TypeError`` on the simulated backend.

        gpuaio operations complete before their ``await`` returns, so there is
        no pending gpuaio work to order against ``stream``.
        """
        self._refuse_simulated_export("__dlpack__")
        return self._gpuaio_dlpack(
            stream=stream, max_version=max_version, dl_device=dl_device, copy=copy
        )

    def _gpuaio_dlpack(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> Any:
        """The DLPack export, on either backend (gpuaio's own use)."""
        from .._core.dlpack import export_capsule

        if copy:
            raise BufferError("gpuaio exports device arrays without copying (copy=True refused)")
        dev_type, dev_id = self._gpuaio_dlpack_device()
        return export_capsule(
            ptr=self._address(share=True),
            shape=self._shape,
            strides=None,
            dtype=self._dtype,
            device_type=dev_type,
            device_id=dev_id,
            owner=self,
            versioned=max_version is not None and max_version[0] >= 1,
        )


class _PinnedBlock:
    """Owner of a pinned host allocation, exposed to numpy as a byte buffer."""

    __slots__ = ("__weakref__", "alloc")

    def __init__(self, alloc: Allocation) -> None:
        self.alloc = alloc

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return {
            "shape": (self.alloc.nbytes,),
            "typestr": "|u1",
            "data": (self.alloc.ptr, False),
            "version": 3,
        }


def pinned_empty(
    shape: SupportsIndex | tuple[SupportsIndex, ...], dtype: npt.DTypeLike = np.uint8
) -> np.ndarray[Any, np.dtype[Any]]:
    """A numpy array in pinned (page-locked) host memory, uninitialized.

    Transfers from and to it run at full DMA speed without staging. The
    memory is released when the array (and every view of it) is gone.
    Page-locking is a slow driver call (milliseconds for large sizes): make
    such buffers at set-up time, not on a hot path of an event loop.
    """
    from .runtime import current_runtime

    dims = _normalize_shape(shape)
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise InvalidArgumentError("pinned arrays cannot hold Python objects")
    n = _alloc_size(dims, dt)
    alloc = Allocation.new(current_runtime(), n, MemoryKind.PINNED, None)
    raw = np.asarray(_PinnedBlock(alloc))
    return raw.view(dt).reshape(dims)
