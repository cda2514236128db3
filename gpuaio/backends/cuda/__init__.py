"""The real backend: the CUDA driver API through ``cuda.bindings``.

Contexts. The backend uses each device's *primary* context (the one the CUDA
runtime, CuPy, PyTorch and ``cuda.core`` share). It is retained with
``cuDevicePrimaryCtxRetain`` the first time a device is used and released by
:meth:`CudaBackend.close`. Calls arrive from the event-loop thread, from
gpuaio's threads and from the user's, and other code in those threads may
have made another context current (``torch.cuda.set_device(1)``,
``with cupy.cuda.Device(1)``, a PyCUDA context). So every method that needs a
context reads the thread's current one (``cuCtxGetCurrent``; no cache could
see what foreign code set), makes the one it needs current only when they
differ, and makes the previous one current again once its driver call has
returned (see :class:`~gpuaio.backends.Backend` for the two cases where the
context stays). When the right context is current already, as in gpuaio's own
threads after their first call, that is one ``cuCtxGetCurrent`` per call.

Errors. Every ``CUresult`` is checked; a failure becomes
:func:`gpuaio._errors.make_cuda_error` (``CudaError``, or ``DeviceFatalError``
for sticky codes) naming the driver call, the ``CUresult`` name and its
description. Bad arguments caught before a call raise
:class:`~gpuaio._errors.InvalidArgumentError`; nothing is enqueued then.

Kernel arguments. :meth:`CudaBackend.launch` lowers each argument to the
``(values, ctypes types)`` pair that ``cuLaunchKernel`` in ``cuda.bindings``
packs into ``kernelParams``:

* objects with ``__cuda_array_interface__`` pass their data pointer, and so do
  ``cuda.core`` ``Buffer`` objects and ``driver.CUdeviceptr`` values;
* numpy scalars pass as the ctypes type of their dtype (``np.float16`` as its
  16 bit pattern), ctypes scalars pass as themselves;
* ``bool`` passes as ``c_bool``, ``int`` as a 64 bit integer and ``float`` as
  ``c_double``.

The driver copies each parameter with the size the *kernel* declares. When
the kernel's parameter layout is known (always for kernels from
:meth:`CudaBackend.compile` on CUDA >= 12.4 drivers), the backend checks the
argument count, rejects numpy/ctypes scalars and pointers whose size differs
from the parameter's, and gives ``int`` and ``float`` the parameter's width
(a ``float`` for a ``float`` parameter is sent as ``c_float``). Without a known
layout (a foreign ``CUfunction``), an ``int`` still works for any integer
parameter on little-endian hosts because the driver reads only the low bytes,
but a ``float`` is sent as ``double``: pass ``np.float32`` for ``float``
parameters there.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import logging
import re
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from cuda.bindings import driver

from ..._errors import CudaError, InvalidArgumentError, NoDeviceError, make_cuda_error
from .._base import Backend, DeviceProperties, MemoryKind, PointerInfo, keeps_context

__all__ = ["CudaBackend", "CudaEvent", "CudaKernel", "CudaStream"]

_logger = logging.getLogger("gpuaio")

_CUresult = driver.CUresult
_NOT_READY = _CUresult.CUDA_ERROR_NOT_READY
_INVALID_VALUE = _CUresult.CUDA_ERROR_INVALID_VALUE
_PEER_ALREADY_ENABLED = _CUresult.CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED

_ATTR = driver.CUdevice_attribute
_STREAM_NON_BLOCKING = int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
_EVENT_DISABLE_TIMING = int(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
_EVENT_BLOCKING_SYNC = int(driver.CUevent_flags.CU_EVENT_BLOCKING_SYNC)
_ATTACH_GLOBAL = int(driver.CUmemAttach_flags.CU_MEM_ATTACH_GLOBAL)
_HOST_ALLOC_FLAGS = int(driver.CU_MEMHOSTALLOC_PORTABLE) | int(driver.CU_MEMHOSTALLOC_DEVICEMAP)
_HOST_REGISTER_FLAGS = int(driver.CU_MEMHOSTREGISTER_PORTABLE) | int(
    driver.CU_MEMHOSTREGISTER_DEVICEMAP
)
_WAIT_GEQ = int(driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
_WRITE_DEFAULT = int(driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)

# One cuPointerGetAttributes call answers everything pointer_info needs.
_POINTER_ATTRIBUTES = (
    driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
    driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_MANAGED,
    driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
)
_MEMORYTYPE_HOST = int(driver.CUmemorytype.CU_MEMORYTYPE_HOST)
_MEMORYTYPE_DEVICE = int(driver.CUmemorytype.CU_MEMORYTYPE_DEVICE)
_MEMORYTYPE_UNIFIED = int(driver.CUmemorytype.CU_MEMORYTYPE_UNIFIED)

_MEMSET_CALLS: dict[int, tuple[str, Callable[..., tuple[Any, ...]], int]] = {
    1: ("cuMemsetD8Async", driver.cuMemsetD8Async, 0xFF),
    2: ("cuMemsetD16Async", driver.cuMemsetD16Async, 0xFFFF),
    4: ("cuMemsetD32Async", driver.cuMemsetD32Async, 0xFFFFFFFF),
}

_ERROR_TOKEN = re.compile(r"CUDA_ERROR_[A-Z0-9_]+")


def _error_text(err: Any) -> tuple[str, str]:
    """``(name, description)`` of a ``CUresult``; never raises."""
    name = getattr(err, "name", None) or f"CUresult({int(err)})"
    detail = ""
    try:
        status, raw = driver.cuGetErrorName(err)
        if not status and raw:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
        status, raw = driver.cuGetErrorString(err)
        if not status and raw:
            detail = raw.decode() if isinstance(raw, bytes) else str(raw)
    except Exception:  # naming an error must never mask it
        pass
    return name, detail


def _cuda_error(call: str, err: Any) -> CudaError:
    """The gpuaio exception for a failed driver call."""
    name, detail = _error_text(err)
    return make_cuda_error(call, int(err), name, detail)


def _uint32_error(call: str, value: int) -> CudaError:
    """What the driver would say about a value that is no uint32 (the sim says the same)."""
    return make_cuda_error(
        call, int(_INVALID_VALUE), "CUDA_ERROR_INVALID_VALUE", f"{value!r} is not a uint32"
    )


def _check(call: str, result: tuple[Any, ...]) -> Any:
    """Raise for a failed ``cuda.bindings`` call; return its payload.

    ``cuda.bindings`` returns ``(CUresult, *outputs)``. The payload is
    ``None`` for no output, the output itself for one, a tuple for several.
    ``CUresult`` is an ``int`` subclass, so ``CUDA_SUCCESS`` is falsy.
    """
    err = result[0]
    if err:
        raise _cuda_error(call, err)
    n = len(result)
    if n == 2:
        return result[1]
    if n == 1:
        return None
    return result[1:]


def _decode_c_string(raw: Any) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).split(b"\x00", 1)[0].decode(errors="replace")
    return str(raw)


# -- handles -----------------------------------------------------------


class _ThreadState(threading.local):
    """Per thread: whether the backend leaves the context it binds current there."""

    def __init__(self) -> None:  # runs in each thread, on its first use
        self.keep: bool = keeps_context(threading.current_thread())


class CudaStream:
    """A stream handle owned (or, for foreign streams, only wrapped) by the backend."""

    __slots__ = ("address", "ctx", "ctx_addr", "destroyed", "device", "handle", "owned")

    def __init__(self, handle: Any, device: int, ctx: Any, owned: bool) -> None:
        self.handle: Any = handle
        """The ``driver.CUstream`` passed to every enqueue call."""
        self.address: int = int(handle)
        self.device: int = device
        self.ctx: Any = ctx
        """The primary context of ``device`` (what ``_enter`` makes current)."""
        self.ctx_addr: int = int(ctx)
        self.owned: bool = owned
        self.destroyed: bool = False

    def __repr__(self) -> str:
        kind = "owned" if self.owned else "foreign"
        return f"<CudaStream 0x{self.address:x} device={self.device} {kind}>"


class CudaEvent:
    """A timing-disabled event created by the backend."""

    __slots__ = ("ctx", "ctx_addr", "destroyed", "device", "handle")

    def __init__(self, handle: Any, device: int, ctx: Any) -> None:
        self.handle: Any = handle
        self.device: int = device
        self.ctx: Any = ctx
        self.ctx_addr: int = int(ctx)
        self.destroyed: bool = False

    def __repr__(self) -> str:
        return f"<CudaEvent 0x{int(self.handle):x} device={self.device}>"


class CudaKernel:
    """A launchable kernel: the handle ``cuLaunchKernel`` takes, plus its layout.

    ``function`` is a ``driver.CUfunction``; for kernels compiled by
    :meth:`CudaBackend.compile` it is the context-independent ``CUkernel``
    cast to ``CUfunction`` (``cuLaunchKernel`` accepts that and runs it in the
    launch stream's context). ``param_sizes`` holds the byte size of every
    parameter when the driver reported it, else ``None``. ``owner`` keeps the
    ``cuda.core`` objects that own the loaded code alive.
    """

    __slots__ = ("device", "function", "name", "owner", "param_sizes")

    def __init__(
        self,
        function: Any,
        name: str,
        device: int | None,
        param_sizes: tuple[int, ...] | None,
        owner: Any = None,
    ) -> None:
        self.function: Any = function
        self.name: str = name
        self.device: int | None = device
        self.param_sizes: tuple[int, ...] | None = param_sizes
        self.owner: Any = owner

    def __repr__(self) -> str:
        return f"<CudaKernel {self.name!r} device={self.device}>"


def _param_sizes(kernel: Any) -> tuple[int, ...] | None:
    """Byte sizes of a ``cuda.core`` kernel's parameters, or ``None`` if unknown."""
    try:
        infos = kernel.arguments_info
        return tuple(int(getattr(info, "size", None) or info[1]) for info in infos)
    except Exception:
        # cuKernelGetParamInfo needs a CUDA 12.4+ driver; without it launches
        # fall back to unchecked lowering.
        return None


# -- host functions ----------------------------------------------------

# The driver calls one ctypes trampoline; userData is a counter naming the
# Python callable in _pending_host_fns, which keeps it alive until it ran.
_HOST_FN_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_pending_host_fns: dict[int, Callable[[], None]] = {}
_host_fn_tokens = itertools.count(1)  # next() is atomic under the GIL


def _run_host_fn(user_data: int | None) -> None:
    """Runs on a driver thread: call the registered callable, never raise."""
    try:
        fn = _pending_host_fns.pop(user_data or 0, None)
        if fn is None:
            _logger.error("gpuaio host function %r was not registered", user_data)
            return
        fn()
    except BaseException:
        # An exception must not propagate into the driver's thread.
        _logger.exception("gpuaio host function raised")


_HOST_FN_TRAMPOLINE = _HOST_FN_TYPE(_run_host_fn)  # module-level: never freed
_HOST_FN_HANDLE = driver.CUhostFn(ctypes.cast(_HOST_FN_TRAMPOLINE, ctypes.c_void_p).value)


# -- kernel arguments --------------------------------------------------

_c_void_p = ctypes.c_void_p
_c_bool = ctypes.c_bool
_c_float = ctypes.c_float
_c_double = ctypes.c_double
_POINTER_SIZE = ctypes.sizeof(ctypes.c_void_p)
_INT_CTYPES: dict[int, tuple[Any, Any]] = {
    1: (ctypes.c_int8, ctypes.c_uint8),
    2: (ctypes.c_int16, ctypes.c_uint16),
    4: (ctypes.c_int32, ctypes.c_uint32),
    8: (ctypes.c_int64, ctypes.c_uint64),
}
_UINT_CTYPES = {size: pair[1] for size, pair in _INT_CTYPES.items()}
# size -> (min, max + 1, ctype) of the signed type: the fast path for Python ints
_INT_LIMITS: dict[int, tuple[int, int, Any]] = {
    size: (-(1 << (8 * size - 1)), 1 << (8 * size - 1), pair[0])
    for size, pair in _INT_CTYPES.items()
}
_INT_LIMITS_KEYS = frozenset((None, *_INT_LIMITS))
# The ctypes scalars cuda.bindings can pack (c_void_p is handled apart).
_PACKABLE_CTYPES: frozenset[Any] = frozenset(
    {
        ctypes.c_bool,
        ctypes.c_byte,
        ctypes.c_ubyte,
        ctypes.c_short,
        ctypes.c_ushort,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_long,
        ctypes.c_ulong,
        ctypes.c_longlong,
        ctypes.c_ulonglong,
        ctypes.c_size_t,
        ctypes.c_float,
        ctypes.c_double,
    }
)

# numpy scalar type -> (ctypes type, size, is_half), or None for other types;
# filled lazily, one entry per argument type ever seen.
_NUMPY_RULES: dict[type, tuple[Any, int, bool] | None] = {}
_UNKNOWN_RULE: Any = object()


def _numpy_rule(cls: type) -> tuple[Any, int, bool] | None:
    try:
        return _NUMPY_RULES[cls]
    except KeyError:
        pass
    rule: tuple[Any, int, bool] | None = None
    if issubclass(cls, np.generic):
        dtype = np.dtype(cls)
        kind, size = dtype.kind, dtype.itemsize
        if kind == "b" and size == 1:
            rule = (_c_bool, 1, False)
        elif kind == "i" and size in _INT_CTYPES:
            rule = (_INT_CTYPES[size][0], size, False)
        elif kind == "u" and size in _INT_CTYPES:
            rule = (_UINT_CTYPES[size], size, False)
        elif kind == "f" and size == 2:
            rule = (ctypes.c_uint16, 2, True)
        elif kind == "f" and size == 4:
            rule = (_c_float, 4, False)
        elif kind == "f" and size == 8:
            rule = (_c_double, 8, False)
    _NUMPY_RULES[cls] = rule
    return rule


def _int_ctype(value: int, size: int, index: int) -> Any:
    pair = _INT_CTYPES.get(size)
    if pair is None:
        raise InvalidArgumentError(
            f"kernel argument {index}: int passed for a {size}-byte parameter"
        )
    half = 1 << (size * 8 - 1)
    if -half <= value < half:
        return pair[0]
    if 0 <= value < 2 * half:
        return pair[1]
    raise InvalidArgumentError(
        f"kernel argument {index}: {value} does not fit a {size}-byte integer parameter"
    )


def _size_mismatch(index: int, what: str, size: int, expected: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"kernel argument {index}: {what} is {size} bytes but the kernel's parameter "
        f"is {expected} bytes"
    )


def _pointer_of(arg: Any) -> int | None:
    """The device address an argument stands for, or ``None`` if it is no pointer."""
    cai = getattr(arg, "__cuda_array_interface__", None)
    if cai is not None:
        return int(cai["data"][0])
    if isinstance(arg, driver.CUdeviceptr):
        return int(arg)
    core = sys.modules.get("cuda.core")  # no Buffer can exist before cuda.core is imported
    if core is not None:
        buffer_cls = getattr(core, "Buffer", None)
        if buffer_cls is not None and isinstance(arg, buffer_cls):
            return int(arg.handle)
    return None


def _lower_slow(arg: Any, index: int, size: int | None) -> tuple[Any, Any]:
    """Lower an argument that is neither a builtin scalar nor a known numpy scalar."""
    ptr = _pointer_of(arg)
    if ptr is not None:
        if size is not None and size != _POINTER_SIZE:
            raise _size_mismatch(index, "a pointer", _POINTER_SIZE, size)
        return ptr, _c_void_p
    cls = type(arg)
    if cls is _c_void_p:
        if size is not None and size != _POINTER_SIZE:
            raise _size_mismatch(index, "a pointer", _POINTER_SIZE, size)
        return arg.value or 0, _c_void_p
    if cls in _PACKABLE_CTYPES:
        nbytes = ctypes.sizeof(cls)
        if size is not None and size != nbytes:
            raise _size_mismatch(index, cls.__name__, nbytes, size)
        return arg, cls
    if isinstance(arg, int):  # int subclasses such as IntEnum (bool cannot be subclassed)
        value = int(arg)
        return value, _int_ctype(value, 8 if size is None else size, index)
    if isinstance(arg, float):
        return _lower_float(float(arg), index, size)
    raise InvalidArgumentError(
        f"kernel argument {index}: unsupported type {cls.__module__}.{cls.__qualname__}; "
        "pass an object with __cuda_array_interface__, a cuda.core Buffer, a numpy or "
        "ctypes scalar, an int, a float or a bool"
    )


def _lower_float(value: float, index: int, size: int | None) -> tuple[Any, Any]:
    if size is None or size == 8:
        return value, _c_double
    if size == 4:
        return value, _c_float
    raise InvalidArgumentError(
        f"kernel argument {index}: float passed for a {size}-byte parameter "
        "(use a numpy scalar of the parameter's type)"
    )


def _lower_args(
    args: Sequence[Any], sizes: tuple[int, ...] | None
) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
    """The ``(values, types)`` pair ``cuLaunchKernel`` packs into ``kernelParams``.

    The common cases (int, float, numpy scalar, array pointer) are handled
    inline; everything else goes through :func:`_lower_slow`.
    """
    n = len(args)
    if sizes is not None and len(sizes) != n:
        raise InvalidArgumentError(f"the kernel takes {len(sizes)} arguments, {n} were given")
    if n == 0:
        return None
    values: list[Any] = [None] * n
    types: list[Any] = [None] * n
    for i, arg in enumerate(args):
        size = None if sizes is None else sizes[i]
        cls = type(arg)
        if cls is int:
            limits = _INT_LIMITS[8 if size is None else size] if size in _INT_LIMITS_KEYS else None
            if limits is not None and limits[0] <= arg < limits[1]:
                types[i] = limits[2]
            else:
                types[i] = _int_ctype(arg, 8 if size is None else size, i)
            values[i] = arg
        elif cls is float:
            values[i], types[i] = _lower_float(arg, i, size)
        elif cls is bool:
            if size is None or size == 1:
                values[i], types[i] = arg, _c_bool
            else:
                values[i], types[i] = int(arg), _int_ctype(int(arg), size, i)
        else:
            rule = _NUMPY_RULES.get(cls, _UNKNOWN_RULE)
            if rule is _UNKNOWN_RULE:
                rule = _numpy_rule(cls)
            if rule is not None:
                ctype, nbytes, is_half = rule
                if size is not None and size != nbytes:
                    raise _size_mismatch(i, np.dtype(cls).name, nbytes, size)
                values[i] = int(arg.view(np.uint16)) if is_half else arg.item()
                types[i] = ctype
                continue
            cai = getattr(arg, "__cuda_array_interface__", None)
            if cai is not None and (size is None or size == _POINTER_SIZE):
                values[i], types[i] = int(cai["data"][0]), _c_void_p
            else:
                values[i], types[i] = _lower_slow(arg, i, size)
    return tuple(values), tuple(types)


# -- compile options ---------------------------------------------------

_BOOL_VALUES = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}
_SWITCHES = {  # NVRTC flag without a value -> ProgramOptions field set to True
    "use_fast_math": "use_fast_math",
    "use-fast-math": "use_fast_math",
    "G": "debug",
    "device-debug": "debug",
    "lineinfo": "lineinfo",
    "generate-line-info": "lineinfo",
    "w": "disable_warnings",
    "disable-warnings": "disable_warnings",
    "restrict": "restrict",
    "extra-device-vectorization": "extra_device_vectorization",
    "device-int128": "device_int128",
    "rdc": "relocatable_device_code",
}
_BOOL_OPTIONS = {  # NVRTC flag=true|false -> ProgramOptions field
    "fmad": "fma",
    "ftz": "ftz",
    "prec-div": "prec_div",
    "prec-sqrt": "prec_sqrt",
    "rdc": "relocatable_device_code",
    "relocatable-device-code": "relocatable_device_code",
}
_LIST_OPTIONS = {  # NVRTC flag=value (repeatable) -> ProgramOptions list field
    "define-macro": "define_macro",
    "undefine-macro": "undefine_macro",
    "include-path": "include_path",
    "pre-include": "pre_include",
    "include": "pre_include",
    "ptxas-options": "ptxas_options",
    "Xptxas": "ptxas_options",
    "diag-suppress": "diag_suppress",
    "diag-error": "diag_error",
    "diag-warn": "diag_warn",
}
_VALUE_OPTIONS = {  # NVRTC flag=value -> ProgramOptions scalar field
    "std": "std",
    "arch": "arch",
    "gpu-architecture": "arch",
    "maxrregcount": "max_register_count",
}
_SHORT_PREFIXES = {"-D": "define_macro", "-U": "undefine_macro", "-I": "include_path"}


