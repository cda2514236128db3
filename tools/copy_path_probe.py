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

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _rawcuda import driver_on_device0, load_torch, ok, parse_size, probe_parser, write_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = probe_parser(__doc__, "4M,16M,64M", 25)
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
    torch = load_torch()
    records: list[dict[str, Any]] = []

    def ways(n: int, h2d: bool) -> dict[str, Callable[[], None]]:
        hp, dd = host.ctypes.data, int(d)
        dst, src = (dd, hp) if h2d else (hp, dd)
        g_dst, g_src = (gd.ptr, hp) if h2d else (hp, gd.ptr)
        typed = cu.cuMemcpyHtoDAsync if h2d else cu.cuMemcpyDtoHAsync
        blocking = cu.cuMemcpyHtoD if h2d else cu.cuMemcpyDtoH

        def on(copy: Callable[..., Any], stream: Any) -> Callable[[], None]:
            def run() -> None:
                ok(copy(dst, src, n, stream))
                ok(cu.cuStreamSynchronize(stream))

            return run

        w: dict[str, Callable[[], None]] = {
            "generic": on(cu.cuMemcpyAsync, nb),
            "typed": on(typed, nb),
            "legacy": on(cu.cuMemcpyAsync, legacy),
            "per_thread": on(cu.cuMemcpyAsync, per_thread),
            "sync": lambda: ok(blocking(dst, src, n)),
            "gpuaio_backend": lambda: (
                be.memcpy_async(g_dst, g_src, n, gs._native),
                be.stream_synchronize(gs._native),
            ),
        }
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
    write_records(args.out, "copy-path-probe.json", records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
