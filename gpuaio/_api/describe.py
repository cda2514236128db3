"""Classifying buffers: what any object a user passes is, as gpuaio sees it.

:func:`describe` turns anything a user may pass (a gpuaio array, a NumPy
array or other buffer, an object with ``__cuda_array_interface__`` or
``__dlpack__``) into a :class:`~gpuaio._engine.buffers.BufferInfo`: address,
size, layout and memory kind. The kind decides the copy path. gpuaio's own
allocations are known without a driver call; a foreign buffer is classified
with ``cuPointerGetAttributes`` once and cached on its owning object. Host
ranges page-locked with :func:`gpuaio.register_host` are kept in a registry
here, so that classifying them needs no driver call either.
"""

from __future__ import annotations

import bisect
import ctypes
import importlib
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from .._core.errors import BufferFreedError, InvalidArgumentError
from .._engine.buffers import BufferInfo
from ..backends import MemoryKind
from .memory import (
    _SIZE_LIMIT,
    Allocation,
    BufferTypeError,
    DeviceArray,
    _is_c_contiguous,
    _PinnedBlock,
    host_generation,
)

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["cached_pageable", "describe", "forget"]


class _Registry:
    """Host ranges page-locked with :func:`register_host`, for classification."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, Allocation]] = []

    def add(self, alloc: Allocation) -> None:
        _invalidate()
        with self._lock:
            i = bisect.bisect(self._starts, alloc.ptr)
            self._starts.insert(i, alloc.ptr)
            self._entries.insert(i, (alloc.ptr, alloc.ptr + alloc.nbytes, alloc))

    def remove(self, alloc: Allocation | None) -> None:
        _invalidate()
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


_generation = host_generation
"""Bumped whenever a host range's kind may have changed (a pinned allocation,
registration, forget): every cached classification made before it is stale."""


def _invalidate() -> None:
    _generation[0] += 1


_pageable: dict[int, tuple[int, int]] = {}
"""Host address -> (generation, id of the backend) of a buffer the driver called pageable.

``cuPointerGetAttributes`` is a driver call per copy otherwise. Only the
pageable answer is kept by address, because only it is safe to keep stale:
a range stops being pageable only when it is page-locked: through
:func:`gpuaio.register_host` or by gpuaio's own pinned allocations (a freed
pageable address may come back pinned), which start a new generation, or by
another library, and then a stale entry sends pinned memory through staging,
which is correct, only slower. Pinned, device and managed answers are asked for every
time. No lock: single dict operations are atomic. Nothing here refers to the
user's arrays (a weak reference would stop ``ndarray.resize``).
"""
_PAGEABLE_KEEP = 4096
"""Addresses kept before the map starts over (arrays come and go)."""


def forget(obj: Any) -> None:
    """Drop the cached memory kind of ``obj``'s buffer (after (un)registering it)."""
    _invalidate()


# Final: a compiled module keeps these in C statics, where a plain global is
# a dict lookup and ``MemoryKind.PINNED`` an attribute lookup on top of it
# (each copy describes two buffers; issue 13).
_ndarray: Final = np.ndarray
_PINNED: Final = MemoryKind.PINNED
_PAGEABLE: Final = MemoryKind.PAGEABLE


def _root(arr: Any) -> Any:
    """The end of ``arr``'s chain of bases: the object that owns its memory."""
    base = arr
    while isinstance(base, _ndarray):
        up = base.base  # read once: an attribute lookup each
        if up is None:
            break
        base = up
    return base


def _host_kind(
    runtime: Runtime, ptr: int, root: Any
) -> tuple[MemoryKind, int | None, Allocation | None]:
    if isinstance(root, _PinnedBlock):
        return _PINNED, None, root.alloc
    backend = runtime.backend
    if _cached(ptr, backend):
        return _PAGEABLE, None, None
    gen = _generation[0]
    info = backend.pointer_info(ptr)
    if info.kind is _PAGEABLE:
        if len(_pageable) >= _PAGEABLE_KEEP:
            _pageable.clear()
        _pageable[ptr] = (gen, id(backend))
    return info.kind, info.device, None


