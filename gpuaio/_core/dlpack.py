"""DLPack export and import (https://dmlc.github.io/dlpack/latest/python_spec.html).

A producer's ``__dlpack_device__()`` returns ``(device_type, device_id)`` and its
``__dlpack__(stream=..., max_version=...)`` returns a ``PyCapsule`` that wraps a C
``DLManagedTensor`` (capsule name ``"dltensor"``) or, for DLPack >= 1.0, a
``DLManagedTensorVersioned`` (``"dltensor_versioned"``, with a version and flags such
as read-only). A consumer takes ownership by renaming the capsule to
``"used_dltensor"`` / ``"used_dltensor_versioned"`` and calls the tensor's
``deleter`` exactly once when it no longer needs the memory. A capsule destroyed
under its original name was never consumed, so its destructor calls the deleter.

Exported tensors live in one ``PyMem_Malloc`` block (struct, then shape and
strides) whose ``manager_ctx`` is a strong reference to the owner; the deleter
frees the block and drops that reference. Deleters and capsule destructors run
while an exception may be propagating (``numpy.from_dlpack`` drops a capsule it
rejects with the error set) and on threads that do not hold the GIL. A ctypes
callback cannot run correctly with an exception set, so the C deleter and
capsule destructor NumPy uses for its own capsules of the same layout are reused;
they are checked against a probe array at import. Where NumPy lacks them (the
versioned ones need NumPy >= 2.1), ctypes callbacks stand in.
"""

from __future__ import annotations

import ctypes
import enum
import importlib
import operator
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from gpuaio._core.errors import InvalidArgumentError

__all__ = [
    "DLPACK_FLAG_BITMASK_IS_COPIED",
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


class _DLDataTypeCode(enum.IntEnum):
    INT = 0
    UINT = 1
    FLOAT = 2
    BFLOAT = 4
    COMPLEX = 5
    BOOL = 6


DLPACK_FLAG_BITMASK_READ_ONLY: Final = 1 << 0
DLPACK_FLAG_BITMASK_IS_COPIED: Final = 1 << 1

_DLPACK_MAJOR: Final = 1
_DLPACK_MINOR: Final = 0
_MAX_VERSION: Final = (_DLPACK_MAJOR, _DLPACK_MINOR)

# Devices whose ``__dlpack__`` takes a CUDA stream to order the export against.
_STREAM_DEVICES: Final = frozenset({DLDeviceType.CUDA, DLDeviceType.CUDA_MANAGED})

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1


# -- C structs (dlpack.h) ------------------------------------------------------


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.c_void_p),  # int64_t *
        ("strides", ctypes.c_void_p),  # int64_t *, NULL means C-contiguous
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),  # void (*)(DLManagedTensor *)
    ]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", _DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),  # void (*)(DLManagedTensorVersioned *)
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_ManagedStruct = type[_DLManagedTensor] | type[_DLManagedTensorVersioned]


def _field_offset(struct: _ManagedStruct, name: str) -> int:
    return int(getattr(struct, name).offset)


# -- Python C API, through private prototypes (the GIL stays held) -------------
# Private prototypes leave the shared ``ctypes.pythonapi`` attributes untouched.


def _capi(name: str, restype: Any, *argtypes: Any) -> Any:
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_py_object = ctypes.py_object

_PyCapsule_New = _capi("PyCapsule_New", _py_object, _c_void_p, _c_char_p, _c_void_p)
_PyCapsule_IsValid = _capi("PyCapsule_IsValid", ctypes.c_int, _py_object, _c_char_p)
_PyCapsule_GetPointer = _capi("PyCapsule_GetPointer", _c_void_p, _py_object, _c_char_p)
_PyCapsule_SetName = _capi("PyCapsule_SetName", ctypes.c_int, _py_object, _c_char_p)
_PyCapsule_GetDestructor = _capi("PyCapsule_GetDestructor", _c_void_p, _py_object)
# Variants taking the raw address of a capsule that is being deallocated.
_PyCapsule_IsValid_raw = _capi("PyCapsule_IsValid", ctypes.c_int, _c_void_p, _c_char_p)
_PyCapsule_GetPointer_raw = _capi("PyCapsule_GetPointer", _c_void_p, _c_void_p, _c_char_p)
_PyMem_Malloc = _capi("PyMem_Malloc", _c_void_p, ctypes.c_size_t)
_PyMem_Free = _capi("PyMem_Free", None, _c_void_p)
_Py_IncRef = _capi("Py_IncRef", None, _py_object)
_Py_DecRef = _capi("Py_DecRef", None, _c_void_p)

