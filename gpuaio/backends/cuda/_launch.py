"""Kernel launches and host functions on a stream.

Kernel arguments. :meth:`LaunchCalls.launch` lowers each argument to the
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

Host functions. :meth:`LaunchCalls.launch_host_func` enqueues one ctypes
trampoline, created at import and never freed, that calls the registered
Python callable on the driver's thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import cuda.bindings.driver as driver
import numpy as np

from ..._core.errors import InvalidArgumentError
from .._base import kernel_array_interface
from ._compile import CudaKernel, _param_sizes
from ._driver import DriverBase, _cuda_error
from ._streams import CudaStream

_logger = logging.getLogger("gpuaio")

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
    cai = kernel_array_interface(arg)
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
            cai = kernel_array_interface(arg)
            if cai is not None and (size is None or size == _POINTER_SIZE):
                values[i], types[i] = int(cai["data"][0]), _c_void_p
            else:
                values[i], types[i] = _lower_slow(arg, i, size)
    return tuple(values), tuple(types)


class LaunchCalls(DriverBase):
    """The launch calls of :class:`~gpuaio.backends.cuda.CudaBackend`."""

    def __init__(self) -> None:
        super().__init__()
        self._native_kernels: weakref.WeakKeyDictionary[Any, CudaKernel] = (
            weakref.WeakKeyDictionary()
        )

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
