"""A download into pageable memory: what its stream and its destination's alignment cost.

Issue 13, round forty-eight. In run FD's committed run (an H200 host), into
the same pre-touched numpy array, torch's ``copy_`` ran a 64 MiB download
at 17.8 GB/s and CuPy's ``get(out=)`` at 17.4, where the naive baseline,
``cuMemcpyAsync`` and ``cuStreamSynchronize`` on gpuaio's stream, ran 11.3;
and torch's ``.to('cpu')``, into a fresh tensor, ran 1 MiB at 10.2 GB/s
and 4 MiB at 14.3 against 8.2-8.4 and 9.2-10.4 into the array. The calls
differ in two ways, measured here apart (interleaved repetitions, medians
in microseconds, one process):

* the stream the driver's own pageable download runs on: a non-blocking
  stream (gpuaio's kind, ``drv_nonblocking``), a blocking one
  (``drv_blocking``), the legacy default stream (``drv_legacy``, torch's
  and CuPy's by default) and the per-thread default stream (``drv_ptds``);
* the destination's address: page + 16 bytes (``np16``, where glibc's
  ``mmap``-backed allocations put a large numpy array), page + 64
  (``a64``), the page (``pg``); for the driver call, for a host copy out of a
  pinned block alone (``memmove_*``: a small download's copy-out), and for
  gpuaio's awaited download (``gpuaio_*``).

torch's ``copy_`` into the ``np16`` array and ``.to('cpu')``, and CuPy's
``get(out=)``, for reference, where installed. Prints a table per size and
writes ``dest_probe.json`` to ``--out``. GPU only.
"""

# The per-size closures below run within their own iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import ctypes
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from _rawcuda import (
    aligned,
    driver_copy,
    driver_on_device0,
    interleaved,
    load_torch,
    ok,
    parse_size,
    report,
    run_probe,
)

import gpuaio

SIZES = ("1M", "4M", "64M")
OFFSETS = {"np16": 16, "a64": 64, "pg": 0}
CU_STREAM_PER_THREAD = 2


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    found = driver_on_device0()
    if found is None:
        raise SystemExit(2)
    cu, _ctx = found
    torch = load_torch()
    try:
        import cupy
    except ImportError:
        cupy = None
    streams = {
        "nonblocking": ok(cu.cuStreamCreate(1)),
        "blocking": ok(cu.cuStreamCreate(0)),
        "legacy": cu.CUstream(0),
        "ptds": cu.CUstream(CU_STREAM_PER_THREAD),
    }
    dev = gpuaio.Device(0)
    s = dev.stream()
    results: dict[str, Any] = {}
    for size in args.sizes.split(","):
        n = parse_size(size)
        inner = max(1, (4 << 20) // n)
        src = np.arange(n, dtype=np.uint64).view(np.uint8)[:n] if n % 8 == 0 else None
        if src is None:
            raise SystemExit("sizes must be multiples of 8 bytes")
        d = ok(cu.cuMemAlloc(n))
        ok(cu.cuMemcpyHtoD(d, src.ctypes.data, n))
        gd = dev.empty(n)
        await s.copy(gd, src)
        pin = ok(cu.cuMemHostAlloc(n, 0))
        ok(cu.cuMemcpyDtoH(pin, d, n))
        dsts = {k: aligned(n, off, 0xA5) for k, off in OFFSETS.items()}
        methods: dict[str, Callable[[], Any]] = {}

        for sname, st in streams.items():
            methods[f"drv_{sname}_np16"] = driver_copy(cu, st, dsts["np16"].ctypes.data, d, n)
        for k in ("a64", "pg"):
            methods[f"drv_nonblocking_{k}"] = driver_copy(
                cu, streams["nonblocking"], dsts[k].ctypes.data, d, n
            )
        for k, dst in dsts.items():
            p = dst.ctypes.data
            methods[f"memmove_{k}"] = lambda p=p: ctypes.memmove(p, int(pin), n)
        for k in ("np16", "a64"):
            methods[f"gpuaio_{k}"] = lambda dst=dsts[k]: s.copy(dst, gd)
        keep: list[Any] = []
        if torch is not None:
            tdev = torch.from_numpy(src).to("cuda")
            tdst = torch.from_numpy(dsts["np16"])
            keep += [tdev, tdst]
            methods["torch_copy_np16"] = lambda: tdst.copy_(tdev)
            methods["torch_to_cpu"] = lambda: tdev.to("cpu")
        if cupy is not None:
            cdev = cupy.asarray(src)
            keep.append(cdev)
            methods["cupy_get_np16"] = lambda: cdev.get(out=dsts["np16"])
        samples = await interleaved(methods, args.reps, inner)
        for k, dst in dsts.items():
            if not np.array_equal(dst, src):
                print(f"{size}: MISMATCH in {k}")
        results[size] = report(size, n, inner, args.reps, samples)
        ok(cu.cuMemFreeHost(pin))
        ok(cu.cuMemFree(d))
        del keep
    return results


def main() -> int:
    return run_probe(__doc__, SIZES, main_async, "dest_probe.json")


if __name__ == "__main__":
    sys.exit(main())
