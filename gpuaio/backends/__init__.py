"""Backends: ``cuda`` (the driver, through cuda.bindings) and ``sim`` (simulated).

The backend is chosen once per process, on first use, from the
``GPUAIO_BACKEND`` environment variable: ``cuda``, ``sim`` or ``auto`` (the
default: ``cuda`` when a driver and a device are present, else ``sim``).
"""

from __future__ import annotations

import os

from .._errors import NoDeviceError
from ._base import Backend, DeviceProperties, MemoryKind, PointerInfo

__all__ = ["Backend", "DeviceProperties", "MemoryKind", "PointerInfo", "create_backend"]


def create_backend(name: str | None = None) -> tuple[Backend, str]:
    """Create the backend named ``name`` (or by ``GPUAIO_BACKEND``).

    Returns the backend and a sentence saying why it was chosen.
    Raises :class:`NoDeviceError` when ``cuda`` is asked for explicitly and
    no device can be used.
    """
    choice = (name or os.environ.get("GPUAIO_BACKEND") or "auto").lower()
    if choice not in ("auto", "cuda", "sim"):
        raise ValueError(f"GPUAIO_BACKEND must be auto, cuda or sim, not {choice!r}")
    if choice in ("auto", "cuda"):
        try:
            from .cuda import CudaBackend

            return CudaBackend(), "a CUDA device was found"
        except NoDeviceError as exc:
            if choice == "cuda":
                raise
            reason = str(exc)
    else:
        reason = "GPUAIO_BACKEND=sim"
    from .sim import SimBackend, SimConfig

    return SimBackend(SimConfig.from_env()), f"simulated backend ({reason})"