# Calls a producer's deleter with the GIL held, as C consumers do.
_DeleterCall = ctypes.PYFUNCTYPE(None, _c_void_p)

# A capsule keeps a pointer to its name rather than a copy, and may outlive this
# module during interpreter shutdown, so the names are never freed.
_NAME_LEGACY: Final = b"dltensor"
_NAME_LEGACY_USED: Final = b"used_dltensor"
_NAME_VERSIONED: Final = b"dltensor_versioned"
_NAME_VERSIONED_USED: Final = b"used_dltensor_versioned"
for _name in (_NAME_LEGACY, _NAME_LEGACY_USED, _NAME_VERSIONED, _NAME_VERSIONED_USED):
    _Py_IncRef(_name)
del _name


# -- deleters and capsule destructors -------------------------------------------


@dataclass(frozen=True, slots=True)
class _Flavor:
    """How capsules of one layout (legacy or versioned) are built and released."""

    versioned: bool
    name: bytes
    used_name: bytes
    struct: _ManagedStruct
    capsule_destructor: int
    """Address of the ``PyCapsule_Destructor``."""
    tensor_deleter: int
    """Address of the ``deleter`` stored in the managed tensor."""
    origin: str
    """``"numpy"`` (NumPy's C functions) or ``"ctypes"`` (callbacks in this module)."""


def _call_deleter(deleter: int, managed: int) -> None:
    _DeleterCall(deleter)(managed)


def _release_export(managed: int | None, struct: _ManagedStruct) -> None:
    """Free an exported tensor's block and drop its owner reference."""
    if managed is None:
        return
    owner = _c_void_p.from_address(managed + _field_offset(struct, "manager_ctx")).value
    _PyMem_Free(managed)
    if owner is not None:
        _Py_DecRef(owner)


def _destroy_capsule(capsule: int | None, name: bytes, struct: _ManagedStruct) -> None:
    """Capsule destructor: run the deleter unless a consumer renamed the capsule."""
    if capsule is None or not _PyCapsule_IsValid_raw(capsule, name):
        return
    managed = _PyCapsule_GetPointer_raw(capsule, name)
    deleter = _c_void_p.from_address(managed + _field_offset(struct, "deleter")).value
    if deleter is not None:
        _call_deleter(deleter, managed)


def _legacy_deleter(managed: int | None) -> None:
    _release_export(managed, _DLManagedTensor)


def _versioned_deleter(managed: int | None) -> None:
    _release_export(managed, _DLManagedTensorVersioned)


def _legacy_capsule_destructor(capsule: int | None) -> None:
    _destroy_capsule(capsule, _NAME_LEGACY, _DLManagedTensor)


def _versioned_capsule_destructor(capsule: int | None) -> None:
    _destroy_capsule(capsule, _NAME_VERSIONED, _DLManagedTensorVersioned)


# Fallback used where NumPy's functions are unavailable. Its thunks take the GIL
# themselves, so any thread may call the deleter, but they cannot run while the
# caller has an exception set: a consumer that drops an unconsumed capsule then
# leaks the tensor (its owner) and its exception surfaces as a SystemError.
# The C thunks must outlive every capsule that points at them: module level.
_CallbackType = ctypes.CFUNCTYPE(None, _c_void_p)
_LEGACY_DELETER_CB: Final = _CallbackType(_legacy_deleter)
_VERSIONED_DELETER_CB: Final = _CallbackType(_versioned_deleter)
_LEGACY_DESTRUCTOR_CB: Final = _CallbackType(_legacy_capsule_destructor)
_VERSIONED_DESTRUCTOR_CB: Final = _CallbackType(_versioned_capsule_destructor)


def _callback_address(callback: Any) -> int:
    address = ctypes.cast(callback, _c_void_p).value
    assert address is not None
    return address