def _program_option_fields(arch: str, name: str, options: Sequence[str]) -> dict[str, Any]:
    """Translate NVRTC command-line options into ``cuda.core`` ``ProgramOptions`` fields.

    ``cuda.core`` builds the NVRTC command line itself from typed fields, so
    each supported flag maps to one field; an unknown flag is rejected rather
    than silently dropped.
    """
    fields: dict[str, Any] = {"name": name, "arch": arch}
    lists: dict[str, list[Any]] = {}
    for option in options:
        if not isinstance(option, str):
            raise InvalidArgumentError(f"compile options must be strings, got {option!r}")
        try:
            _parse_option(option, fields, lists)
        except ValueError as exc:
            raise InvalidArgumentError(f"invalid compile option {option!r}: {exc}") from exc
    fields.update(lists)
    return fields


def _parse_option(option: str, fields: dict[str, Any], lists: dict[str, list[Any]]) -> None:
    short = option[:2]
    if short in _SHORT_PREFIXES and len(option) > 2 and not option.startswith("--"):
        key, value = _SHORT_PREFIXES[short], option[2:]
    else:
        flag, sep, value = option.lstrip("-").partition("=")
        if not sep and flag in _SWITCHES:
            fields[_SWITCHES[flag]] = True
            return
        if sep and flag in _BOOL_OPTIONS:
            if value.lower() not in _BOOL_VALUES:
                raise ValueError(f"expected true or false, got {value!r}")
            fields[_BOOL_OPTIONS[flag]] = _BOOL_VALUES[value.lower()]
            return
        if sep and flag in _VALUE_OPTIONS:
            field = _VALUE_OPTIONS[flag]
            fields[field] = int(value) if field == "max_register_count" else value
            return
        if not (sep and flag in _LIST_OPTIONS):
            known = dict.fromkeys((*_SWITCHES, *_BOOL_OPTIONS, *_LIST_OPTIONS, *_VALUE_OPTIONS))
            raise ValueError("unsupported; supported: -D, -U, -I, " + ", ".join(known))
        key = _LIST_OPTIONS[flag]
    if not value:
        raise ValueError("missing value")
    if key == "define_macro":
        macro, has_value, body = value.partition("=")
        lists.setdefault(key, []).append((macro, body if has_value else "1"))
    elif key.startswith("diag_"):
        lists.setdefault(key, []).extend(int(v) for v in value.split(","))
    else:
        lists.setdefault(key, []).append(value)


