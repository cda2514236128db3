"""A small download's DMA and copy-out one after the other, or in pieces that overlap.

Issue 13, round forty-nine. A download of up to ``inline_max`` (1 MiB) into
pageable memory is one DMA into a pinned block, then one copy-out into the
caller's array once the DMA has completed (``Stager._small_d2h``): the two
never overlap. The driver's own pageable download pipelines its staging.
In run IB (an H100 host) a 1 MiB download into numpy's page + 16 array took
gpuaio 166.9 us, the driver 134.6, torch's ``.to('cpu')`` 124.3, a
``memmove`` out of a pinned block alone 88.7 and a pinned DMA about 27.

This probe measures, with raw driver calls on one thread, what overlapping
them could win before any library change (interleaved repetitions, medians
in microseconds, one process):

* ``whole_*``: one DMA into a pinned block, an event after it, the event
  queried until it has fired, then one ``memmove`` into the destination:
  today's path without gpuaio's own costs;
* ``pieces<k>_*``: ``k`` DMAs of ``n / k`` bytes, an event after each; piece
  ``i`` is copied out as soon as its event has fired, while the later
  pieces are still in DMA;
* ``drv_*``: the driver's pageable download (``cuMemcpyAsync`` into the
  array, ``cuStreamSynchronize``);
* ``gpuaio_*``: ``await stream.copy(array, device)``;

each into a pre-touched array at page + 16 bytes (``np16``, where glibc's
``mmap``-backed allocations put a large numpy array) and page + 64
(``a64``). The pinned block's bytes sit as far into a 64-byte line as the
destination's, as gpuaio's staging places them (``lent.staged_at``).
Prints a table per size and writes ``piece_probe.json`` to ``--out``.
GPU only.
"""

# The per-size closures below run within their own iteration.
# ruff: noqa: B023

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
from _rawcuda import (
    aligned,
    driver_copy,
    driver_on_device0,
    interleaved,
    ok,
    parse_size,
    report,
    run_probe,
)

import gpuaio

SIZES = ("256K", "1M", "2M")
PIECES = (2, 4, 8)
OFFSETS = {"np16": 16, "a64": 64}
CUDA_ERROR_NOT_READY = 600
EVENT_DISABLE_TIMING = 2


async def main_async(args: Any) -> dict[str, Any]:
    found = driver_on_device0()
    if found is None:
        raise SystemExit(2)
    cu, _ctx = found
    stream = ok(cu.cuStreamCreate(1))  # non-blocking, as gpuaio's streams
    most = max(PIECES)
    events = [ok(cu.cuEventCreate(EVENT_DISABLE_TIMING)) for _ in range(most)]
    dev = gpuaio.Device(0)
    s = dev.stream()
    results: dict[str, Any] = {}
    for size in args.sizes.split(","):
        n = parse_size(size)
        if n % (8 * most):
            raise SystemExit(f"sizes must be multiples of {8 * most} bytes")
        inner = max(1, (4 << 20) // n)
        src = np.arange(n // 8, dtype=np.uint64).view(np.uint8)
        d = ok(cu.cuMemAlloc(n))
        ok(cu.cuMemcpyHtoD(d, src.ctypes.data, n))
        gd = dev.empty(n)
        await s.copy(gd, src)
        block = int(ok(cu.cuMemHostAlloc(n + 64, 0)))
        dsts = {k: aligned(n, off, 0xA5) for k, off in OFFSETS.items()}
        methods: dict[str, Callable[[], Any]] = {}

        def staged(dst: np.ndarray, k: int) -> Callable[[], None]:
            p = dst.ctypes.data
            at = block + (p & 63)
            piece = n // k

            def call() -> None:
                for i in range(k):
                    off = i * piece
                    ok(cu.cuMemcpyDtoHAsync(at + off, int(d) + off, piece, stream))
                    ok(cu.cuEventRecord(events[i], stream))
                for i in range(k):
                    while int(cu.cuEventQuery(events[i])[0]) == CUDA_ERROR_NOT_READY:
                        pass
                    off = i * piece
                    ctypes.memmove(p + off, at + off, piece)

            return call

        for name, dst in dsts.items():
            methods[f"whole_{name}"] = staged(dst, 1)
            for k in PIECES:
                methods[f"pieces{k}_{name}"] = staged(dst, k)
            methods[f"drv_{name}"] = driver_copy(cu, stream, dst.ctypes.data, d, n)
            methods[f"gpuaio_{name}"] = lambda dst=dst: s.copy(dst, gd)

        def refill() -> None:
            for dst in dsts.values():
                dst.fill(0xA5)  # each method must write every byte itself

        def check(name: str) -> None:
            for k, dst in dsts.items():
                if name.endswith(k) and not np.array_equal(dst, src):
                    raise SystemExit(f"{size} {name}: the destination is not the source")

        samples = await interleaved(methods, args.reps, inner, refill, check)
        results[size] = report(size, n, inner, args.reps, samples)
        ok(cu.cuMemFreeHost(block))
        ok(cu.cuMemFree(d))
    for ev in events:
        ok(cu.cuEventDestroy(ev))
    ok(cu.cuStreamDestroy(stream))
    s.close()
    return results


def main() -> int:
    return run_probe(__doc__, SIZES, main_async, "piece_probe.json")


if __name__ == "__main__":
    raise SystemExit(main())
