"""Interop with CuPy, PyTorch and numba-cuda: arrays, streams and kernel launches.

* Arrays: :func:`to_cupy` / :func:`to_torch` view a gpuaio array without a
  copy (CAI / DLPack); every gpuaio call already accepts CuPy, torch, numba
  and numpy arrays, and anything with the buffer protocol,
  ``__array_interface__``, ``__cuda_array_interface__`` or ``__dlpack__``.
* Streams: ``Device.wrap_stream(torch_or_cupy_stream)`` lets gpuaio await
  work those libraries enqueued; :func:`as_cupy_stream` /
  :func:`as_torch_stream` go the other way.
* Kernels: cuda.core kernels launch with :meth:`gpuaio.Stream.launch`;
  :func:`launch_cupy` (``RawKernel``) and :func:`launch_numba`
  (``@cuda.jit``) launch through their own library on a gpuaio stream, and
  :func:`enqueue` submits any other library's work, each returning an
  awaitable :class:`~gpuaio.Operation`.

Ordering rule: work a library enqueues directly on ``stream.handle`` is
ordered after gpuaio work already handed to the driver, which may not yet
include a staged (pageable) copy submitted earlier. :func:`enqueue` and the
launch helpers submit in gpuaio's own order. ``import gpuaio.interop``
imports none of those libraries; each helper imports the one it needs.
"""

from __future__ import annotations

from ._integrations.interop import (
    as_cupy_stream,
    as_torch_stream,
    converter,
    enqueue,
    launch_cupy,
    launch_numba,
    to_cupy,
    to_torch,
)

__all__ = [
    "as_cupy_stream",
    "as_torch_stream",
    "converter",
    "enqueue",
    "launch_cupy",
    "launch_numba",
    "to_cupy",
    "to_torch",
]