def _cached(ptr: int, backend: object) -> bool:
    """Whether the driver called ``ptr`` pageable in this generation (``_pageable``)."""
    hit = _pageable.get(ptr)
    return hit is not None and hit[0] == _generation[0] and hit[1] == id(backend)


def cached_pageable(arr: np.ndarray[Any, Any], runtime: Runtime) -> int:
    """The address of ``arr``'s buffer where :func:`describe` would find it
    writable, C-contiguous, non-empty and pageable without asking the
    driver: a copy may take it to be such memory before describing it
    (``gpuaio._engine.early``). 0 says nothing."""
    # A gpuaio pinned array first: it is asked about on every pinned download
    # from a device array, and answered without reading its address.
    if isinstance(_root(arr), _PinnedBlock):
        return 0
    try:
        ptr = _writable_address(arr)
    except (TypeError, ValueError, BufferError):
        return 0
    return ptr if _cached(ptr, runtime.backend) else 0


def describe(obj: Any, runtime: Runtime, name: str = "the buffer") -> BufferInfo:
    """Classify ``obj`` (see the module docstring); raise if it is no buffer.

    ``name`` is how errors call the argument (``"src"``, ``"parts[2]"``).
    """
    if isinstance(obj, DeviceArray):
        alloc = obj._alloc
        if alloc._freed or alloc._free_requested:
            raise BufferFreedError("this device array was freed")
        info = obj._info
        if info is None:
            # The owner kept alive is the allocation, not the view: the view's
            # own cache must not refer back to it (a cycle would leave freeing
            # the memory to the garbage collector).
            info = obj._info = BufferInfo(
                alloc.ptr + obj.offset,
                obj.nbytes,
                obj.shape,
                obj.dtype,
                alloc.kind,
                alloc.device,
                False,
                True,
                alloc,
                alloc,
            )
        return info
    if type(obj) is np.ndarray:  # the common case first: a missing getattr is slow
        return _from_numpy(obj, obj, runtime)
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


_lend = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def _ctypes_address(arr: Any) -> int:
    """The address of ``arr``'s writable, C-contiguous, non-empty buffer; raises
    ``TypeError``, ``ValueError`` or ``BufferError`` for any other."""
    return _addressof(_lend(arr))


_writable_address: Callable[[Any], int]
try:
    # A compiled install's C (``_address.c``, hatch_build.NATIVE): the same
    # answers and errors without building a ctypes object, in a third of the time.
    _writable_address = importlib.import_module("gpuaio._api._address").writable_address
except ImportError:  # a pure-Python install
    _writable_address = _ctypes_address
_new_info = tuple.__new__
"""``_new_info(BufferInfo, fields)``: a BufferInfo without the Python frame of its ``__new__``."""


def _from_numpy(arr: np.ndarray[Any, Any], owner: Any, runtime: Runtime) -> BufferInfo:
    dtype = arr.dtype
    if dtype.hasobject:
        raise InvalidArgumentError("arrays of Python objects cannot be copied to or from a GPU")
    nbytes = arr.nbytes
    # A writable, C-contiguous, non-empty array lends its buffer, and that also
    # proves both flags (reading them builds a flags object): the address in a
    # fifth of what ``__array_interface__`` takes (it builds a dict), a
    # twentieth in C.
    try:
        ptr = _writable_address(arr)
        writeable = contiguous = True
    except (TypeError, ValueError, BufferError):
        flags = arr.flags
        writeable, contiguous = flags.writeable, flags.c_contiguous
        ptr = int(arr.__array_interface__["data"][0]) if nbytes else 0
    reg: _Registry | None = runtime.extras.get("registry")
    found = reg.find(ptr, nbytes) if reg is not None and ptr else None
    if found is not None:
        # Being unregistered: take the pageable path.
        kind = MemoryKind.PAGEABLE if found.freed else MemoryKind.PINNED
        device, alloc = None, (None if found.freed else found)
    elif ptr:
        kind, device, alloc = _host_kind(runtime, ptr, _root(arr))
    else:
        kind, device, alloc = MemoryKind.PAGEABLE, None, None
    return _new_info(
        BufferInfo,
        (
            ptr,
            nbytes,
            arr.shape,
            dtype,
            kind,
            device,
            not writeable,
            contiguous,
            arr if owner is arr else (owner, arr),
            alloc,
        ),
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
