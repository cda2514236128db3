"""gpuaio: CUDA copies, memsets and kernel launches as truly asynchronous awaitables.

No gpuaio call blocks the event loop, and every ``await`` returns only when
the operation is complete and every buffer it touched is safe to reuse.
Works on asyncio, uvloop and trio (through anyio)::

    import gpuaio, numpy as np

    dev = gpuaio.Device(0)
    async with dev.stream() as s:
        host = np.arange(1 << 20, dtype=np.float32)   # pageable is fine
        d = dev.empty(host.shape, host.dtype)
        await s.copy(d, host)
        await s.memset(d, 0)
"""

from __future__ import annotations

import contextlib as _contextlib
import importlib as _importlib
import sys as _sys

from ._api.device import Device, Event, Stream
from ._api.memory import BufferTypeError, DeviceArray, pinned_empty
from ._api.registration import HostRegistration, register_host, register_host_async
from ._api.runtime import configure, current_runtime, reserve_pinned, use_backend

# Imported here, not on first use, so that a first transfer inside a running
# event loop does not pay for module imports on the loop thread.
from ._core import dlpack as _dlpack  # noqa: F401  (preloaded, see above)
from ._core.errors import (
    BufferFreedError,
    CudaError,
    DeviceFatalError,
    ForkedProcessError,
    GpuaioError,
    InvalidArgumentError,
    NoDeviceError,
    OperationAbortedError,
    StreamClosedError,
)
from ._core.kernel import Kernel
from ._core.operation import Operation, wait_all
from ._core.progress import ProgressCallback, progress_bar
from ._core.trace import Tracer, trace
from ._engine import staging as _staging  # noqa: F401  (preloaded, see above)
from ._engine.completion import STRATEGIES, Strategy
from ._engine.pool import PoolStats
from ._integrations.loader import Prefetcher, prefetch
from ._integrations.multi import gather, scatter
from .backends import MemoryKind

# anyio imports its event-loop backends on first use, which for gpuaio is the
# first awaited operation, on the loop thread (20-35 ms idle, ~100 ms on a
# loaded machine). Import them now: asyncio's always, trio's if trio is in use.
for _backend in ("asyncio", "trio"):
    if _backend == "asyncio" or "trio" in _sys.modules:
        with _contextlib.suppress(ImportError):
            _importlib.import_module(f"anyio._backends._{_backend}")
del _backend

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "BufferFreedError",
    "BufferTypeError",
    "CudaError",
    "Device",
    "DeviceArray",
    "DeviceFatalError",
    "Event",
    "ForkedProcessError",
    "GpuaioError",
    "HostRegistration",
    "InvalidArgumentError",
    "Kernel",
    "MemoryKind",
    "NoDeviceError",
    "Operation",
    "OperationAbortedError",
    "PoolStats",
    "Prefetcher",
    "ProgressCallback",
    "Stream",
    "Strategy",
    "StreamClosedError",
    "Tracer",
    "__version__",
    "backend_name",
    "configure",
    "gather",
    "memory_kind",
    "pinned_empty",
    "prefetch",
    "progress_bar",
    "register_host",
    "register_host_async",
    "reserve_pinned",
    "scatter",
    "trace",
    "use_backend",
    "wait_all",
]


def backend_name() -> str:
    """The active backend: ``"cuda"`` or ``"sim"`` (choosing it if not yet chosen)."""
    return current_runtime().backend.name


def memory_kind(buffer: object) -> MemoryKind:
    """How gpuaio classifies ``buffer`` (pageable, pinned, device or managed)."""
    from ._api.describe import describe

    return describe(buffer, current_runtime(), "buffer").kind
