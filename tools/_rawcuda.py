"""What the raw-driver probes share (``driver_lock_probe.py``, ``register_probe.py``).

Checked ``cuda.bindings`` calls, the driver with device 0's primary context
current, and gpuaio's own size syntax (``16M``, ``1GiB``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuaio._engine.pool import parse_size

__all__ = [
    "aligned",
    "driver_copy",
    "driver_on_device0",
    "interleaved",
    "load_torch",
    "ok",
    "parse_size",
    "probe_parser",
    "report",
    "run_probe",
    "write_records",
]


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


def probe_parser(doc: str | None, sizes: str, reps: int) -> argparse.ArgumentParser:
    """The options every probe takes: ``--sizes`` (gpuaio's syntax, comma-separated),
    ``--reps`` and ``--out`` (a directory for its JSON)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--sizes", default=sizes, help=f"comma-separated sizes (default {sizes})")
    p.add_argument("--reps", type=int, default=reps, help=f"repetitions (default {reps})")
    p.add_argument("--out", help="directory for the JSON")
    return p


def driver_copy(cu: Any, stream: Any, dst: int, src: int, n: int) -> Callable[[], None]:
    """A call of the driver's own copy of ``n`` bytes (``cuMemcpyAsync``, then
    ``cuStreamSynchronize`` of ``stream``): the blocking baseline of a probe."""

    def call() -> None:
        ok(cu.cuMemcpyAsync(dst, src, n, stream))
        ok(cu.cuStreamSynchronize(stream))

    return call


def run_probe(
    doc: str | None,
    sizes: tuple[str, ...],
    main_async: Callable[[Any], Awaitable[Any]],
    name: str,
) -> int:
    """A probe's ``main``: parse the common options (default ``sizes``, 15
    repetitions), run ``main_async(args)`` under anyio, write what it returns
    as ``--out``/``name``."""
    args = probe_parser(doc, ",".join(sizes), 15).parse_args()
    write_records(args.out, name, anyio.run(main_async, args))
    return 0


def write_records(out: str | None, name: str, records: Any) -> None:
    """Write ``records`` as ``out/name`` (indented JSON), if ``out`` was given."""
    if not out:
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(records, indent=1))


def load_torch() -> Any:
    """torch, where it is installed and sees a GPU; else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def aligned(n: int, off: int, fill: int) -> np.ndarray[Any, Any]:
    """A pre-touched ``n``-byte array at page + ``off`` bytes."""
    a = np.full(n + 8192, fill, np.uint8)
    start = (-a.ctypes.data) % 4096 + off
    return a[start : start + n]


async def interleaved(
    methods: dict[str, Callable[[], Any]],
    reps: int,
    inner: int,
    before_warm: Callable[[], None] | None = None,
    after_warm: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Microseconds per call of each method, ``inner`` calls a sample, one
    sample of each in turn per round, ``reps`` rounds after one that warms
    every path (and runs ``before_warm()`` before each method, ``after_warm(name)``
    after it). A method named ``gpuaio*`` or ``aw_*`` returns an awaitable, awaited."""
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for rep in range(reps + 1):
        for name, fn in methods.items():
            if not rep and before_warm is not None:
                before_warm()
            awaited = name.startswith(("gpuaio", "aw_"))
            t0 = time.perf_counter()
            for _ in range(inner):
                r = fn()
                if awaited:
                    await r
            dt = (time.perf_counter() - t0) / inner * 1e6
            if rep:
                samples[name].append(dt)
            elif after_warm is not None:
                after_warm(name)
    return samples


def report(
    size: str, n: int, inner: int, reps: int, samples: dict[str, list[float]]
) -> dict[str, Any]:
    """Print each method's median (us, GB/s) for ``size``; return them as a record."""
    med = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    print(f"{size} ({inner} per sample, {reps} rounds): us, GB/s", flush=True)
    for k, v in med.items():
        print(f"  {k:22s} {v:9.1f}  {n / (v * 1e-6) / 1e9:6.2f}", flush=True)
    return {"us": med, "inner": inner, "reps": reps}
