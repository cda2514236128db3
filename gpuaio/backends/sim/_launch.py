"""Simulated kernels: compile (a Python body stands for the source), launches, host functions.

A kernel body runs in the stream's worker with array arguments as writable
numpy views of the memory; one that raises faults the device, as a trapped
kernel does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ..._core.errors import InvalidArgumentError
from .._base import kernel_array_interface
from ._config import _INVALID_HANDLE, _INVALID_VALUE, _LAUNCH_FAILED, _error
from ._core import SimCore, _in_context
from ._memory import _view
from ._state import SimKernel, _Op


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
    lo, hi = _extent(shape, strides, dtype.itemsize)
    buf = _view(ptr + lo, hi - lo)
    return np.ndarray(shape, dtype=dtype, buffer=buf, offset=-lo, strides=strides)


def _extent(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """Byte offsets ``[lo, hi)`` from the first element that the elements lie in."""
    pairs = list(zip(shape, strides, strict=True))
    lo = sum((n - 1) * s for n, s in pairs if s < 0)
    hi = sum((n - 1) * s for n, s in pairs if s > 0) + itemsize
    return lo, hi


def _span(a: npt.NDArray[Any]) -> tuple[int, int]:
    """The address range ``[start, end)`` an array's elements lie in."""
    lo, hi = _extent(a.shape, a.strides, a.itemsize)
    return a.ctypes.data + lo, a.ctypes.data + hi


def _kernel_arg(arg: Any) -> Any:
    """A kernel argument as the sim kernel body sees it: arrays become numpy views.

    A gpuaio ``DeviceArray`` refuses its public ``__cuda_array_interface__`` on
    the sim (it is not CUDA memory to other libraries), so it is described
    through the private one (:func:`kernel_array_interface`).
    """
    cai = kernel_array_interface(arg)
    return arg if cai is None else _array_arg(cai)


class SimLaunch(SimCore):
    """The kernel calls of the simulated backend."""

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
            body = cast(Callable[..., None], kernel)  # narrowed to (...) -> object
            kernel = SimKernel(body, getattr(kernel, "__name__", ""))
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
        spans = tuple(
            _span(c) for a, c in zip(args, converted, strict=True) if c is not a and c.size
        )

        def run() -> None:
            fn(grid, block, *converted)

        cost = max(self.config.latency_s, kernel.duration_s)
        self._push(s, _Op(call, run, cost, fail_code=_LAUNCH_FAILED, spans=spans))

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