_CTYPES_FLAVORS: Final = {
    False: _Flavor(
        versioned=False,
        name=_NAME_LEGACY,
        used_name=_NAME_LEGACY_USED,
        struct=_DLManagedTensor,
        capsule_destructor=_callback_address(_LEGACY_DESTRUCTOR_CB),
        tensor_deleter=_callback_address(_LEGACY_DELETER_CB),
        origin="ctypes",
    ),
    True: _Flavor(
        versioned=True,
        name=_NAME_VERSIONED,
        used_name=_NAME_VERSIONED_USED,
        struct=_DLManagedTensorVersioned,
        capsule_destructor=_callback_address(_VERSIONED_DESTRUCTOR_CB),
        tensor_deleter=_callback_address(_VERSIONED_DELETER_CB),
        origin="ctypes",
    ),
}


def _numpy_flavor(versioned: bool) -> _Flavor | None:
    """Borrow NumPy's C deleter and capsule destructor for this layout, if usable.

    NumPy's deleter frees the managed tensor with ``PyMem_Free`` and drops the
    reference in ``manager_ctx``, which is exactly what an export needs. The probe
    checks that NumPy still stores a strong reference to the array there.
    """
    fallback = _CTYPES_FLAVORS[versioned]
    probe = np.zeros(1, dtype=np.uint8)
    refs_before = sys.getrefcount(probe)
    try:
        capsule = probe.__dlpack__(max_version=_MAX_VERSION) if versioned else probe.__dlpack__()
    except (TypeError, ValueError, BufferError):
        return None
    if not _PyCapsule_IsValid(capsule, fallback.name):
        return None
    managed = fallback.struct.from_address(_PyCapsule_GetPointer(capsule, fallback.name))
    if managed.manager_ctx != id(probe) or sys.getrefcount(probe) != refs_before + 1:
        return None
    if versioned and managed.version.major != _DLPACK_MAJOR:
        return None
    destructor = _PyCapsule_GetDestructor(capsule)
    if not destructor or not managed.deleter:
        return None
    return _Flavor(
        versioned=versioned,
        name=fallback.name,
        used_name=fallback.used_name,
        struct=fallback.struct,
        capsule_destructor=int(destructor),
        tensor_deleter=int(managed.deleter),
        origin="numpy",
    )


_FLAVORS: dict[bool, _Flavor] = {
    versioned: _numpy_flavor(versioned) or _CTYPES_FLAVORS[versioned] for versioned in (False, True)
}


# -- dtypes ----------------------------------------------------------------------

_FROM_DL: Final[dict[tuple[int, int], np.dtype[Any]]] = {
    (_DLDataTypeCode.BOOL, 8): np.dtype(np.bool_),
    (_DLDataTypeCode.INT, 8): np.dtype(np.int8),
    (_DLDataTypeCode.INT, 16): np.dtype(np.int16),
    (_DLDataTypeCode.INT, 32): np.dtype(np.int32),
    (_DLDataTypeCode.INT, 64): np.dtype(np.int64),
    (_DLDataTypeCode.UINT, 8): np.dtype(np.uint8),
    (_DLDataTypeCode.UINT, 16): np.dtype(np.uint16),
    (_DLDataTypeCode.UINT, 32): np.dtype(np.uint32),
    (_DLDataTypeCode.UINT, 64): np.dtype(np.uint64),
    (_DLDataTypeCode.FLOAT, 16): np.dtype(np.float16),
    (_DLDataTypeCode.FLOAT, 32): np.dtype(np.float32),
    (_DLDataTypeCode.FLOAT, 64): np.dtype(np.float64),
    (_DLDataTypeCode.COMPLEX, 64): np.dtype(np.complex64),
    (_DLDataTypeCode.COMPLEX, 128): np.dtype(np.complex128),
}

_KIND_CODES: Final = {
    "b": _DLDataTypeCode.BOOL,
    "i": _DLDataTypeCode.INT,
    "u": _DLDataTypeCode.UINT,
    "f": _DLDataTypeCode.FLOAT,
    "c": _DLDataTypeCode.COMPLEX,
}

_SUPPORTED_DTYPES: Final = (
    "bool, int8-int64, uint8-uint64, float16/32/64, complex64/128, ml_dtypes.bfloat16"
)


def _is_bfloat16(dtype: np.dtype[Any]) -> bool:
    # A bfloat16 dtype exists only once ml_dtypes has been imported.
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and dtype == np.dtype(ml_dtypes.bfloat16)


