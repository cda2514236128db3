"""Which driver entry point and stream copy pageable memory fastest?

In ``benchmarks/transfers.py`` runs on H200s, torch's and CuPy's downloads
into the same pre-touched pageable buffer beat the raw ``cuMemcpyAsync`` +
``cuStreamSynchronize`` on gpuaio's stream by up to 2x at 16 MiB (runs W, Y,
AA), while in ``parallel_copy_probe.py`` (no gpuaio) the raw call matched
torch. Torch and CuPy call the runtime on the legacy default stream; gpuaio
calls the driver's generic ``cuMemcpyAsync`` on a non-blocking stream.

This probe times, in one process and interleaved (medians of ``--reps``,
microseconds), each way of copying ``n`` bytes between device memory and a
pre-touched pageable buffer, then waiting for it:

* ``generic``: ``cuMemcpyAsync`` on a non-blocking stream (gpuaio's call);
* ``typed``: ``cuMemcpyDtoHAsync`` / ``cuMemcpyHtoDAsync`` on that stream;
* ``legacy``: ``cuMemcpyAsync`` on the legacy default stream (handle 0);
* ``per_thread``: ``cuMemcpyAsync`` on the per-thread default stream;
* ``sync``: ``cuMemcpyDtoH`` / ``cuMemcpyHtoD``;
* ``gpuaio_backend``: gpuaio's ``backend.memcpy_async`` on a gpuaio stream;
* ``torch``: ``copy_`` (where torch is installed);

first with gpuaio imported but idle, then again after gpuaio has run staged
copies of the same size (its pinned pool and copy threads up).

Writes ``copy-path-probe.json`` with ``--out``. GPU only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _rawcuda import driver_on_device0, ok, parse_size

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", default="4M,16M,64M")
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--out")
    args = p.parse_args()
    found = driver_on_device0()
    if found is None:
        return 2
    cu, _ctx = found
    import gpuaio
    from gpuaio._api.runtime import current_runtime

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    big = max(sizes)
    nb = ok(cu.cuStreamCreate(1))
    legacy = cu.CUstream(0)
    per_thread = cu.CUstream(2)  # CU_STREAM_PER_THREAD
    d = ok(cu.cuMemAlloc(big))
    host = np.full(big, 0x3C, np.uint8)
    ok(cu.cuMemcpyHtoD(d, host.ctypes.data, big))
    dev = gpuaio.Device(0)
    gs = dev.stream()
    be = current_runtime().backend
    gd = dev.empty(big)
    torch: Any = None
    try:
        import torch as _torch

        if _torch.cuda.is_available():
            torch = _torch
    except ImportError:
        pass
    records: list[dict[str, Any]] = []

    def ways(n: int, h2d: bool) -> dict[str, Callable[[], None]]:
        hp = host.ctypes.data
        dd = int(d)
        w: dict[str, Callable[[], None]] = {}
        if h2d:
            w["generic"] = lambda: (cu.cuMemcpyAsync(dd, hp, n, nb), cu.cuStreamSynchronize(nb))
            w["typed"] = lambda: (cu.cuMemcpyHtoDAsync(dd, hp, n, nb), cu.cuStreamSynchronize(nb))
            w["legacy"] = lambda: (
                cu.cuMemcpyAsync(dd, hp, n, legacy),
                cu.cuStreamSynchronize(legacy),
            )
            w["per_thread"] = lambda: (
                cu.cuMemcpyAsync(dd, hp, n, per_thread),
                cu.cuStreamSynchronize(per_thread),
            )
            w["sync"] = lambda: cu.cuMemcpyHtoD(dd, hp, n)
            w["gpuaio_backend"] = lambda: (
                be.memcpy_async(gd.ptr, hp, n, gs._native),
                be.stream_synchronize(gs._native),
            )
        else:
            w["generic"] = lambda: (cu.cuMemcpyAsync(hp, dd, n, nb), cu.cuStreamSynchronize(nb))
            w["typed"] = lambda: (cu.cuMemcpyDtoHAsync(hp, dd, n, nb), cu.cuStreamSynchronize(nb))
            w["legacy"] = lambda: (
                cu.cuMemcpyAsync(hp, dd, n, legacy),
                cu.cuStreamSynchronize(legacy),
            )
            w["per_thread"] = lambda: (
                cu.cuMemcpyAsync(hp, dd, n, per_thread),
                cu.cuStreamSynchronize(per_thread),
            )
            w["sync"] = lambda: cu.cuMemcpyDtoH(hp, dd, n)
            w["gpuaio_backend"] = lambda: (
                be.memcpy_async(hp, gd.ptr, n, gs._native),
                be.stream_synchronize(gs._native),
            )
        if torch is not None:
            t_host = torch.from_numpy(host[:n])
            t_dev = torch.empty(n, dtype=torch.uint8, device="cuda")
            if h2d:
                w["torch"] = lambda: (t_dev.copy_(t_host), torch.cuda.synchronize())
            else:
                w["torch"] = lambda: (t_host.copy_(t_dev), torch.cuda.synchronize())
        return w

    def measure(phase: str) -> None:
        for n in sizes:
            for h2d in (True, False):
                w = ways(n, h2d)
                times: dict[str, list[float]] = {k: [] for k in w}
                for fn in w.values():
                    fn()  # warm
                order = list(w.items())
                rng = random.Random(n)
                for _ in range(args.reps):
                    # Shuffled each round: a copy runs slower after some kinds
                    # of work than after others (caches, TLB).
                    rng.shuffle(order)
                    for k, fn in order:
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
                meds = {k: statistics.median(v) * 1e6 for k, v in times.items()}
                dirn = "h2d" if h2d else "d2h"
                records.append({"phase": phase, "dir": dirn, "bytes": n, **meds})
                print(
                    f"  {phase:>12} {dirn} {n >> 20:>4} MiB: "
                    + "  ".join(f"{k} {v:8.1f}" for k, v in meds.items()),
                    flush=True,
                )

    measure("idle gpuaio")

    async def staged() -> None:
        for n in sizes:
            src = np.full(n, 7, np.uint8)
            back = np.zeros(n, np.uint8)
            for _ in range(3):
                await gs.copy(gd[:n], src)
                await gs.copy(back, gd[:n])

    asyncio.run(staged())
    measure("after gpuaio")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "copy-path-probe.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
