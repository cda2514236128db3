"""The simulated machine's shape and speed (:class:`SimConfig`), and its error codes.

The ``CUresult`` codes the sim raises, ``_error`` that turns one into the
gpuaio error CUDA's would become, and the constants the other modules share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..._core.errors import CudaError, InvalidArgumentError, make_cuda_error
from .._base import MemoryKind

CU_RESULT_NAMES: dict[int, str] = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    101: "CUDA_ERROR_INVALID_DEVICE",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    214: "CUDA_ERROR_ECC_UNCORRECTABLE",
    400: "CUDA_ERROR_INVALID_HANDLE",
    600: "CUDA_ERROR_NOT_READY",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT",
    710: "CUDA_ERROR_ASSERT",
    712: "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
    713: "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
    714: "CUDA_ERROR_HARDWARE_STACK_ERROR",
    715: "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    716: "CUDA_ERROR_MISALIGNED_ADDRESS",
    717: "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    718: "CUDA_ERROR_INVALID_PC",
    719: "CUDA_ERROR_LAUNCH_FAILED",
    999: "CUDA_ERROR_UNKNOWN",
}

_INVALID_VALUE = 1
_OUT_OF_MEMORY = 2
_DEINITIALIZED = 4
_INVALID_DEVICE = 101
_INVALID_CONTEXT = 201
_INVALID_HANDLE = 400
_ILLEGAL_ADDRESS = 700
_ALREADY_REGISTERED = 712
_NOT_REGISTERED = 713
_LAUNCH_FAILED = 719

_GIB = 1 << 30
_ALIGN = 256
_MIN_SLEEP_S = 20e-6  # below this, time.sleep overshoots more than it waits
_POLL_S = 20e-6
_JOIN_TIMEOUT_S = 2.0
_DEVICE_SIDE = (MemoryKind.DEVICE, MemoryKind.MANAGED)


def _error(call: str, code: int, detail: str = "") -> CudaError:
    return make_cuda_error(call, code, CU_RESULT_NAMES.get(code, f"CUresult_{code}"), detail)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Shape and speed of the simulated machine (bandwidths in GB/s, 1e9 bytes)."""

    devices: int = 1
    device_memory: int = 8 * _GIB
    """Per-device budget; ``cuMemAlloc`` beyond it fails with out-of-memory."""
    dma_gbps: float = 20.0
    """Pinned <-> device (and managed) copies."""
    pageable_gbps: float = 4.0
    """The driver's own staging of pageable memory."""
    d2d_gbps: float = 200.0
    """Copies and memsets within one device."""
    peer_gbps: float = 40.0
    host_gbps: float = 8.0
    """Driver host-to-host copies and host memsets."""
    latency_s: float = 5e-6
    """Fixed cost of every enqueued copy, memset, launch and stream-memory op."""
    priority_range: tuple[int, int] = (0, -5)
    """(least, greatest) stream priority."""
    launch_queue: int = 1024
    """Entries a stream holds not yet run before an enqueue blocks its caller
    until one has run (CUDA's per-stream launch queue is about 1,000 deep)."""
    host_func_entries: int = 18
    """Launch-queue entries one queued host function takes. On an H200 a held
    stream took 1,021 memsets but only 55 memsets each followed by a host
    function before an enqueue blocked."""
    marker_fault_delay_s: float = 0.0
    """After a sticky fault, how long a query of an event whose record was not
    reached yet keeps answering "not ready" before it reports the error. Any
    other call (a query of a never-recorded event included) reports it at once.
    On an H200 gpuaio's marker queries reported a trapped kernel about 250 ms
    after a never-recorded event's query did; the sticky-fault tests use 0.25."""

    def __post_init__(self) -> None:
        rates = (self.dma_gbps, self.pageable_gbps, self.d2d_gbps, self.peer_gbps, self.host_gbps)
        if self.devices < 1 or self.device_memory <= 0:
            raise InvalidArgumentError("SimConfig needs devices >= 1 and device_memory > 0")
        if self.launch_queue < 1 or self.host_func_entries < 1:
            raise InvalidArgumentError("SimConfig needs launch_queue, host_func_entries >= 1")
        if self.marker_fault_delay_s < 0:
            raise InvalidArgumentError("SimConfig.marker_fault_delay_s must be >= 0")
        if not all(r > 0 and math.isfinite(r) for r in rates) or self.latency_s < 0:
            raise InvalidArgumentError("SimConfig bandwidths must be > 0 and latency_s >= 0")
        if self.priority_range[1] > self.priority_range[0]:
            raise InvalidArgumentError(
                "SimConfig.priority_range is (least, greatest), least >= greatest"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimConfig:
        """Defaults overridden by ``GPUAIO_SIM_<FIELD>`` variables.

        e.g. ``GPUAIO_SIM_DEVICES=8``, ``GPUAIO_SIM_DMA_GBPS=55``,
        ``GPUAIO_SIM_PRIORITY_RANGE=0,-5``.
        """
        env = os.environ if environ is None else environ
        defaults = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"GPUAIO_SIM_{f.name.upper()}")
            if raw is None or not raw.strip():
                continue
            default = getattr(defaults, f.name)
            try:
                if isinstance(default, tuple):
                    values[f.name] = tuple(int(part) for part in raw.split(","))
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = float(raw)
            except ValueError:
                raise InvalidArgumentError(
                    f"GPUAIO_SIM_{f.name.upper()}={raw!r} is not a valid {f.name}"
                ) from None
        return cls(**values)
