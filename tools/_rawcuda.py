"""What the raw-driver probes share (``driver_lock_probe.py``, ``register_probe.py``).

Checked ``cuda.bindings`` calls, the driver with device 0's primary context
current, and gpuaio's own size syntax (``16M``, ``1GiB``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuaio._engine.pool import parse_size

__all__ = ["driver_on_device0", "ok", "parse_size"]


def ok(res: Any) -> Any:
    """The value(s) of a ``cuda.bindings`` call's result; raises on an error code."""
    err = res[0]
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return res[1] if len(res) == 2 else res[1:]


def driver_on_device0() -> tuple[Any, Any] | None:
    """``(cuda.bindings.driver, device 0's primary context)``, initialized, the
    context current in this thread (other threads make it current themselves).

    None (after saying so) where cuda.bindings is not installed.
    """
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        print("cuda.bindings is not installed: this probe needs a GPU")
        return None
    ok(cu.cuInit(0))
    dev = ok(cu.cuDeviceGet(0))
    ctx = ok(cu.cuDevicePrimaryCtxRetain(dev))
    ok(cu.cuCtxSetCurrent(ctx))
    return cu, ctx
