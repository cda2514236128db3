"""gpuaio's exception hierarchy.

Every exception gpuaio raises derives from :class:`GpuaioError`. Errors about
bad input also derive from the builtin they refine (``ValueError`` or
``TypeError``) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "BufferFreedError",
    "ClosedWhilePendingError",
    "CudaError",
    "DeviceFatalError",
    "ForkedProcessError",
    "GpuaioError",
    "InvalidArgumentError",
    "NoDeviceError",
    "OperationAbortedError",
    "StreamClosedError",
    "sticky_error_codes",
]


class GpuaioError(Exception):
    """Base class of every exception raised by gpuaio."""


class InvalidArgumentError(GpuaioError, ValueError):
    """An argument was rejected before anything was enqueued.

    Raised for size, dtype, shape, layout, writability or device mismatches.
    Nothing has been submitted to the GPU when this is raised.
    """


class BufferFreedError(GpuaioError, ValueError):
    """A buffer was used after it was freed."""


class StreamClosedError(GpuaioError, RuntimeError):
    """An operation was submitted to a stream that has been closed."""


class NoDeviceError(GpuaioError, RuntimeError):
    """The requested device (or any CUDA device) is not available."""


class OperationAbortedError(GpuaioError, RuntimeError):
    """The operation was aborted before it completed (see :meth:`Operation.abort`)."""


class CudaError(GpuaioError, RuntimeError):
    """A CUDA driver call failed.

    Attributes:
        call: the driver entry point that failed, e.g. ``"cuMemcpyAsync"``.
        code: the numeric ``CUresult``.
        name: the ``CUresult`` name, e.g. ``"CUDA_ERROR_INVALID_VALUE"``.
    """

    def __init__(self, call: str, code: int, name: str, detail: str = "") -> None:
        self.call = call
        self.code: int = int(code)
        self.name = name
        self.detail = detail
        msg = f"{call} failed: {name} ({self.code})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.call, self.code, self.name, self.detail))


class DeviceFatalError(CudaError):
    """A sticky (context-fatal) CUDA error.

    The device's context is unusable for the rest of the process: every
    pending and every later operation on that device fails with this error.
    """


class ForkedProcessError(DeviceFatalError):
    """gpuaio was used in a process forked after gpuaio had initialized its backend.

    CUDA does not survive ``fork``: in the child every driver call fails
    (``CUDA_ERROR_NOT_INITIALIZED``), so every gpuaio call on what the child
    inherited (the runtime, its devices, streams, arrays and pending
    operations) raises this at once, and nothing is freed: the child leaks
    what it inherited rather than touch the parent's driver state. The
    simulated backend behaves the same way. Start worker processes with the
    ``spawn`` or ``forkserver`` multiprocessing start method, or fork before
    gpuaio is first used. The message says which.
    """

    def __init__(
        self,
        call: str,
        code: int = 3,
        name: str = "CUDA_ERROR_NOT_INITIALIZED",
        detail: str = "",
    ) -> None:
        super().__init__(call, code, name, detail)
        # The advice is the message; the call and the code are attributes.
        self.args: tuple[str] = (
            detail or f"{call}: this process was forked after gpuaio initialized",
        )


# CUresult codes after which the context is corrupted for good
# (see the CUDA driver API's error documentation).
sticky_error_codes: frozenset[int] = frozenset(
    {
        214,  # CUDA_ERROR_ECC_UNCORRECTABLE
        700,  # CUDA_ERROR_ILLEGAL_ADDRESS
        702,  # CUDA_ERROR_LAUNCH_TIMEOUT
        710,  # CUDA_ERROR_ASSERT
        714,  # CUDA_ERROR_HARDWARE_STACK_ERROR
        715,  # CUDA_ERROR_ILLEGAL_INSTRUCTION
        716,  # CUDA_ERROR_MISALIGNED_ADDRESS
        717,  # CUDA_ERROR_INVALID_ADDRESS_SPACE
        718,  # CUDA_ERROR_INVALID_PC
        719,  # CUDA_ERROR_LAUNCH_FAILED
    }
)


def make_cuda_error(call: str, code: int, name: str, detail: str = "") -> CudaError:
    """Return the right :class:`CudaError` subclass for ``code``."""
    cls = DeviceFatalError if int(code) in sticky_error_codes else CudaError
    return cls(call, code, name, detail)


class ClosedWhilePendingError(RuntimeError):
    """The runtime (its completion engine) closed while the operation was pending.

    A ``RuntimeError``, as before it had a class of its own; the class lets an
    unretrieved one stay quiet (shutdown, not a failure of the work).
    """

    def __init__(self) -> None:
        super().__init__("gpuaio completion engine closed with the operation pending")