def _to_dl_dtype(dtype: np.dtype[Any]) -> tuple[int, int]:
    """``(code, bits)`` of a NumPy dtype; lanes is always 1."""
    if dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidArgumentError(
            f"structured dtype {dtype} cannot be exported through DLPack; "
            f"supported: {_SUPPORTED_DTYPES}"
        )
    if not dtype.isnative:
        raise InvalidArgumentError(
            f"dtype {dtype.str} has non-native byte order, which DLPack cannot describe"
        )
    code = _KIND_CODES.get(dtype.kind)
    bits = dtype.itemsize * 8
    if code is not None and (code, bits) in _FROM_DL:
        return int(code), bits
    if _is_bfloat16(dtype):
        return int(_DLDataTypeCode.BFLOAT), 16
    raise InvalidArgumentError(
        f"dtype {dtype} cannot be exported through DLPack; supported: {_SUPPORTED_DTYPES}"
    )


def _from_dl_dtype(code: int, bits: int, lanes: int) -> np.dtype[Any]:
    if lanes != 1:
        raise InvalidArgumentError(
            f"DLPack dtype (code={code}, bits={bits}) has {lanes} lanes; only 1 is supported"
        )
    dtype = _FROM_DL.get((code, bits))
    if dtype is not None:
        return dtype
    if (code, bits) == (_DLDataTypeCode.BFLOAT, 16):
        try:
            ml_dtypes = importlib.import_module("ml_dtypes")
        except ImportError:
            raise InvalidArgumentError(
                "DLPack tensor has dtype bfloat16, which NumPy can only represent "
                "with the ml_dtypes package installed"
            ) from None
        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    raise InvalidArgumentError(
        f"DLPack dtype (code={code}, bits={bits}) has no NumPy equivalent; "
        f"supported: {_SUPPORTED_DTYPES}"
    )


# -- export ------------------------------------------------------------------------


