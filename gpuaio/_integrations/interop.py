"""Interop with CuPy, PyTorch and numba-cuda: arrays, streams and kernel launches.

Arrays need no helper in most cases: :class:`~gpuaio.DeviceArray` exports
``__cuda_array_interface__`` and DLPack, and every gpuaio call accepts
objects with the buffer protocol, ``__array_interface__``,
``__cuda_array_interface__`` or ``__dlpack__``. :func:`to_cupy` and
:func:`to_torch` are the zero-copy conversions :func:`gpuaio.prefetch` uses
for ``to="cupy"`` / ``to="torch"``.

Streams: a gpuaio :class:`~gpuaio.Stream` exports ``__cuda_stream__``
(cuda.core's protocol) and :attr:`~gpuaio.Stream.handle`;
:meth:`gpuaio.Device.wrap_stream` accepts a torch, CuPy or cuda.core stream,
so ``await dev.wrap_stream(torch.cuda.current_stream()).synchronize()``
waits, without blocking the event loop, for the work torch enqueued so far.

Kernels: cuda.core kernels (and driver ``CUfunction``/``CUkernel`` handles)
launch directly with :meth:`gpuaio.Stream.launch` (or wrap them with
:meth:`gpuaio.Kernel.wrap`). CuPy ``RawKernel``\\ s and numba-cuda kernels
launch through their own library, on the gpuaio stream, with
:func:`launch_cupy` and :func:`launch_numba`; any other library's work is
enqueued with :func:`enqueue`. Each returns an :class:`~gpuaio.Operation`
that completes when that work has run on the GPU.

Ordering rule: gpuaio may still hold work of a stream in its executor (a
staged copy of pageable memory waits there until its turn). Work another
library enqueues *directly* on ``stream.handle`` is therefore ordered only
after gpuaio work already handed to the driver. :func:`enqueue` (and the
launch helpers built on it) submit in gpuaio's order instead, after every
earlier gpuaio call on the stream. Launching on the handle directly is
correct once the earlier gpuaio operations have been awaited.

These helpers need the ``cuda`` backend (the simulated backend has no CUDA
stream for another library to use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._api.device import Stream
from .._api.memory import DeviceArray
from .._core.errors import InvalidArgumentError
from .._core.kernel import normalize_dim3
from .._core.operation import Operation

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


# -- arrays -----------------------------------------------------------------


def to_cupy(array: DeviceArray) -> Any:
    """A ``cupy.ndarray`` sharing ``array``'s memory (zero-copy).

    Goes through ``__cuda_array_interface__``; the CuPy array keeps ``array``
    (and so its allocation) alive. gpuaio operations are complete when their
    ``await`` returns, so there is no pending gpuaio work to order against
    CuPy's stream.
    """
    import cupy  # pyright: ignore[reportMissingImports]

    with cupy.cuda.Device(array.device):
        return cupy.asarray(array)


def to_torch(array: DeviceArray) -> Any:
    """A CUDA ``torch.Tensor`` sharing ``array``'s memory (zero-copy, DLPack).

    The tensor keeps ``array`` alive through the DLPack capsule's owner
    reference.
    """
    import torch  # pyright: ignore[reportMissingImports]

    return torch.from_dlpack(array)


def converter(to: str | Callable[[DeviceArray], Any]) -> Callable[[DeviceArray], Any]:
    """The conversion for a ``to=`` argument: ``"gpuaio"``, ``"cupy"``, ``"torch"`` or a callable.

    Imports the library named at once, so a missing one is reported when
    the caller asks for it rather than at the first batch.
    """
    if callable(to):
        return to
    if to == "gpuaio":
        return _identity
    if to in ("cupy", "torch"):
        try:
            __import__(to)
        except ImportError as exc:
            raise InvalidArgumentError(
                f"to={to!r} needs {to}, which cannot be imported: {exc}"
            ) from exc
        return to_cupy if to == "cupy" else to_torch
    raise InvalidArgumentError(
        f"to must be 'gpuaio', 'cupy', 'torch' or a callable taking a DeviceArray, not {to!r}"
    )


def _identity(array: DeviceArray) -> DeviceArray:
    return array


# -- streams ----------------------------------------------------------------


def _cuda_only(stream: Stream, what: str) -> None:
    if stream.device.backend != "cuda":
        raise InvalidArgumentError(
            f"{what} needs the cuda backend; this stream is on the {stream.device.backend} backend"
        )


def as_cupy_stream(stream: Stream) -> Any:
    """A ``cupy.cuda.ExternalStream`` on ``stream``'s ``CUstream`` (see the ordering rule)."""
    _cuda_only(stream, "as_cupy_stream")
    import cupy  # pyright: ignore[reportMissingImports]

    return cupy.cuda.ExternalStream(stream.handle, stream.device.ordinal)


