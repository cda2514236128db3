"""DLPack export and import (https://dmlc.github.io/dlpack/latest/python_spec.html).

Import goes through ``cuda.core.utils.StridedMemoryView.from_dlpack``, which
renames the capsule to ``used_*`` and calls the producer's deleter once when the
view is collected. gpuaio still makes the ``__dlpack__`` call itself (its stream
rules differ from cuda.core's) and checks the tensor before handing the capsule
over, so a rejected capsule stays unconsumed.

Export is gpuaio's own: cuda.core 1.2 builds a tensor capsule only from a view
it classifies through the CUDA driver (none on the simulated backend) and calls
managed memory ``kDLCUDAHost``. An exported tensor is one ``PyMem_Malloc`` block
(struct, then shape and strides) whose ``manager_ctx`` is a strong reference to
the owner. Deleters and capsule destructors may run with an exception set
(``numpy.from_dlpack`` drops a capsule it rejects) and on threads without the
GIL, which a ctypes callback cannot handle, so NumPy's own C functions for the
same layout are reused (checked on a probe array); ctypes callbacks stand in
where NumPy lacks them (versioned ones need NumPy >= 2.1).
"""

from __future__ import annotations

import ctypes
import enum
import importlib
import operator
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import numpy as np

from gpuaio._core.errors import InvalidArgumentError

__all__ = [
    "DLPACK_FLAG_BITMASK_READ_ONLY",
    "DLDeviceType",
    "DLPackView",
    "export_capsule",
    "parse_dlpack",
]


class DLDeviceType(enum.IntEnum):
    """The ``DLDeviceType`` values gpuaio produces and recognises."""

    CPU = 1
    CUDA = 2
    CUDA_HOST = 3
    CUDA_MANAGED = 13


DLPACK_FLAG_BITMASK_READ_ONLY: Final = 1 << 0
_MAX_VERSION: Final = (1, 0)
_INT64: Final = range(-(1 << 63), 1 << 63)


class _DLTensor(ctypes.Structure):
    # dlpack.h's DLDevice {device_type, device_id} and DLDataType {code, bits, lanes}
    # are inlined: same layout.
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("code", ctypes.c_uint8),
        ("bits", ctypes.c_uint8),
        ("lanes", ctypes.c_uint16),
        ("shape", ctypes.c_void_p),  # int64_t *
        ("strides", ctypes.c_void_p),  # int64_t *, in elements; NULL means C-contiguous
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint32 * 2),  # major, minor
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


def _capi(name: str, restype: Any, *argtypes: Any) -> Any:
    # Private prototypes (GIL held) leave the shared ctypes.pythonapi attributes alone.
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


_ptr, _str, _obj = ctypes.c_void_p, ctypes.c_char_p, ctypes.py_object
_PyCapsule_New = _capi("PyCapsule_New", _obj, _ptr, _str, _ptr)
_PyCapsule_IsValid = _capi("PyCapsule_IsValid", ctypes.c_int, _obj, _str)
_PyCapsule_GetPointer = _capi("PyCapsule_GetPointer", _ptr, _obj, _str)
_PyCapsule_GetDestructor = _capi("PyCapsule_GetDestructor", _ptr, _obj)
# Variants taking the raw address of a capsule that is being deallocated.
_PyCapsule_IsValid_raw = _capi("PyCapsule_IsValid", ctypes.c_int, _ptr, _str)
_PyCapsule_GetPointer_raw = _capi("PyCapsule_GetPointer", _ptr, _ptr, _str)
_PyMem_Malloc = _capi("PyMem_Malloc", _ptr, ctypes.c_size_t)
_PyMem_Free = _capi("PyMem_Free", None, _ptr)
_Py_IncRef = _capi("Py_IncRef", None, _obj)
_Py_DecRef = _capi("Py_DecRef", None, _ptr)
_DeleterCall = ctypes.PYFUNCTYPE(None, _ptr)  # calls a deleter with the GIL held

# A capsule points at its name and may outlive this module at shutdown: never freed.
_NAMES: Final = {False: b"dltensor", True: b"dltensor_versioned"}
for _name in _NAMES.values():
    _Py_IncRef(_name)
_STRUCTS: Final = {False: _DLManagedTensor, True: _DLManagedTensorVersioned}


@dataclass(frozen=True, slots=True)
class _Flavor:
    """The C functions that release exported capsules of one layout (legacy or versioned)."""

    capsule_destructor: int
    tensor_deleter: int
    origin: str  # "numpy" (NumPy's C functions) or "ctypes" (the callbacks below)


def _release_export(versioned: bool, managed: int | None) -> None:
    """Deleter: free an exported tensor's block and drop its owner reference."""
    if managed is not None:
        owner = _STRUCTS[versioned].from_address(managed).manager_ctx
        _PyMem_Free(managed)
        if owner is not None:
            _Py_DecRef(owner)


