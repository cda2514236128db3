"""Would write-combined pinned blocks stage uploads faster?

Every staged upload copies pageable memory into a pinned block with
``memmove`` / ``np.copyto``, then DMAs the block. The driver's own pageable
path staged 1 MiB in 65 us on an H200 host where gpuaio's ``memmove`` into
a pinned block took 90-130 us (issue 13, runs Z and AB). A CPU store into
ordinary (write-back) memory first reads the line it writes; write-combined
memory (``CU_MEMHOSTALLOC_WRITECOMBINED``) skips that read, and the GPU reads
it over PCIe without snooping the CPU's caches. CPU reads of it are slow, so
it could only ever hold uploads.

For each size this probe times (medians of ``--reps``, microseconds, each
round in a shuffled order):

* ``memmove`` of a pre-touched pageable buffer into an ordinary pinned block
  and into a write-combined one, on one thread;
* ``np.copyto`` of it split over ``--threads`` threads (the copy threads);
* the DMA of each block to the device (``cuMemcpyAsync`` + sync);
* one upload as staging does it (copy, then DMA) for each kind;
* reading the write-combined block back (why downloads must not use it).

Writes ``wc-probe.json`` with ``--out``. GPU only.
"""

from __future__ import annotations

import ctypes
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np
from _rawcuda import driver_on_device0, ok, parse_size, probe_parser, write_records

WRITECOMBINED = 0x04  # CU_MEMHOSTALLOC_WRITECOMBINED
PORTABLE_DEVICEMAP = 0x01 | 0x02  # gpuaio's flags


def main() -> int:
    p = probe_parser(__doc__, "64K,1M,4M,16M,64M", 30)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    found = driver_on_device0()
    if found is None:
        return 2
    cu, ctx = found
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    big = max(sizes)
    stream = ok(cu.cuStreamCreate(1))
    dev = ok(cu.cuMemAlloc(big))
    src = np.random.default_rng(1).integers(0, 255, big, dtype=np.uint8)
    blocks = {
        "pinned": ok(cu.cuMemHostAlloc(big, PORTABLE_DEVICEMAP)),
        "wc": ok(cu.cuMemHostAlloc(big, PORTABLE_DEVICEMAP | WRITECOMBINED)),
    }
    views = {
        k: np.ctypeslib.as_array((ctypes.c_uint8 * big).from_address(int(v)))
        for k, v in blocks.items()
    }
    for v in views.values():
        v[:] = 1  # touched
    sink = np.zeros(big, np.uint8)
    pool = ThreadPoolExecutor(args.threads, initializer=lambda: cu.cuCtxSetCurrent(ctx))
    wait([pool.submit(time.sleep, 0.01) for _ in range(args.threads)])
    records: list[dict[str, Any]] = []

    def threaded(dst: np.ndarray, s: np.ndarray) -> None:
        n = dst.nbytes
        step = (-(-n // args.threads) + 4095) & ~4095
        wait(
            [pool.submit(np.copyto, dst[o : o + step], s[o : o + step]) for o in range(0, n, step)]
        )

    for n in sizes:
        ways: dict[str, Callable[[], Any]] = {}
        for k, ptr in blocks.items():
            p_ = int(ptr)
            view = views[k][:n]

            def mm(p_: int = p_, n: int = n) -> None:
                ctypes.memmove(p_, src.ctypes.data, n)

            def dma(p_: int = p_, n: int = n) -> None:
                ok(cu.cuMemcpyAsync(dev, p_, n, stream))
                ok(cu.cuStreamSynchronize(stream))

            def staged(mm: Callable[[], None] = mm, dma: Callable[[], None] = dma) -> None:
                mm()
                dma()

            ways[f"memmove_{k}"] = mm
            ways[f"copyto_{args.threads}threads_{k}"] = lambda view=view, n=n: threaded(
                view, src[:n]
            )
            ways[f"dma_{k}"] = dma
            ways[f"upload_{k}"] = staged
        ways["read_back_wc"] = lambda n=n: ctypes.memmove(sink.ctypes.data, int(blocks["wc"]), n)
        ways["read_back_pinned"] = lambda n=n: ctypes.memmove(
            sink.ctypes.data, int(blocks["pinned"]), n
        )
        times: dict[str, list[float]] = {k: [] for k in ways}
        order = list(ways.items())
        rng = random.Random(n)
        for fn in ways.values():
            fn()
        for _ in range(args.reps):
            rng.shuffle(order)
            for k, fn in order:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        meds = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
        # The last upload into the wc block must have landed intact.
        back = np.zeros(n, np.uint8)
        ok(cu.cuMemcpyDtoH(back.ctypes.data, dev, n))
        meds["data_ok"] = bool(np.array_equal(back, src[:n]))
        records.append({"bytes": n, **meds})
        print(f"  {n >> 10:>6} KiB: " + "  ".join(f"{k} {v}" for k, v in meds.items()), flush=True)
    pool.shutdown()
    write_records(args.out, "wc-probe.json", records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
