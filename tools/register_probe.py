"""Mid-size pageable copies: the driver's own path against registering the buffer in place.

Issue 13, item 7 asks whether registering a pageable buffer in place
(``cuMemHostRegister``, a DMA straight from or into it, ``cuMemHostUnregister``)
beats staging. At 64 MiB-1 GiB it did not (13.8-16.8 GB/s against staging's
28-32). This probe asks the same at 1-16 MiB, where gpuaio now uses the
driver's own pageable path (``cuMemcpyAsync`` from or into pageable memory),
and where torch and CuPy beat gpuaio. Per size and direction, interleaved
repetitions, medians in microseconds, one process:

* ``driver``: ``cuMemcpyAsync`` with the pageable buffer, then
  ``cuStreamSynchronize`` (what torch's ``copy_`` does);
* ``register``: register, DMA, synchronize, unregister, with each step
  timed (the buffer is pre-touched; its address is not page aligned, as a
  NumPy array's is not);
* ``registered``: the DMA alone from a buffer registered once (the floor);
* ``torch``: ``copy_(non_blocking=True)`` and ``torch.cuda.synchronize()``,
  when torch is installed.

Prints a table and writes ``register_probe.json`` to ``--out``. GPU only.
"""

# The per-size closures below run within their own iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _rawcuda import driver_on_device0, ok, parse_size

SIZES = ("1M", "4M", "16M", "64M")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--out", help="directory for register_probe.json")
    args = p.parse_args()
    found = driver_on_device0()
    if found is None:
        return 2
    cu, _ctx = found
    stream = ok(cu.cuStreamCreate(1))
    try:
        import torch

        torch.cuda.init()
    except Exception:  # torch is optional
        torch = None  # type: ignore[assignment]

    results: dict[str, dict[str, float]] = {}
    for size in args.sizes.split(","):
        n = parse_size(size)
        host = np.full(n + 4096, 0x5A, np.uint8)[16 : 16 + n]  # not page aligned
        reg_host = np.full(n + 4096, 0x5A, np.uint8)[16 : 16 + n]
        d = ok(cu.cuMemAlloc(n))
        hp, rp = host.ctypes.data, reg_host.ctypes.data
        ok(cu.cuMemHostRegister(rp, n, 0))
        tdev = torch.empty(n, dtype=torch.uint8, device="cuda") if torch is not None else None
        thost = torch.from_numpy(host) if torch is not None else None

        for direction in ("h2d", "d2h"):
            h2d = direction == "h2d"
            steps: dict[str, list[float]] = {}

            def timed(name: str, fn: Callable[[], Any], out: dict[str, list[float]]) -> None:
                t0 = time.perf_counter()
                fn()
                out.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)

            def copy(ptr: int) -> None:
                if h2d:
                    ok(cu.cuMemcpyAsync(d, ptr, n, stream))
                else:
                    ok(cu.cuMemcpyAsync(ptr, d, n, stream))

            def driver() -> None:
                copy(hp)
                ok(cu.cuStreamSynchronize(stream))

            def registered() -> None:
                copy(rp)
                ok(cu.cuStreamSynchronize(stream))

            def register() -> None:
                sub: dict[str, list[float]] = {}
                timed("reg", lambda: ok(cu.cuMemHostRegister(hp, n, 0)), sub)
                timed("dma", lambda: (copy(hp), ok(cu.cuStreamSynchronize(stream))), sub)
                timed("unreg", lambda: ok(cu.cuMemHostUnregister(hp)), sub)
                for k, v in sub.items():
                    steps.setdefault(f"register.{k}", []).extend(v)

            def torch_copy() -> None:
                assert torch is not None and tdev is not None and thost is not None
                if h2d:
                    tdev.copy_(thost, non_blocking=True)
                else:
                    thost.copy_(tdev, non_blocking=True)
                torch.cuda.synchronize()

            methods: dict[str, Callable[[], None]] = {
                "driver": driver,
                "register": register,
                "registered": registered,
            }
            if torch is not None:
                methods["torch"] = torch_copy
            for fn in methods.values():  # warm-up
                fn()
            steps.clear()
            for _ in range(args.reps):
                for name, fn in methods.items():
                    timed(name, fn, steps)
            med = {k: round(statistics.median(v), 1) for k, v in steps.items()}
            key = f"{direction}_{size}"
            results[key] = med
            gbps = {k: round(n / (med[k] * 1e-6) / 1e9, 2) for k in methods}
            print(f"{key:10s} us {med}", flush=True)
            print(f"{'':10s} GB/s {gbps}", flush=True)
        ok(cu.cuMemHostUnregister(rp))
        ok(cu.cuMemFree(d))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "register_probe.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