def as_torch_stream(stream: Stream) -> Any:
    """A ``torch.cuda.ExternalStream`` on ``stream``'s ``CUstream`` (see the ordering rule)."""
    _cuda_only(stream, "as_torch_stream")
    import torch  # pyright: ignore[reportMissingImports]

    return torch.cuda.ExternalStream(stream.handle, device=f"cuda:{stream.device.ordinal}")


# -- foreign work -------------------------------------------------------------


def enqueue(
    stream: Stream,
    submit: Callable[[int], object],
    *,
    label: str = "foreign work",
    keep: Iterable[Any] = (),
) -> Operation:
    """Call ``submit(handle)`` in ``stream``'s order; it enqueues work on ``handle``.

    ``handle`` is the stream's ``CUstream`` address. ``submit`` runs after
    every earlier gpuaio call on the stream has been handed to the driver:
    at once on the calling thread when nothing is pending in gpuaio's
    executor, else on that executor's thread. It must only *enqueue* (not
    wait), and must not call back into gpuaio. The returned operation
    completes when the work ``submit`` enqueued has run; the objects in
    ``keep`` (and gpuaio allocations among them) stay alive and in use
    until then. An exception from ``submit`` is raised here when it ran at
    once, or fails the operation otherwise.
    """
    stream._check()
    kept = tuple(keep)
    infos = stream._array_args(kept)
    op = Operation(label, stream, keep=kept)
    stream._track(op, infos)
    handle = stream.handle

    def step(_native: Any) -> None:
        submit(handle)

    # On failure the sequencer resolves the op itself: at once if nothing was
    # enqueued, after the stream drained if something was.
    return stream._seq.gpu(op, step)


def launch_cupy(
    stream: Stream,
    kernel: Any,
    grid: int | Sequence[int],
    block: int | Sequence[int],
    args: Sequence[Any],
    *,
    shared_mem: int = 0,
) -> Operation:
    """Launch a CuPy ``RawKernel`` (or ``RawModule`` function) on ``stream``.

    ``args`` are what the kernel takes (CuPy arrays, numpy scalars such as
    ``np.int32(n)``); gpuaio arrays are passed as CuPy views of the same
    memory. The launch is submitted in gpuaio's order (see :func:`enqueue`);
    the returned operation completes when the kernel has run.
    """
    _cuda_only(stream, "launch_cupy")
    import cupy  # pyright: ignore[reportMissingImports]

    grid3 = normalize_dim3(grid, "grid")
    block3 = normalize_dim3(block, "block")
    ordinal = stream.device.ordinal
    converted = tuple(to_cupy(a) if isinstance(a, DeviceArray) else a for a in args)

    def submit(handle: int) -> None:
        with cupy.cuda.Device(ordinal), cupy.cuda.ExternalStream(handle, ordinal):
            kernel(grid3, block3, converted, shared_mem=shared_mem)

    name = getattr(kernel, "name", None) or type(kernel).__name__
    return enqueue(stream, submit, label=f"launch cupy {name}", keep=(kernel, *args, *converted))


def launch_numba(
    stream: Stream,
    kernel: Any,
    grid: int | Sequence[int],
    block: int | Sequence[int],
    args: Sequence[Any],
    *,
    shared_mem: int = 0,
) -> Operation:
    """Launch a numba-cuda kernel (a ``@cuda.jit`` dispatcher) on ``stream``.

    Equivalent to ``kernel[grid, block, stream, shared_mem](*args)`` with
    numba's view of the gpuaio stream; numba accepts gpuaio arrays through
    ``__cuda_array_interface__``. Submitted in gpuaio's order (see
    :func:`enqueue`); the returned operation completes when the kernel has
    run.
    """
    _cuda_only(stream, "launch_numba")
    from numba import cuda  # pyright: ignore[reportMissingImports]

    grid3 = normalize_dim3(grid, "grid")
    block3 = normalize_dim3(block, "block")
    ordinal = stream.device.ordinal
    call_args = tuple(args)

    def submit(handle: int) -> None:
        with cuda.gpus[ordinal]:
            ext = cuda.external_stream(handle)
            kernel[grid3, block3, ext, shared_mem](*call_args)

    name = getattr(kernel, "__name__", None) or type(kernel).__name__
    return enqueue(stream, submit, label=f"launch numba {name}", keep=(kernel, *call_args))