def _destroy_capsule(versioned: bool, capsule: int | None) -> None:
    """Capsule destructor: run the deleter unless a consumer renamed the capsule."""
    if capsule is not None and _PyCapsule_IsValid_raw(capsule, _NAMES[versioned]):
        managed = _PyCapsule_GetPointer_raw(capsule, _NAMES[versioned])
        deleter = _STRUCTS[versioned].from_address(managed).deleter
        if deleter is not None:
            _DeleterCall(deleter)(managed)


# The fallback takes the GIL itself, but cannot run with an exception set: a
# consumer dropping an unconsumed capsule then leaks the owner and its error
# surfaces as a SystemError. Module level: the thunks outlive every capsule.
_CALLBACK = ctypes.CFUNCTYPE(None, _ptr)
_CALLBACKS: Final = {
    v: (_CALLBACK(partial(_destroy_capsule, v)), _CALLBACK(partial(_release_export, v)))
    for v in (False, True)
}


def _address(callback: Any) -> int:
    return int(ctypes.cast(callback, _ptr).value or 0)


_CTYPES_FLAVORS: Final = {
    v: _Flavor(_address(destroy), _address(release), "ctypes")
    for v, (destroy, release) in _CALLBACKS.items()
}


def _numpy_flavor(versioned: bool) -> _Flavor | None:
    """NumPy's deleter and capsule destructor, if a probe shows they fit an export.

    NumPy's deleter frees the tensor with ``PyMem_Free`` and drops the strong
    reference in ``manager_ctx``: the probe checks that NumPy still stores one.
    """
    probe = np.zeros(1, dtype=np.uint8)
    refs = sys.getrefcount(probe)
    try:
        capsule = probe.__dlpack__(max_version=_MAX_VERSION) if versioned else probe.__dlpack__()
    except (TypeError, ValueError, BufferError):
        return None
    if not _PyCapsule_IsValid(capsule, _NAMES[versioned]):
        return None
    managed = _STRUCTS[versioned].from_address(_PyCapsule_GetPointer(capsule, _NAMES[versioned]))
    destructor = _PyCapsule_GetDestructor(capsule)
    if managed.manager_ctx != id(probe) or sys.getrefcount(probe) != refs + 1:
        return None
    if (versioned and managed.version[0] != 1) or not destructor or not managed.deleter:
        return None
    return _Flavor(int(destructor), int(managed.deleter), origin="numpy")


_FLAVORS: dict[bool, _Flavor] = {v: _numpy_flavor(v) or _CTYPES_FLAVORS[v] for v in (False, True)}

# DLDataTypeCode of each NumPy kind gpuaio exchanges, and the bit widths it allows.
_CODES: Final = {"i": 0, "u": 1, "f": 2, "c": 5, "b": 6}
_BITS: Final = {0: (8, 16, 32, 64), 1: (8, 16, 32, 64), 2: (16, 32, 64), 5: (64, 128), 6: (8,)}
_BFLOAT16: Final = (4, 16)
_SUPPORTED: Final = "supported: bool, (u)int8-64, float16/32/64, complex64/128, bfloat16"


def _to_dl_dtype(dtype: np.dtype[Any]) -> tuple[int, int]:
    """``(code, bits)`` of a NumPy dtype; lanes is always 1."""
    if dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidArgumentError(f"structured dtype {dtype} cannot be exported; {_SUPPORTED}")
    if not dtype.isnative:
        raise InvalidArgumentError(f"dtype {dtype.str} has non-native byte order")
    code, bits = _CODES.get(dtype.kind), dtype.itemsize * 8
    if code is not None and bits in _BITS[code]:
        return code, bits
    ml_dtypes = sys.modules.get("ml_dtypes")  # bfloat16 exists once ml_dtypes is imported
    if ml_dtypes is not None and dtype == np.dtype(ml_dtypes.bfloat16):
        return _BFLOAT16
    raise InvalidArgumentError(f"dtype {dtype} cannot be exported; {_SUPPORTED}")


