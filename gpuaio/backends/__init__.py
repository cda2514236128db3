"""Backends: ``cuda`` (the driver, through cuda.bindings) and ``sim`` (simulated).

The backend is chosen once per process, on first use, from the
``GPUAIO_BACKEND`` environment variable:

* unset (the default): ``cuda``; with no usable driver or device the first
  device use raises :class:`~gpuaio.NoDeviceError`, whose one-line message says
  why and names ``GPUAIO_BACKEND=sim``. gpuaio never runs on the simulator
  unless asked to.
* ``cuda``: the same, asked for explicitly.
* ``sim``: the simulated backend.
* ``auto``: ``cuda`` when a driver and a device are present, else ``sim``,
  with a WARNING on the ``gpuaio`` logger saying why it fell back.
"""

from __future__ import annotations

import logging
import os

from .._core.errors import NoDeviceError
from ._base import Backend, DeviceProperties, MemoryKind, PointerInfo

__all__ = ["Backend", "DeviceProperties", "MemoryKind", "PointerInfo", "create_backend"]

_log = logging.getLogger("gpuaio")

_CHOICES = ("auto", "cuda", "sim")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def create_backend(name: str | None = None) -> tuple[Backend, str]:
    """Create the backend named ``name`` (or by ``GPUAIO_BACKEND``).

    Returns the backend and a sentence saying why it was chosen.
    Raises :class:`NoDeviceError` (one line, naming ``GPUAIO_BACKEND=sim``)
    when ``cuda`` is asked for, or nothing is asked for, and no device can be
    used. Only ``auto`` falls back to the simulated backend, and it logs a
    WARNING on the ``gpuaio`` logger when it does.
    """
    env = os.environ.get("GPUAIO_BACKEND")
    choice = (name or env or "").lower()
    if choice and choice not in _CHOICES:
        what = "use_backend()" if name else "GPUAIO_BACKEND"
        raise ValueError(f"{what} must be auto, cuda or sim, not {choice!r}")
    if choice in ("", "auto", "cuda"):
        try:
            from .cuda import CudaBackend

            return CudaBackend(), "a CUDA device was found"
        except (NoDeviceError, ImportError) as exc:
            why = _one_line(str(exc)).rstrip(".") or type(exc).__name__
            if choice != "auto":
                if choice == "":
                    asked = "GPUAIO_BACKEND is not set, so a GPU is required"
                elif name:
                    asked = "use_backend('cuda')"
                else:
                    asked = "GPUAIO_BACKEND=cuda"
                raise NoDeviceError(
                    f"no usable CUDA device ({asked}): {why}; "
                    "set GPUAIO_BACKEND=sim to run on gpuaio's simulated backend instead"
                ) from exc
            _log.warning(
                "gpuaio: no usable CUDA device (%s); backend auto falls back to the "
                "simulated backend, whose 'device' memory is host memory",
                why,
            )
            reason = f"auto fell back from cuda: {why}"
    else:
        reason = "GPUAIO_BACKEND=sim"
    from .sim import SimBackend, SimConfig

    return SimBackend(SimConfig.from_env()), f"simulated backend ({reason})"