def _c_contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides in elements (zero-length dimensions count as 1, as in NumPy)."""
    strides: list[int] = []
    step = 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _int64_tuple(values: tuple[int, ...], what: str) -> tuple[int, ...]:
    try:
        result = tuple(operator.index(v) for v in values)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be a tuple of integers, got {values!r}") from None
    for v in result:
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise InvalidArgumentError(f"{what} entry {v} does not fit in int64")
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
    """Wrap memory at ``ptr`` in a DLPack capsule.

    Args:
        ptr: address of the first element (device or host, per ``device_type``).
        shape: extent of each dimension.
        strides: strides in elements (DLPack's unit, not bytes); ``None`` for
            C-contiguous. The capsule always carries explicit strides.
        dtype: element type (see ``_SUPPORTED_DTYPES``).
        device_type: a ``DLDeviceType`` value.
        device_id: device ordinal (0 for host memory).
        owner: kept alive (strong reference) until the consumer's deleter call,
            or until the capsule is destroyed unconsumed.
        readonly: sets ``DLPACK_FLAG_BITMASK_READ_ONLY``; legacy capsules cannot
            signal it, so ``readonly=True`` requires ``versioned=True``.
        versioned: build a DLPack 1.0 ``"dltensor_versioned"`` capsule instead of
            a legacy ``"dltensor"`` one.

    Raises:
        InvalidArgumentError: unsupported dtype, malformed shape or strides,
            a null pointer for a non-empty tensor, or ``readonly`` without
            ``versioned``.
    """
    dtype = np.dtype(dtype)
    code, bits = _to_dl_dtype(dtype)
    shape = _int64_tuple(shape, "shape")
    if any(extent < 0 for extent in shape):
        raise InvalidArgumentError(f"shape {shape} has a negative extent")
    ndim = len(shape)
    if strides is None:
        strides = _c_contiguous_strides(shape)
    else:
        strides = _int64_tuple(strides, "strides")
        if len(strides) != ndim:
            raise InvalidArgumentError(
                f"strides {strides} have {len(strides)} entries for a {ndim}-d shape {shape}"
            )
    ptr = operator.index(ptr)
    if not 0 <= ptr < 1 << 64:
        raise InvalidArgumentError(f"pointer {ptr:#x} is not a valid address")
    if ptr == 0 and 0 not in shape:
        raise InvalidArgumentError(f"null data pointer for a non-empty tensor of shape {shape}")
    device_type = operator.index(device_type)
    device_id = operator.index(device_id)
    if not 0 < device_type < 1 << 31:
        raise InvalidArgumentError(f"device_type {device_type} is not a DLDeviceType value")
    if not 0 <= device_id < 1 << 31:
        raise InvalidArgumentError(f"device_id {device_id} is out of range")
    if readonly and not versioned:
        raise InvalidArgumentError(
            "a read-only tensor can only be exported as a versioned capsule "
            "(the consumer must pass max_version >= (1, 0)); legacy DLPack has no "
            "read-only flag"
        )

    flavor = _FLAVORS[bool(versioned)]
    header = ctypes.sizeof(flavor.struct)  # a multiple of 8: int64 arrays follow
    block = _PyMem_Malloc(header + 2 * 8 * ndim)
    if not block:
        raise MemoryError("PyMem_Malloc failed to allocate a DLPack tensor")
    try:
        managed = flavor.struct.from_address(block)
        ctypes.memset(block, 0, header)
        tensor = managed.dl_tensor
        tensor.data = ptr
        tensor.device.device_type = device_type
        tensor.device.device_id = device_id
        tensor.ndim = ndim
        tensor.dtype.code = code
        tensor.dtype.bits = bits
        tensor.dtype.lanes = 1
        tensor.byte_offset = 0
        if ndim:
            shape_at = block + header
            strides_at = shape_at + 8 * ndim
            (ctypes.c_int64 * ndim).from_address(shape_at)[:] = list(shape)
            (ctypes.c_int64 * ndim).from_address(strides_at)[:] = list(strides)
            tensor.shape = shape_at
            tensor.strides = strides_at
        managed.manager_ctx = id(owner)
        managed.deleter = flavor.tensor_deleter
        if flavor.versioned:
            managed.version.major = _DLPACK_MAJOR
            managed.version.minor = _DLPACK_MINOR
            managed.flags = DLPACK_FLAG_BITMASK_READ_ONLY if readonly else 0
        capsule: object = _PyCapsule_New(block, flavor.name, flavor.capsule_destructor)
    except BaseException:
        _PyMem_Free(block)
        raise
    # The reference that manager_ctx stands for; the deleter drops it.
    _Py_IncRef(owner)
    return capsule


# -- import ------------------------------------------------------------------------


class _ConsumedTensor:
    """Owns a consumed ``DLManagedTensor(Versioned)``; calls its deleter once when collected."""

    __slots__ = ("__weakref__", "_finalizer", "_producer")

    def __init__(self, managed: int, deleter: int | None, producer: object) -> None:
        # A tensor without a deleter (allowed by the spec) is kept alive through
        # the producing object instead.
        self._producer = producer if deleter is None else None
        self._finalizer: weakref.finalize[[int, int], _ConsumedTensor] | None = None
        if deleter is not None:
            self._finalizer = weakref.finalize(self, _call_deleter, deleter, managed)
            # Leave memory alone during interpreter shutdown: views may still be read.
            self._finalizer.atexit = False

    def __repr__(self) -> str:
        alive = self._finalizer is not None and self._finalizer.alive
        return f"<DLPack tensor keepalive, deleter {'pending' if alive else 'not owned'}>"


@dataclass(frozen=True, slots=True)
class DLPackView:
    """A consumed DLPack tensor, as gpuaio needs it for copies.

    ``keepalive`` owns the producer's memory: it stays valid while this view (or
    ``keepalive`` itself) is referenced, and the producer's deleter runs exactly
    once when the last reference goes away.
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


def _device_of(obj: object) -> tuple[int, int]:
    query = getattr(obj, "__dlpack_device__", None)
    if query is None or not callable(query):
        raise InvalidArgumentError(
            f"{type(obj).__qualname__} object does not support DLPack (no __dlpack_device__)"
        )
    device = query()
    try:
        device_type, device_id = (operator.index(v) for v in device)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"{type(obj).__qualname__}.__dlpack_device__() returned {device!r}, "
            "not a (device_type, device_id) pair of integers"
        ) from None
    return device_type, device_id


def _as_device_type(value: int) -> int:
    try:
        return DLDeviceType(value)
    except ValueError:
        return value