def _is_nvrtc_error(exc: BaseException) -> bool:
    """Whether ``exc`` is ``cuda.core``'s ``NVRTCError`` (a failed compile, not a missing NVRTC)."""
    return any(cls.__name__ == "NVRTCError" for cls in type(exc).__mro__)


def _core_error_to_cuda(call: str, exc: Exception) -> CudaError | None:
    """Map a ``cuda.core`` ``CUDAError`` naming a ``CUresult`` to a gpuaio error."""
    match = _ERROR_TOKEN.search(str(exc))
    if match is None:
        return None
    err = _CUresult.__members__.get(match.group(0))
    if err is None:
        return None
    return make_cuda_error(call, int(err), match.group(0), str(exc))


# -- the backend -------------------------------------------------------


class CudaBackend(Backend):
    """The ``cuda`` backend: CUDA driver API calls through ``cuda.bindings``.

    Construction initializes the driver (``cuInit``) and counts devices; it
    raises :class:`~gpuaio._errors.NoDeviceError` if the driver library is
    missing, ``cuInit`` fails, or no device exists. Everything per device is
    lazy: a device's primary context is retained on its first use.
    """

    name = "cuda"

    def __init__(self) -> None:
        try:
            result = driver.cuInit(0)
        except Exception as exc:  # the driver library itself could not be loaded
            raise NoDeviceError(f"the CUDA driver library could not be loaded: {exc}") from exc
        if result[0]:
            name, detail = _error_text(result[0])
            raise NoDeviceError(f"cuInit failed: {name} ({int(result[0])}): {detail}")
        err, count = driver.cuDeviceGetCount()
        if err:
            name, detail = _error_text(err)
            raise NoDeviceError(f"cuDeviceGetCount failed: {name} ({int(err)}): {detail}")
        if count <= 0:
            raise NoDeviceError("the CUDA driver reports no devices")
        self._count: int = int(count)
        self._devices: list[Any] = [
            _check("cuDeviceGet", driver.cuDeviceGet(i)) for i in range(self._count)
        ]
        version = int(_check("cuDriverGetVersion", driver.cuDriverGetVersion()))
        self._driver_version_int = version
        self._driver_version = f"{version // 1000}.{(version % 1000) // 10}"
        self._lock = threading.Lock()
        self._contexts: dict[int, Any] = {}
        self._ctx_addrs: dict[int, int] = {}  # device -> address of its primary context
        self._own_addrs: set[int] = set()  # the addresses of all of them
        self._tls = _ThreadState()
        self._properties: dict[int, DeviceProperties] = {}
        self._priority_ranges: dict[int, tuple[int, int]] = {}
        self._peers_enabled: set[tuple[int, int]] = set()
        self._allocations: dict[int, int] = {}  # device/managed pointer -> device
        self._native_kernels: weakref.WeakKeyDictionary[Any, CudaKernel] = (
            weakref.WeakKeyDictionary()
        )

    # -- contexts ------------------------------------------------------
    def _cu_device(self, device: int) -> Any:
        if not 0 <= device < self._count:
            raise NoDeviceError(
                f"CUDA device {device} is not available ({self._count} device(s) present)"
            )
        return self._devices[device]

    def _context(self, device: int) -> Any:
        """The primary context of ``device``, retained on first use."""
        ctx = self._contexts.get(device)
        if ctx is not None:
            return ctx
        with self._lock:
            ctx = self._contexts.get(device)
            if ctx is None:
                cu_device = self._cu_device(device)
                ctx = _check("cuDevicePrimaryCtxRetain", driver.cuDevicePrimaryCtxRetain(cu_device))
                # The addresses first: a thread that finds the context finds them.
                self._ctx_addrs[device] = int(ctx)
                self._own_addrs.add(int(ctx))
                self._contexts[device] = ctx
            return ctx

    @staticmethod
    def _current() -> Any:
        """``cuCtxGetCurrent``: the calling thread's current context (``CUcontext(0)``: none)."""
        err, cur = driver.cuCtxGetCurrent()
        if err:
            raise _cuda_error("cuCtxGetCurrent", err)
        return cur

    def _switch(self, ctx: Any, addr: int, cur: Any, cur_addr: int) -> Any:
        """Make ``ctx`` current in place of ``cur``; return ``cur`` if it must come back.

        ``None`` means it stays: in gpuaio's own threads, and where no context
        was current and ``ctx`` is device 0's primary context (the one the CUDA
        runtime would make current there: torch and CuPy see no change).
        """
        (err,) = driver.cuCtxSetCurrent(ctx)
        if err:
            raise _cuda_error("cuCtxSetCurrent", err)
        if self._tls.keep or (cur_addr == 0 and addr == self._ctx_addrs.get(0)):
            return None
        return cur

    def _enter(self, ctx: Any, addr: int) -> Any:
        """Make ``ctx`` (at ``addr``) current in this thread for one call.

        Returns the context to make current again with :meth:`_leave` once the
        call is done, or ``None`` for nothing to restore. One
        ``cuCtxGetCurrent``; a switch only when another context is current.
        """
        cur = self._current()
        cur_addr = int(cur)
        if cur_addr == addr:
            return None
        return self._switch(ctx, addr, cur, cur_addr)

    def _enter_device(self, device: int) -> tuple[Any, Any]:
        """:meth:`_enter` ``device``'s primary context: ``(ctx, what to restore)``."""
        ctx = self._contexts.get(device)
        if ctx is None:
            ctx = self._context(device)
        addr = self._ctx_addrs.get(device)
        return ctx, self._enter(ctx, int(ctx) if addr is None else addr)

    def _enter_host(self, *, any_context: bool = False) -> Any:
        """:meth:`_enter` for device-agnostic calls: one of our contexts, if none is current.

        Portable pinned memory and unified addressing make these calls
        independent of which device's context is current. Memory must not be
        allocated or registered in a foreign context, though: it would go
        when that context is destroyed. ``any_context``: any current context
        serves (queries).
        """
        cur = self._current()
        cur_addr = int(cur)
        if cur_addr in self._own_addrs or (any_context and cur_addr):
            return None
        contexts = self._contexts
        device = min(contexts) if contexts else 0
        ctx = self._context(device)
        return self._switch(ctx, int(ctx), cur, cur_addr)

    def _restoring(self, prev: Any, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, then make ``prev`` (from an ``_enter*``) current again.

        For the calls off the hot path (allocation, frees, destroys,
        synchronizes). The enqueue and query calls that run on an event loop
        keep the same steps inline: going through here costs about 140 ns more
        per call.
        """
        try:
            return call(*args)
        finally:
            if prev is not None:
                self._leave(prev)

    def _leave(self, prev: Any) -> None:
        """Make ``prev``, current before :meth:`_enter`, current again."""
        (err,) = driver.cuCtxSetCurrent(prev)
        if err:
            # The call itself was done: raising now would misreport it.
            _logger.warning(
                "gpuaio could not make the thread's CUDA context %#x current again: %s",
                int(prev),
                _error_text(err)[0],
            )

    def current_context(self) -> int:
        """``cuCtxGetCurrent``: the address of the calling thread's current context (0: none)."""
        return int(self._current())

    def set_current_context(self, ctx: int) -> None:
        """``cuCtxSetCurrent`` of the context at address ``ctx`` (0: none)."""
        _check("cuCtxSetCurrent", driver.cuCtxSetCurrent(driver.CUcontext(int(ctx))))

    def primary_context(self, device: int) -> int:
        """The address of ``device``'s primary context (retained on first use)."""
        return int(self._context(device))

    # -- devices -------------------------------------------------------
    def device_count(self) -> int:
        """Number of CUDA devices visible to this process."""
        return self._count

    def _attribute(self, device: int, attribute: Any) -> int:
        return int(
            _check(
                "cuDeviceGetAttribute",
                driver.cuDeviceGetAttribute(attribute, self._cu_device(device)),
            )
        )

    def device_properties(self, device: int) -> DeviceProperties:
        """Static properties of ``device`` (cached after the first query).

        ``stream_mem_ops`` is true on CUDA >= 12.0 drivers, where the v2
        stream memory operations that ``cuStreamWriteValue32`` and
        ``cuStreamWaitValue32`` map to are always available, or where the
        legacy ``CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1`` says so.
        """
        props = self._properties.get(device)
        if props is not None:
            return props
        cu_device = self._cu_device(device)
        name = _decode_c_string(_check("cuDeviceGetName", driver.cuDeviceGetName(256, cu_device)))
        total = int(_check("cuDeviceTotalMem", driver.cuDeviceTotalMem(cu_device)))
        bus_id = _decode_c_string(
            _check("cuDeviceGetPCIBusId", driver.cuDeviceGetPCIBusId(64, cu_device))
        )
        memops_v1 = getattr(_ATTR, "CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1", None)
        stream_mem_ops = self._driver_version_int >= 12000
        if not stream_mem_ops and memops_v1 is not None:
            try:
                stream_mem_ops = bool(self._attribute(device, memops_v1))
            except CudaError:
                stream_mem_ops = False
        props = DeviceProperties(
            ordinal=device,
            name=name,
            total_memory=total,
            compute_capability=(
                self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            ),
            multiprocessors=self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            pci_bus_id=bus_id,
            can_map_host_memory=bool(
                self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)
            ),
            stream_mem_ops=stream_mem_ops,
        )
        self._properties[device] = props
        return props

    def driver_version(self) -> str:
        """The CUDA version the driver supports, e.g. ``"13.0"``."""
        return self._driver_version

    def can_access_peer(self, device: int, peer: int) -> bool:
        """``cuDeviceCanAccessPeer``: whether ``device`` can map ``peer``'s memory.

        As in CUDA, a device is not its own peer (``False`` for ``device == peer``).
        """
        cu_device, cu_peer = self._cu_device(device), self._cu_device(peer)
        if device == peer:
            return False
        return bool(
            _check("cuDeviceCanAccessPeer", driver.cuDeviceCanAccessPeer(cu_device, cu_peer))
        )

    def enable_peer_access(self, device: int, peer: int) -> None:
        """``cuCtxEnablePeerAccess`` from ``device`` to ``peer`` (idempotent; no-op if equal)."""
        self._cu_device(device)
        self._cu_device(peer)
        if device == peer or (device, peer) in self._peers_enabled:
            return
        peer_ctx = self._context(peer)
        _, prev = self._enter_device(device)
        try:
            (err,) = driver.cuCtxEnablePeerAccess(peer_ctx, 0)
        finally:
            if prev is not None:
                self._leave(prev)
        if err and err != _PEER_ALREADY_ENABLED:
            raise _cuda_error("cuCtxEnablePeerAccess", err)
        self._peers_enabled.add((device, peer))

    # -- memory --------------------------------------------------------
    @staticmethod
    def _check_size(nbytes: int) -> None:
        if nbytes <= 0:
            raise InvalidArgumentError(f"allocation size must be positive, got {nbytes}")

    def mem_alloc(self, device: int, nbytes: int) -> int:
        """``cuMemAlloc`` on ``device``; returns the device address."""
        self._check_size(nbytes)
        _, prev = self._enter_device(device)
        try:
            ptr = int(_check("cuMemAlloc", driver.cuMemAlloc(nbytes)))
        finally:
            if prev is not None:
                self._leave(prev)
        self._allocations[ptr] = device
        return ptr

    def mem_alloc_managed(self, device: int, nbytes: int) -> int:
        """``cuMemAllocManaged`` (``CU_MEM_ATTACH_GLOBAL``) in ``device``'s context."""
        self._check_size(nbytes)
        _, prev = self._enter_device(device)
        try:
            result = driver.cuMemAllocManaged(nbytes, _ATTACH_GLOBAL)
        finally:
            if prev is not None:
                self._leave(prev)
        ptr = int(_check("cuMemAllocManaged", result))
        self._allocations[ptr] = device
        return ptr

    def mem_free(self, ptr: int) -> None:
        """``cuMemFree`` of device or managed memory, in its owner's context."""
        device = self._allocations.pop(ptr, None)
        if device is None:
            info = self.pointer_info(ptr)  # a foreign allocation: find its device
            device = info.device
        prev = self._enter_host() if device is None else self._enter_device(device)[1]
        result = self._restoring(prev, driver.cuMemFree, ptr)
        _check("cuMemFree", result)

    def host_alloc(self, nbytes: int) -> int:
        """``cuMemHostAlloc(PORTABLE | DEVICEMAP)``: pinned, mapped on every device."""
        self._check_size(nbytes)
        result = self._restoring(
            self._enter_host(), driver.cuMemHostAlloc, nbytes, _HOST_ALLOC_FLAGS
        )
        return int(_check("cuMemHostAlloc", result))

    def host_free(self, ptr: int) -> None:
        """``cuMemFreeHost`` of memory from :meth:`host_alloc`."""
        result = self._restoring(self._enter_host(), driver.cuMemFreeHost, ptr)
        _check("cuMemFreeHost", result)

    def host_register(self, ptr: int, nbytes: int) -> None:
        """``cuMemHostRegister(PORTABLE | DEVICEMAP)``: page-lock and map a host range."""
        self._check_size(nbytes)
        result = self._restoring(
            self._enter_host(), driver.cuMemHostRegister, ptr, nbytes, _HOST_REGISTER_FLAGS
        )
        _check("cuMemHostRegister", result)

    def host_unregister(self, ptr: int) -> None:
        """``cuMemHostUnregister`` of a range registered by :meth:`host_register`."""
        result = self._restoring(self._enter_host(), driver.cuMemHostUnregister, ptr)
        _check("cuMemHostUnregister", result)

    def host_device_pointer(self, ptr: int) -> int:
        """``cuMemHostGetDevicePointer``: the device address of mapped pinned memory."""
        result = self._restoring(self._enter_host(), driver.cuMemHostGetDevicePointer, ptr, 0)
        return int(_check("cuMemHostGetDevicePointer", result))

    def pointer_info(self, ptr: int) -> PointerInfo:
        """Classify ``ptr`` with one ``cuPointerGetAttributes`` call.

        Unknown addresses (``CUDA_ERROR_INVALID_VALUE`` or no memory type) are
        pageable; host memory the driver knows (allocated pinned or registered)
        is pinned; device memory is managed when the driver says so.
        """
        prev = self._enter_host(any_context=True)
        try:
            err, values = driver.cuPointerGetAttributes(3, _POINTER_ATTRIBUTES, ptr)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            if err == _INVALID_VALUE:
                return PointerInfo(MemoryKind.PAGEABLE, None)
            raise _cuda_error("cuPointerGetAttributes", err)
        memory_type, is_managed, ordinal = int(values[0]), bool(values[1]), int(values[2])
        device = ordinal if 0 <= ordinal < self._count else None
        if is_managed or memory_type == _MEMORYTYPE_UNIFIED:
            return PointerInfo(MemoryKind.MANAGED, device)
        if memory_type == _MEMORYTYPE_DEVICE:
            return PointerInfo(MemoryKind.DEVICE, device)
        if memory_type == _MEMORYTYPE_HOST:
            return PointerInfo(MemoryKind.PINNED, None)
        return PointerInfo(MemoryKind.PAGEABLE, None)

    # -- streams -------------------------------------------------------
    def stream_priority_range(self, device: int) -> tuple[int, int]:
        """``cuCtxGetStreamPriorityRange``: (least, greatest); greatest is lower."""
        cached = self._priority_ranges.get(device)
        if cached is not None:
            return cached
        _, prev = self._enter_device(device)
        try:
            result = driver.cuCtxGetStreamPriorityRange()
        finally:
            if prev is not None:
                self._leave(prev)
        least, greatest = _check("cuCtxGetStreamPriorityRange", result)
        cached = (int(least), int(greatest))
        self._priority_ranges[device] = cached
        return cached

    def stream_create(self, device: int, priority: int = 0) -> CudaStream:
        """``cuStreamCreateWithPriority(CU_STREAM_NON_BLOCKING, priority)`` on ``device``.

        The driver clamps ``priority`` into :meth:`stream_priority_range`.
        """
        ctx, prev = self._enter_device(device)
        try:
            result = driver.cuStreamCreateWithPriority(_STREAM_NON_BLOCKING, priority)
        finally:
            if prev is not None:
                self._leave(prev)
        handle = _check("cuStreamCreateWithPriority", result)
        return CudaStream(handle, device, ctx, owned=True)

    def stream_from_handle(self, device: int, handle: int) -> CudaStream:
        """Wrap a foreign ``CUstream`` address of ``device``; never destroyed here."""
        return CudaStream(driver.CUstream(int(handle)), device, self._context(device), owned=False)

    def stream_handle(self, stream: CudaStream) -> int:
        """The ``CUstream`` address of ``stream``."""
        return stream.address

    def stream_destroy(self, stream: CudaStream) -> None:
        """``cuStreamDestroy`` for owned streams (idempotent); foreign ones are left alone.

        Work already enqueued still completes.
        """
        if not stream.owned or stream.destroyed:
            return
        result = self._restoring(
            self._enter(stream.ctx, stream.ctx_addr), driver.cuStreamDestroy, stream.handle
        )
        _check("cuStreamDestroy", result)
        stream.destroyed = True

    def stream_synchronize(self, stream: CudaStream) -> None:
        """``cuStreamSynchronize``; the GIL is released while it blocks."""
        result = self._restoring(
            self._enter(stream.ctx, stream.ctx_addr), driver.cuStreamSynchronize, stream.handle
        )
        _check("cuStreamSynchronize", result)

    # -- enqueue -------------------------------------------------------
    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: CudaStream) -> None:
        """``cuMemcpyAsync`` between any two unified addresses.

        Follows CUDA's synchronization rules: with pageable memory on either
        side the call may block the calling thread until the copy is staged
        or done. ``nbytes == 0`` enqueues nothing.
        """
        if nbytes <= 0:
            if nbytes < 0:
                raise InvalidArgumentError(f"copy size must not be negative, got {nbytes}")
            return
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuMemcpyAsync(dst, src, nbytes, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuMemcpyAsync", err)

    def memcpy_peer_async(
        self,
        dst: int,
        dst_device: int,
        src: int,
        src_device: int,
        nbytes: int,
        stream: CudaStream,
    ) -> None:
        """``cuMemcpyPeerAsync`` between the two devices' primary contexts."""
        if nbytes <= 0:
            if nbytes < 0:
                raise InvalidArgumentError(f"copy size must not be negative, got {nbytes}")
            return
        dst_ctx = self._context(dst_device)
        src_ctx = self._context(src_device)
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuMemcpyPeerAsync(dst, dst_ctx, src, src_ctx, nbytes, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuMemcpyPeerAsync", err)

    def memset_async(
        self, ptr: int, value: int, itemsize: int, count: int, stream: CudaStream
    ) -> None:
        """``cuMemsetD{8,16,32}Async`` by ``itemsize``.

        ``value`` is taken modulo ``2 ** (8 * itemsize)``, so ``-1`` sets all
        bits. ``count == 0`` enqueues nothing.
        """
        call = _MEMSET_CALLS.get(itemsize)
        if call is None:
            raise InvalidArgumentError(f"memset item size must be 1, 2 or 4, got {itemsize}")
        if count <= 0:
            if count < 0:
                raise InvalidArgumentError(f"memset count must not be negative, got {count}")
            return
        name, fn, mask = call
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = fn(ptr, value & mask, count, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error(name, err)

    def _native_kernel(self, kernel: Any) -> CudaKernel:
        """A :class:`CudaKernel` for a ``cuda.core`` ``Kernel`` or a raw driver handle."""
        if isinstance(kernel, driver.CUfunction):
            return CudaKernel(kernel, "<CUfunction>", None, None)
        if isinstance(kernel, driver.CUkernel):
            return CudaKernel(driver.CUfunction(int(kernel)), "<CUkernel>", None, None)
        core = sys.modules.get("cuda.core")
        kernel_cls = getattr(core, "Kernel", None) if core is not None else None
        if kernel_cls is None or not isinstance(kernel, kernel_cls):
            raise InvalidArgumentError(
                f"cannot launch {type(kernel).__qualname__}: pass a kernel from compile(), "
                "a cuda.core Kernel, or a driver CUfunction/CUkernel"
            )
        try:
            cached = self._native_kernels.get(kernel)
        except TypeError:  # not hashable in this cuda.core version: no cache
            cached = None
        if cached is None:
            # The cache entry must not reference `kernel`, or it would never expire.
            function = driver.CUfunction(int(kernel.handle))
            cached = CudaKernel(function, "<cuda.core Kernel>", None, _param_sizes(kernel))
            with contextlib.suppress(TypeError):
                self._native_kernels[kernel] = cached
        return cached

    def launch(
        self,
        kernel: Any,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[Any],
        shared_mem: int,
        stream: CudaStream,
    ) -> None:
        """``cuLaunchKernel`` on ``stream`` (see the module docstring for argument lowering).

        ``kernel`` is a :class:`CudaKernel` from :meth:`compile`, a
        ``cuda.core`` ``Kernel``, or a ``driver.CUfunction``/``CUkernel``.
        """
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            k = kernel if type(kernel) is CudaKernel else self._native_kernel(kernel)
            params = _lower_args(args, k.param_sizes)
            gx, gy, gz = grid
            bx, by, bz = block
            try:
                (err,) = driver.cuLaunchKernel(
                    k.function, gx, gy, gz, bx, by, bz, shared_mem, stream.handle, params, 0
                )
            except (TypeError, OverflowError, ValueError) as exc:
                # Raised while packing arguments, before anything was enqueued.
                raise InvalidArgumentError(f"cannot launch {k.name}: {exc}") from exc
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuLaunchKernel", err)

    def launch_host_func(self, stream: CudaStream, fn: Callable[[], None]) -> None:
        """``cuLaunchHostFunc``: call ``fn()`` on a driver thread in stream order.

        ``fn`` stays referenced until it has run. Exceptions it raises are
        logged on the ``gpuaio`` logger, never propagated into the driver.
        The stream does not advance until ``fn`` returns, and ``fn`` needs
        the GIL: the GPU waits on Python while it runs. ``fn`` must not call
        CUDA. The driver skips host functions after a context error, so
        ``fn`` may then never run.
        """
        token = next(_host_fn_tokens)
        _pending_host_fns[token] = fn
        try:
            prev = self._enter(stream.ctx, stream.ctx_addr)
            try:
                (err,) = driver.cuLaunchHostFunc(stream.handle, _HOST_FN_HANDLE, token)
            finally:
                if prev is not None:
                    self._leave(prev)
        except BaseException:
            _pending_host_fns.pop(token, None)
            raise
        if err:
            _pending_host_fns.pop(token, None)
            raise _cuda_error("cuLaunchHostFunc", err)

    def stream_write_value32(self, stream: CudaStream, device_ptr: int, value: int) -> None:
        """``cuStreamWriteValue32`` (with a memory barrier); ``value`` is a uint32.

        ``device_ptr`` must be device memory or the device address of mapped
        pinned memory (:meth:`host_device_pointer`), never managed memory.
        """
        if not 0 <= value <= 0xFFFFFFFF:
            raise _uint32_error("cuStreamWriteValue32", value)
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuStreamWriteValue32(stream.handle, device_ptr, value, _WRITE_DEFAULT)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuStreamWriteValue32", err)

    def stream_wait_value32(self, stream: CudaStream, device_ptr: int, value: int) -> None:
        """``cuStreamWaitValue32(GEQ)``: later work waits until the word reaches ``value``.

        The comparison is CUDA's cyclic one, ``(int32_t)(*addr - value) >= 0``.
        """
        if not 0 <= value <= 0xFFFFFFFF:
            raise _uint32_error("cuStreamWaitValue32", value)
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuStreamWaitValue32(stream.handle, device_ptr, value, _WAIT_GEQ)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuStreamWaitValue32", err)

    # -- events --------------------------------------------------------
    def event_create(self, device: int, blocking_sync: bool = False) -> CudaEvent:
        """``cuEventCreate(CU_EVENT_DISABLE_TIMING [| CU_EVENT_BLOCKING_SYNC])``.

        With ``blocking_sync`` a thread in :meth:`event_synchronize` sleeps
        instead of spinning.
        """
        flags = _EVENT_DISABLE_TIMING | (_EVENT_BLOCKING_SYNC if blocking_sync else 0)
        ctx, prev = self._enter_device(device)
        try:
            result = driver.cuEventCreate(flags)
        finally:
            if prev is not None:
                self._leave(prev)
        handle = _check("cuEventCreate", result)
        return CudaEvent(handle, device, ctx)

    def event_destroy(self, event: CudaEvent) -> None:
        """``cuEventDestroy`` (idempotent); a pending record still completes."""
        if event.destroyed:
            return
        result = self._restoring(
            self._enter(event.ctx, event.ctx_addr), driver.cuEventDestroy, event.handle
        )
        _check("cuEventDestroy", result)
        event.destroyed = True

    def event_record(self, event: CudaEvent, stream: CudaStream) -> None:
        """``cuEventRecord``: ``event`` completes when ``stream``'s prior work has."""
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuEventRecord(event.handle, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuEventRecord", err)

    def event_query(self, event: CudaEvent) -> bool:
        """``cuEventQuery``: True when done, False on ``CUDA_ERROR_NOT_READY``, else raises."""
        prev = self._enter(event.ctx, event.ctx_addr)
        try:
            (err,) = driver.cuEventQuery(event.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if not err:
            return True
        if err == _NOT_READY:
            return False
        raise _cuda_error("cuEventQuery", err)

    def event_synchronize(self, event: CudaEvent) -> None:
        """``cuEventSynchronize``; the GIL is released while it blocks."""
        result = self._restoring(
            self._enter(event.ctx, event.ctx_addr), driver.cuEventSynchronize, event.handle
        )
        _check("cuEventSynchronize", result)

    def stream_wait_event(self, stream: CudaStream, event: CudaEvent) -> None:
        """``cuStreamWaitEvent``: later work on ``stream`` waits for ``event`` (any device)."""
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuStreamWaitEvent(stream.handle, event.handle, 0)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuStreamWaitEvent", err)

    # -- kernels -------------------------------------------------------
    def compile(
        self,
        device: int,
        source: str,
        name: str,
        options: Sequence[str],
        sim: Callable[..., None] | None,
    ) -> CudaKernel:
        """Compile CUDA C++ ``source`` for ``device`` with NVRTC and load kernel ``name``.

        Uses ``cuda.core``: ``Program(source, "c++", ProgramOptions(arch=sm_XY, ...))``
        compiled to a cubin for the device's compute capability, then
        ``ObjectCode.get_kernel(name)``. ``options`` are NVRTC flags; the
        supported ones (``-D``, ``-U``, ``-I``, ``-std=``, ``--use_fast_math``,
        ``--fmad=``, ``--ftz=``, ``--prec-div=``, ``--prec-sqrt=``, ``-G``,
        ``-lineinfo``, ``--maxrregcount=``, ``-arch=`` and a few more) are
        mapped onto ``ProgramOptions`` fields, any other raises
        :class:`~gpuaio._errors.InvalidArgumentError`. The kernel name must be
        unmangled (``extern "C"``). Compile errors and unknown kernel names
        raise ``InvalidArgumentError`` with NVRTC's log. ``sim`` is the
        simulated body used by the ``sim`` backend and is ignored here.

        The returned kernel is context-independent (a ``CUkernel``).
        """
        del sim  # only the sim backend runs Python bodies
        if not isinstance(source, str) or not isinstance(name, str):
            raise InvalidArgumentError("kernel source and name must be strings")
        major, minor = self.device_properties(device).compute_capability
        fields = _program_option_fields(f"sm_{major}{minor}", name, options)
        core = importlib.import_module("cuda.core")  # imported lazily: it takes ~0.5 s
        try:
            program_options = core.ProgramOptions(**fields)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"invalid compile options {list(options)!r}: {exc}") from exc
        _, prev = self._enter_device(device)
        try:
            # cuda.core keeps its own notion of the current device: with the
            # device's primary context current this finds it so and switches nothing.
            core.Device(device).set_current()
            kernel, object_code = self._load(core, source, name, program_options)
        finally:
            if prev is not None:
                self._leave(prev)
        function = driver.CUfunction(int(kernel.handle))
        return CudaKernel(function, name, device, _param_sizes(kernel), (kernel, object_code))

    @staticmethod
    def _load(core: Any, source: str, name: str, program_options: Any) -> tuple[Any, Any]:
        """Compile ``source`` to a cubin and get kernel ``name``: ``(kernel, object code)``."""
        program = core.Program(source, code_type="c++", options=program_options)
        try:
            object_code = program.compile("cubin")
        except Exception as exc:
            if not _is_nvrtc_error(exc):
                raise
            # cuda.core's NVRTCError carries NVRTC's log.
            raise InvalidArgumentError(f"compiling kernel {name!r} failed: {exc}") from exc
        finally:
            program.close()
        try:
            kernel = object_code.get_kernel(name)
        except Exception as exc:
            if "CUDA_ERROR_NOT_FOUND" in str(exc):
                raise InvalidArgumentError(
                    f'the compiled source has no kernel named {name!r} (declare it extern "C")'
                ) from exc
            mapped = _core_error_to_cuda("cuLibraryGetKernel", exc)
            if mapped is None:
                raise
            raise mapped from exc
        return kernel, object_code

    # -- lifecycle -----------------------------------------------------
    def close(self) -> None:
        """Release the primary contexts this backend retained (safe to call twice).

        Streams, events and memory created through the backend are invalid
        once the last reference to their context is gone. A later call
        retains the contexts again.
        """
        with self._lock:
            contexts, self._contexts = self._contexts, {}
            self._ctx_addrs, self._own_addrs = {}, set()
            self._priority_ranges.clear()
            self._peers_enabled.clear()
            for device in sorted(contexts):
                try:
                    (err,) = driver.cuDevicePrimaryCtxRelease(self._devices[device])
                except Exception:  # the driver may already be torn down at exit
                    _logger.debug("cuDevicePrimaryCtxRelease(%d) raised", device, exc_info=True)
                    continue
                if err:
                    _logger.debug("cuDevicePrimaryCtxRelease(%d) failed: %s", device, err)