def _check_dl_dtype(code: int, bits: int, lanes: int) -> None:
    """Reject, before consuming, a dtype that cuda.core cannot give as a NumPy dtype."""
    if lanes != 1:
        raise InvalidArgumentError(f"DLPack dtype (code={code}, bits={bits}) has {lanes} lanes")
    if (code, bits) == _BFLOAT16:
        try:
            importlib.import_module("ml_dtypes")
        except ImportError:
            raise InvalidArgumentError(
                "DLPack tensor has dtype bfloat16, which needs the ml_dtypes package"
            ) from None
    elif bits not in _BITS.get(code, ()):
        raise InvalidArgumentError(
            f"DLPack dtype (code={code}, bits={bits}) has no NumPy equivalent; {_SUPPORTED}"
        )


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides in elements (zero extents count as 1, as in NumPy and torch)."""
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _int64s(values: tuple[int, ...], what: str) -> tuple[int, ...]:
    try:
        result = tuple(operator.index(v) for v in values)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be a tuple of integers, got {values!r}") from None
    if any(v not in _INT64 for v in result):
        raise InvalidArgumentError(f"{what} {result} do not fit in int64")
    return result


def export_capsule(
    *,
    ptr: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...] | None,
    dtype: np.dtype[Any],
    device_type: int,
    device_id: int,
    owner: object,
    readonly: bool = False,
    versioned: bool = False,
) -> object:
    """Wrap memory at ``ptr`` (on the ``DLDeviceType`` ``device_type``) in a DLPack capsule.

    ``strides`` are in elements (``None``: C-contiguous); the capsule always
    carries explicit strides. ``owner`` stays referenced until the consumer's
    deleter call, or until the capsule is destroyed unconsumed. ``versioned``
    builds a DLPack 1.0 ``"dltensor_versioned"`` capsule, the only kind that can
    carry ``readonly``.

    Raises:
        InvalidArgumentError: unsupported dtype, malformed shape or strides, a
            null pointer for a non-empty tensor, or ``readonly`` without ``versioned``.
    """
    code, bits = _to_dl_dtype(np.dtype(dtype))
    shape = _int64s(shape, "shape")
    if any(extent < 0 for extent in shape):
        raise InvalidArgumentError(f"shape {shape} has a negative extent")
    strides = _c_strides(shape) if strides is None else _int64s(strides, "strides")
    if len(strides) != len(shape):
        raise InvalidArgumentError(f"strides {strides} do not match the {len(shape)}-d {shape}")
    ptr, device_type, device_id = map(operator.index, (ptr, device_type, device_id))
    if not 0 <= ptr < 1 << 64 or (ptr == 0 and 0 not in shape):
        raise InvalidArgumentError(f"null data pointer or bad address {ptr:#x} for shape {shape}")
    if not 0 < device_type < 1 << 31 or not 0 <= device_id < 1 << 31:
        raise InvalidArgumentError(f"device_type {device_type} / device_id {device_id} invalid")
    if readonly and not versioned:
        raise InvalidArgumentError(
            "a read-only tensor can only be exported as a versioned capsule (the consumer "
            "must pass max_version >= (1, 0)); legacy DLPack has no read-only flag"
        )
    versioned, ndim = bool(versioned), len(shape)
    flavor, struct = _FLAVORS[versioned], _STRUCTS[versioned]
    header = ctypes.sizeof(struct)  # a multiple of 8: the int64 arrays follow
    block = _PyMem_Malloc(header + 16 * ndim)
    if not block:
        raise MemoryError("PyMem_Malloc failed to allocate a DLPack tensor")
    try:
        ctypes.memset(block, 0, header)
        managed = struct.from_address(block)
        tensor = managed.dl_tensor
        tensor.data, tensor.ndim = ptr, ndim
        tensor.device_type, tensor.device_id = device_type, device_id
        tensor.code, tensor.bits, tensor.lanes = code, bits, 1
        if ndim:
            (ctypes.c_int64 * (2 * ndim)).from_address(block + header)[:] = [*shape, *strides]
            tensor.shape, tensor.strides = block + header, block + header + 8 * ndim
        managed.manager_ctx, managed.deleter = id(owner), flavor.tensor_deleter
        if isinstance(managed, _DLManagedTensorVersioned):
            managed.version[:] = _MAX_VERSION
            managed.flags = DLPACK_FLAG_BITMASK_READ_ONLY if readonly else 0
        capsule: object = _PyCapsule_New(block, _NAMES[versioned], flavor.capsule_destructor)
    except BaseException:
        _PyMem_Free(block)
        raise
    _Py_IncRef(owner)  # the reference manager_ctx stands for; the deleter drops it
    return capsule


@dataclass(frozen=True, slots=True)
class DLPackView:
    """A consumed DLPack tensor, as gpuaio needs it for copies.

    ``keepalive`` (cuda.core's ``StridedMemoryView``) owns the producer's memory:
    it stays valid while this view or ``keepalive`` is referenced, and the
    producer's deleter runs exactly once when the last reference goes.
    """

    ptr: int
    """Address of the first element (``data + byte_offset``)."""
    shape: tuple[int, ...]
    strides_bytes: tuple[int, ...]
    dtype: np.dtype[Any]
    device_type: int
    device_id: int
    readonly: bool
    keepalive: object = field(repr=False, compare=False)


class _Captured:
    """Hands cuda.core a capsule gpuaio already took and checked, and keeps its producer."""

    __slots__ = ("capsule", "device", "producer")

    def __init__(self, producer: object, capsule: object, device: tuple[int, int]) -> None:
        self.producer, self.capsule, self.device = producer, capsule, device

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device

    def __dlpack__(self, **kwargs: object) -> object:
        return self.capsule


def parse_dlpack(obj: object, *, stream: int | None = None) -> DLPackView:
    """Consume ``obj.__dlpack__()`` (torch, CuPy, JAX, NumPy, gpuaio...) and describe its tensor.

    ``stream`` is the CUDA stream the consumer will use, forwarded to CUDA and
    CUDA-managed producers only, so they can order their pending work before
    it (``1`` legacy default, ``2`` per-thread default, ``-1`` none; ``0`` is
    ambiguous and rejected). ``max_version=(1, 0)`` is offered, and dropped for
    producers predating DLPack 1.0.

    Raises:
        InvalidArgumentError: ``obj`` is no DLPack producer, returned no unconsumed
            capsule, or uses a DLPack major version, device, dtype or lanes count
            gpuaio cannot use, or ``stream`` is 0. The capsule is then left unconsumed.
    """
    kind = type(obj).__qualname__
    query, export = getattr(obj, "__dlpack_device__", None), getattr(obj, "__dlpack__", None)
    if not callable(query) or not callable(export):
        raise InvalidArgumentError(f"{kind} object does not support DLPack")
    device: Any = query()
    try:
        device_type, _ = map(operator.index, device)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"{kind}.__dlpack_device__() returned {device!r}, not a (device_type, device_id) pair"
        ) from None
    kwargs: dict[str, object] = {}
    if stream is not None and device_type in (DLDeviceType.CUDA, DLDeviceType.CUDA_MANAGED):
        if operator.index(stream) == 0:
            raise InvalidArgumentError(
                "stream=0 is ambiguous in DLPack; pass 1 for the legacy default stream "
                "or 2 for the per-thread default stream"
            )
        kwargs["stream"] = operator.index(stream)
    try:
        capsule = export(max_version=_MAX_VERSION, **kwargs)
    except TypeError:  # a producer predating DLPack 1.0
        capsule = export(**kwargs)

    versioned = bool(_PyCapsule_IsValid(capsule, _NAMES[True]))
    if not versioned and not _PyCapsule_IsValid(capsule, _NAMES[False]):
        if any(_PyCapsule_IsValid(capsule, b"used_" + name) for name in _NAMES.values()):
            raise InvalidArgumentError(f"{kind}.__dlpack__() returned an already consumed capsule")
        raise InvalidArgumentError(
            f"{kind}.__dlpack__() returned {type(capsule).__qualname__}, "
            "not a 'dltensor' or 'dltensor_versioned' capsule"
        )
    managed = _STRUCTS[versioned].from_address(_PyCapsule_GetPointer(capsule, _NAMES[versioned]))
    if isinstance(managed, _DLManagedTensorVersioned) and managed.version[0] != 1:
        major, minor = managed.version
        raise InvalidArgumentError(f"{kind} exported DLPack {major}.{minor}; gpuaio reads 1.x")
    tensor = managed.dl_tensor
    _check_dl_dtype(tensor.code, tensor.bits, tensor.lanes)
    if tensor.ndim < 0 or (tensor.ndim and not tensor.shape):
        raise InvalidArgumentError(f"DLPack tensor has ndim {tensor.ndim} and no valid shape")
    ptr, dev_id = (tensor.data or 0) + tensor.byte_offset, tensor.device_id
    try:
        dev_type = DLDeviceType(tensor.device_type)
    except ValueError:
        raise InvalidArgumentError(
            f"DLPack device type {tensor.device_type} is neither CPU nor CUDA memory"
        ) from None

    # cuda.core renames the capsule and owns the deleter call; stream_ptr=-1: the
    # stream was already given to the producer. Imported late: it takes ~0.4 s.
    smv = importlib.import_module("cuda.core.utils").StridedMemoryView
    cuda_id = dev_id if dev_type == DLDeviceType.CUDA else 0
    view = smv.from_dlpack(_Captured(obj, capsule, (dev_type, cuda_id)), -1)
    dtype = np.dtype(view.dtype)
    return DLPackView(
        ptr=ptr,  # not view.ptr: older cuda.core releases leave out byte_offset
        shape=view.shape,
        strides_bytes=tuple(s * dtype.itemsize for s in view.strides or _c_strides(view.shape)),
        dtype=dtype,
        device_type=dev_type,
        device_id=dev_id,
        readonly=view.readonly,
        keepalive=view,
    )