def parse_dlpack(obj: object, *, stream: int | None = None) -> DLPackView:
    """Consume ``obj.__dlpack__()`` and describe the tensor it shares.

    Args:
        obj: any object implementing ``__dlpack__`` and ``__dlpack_device__``
            (gpuaio arrays, torch, CuPy, JAX, NumPy, ...).
        stream: the CUDA stream the consumer will use, forwarded to the producer
            so it can order its pending work before that stream (DLPack stream
            semantics: ``1`` legacy default, ``2`` per-thread default, ``-1`` no
            synchronization; ``0`` is ambiguous and rejected). Only passed for
            CUDA and CUDA-managed tensors.

    Raises:
        InvalidArgumentError: ``obj`` is not a DLPack producer, returned
            something other than an unconsumed DLPack capsule, uses an
            unsupported DLPack major version, dtype or lanes count, or
            ``stream`` is 0.
    """
    device_type, _ = _device_of(obj)
    export = getattr(obj, "__dlpack__", None)
    if export is None or not callable(export):
        raise InvalidArgumentError(
            f"{type(obj).__qualname__} object does not support DLPack (no __dlpack__)"
        )
    kwargs: dict[str, object] = {}
    if stream is not None and device_type in _STREAM_DEVICES:
        stream = operator.index(stream)
        if stream == 0:
            raise InvalidArgumentError(
                "stream=0 is ambiguous in DLPack; pass 1 for the legacy default stream "
                "or 2 for the per-thread default stream"
            )
        kwargs["stream"] = stream
    try:
        capsule = export(max_version=_MAX_VERSION, **kwargs)
    except TypeError:
        # Producers predating DLPack 1.0 do not accept max_version.
        capsule = export(**kwargs)

    # Only the layout fields (names, struct) of the flavor matter to a consumer.
    if _PyCapsule_IsValid(capsule, _NAME_VERSIONED):
        flavor = _CTYPES_FLAVORS[True]
    elif _PyCapsule_IsValid(capsule, _NAME_LEGACY):
        flavor = _CTYPES_FLAVORS[False]
    elif _PyCapsule_IsValid(capsule, _NAME_VERSIONED_USED) or _PyCapsule_IsValid(
        capsule, _NAME_LEGACY_USED
    ):
        raise InvalidArgumentError(
            f"{type(obj).__qualname__}.__dlpack__() returned an already consumed capsule"
        )
    else:
        raise InvalidArgumentError(
            f"{type(obj).__qualname__}.__dlpack__() returned {type(capsule).__qualname__}, "
            "not a 'dltensor' or 'dltensor_versioned' capsule"
        )

    # Everything is validated before the capsule is renamed: on error it stays
    # unconsumed and its own destructor releases the tensor.
    address: int = _PyCapsule_GetPointer(capsule, flavor.name)
    managed = flavor.struct.from_address(address)
    readonly = False
    if flavor.versioned:
        version = managed.version
        if version.major != _DLPACK_MAJOR:
            raise InvalidArgumentError(
                f"{type(obj).__qualname__} exported DLPack {version.major}.{version.minor}; "
                f"only major version {_DLPACK_MAJOR} is supported"
            )
        readonly = bool(managed.flags & DLPACK_FLAG_BITMASK_READ_ONLY)
    tensor = managed.dl_tensor
    dtype = _from_dl_dtype(tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes)
    ndim = int(tensor.ndim)
    if ndim < 0:
        raise InvalidArgumentError(f"DLPack tensor has a negative ndim ({ndim})")
    if ndim and not tensor.shape:
        raise InvalidArgumentError(f"DLPack tensor has ndim {ndim} but a null shape pointer")
    shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    if ndim:
        shape = tuple((ctypes.c_int64 * ndim).from_address(tensor.shape))
        if tensor.strides:
            strides = tuple((ctypes.c_int64 * ndim).from_address(tensor.strides))
        else:
            strides = _c_contiguous_strides(shape)
    ptr = (tensor.data or 0) + int(tensor.byte_offset)
    view_device = (int(tensor.device.device_type), int(tensor.device.device_id))
    deleter: int | None = managed.deleter

    _PyCapsule_SetName(capsule, flavor.used_name)
    keepalive = _ConsumedTensor(address, deleter, obj)
    return DLPackView(
        ptr=ptr,
        shape=shape,
        strides_bytes=tuple(s * dtype.itemsize for s in strides),
        dtype=dtype,
        device_type=_as_device_type(view_device[0]),
        device_id=view_device[1],
        readonly=readonly,
        keepalive=keepalive,
    )
