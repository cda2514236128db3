"""Memory: gpuaio's allocations, and classification of any buffer.

:func:`describe` turns anything a user may pass (a gpuaio array, a numpy
array or other buffer, an object with ``__cuda_array_interface__`` or
``__dlpack__``) into a :class:`BufferInfo`: address, size, layout and memory
kind. The kind decides the copy path. gpuaio's own allocations are known
without a driver call; a foreign buffer is classified with
``cuPointerGetAttributes`` once and cached on its owning object.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, SupportsIndex

import numpy as np
import numpy.typing as npt

from .._core.errors import BufferFreedError, GpuaioError, InvalidArgumentError
from .._engine.buffers import BufferInfo
from ..backends import MemoryKind

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "Allocation",
    "BufferTypeError",
    "DeviceArray",
    "MemoryKind",
    "HostRegistration",
    "describe",
    "pinned_empty",
    "register_host",
    "register_host_async",
]


class BufferTypeError(GpuaioError, TypeError):
    """The object is not a buffer gpuaio can read or write."""


class Allocation:
    """A block of device, managed or pinned memory owned by gpuaio.

    Freed when the last reference goes away, or by :meth:`free`. Freeing
    waits for every in-flight gpuaio operation that uses the block, and the
    driver call runs on a background thread (``cuMemFree`` may synchronize).
    """

    __slots__ = (
        "__weakref__",
        "_free_requested",
        "_freed",
        "_lock",
        "_runtime",
        "_users",
        "device",
        "kind",
        "nbytes",
        "ptr",
    )

    def __init__(
        self, runtime: Runtime, ptr: int, nbytes: int, kind: MemoryKind, device: int | None
    ) -> None:
        self._runtime = runtime
        self.ptr: int = ptr
        self.nbytes: int = nbytes
        self.kind: MemoryKind = kind
        self.device: int | None = device
        self._users = 0
        self._freed = False
        self._free_requested = False
        self._lock = threading.Lock()

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
        else:
            raise InvalidArgumentError(f"gpuaio does not allocate {kind.value} memory")
        return cls(runtime, ptr, nbytes, kind, device)

    @property
    def freed(self) -> bool:
        return self._freed or self._free_requested

    def acquire(self) -> None:
        """Mark one more in-flight operation using this block."""
        with self._lock:
            if self._freed or self._free_requested:
                raise BufferFreedError(f"{self.kind.value} buffer at {self.ptr:#x} was freed")
            self._users += 1

    def release(self) -> None:
        """An operation using this block has completed."""
        with self._lock:
            self._users -= 1
            go = self._free_requested and self._users == 0 and not self._freed
            if go:
                self._freed = True
        if go:
            self._runtime.reaper.submit(self._free_now)

    def free(self) -> None:
        """Free now, or as soon as the operations in flight on it complete."""
        with self._lock:
            if self._freed or self._free_requested:
                return
            self._free_requested = True
            go = self._users == 0
            if go:
                self._freed = True
        if go:
            self._runtime.reaper.submit(self._free_now)

    def _free_now(self) -> None:
        rt = self._runtime
        if rt.closed:
            return
        try:
            if self.kind is MemoryKind.PINNED:
                rt.backend.host_free(self.ptr)
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

    __slots__ = ("__weakref__", "_alloc", "dtype", "offset", "shape")

    def __init__(
        self, alloc: Allocation, shape: tuple[int, ...], dtype: npt.DTypeLike, offset: int = 0
    ) -> None:
        self._alloc = alloc
        self.shape: tuple[int, ...] = shape
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        self.offset: int = offset
        if offset + self.nbytes > alloc.nbytes:
            raise InvalidArgumentError("view exceeds its allocation")

    # -- properties ----------------------------------------------------
    @property
    def ptr(self) -> int:
        """Device address of the first element."""
        if self._alloc.freed:
            raise BufferFreedError("this device array was freed")
        return self._alloc.ptr + self.offset

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
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def strides(self) -> tuple[int, ...]:
        return _c_strides(self.shape, self.dtype.itemsize)

    @property
    def allocation(self) -> Allocation:
        return self._alloc

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

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
            f"<gpuaio.DeviceArray shape={self.shape} dtype={self.dtype} "
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
            raise InvalidArgumentError(f"cannot reshape {self.shape} ({self.size} items) to {new}")
        return DeviceArray(self._alloc, new, self.dtype, self.offset)

    def view(self, dtype: npt.DTypeLike) -> DeviceArray:
        """Reinterpret the bytes as ``dtype`` (the last axis absorbs the size change)."""
        dt = np.dtype(dtype)
        if self.nbytes % dt.itemsize:
            raise InvalidArgumentError(f"{self.nbytes} bytes is not a multiple of {dt}")
        if not self.shape:
            raise InvalidArgumentError("cannot change the dtype of a 0-d array")
        last = self.shape[-1] * self.dtype.itemsize
        if last % dt.itemsize:
            raise InvalidArgumentError(f"last axis of {last} bytes is not a multiple of {dt}")
        return DeviceArray(self._alloc, (*self.shape[:-1], last // dt.itemsize), dt, self.offset)

    def __getitem__(self, key: slice | int) -> DeviceArray:
        """Basic indexing on the first axis (a step of 1 keeps it contiguous)."""
        if not self.shape:
            raise IndexError("cannot index a 0-d array")
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise InvalidArgumentError("only slices with step 1 keep a device array contiguous")
            n = max(0, stop - start)
            return DeviceArray(
                self._alloc, (n, *self.shape[1:]), self.dtype, self.offset + start * row
            )
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < 0:
                i += self.shape[0]
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"index {key} out of range for axis of size {self.shape[0]}")
            return DeviceArray(self._alloc, self.shape[1:], self.dtype, self.offset + i * row)
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
        return self._gpuaio_cai()

    def _gpuaio_cai(self) -> dict[str, Any]:
        """The ``__cuda_array_interface__`` dict, on either backend (gpuaio's own use)."""
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
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
            ptr=self.ptr,
            shape=self.shape,
            strides=None,
            dtype=self.dtype,
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


# -- registered host memory ----------------------------------------------


class _Registry:
    """Host ranges page-locked with :func:`register_host`, for classification."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, Allocation]] = []

    def add(self, alloc: Allocation) -> None:
        import bisect

        with self._lock:
            i = bisect.bisect(self._starts, alloc.ptr)
            self._starts.insert(i, alloc.ptr)
            self._entries.insert(i, (alloc.ptr, alloc.ptr + alloc.nbytes, alloc))

    def remove(self, alloc: Allocation | None) -> None:
        with self._lock:
            for i, (_s, _e, a) in enumerate(self._entries):
                if a is alloc:
                    del self._starts[i]
                    del self._entries[i]
                    return

    def wait_unregistered(self, ptr: int, nbytes: int, timeout: float = 10.0) -> None:
        """Block until no registration still being undone overlaps the range."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = any(a.freed and s < ptr + nbytes and ptr < e for s, e, a in self._entries)
            if not busy or time.monotonic() > deadline:
                return
            time.sleep(0.001)

    def find(self, ptr: int, nbytes: int) -> Allocation | None:
        import bisect

        if not self._starts:
            return None
        with self._lock:
            i = bisect.bisect(self._starts, ptr) - 1
            if i >= 0:
                start, end, alloc = self._entries[i]
                if start <= ptr and ptr + nbytes <= end:
                    return alloc
        return None


def _registry(runtime: Runtime) -> _Registry:
    reg = runtime.extras.get("registry")
    if reg is None:
        reg = runtime.extras["registry"] = _Registry()
    assert isinstance(reg, _Registry)
    return reg


class HostRegistration:
    """A pageable host buffer page-locked in place (``cuMemHostRegister``).

    While registered, transfers from and to the buffer run at pinned speed
    without staging. :meth:`unregister` (or leaving the ``with`` block) waits
    for the gpuaio operations in flight on it before unlocking. Registering
    costs milliseconds (about 9 ms for 256 MiB on an H100 host): worth it for
    long-lived buffers used many times. Use :func:`register_host_async` on an
    event loop.

    Any C-contiguous host buffer can be registered: a numpy array, a
    ``bytearray``, read-only memory such as ``bytes`` (gpuaio then only reads
    it). The buffer is kept alive while registered, and a ``bytearray``
    cannot be resized then. A call that raises leaves the buffer pageable.
    """

    def __init__(self, runtime: Runtime, array: Any) -> None:
        # Every check first: nothing may be left page-locked by a rejected call.
        info = describe(array, runtime, "array")
        if info.kind is not MemoryKind.PAGEABLE:
            raise InvalidArgumentError(
                "register_host: only pageable host memory can be registered, `array` is "
                f"{info.kind.value} memory"
            )
        if info.nbytes == 0:
            raise InvalidArgumentError("register_host: `array` is empty")
        if not info.contiguous:
            raise InvalidArgumentError(
                "register_host: `array` is not C-contiguous (its bytes are not one range)"
            )
        registry = _registry(runtime)
        registry.wait_unregistered(info.ptr, info.nbytes)
        runtime.backend.host_register(info.ptr, info.nbytes)
        try:
            self._runtime = runtime
            self.array = array
            # The allocation keeps the buffer (and, for a bytearray, the buffer
            # export that stops it from being resized) until it is unlocked:
            # memory freed or moved while page-locked would stay locked, and
            # whatever is allocated there next would be taken for pinned.
            self.alloc: _RegisteredAllocation = _RegisteredAllocation(
                runtime, info.ptr, info.nbytes, info.owner
            )
            registry.add(self.alloc)
            forget(array)
        except BaseException:
            alloc = getattr(self, "alloc", None)
            if alloc is not None:
                alloc._freed = True  # unregistered here, not by its finalizer
                alloc._keep = None
                registry.remove(alloc)
            runtime.backend.host_unregister(info.ptr)
            raise

    def unregister(self) -> None:
        """Unlock the buffer once operations in flight on it complete."""
        self.alloc.free()
        forget(self.array)

    def __enter__(self) -> HostRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()


class _RegisteredAllocation(Allocation):
    """Host memory the user owns, page-locked in place; freeing it unregisters."""

    __slots__ = ("_keep",)

    def __init__(self, runtime: Runtime, ptr: int, nbytes: int, keep: Any = None) -> None:
        super().__init__(runtime, ptr, nbytes, MemoryKind.PINNED, None)
        self._keep = keep
        """The user's buffer (and its export), alive while page-locked."""

    def _free_now(self) -> None:
        try:
            if not self._runtime.closed:
                self._runtime.backend.host_unregister(self.ptr)
        finally:
            # Only now: a new registration of the range waits for this removal.
            _registry(self._runtime).remove(self)
            self._keep = None

    def __del__(self) -> None:
        # The user's array outlives the registration object only if they
        # dropped the handle: unlock it then.
        if not self._freed and not getattr(self._runtime, "closed", True):
            self.free()


def register_host(array: Any) -> HostRegistration:
    """Page-lock ``array`` in place; see :class:`HostRegistration` (blocks for ms)."""
    from .runtime import current_runtime

    return HostRegistration(current_runtime(), array)


async def register_host_async(array: Any) -> HostRegistration:
    """:func:`register_host` on a worker thread, so the event loop keeps running."""
    import anyio.to_thread

    return await anyio.to_thread.run_sync(register_host, array)


# -- classification -------------------------------------------------------


_kind_cache: weakref.WeakKeyDictionary[Any, tuple[MemoryKind, int | None]] = (
    weakref.WeakKeyDictionary()
)


def forget(obj: Any) -> None:
    """Drop the cached memory kind of ``obj``'s root buffer (after (un)registering it)."""
    # A root that cannot be weakly referenced (bytearray, bytes) or hashed was
    # never cached: _host_kind classifies it each time.
    with contextlib.suppress(TypeError, ValueError):
        _kind_cache.pop(_root(obj), None)


def _root(arr: Any) -> Any:
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base


def _host_kind(
    runtime: Runtime, ptr: int, root: Any
) -> tuple[MemoryKind, int | None, Allocation | None]:
    if isinstance(root, _PinnedBlock):
        return MemoryKind.PINNED, None, root.alloc
    try:
        cached = _kind_cache.get(root)
    except (TypeError, ValueError):  # unhashable, or a writable memoryview
        cached = None
    if cached is None:
        info = runtime.backend.pointer_info(ptr)
        cached = (info.kind, info.device)
        with contextlib.suppress(TypeError, ValueError):
            _kind_cache[root] = cached  # else classified again next time
    return cached[0], cached[1], None


def describe(obj: Any, runtime: Runtime, name: str = "the buffer") -> BufferInfo:
    """Classify ``obj`` (see the module docstring); raise if it is no buffer.

    ``name`` is how errors call the argument (``"src"``, ``"parts[2]"``).
    """
    if isinstance(obj, DeviceArray):
        alloc = obj._alloc
        if alloc.freed:
            raise BufferFreedError("this device array was freed")
        return BufferInfo(
            obj.ptr,
            obj.nbytes,
            obj.shape,
            obj.dtype,
            alloc.kind,
            alloc.device,
            False,
            True,
            obj,
            alloc,
        )
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _from_cai(obj, cai, runtime, name)
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array_interface__"):
        return _from_numpy(np.asarray(obj), obj, runtime)
    try:
        mv = memoryview(obj)
    except TypeError:
        mv = None
    if mv is not None:
        return _from_numpy(np.asarray(mv), obj, runtime)
    if hasattr(obj, "__dlpack__"):
        return _from_dlpack(obj, runtime)
    raise BufferTypeError(
        f"{name}: {type(obj).__name__} is not a buffer: pass a gpuaio array, a numpy array or "
        "other buffer-protocol object, or an object with __cuda_array_interface__ or __dlpack__"
    )


def _from_numpy(arr: np.ndarray[Any, Any], owner: Any, runtime: Runtime) -> BufferInfo:
    if arr.dtype.hasobject:
        raise InvalidArgumentError("arrays of Python objects cannot be copied to or from a GPU")
    ptr = int(arr.__array_interface__["data"][0]) if arr.size else 0
    root = _root(arr)
    reg = _registry(runtime).find(ptr, arr.nbytes) if arr.size else None
    if reg is not None:
        # Being unregistered: take the pageable path and cache nothing.
        kind = MemoryKind.PAGEABLE if reg.freed else MemoryKind.PINNED
        device, alloc = None, (None if reg.freed else reg)
    elif arr.size:
        kind, device, alloc = _host_kind(runtime, ptr, root)
    else:
        kind, device, alloc = MemoryKind.PAGEABLE, None, None
    return BufferInfo(
        ptr,
        arr.nbytes,
        arr.shape,
        arr.dtype,
        kind,
        device,
        not arr.flags.writeable,
        bool(arr.flags.c_contiguous),
        (owner, arr),
        alloc,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _parse_cai(
    cai: Any, name: str
) -> tuple[int, bool, tuple[int, ...], np.dtype[Any], tuple[int, ...] | None]:
    """Check a ``__cuda_array_interface__`` dict (v3): ``(ptr, readonly, shape, dtype, strides)``.

    A foreign object's interface is input like any other: a malformed one
    raises :class:`InvalidArgumentError` naming ``name`` and the field.
    """

    def bad(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{name}: malformed __cuda_array_interface__: {why}")

    if not isinstance(cai, Mapping):
        raise bad(f"a dict is expected, not {type(cai).__name__}")
    for key in ("shape", "typestr", "data"):
        if key not in cai:
            raise bad(f"it has no {key!r}")
    data = cai["data"]
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise bad(f"'data' must be a (pointer, read_only) pair, not {data!r}")
    ptr, readonly = data
    if not _is_int(ptr) or not 0 <= ptr < _SIZE_LIMIT:
        raise bad(f"the pointer in 'data' must be an address (an int), not {ptr!r}")
    raw_shape = cai["shape"]
    if not isinstance(raw_shape, (tuple, list)) or not all(_is_int(d) for d in raw_shape):
        raise bad(f"'shape' must be a tuple of ints, not {raw_shape!r}")
    shape = tuple(int(d) for d in raw_shape)
    if any(d < 0 for d in shape):
        raise bad(f"'shape' {shape} has a negative extent")
    typestr = cai["typestr"]
    if not isinstance(typestr, str):
        raise bad(f"'typestr' must be a str, not {typestr!r}")
    try:
        dtype = np.dtype(typestr)
    except (TypeError, ValueError):
        raise bad(f"'typestr' {typestr!r} is not a type string numpy knows") from None
    if dtype.hasobject or dtype.itemsize == 0:
        raise bad(f"'typestr' {typestr!r} is not a fixed-size data type")
    raw_strides = cai.get("strides")
    strides: tuple[int, ...] | None = None
    if raw_strides is not None:
        if (
            not isinstance(raw_strides, (tuple, list))
            or len(raw_strides) != len(shape)
            or not all(_is_int(st) for st in raw_strides)
        ):
            raise bad(
                f"'strides' must be None or a tuple of {len(shape)} ints (one per "
                f"extent of 'shape'), not {raw_strides!r}"
            )
        strides = tuple(int(st) for st in raw_strides)
    if cai.get("mask") is not None:
        raise bad("masked arrays ('mask') are not supported")
    if not isinstance(readonly, (bool, np.bool_, int)):
        raise bad(f"the read-only flag in 'data' must be a bool, not {readonly!r}")
    return int(ptr), bool(readonly), shape, dtype, strides


def _from_cai(obj: Any, cai: Any, runtime: Runtime, name: str) -> BufferInfo:
    ptr, readonly, shape, dtype, strides = _parse_cai(cai, name)
    n = dtype.itemsize
    for d in shape:
        n *= d
    if n and ptr == 0:
        raise InvalidArgumentError(
            f"{name}: malformed __cuda_array_interface__: a null pointer for {n} bytes"
        )
    contiguous = strides is None or _is_c_contiguous(shape, strides, dtype.itemsize)
    if n:
        info = runtime.backend.pointer_info(ptr)
        kind, device = info.kind, info.device
    else:
        kind, device = MemoryKind.DEVICE, None
    return BufferInfo(ptr, n, shape, dtype, kind, device, readonly, contiguous, obj, None)


def _from_dlpack(obj: Any, runtime: Runtime) -> BufferInfo:
    from .._core.dlpack import parse_dlpack

    view = parse_dlpack(obj)
    n = view.dtype.itemsize
    for d in view.shape:
        n *= d
    contiguous = _is_c_contiguous(view.shape, view.strides_bytes, view.dtype.itemsize)
    if n:
        info = runtime.backend.pointer_info(view.ptr)
        kind, device = info.kind, info.device
    else:
        kind, device = MemoryKind.PAGEABLE, None
    return BufferInfo(
        view.ptr,
        n,
        view.shape,
        view.dtype,
        kind,
        device,
        view.readonly,
        contiguous,
        (obj, view.keepalive),
        None,
    )
