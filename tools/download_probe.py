#!/usr/bin/env python
"""Where a small download's time goes (issue 13, round forty-four, run FB).

``python tools/download_probe.py [--out FILE]`` on a GPU; with
``GPUAIO_BACKEND=sim`` it runs on the simulator, which checks the script
(its figures mean nothing there).

One process, asyncio, one stream. Per size (4 KiB, 64 KiB, 256 KiB, 1 MiB),
a download from device memory into a pre-touched pageable numpy array,
three ways, interleaved, ``--reps`` copies each, us from the call:

* gpuaio: ``op = s.copy(dst, d)`` then ``await op``. The copy-out of a
  small download is ``Lent.__call__`` (``gpuaio/_engine/lent.py``), which
  calls the module global ``copy_small``: the probe wraps that global (the
  compiled module reads it at each call) to time the copy-out and name its
  thread. Stamps: the call returns; the copy-out starts and ends; the await
  returns.
* hand (and hand_pool, the same through a block of gpuaio's staging
  pool): ``cuMemcpyAsync`` into a pinned block, ``cuEventRecord``,
  ``cuEventQuery`` between bare yields, ``ctypes.memmove`` out (the floor
  probe's ``hand_inline``). Stamps: the call returns (the record made), the
  event found fired, the memmove ends.

Medians per stamp; the share of gpuaio's copy-outs run on the loop thread;
per thread of the process, its CPU time and timeslices per op over a run of
gpuaio's downloads alone (``/proc/self/task/*/schedstat``). Then the sizes of
``--evict-sizes`` again with an unrelated ``--evict``-byte host copy before
every timed copy, either way.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the probes beside this file
from floor_probe import YIELD, Raw
from timeline_probe import evicter

import gpuaio
import gpuaio._engine.lent as lent_mod
from gpuaio._api.runtime import current_runtime
from gpuaio._engine.pool import MIN_CLASS

clock = time.perf_counter
stamps: list[tuple[float, float, int]] = []
_orig = lent_mod.copy_small


def timed_copy(dst: int, src: int, n: int) -> object:
    t0 = clock()
    r = _orig(dst, src, n)
    stamps.append((t0, clock(), threading.get_ident()))
    return r


def sched() -> dict[int, tuple[int, int]]:
    """Per thread of this process: (ns on a CPU, timeslices) from schedstat."""
    out: dict[int, tuple[int, int]] = {}
    if not os.path.isdir("/proc/self/task"):
        return out
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/schedstat") as fh:
                f = fh.read().split()
            out[int(t)] = (int(f[0]), int(f[2]))
        except OSError:
            pass
    return out


def names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def med(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e6, 1) if xs else float("nan")


async def one_size(dev: Any, s: Any, raw: Raw, n: int, reps: int, evict: int = 0) -> dict[str, Any]:
    loop_tid = threading.get_ident()
    # evict: an unrelated host copy of this many bytes before each timed
    # copy, either way (as a 1 MiB download's own copy-out does to the next
    # call): how much of a call's time is its code and data out of the caches.
    before = evicter(evict)
    src = np.frombuffer(os.urandom(n), np.uint8).copy()
    dst = np.full(n, 0xA5, np.uint8)
    d = dev.empty(n)
    await s.copy(d, src)
    blk = gpuaio.pinned_empty(n)
    bp, dp, dd = blk.ctypes.data, dst.ctypes.data, d.ptr
    # hand_pool: the hand-written download through a block of gpuaio's own
    # staging pool, the kind of block gpuaio's download DMAs into.
    pool = current_runtime().stager.pool  # type: ignore[union-attr]
    for _ in range(3):  # the pool caches a block of this class
        await s.copy(dst, d)
    small = n <= MIN_CLASS
    pblk = pool.take_small() if small else pool.take_cached(n)
    assert pblk is not None, "no cached pool block of this size"
    pp = pblk.ptr
    g: dict[str, list[float]] = {
        "call": [],
        "copy_start": [],
        "copy_end": [],
        "await": [],
        "copy_us": [],
    }
    h: dict[str, list[float]] = {"call": [], "fired": [], "await": [], "copy_us": []}
    hp: dict[str, list[float]] = {"call": [], "fired": [], "await": [], "copy_us": []}
    on_loop = 0
    # Warm up until 20 downloads in a row took the inline path (one copy-out
    # each): the block lent to hand_pool made the class miss once, and a
    # miss grows it on the reaper thread, in the background.
    streak = 0
    for _ in range(2000):
        stamps.clear()
        await s.copy(dst, d)
        streak = streak + 1 if len(stamps) == 1 else 0
        if streak >= 20:
            break
    else:
        raise SystemExit(f"{n}: downloads never settled on the inline path")
    for i in range(3 * reps):
        if i % 3 == 0:
            stamps.clear()
            if before is not None:
                before()
            t0 = clock()
            op = s.copy(dst, d)
            t1 = clock()
            await op
            t2 = clock()
            if len(stamps) != 1:
                raise SystemExit(f"{n}: {len(stamps)} copy-outs for one download")
            c0, c1, tid = stamps[0]
            on_loop += tid == loop_tid
            g["call"].append(t1 - t0)
            g["copy_start"].append(c0 - t0)
            g["copy_end"].append(c1 - t0)
            g["await"].append(t2 - t0)
            g["copy_us"].append(c1 - c0)
        else:
            hh, b = (h, bp) if i % 3 == 1 else (hp, pp)
            if before is not None:
                before()
            t0 = clock()
            raw.copy(b, dd, n)
            raw.record()
            t1 = clock()
            while not raw.fired():
                await YIELD
            t2 = clock()
            ctypes.memmove(dp, b, n)
            t3 = clock()
            hh["call"].append(t1 - t0)
            hh["fired"].append(t2 - t0)
            hh["await"].append(t3 - t0)
            hh["copy_us"].append(t3 - t2)
    # gpuaio alone, back to back: which threads ran, per op.
    a0 = sched()
    t0 = clock()
    for _ in range(reps):
        await s.copy(dst, d)
    alone = (clock() - t0) / reps
    a1 = sched()
    nm = names()
    me = threading.get_native_id()
    threads = {}
    for tid, (ns, sl) in a1.items():
        ns0, sl0 = a0.get(tid, (0, 0))
        if ns - ns0 > 0:
            label = "loop" if tid == me else nm.get(tid, "native")
            threads[f"{label}:{tid}"] = [
                round((ns - ns0) / reps / 1e3, 2),
                round((sl - sl0) / reps, 2),
            ]
    if small:
        pool.release_small(pblk)
    else:
        pool.release(pblk)
    assert np.array_equal(dst, src), "a download left wrong bytes"
    out = {
        "evict_bytes": evict,
        "gpuaio_alone_us": round(alone * 1e6, 1),
        "threads_us_and_slices_per_op": threads,
        "bytes": n,
        "gpuaio": {k: med(v) for k, v in g.items()},
        "hand": {k: med(v) for k, v in h.items()},
        "hand_pool": {k: med(v) for k, v in hp.items()},
        "gpuaio_copy_out_on_loop": on_loop / reps,
    }
    print(json.dumps(out), flush=True)
    return out


async def probe(a: argparse.Namespace) -> list[dict[str, Any]]:
    lent_mod.copy_small = timed_copy
    print("lent from", lent_mod.__file__, flush=True)
    dev = gpuaio.Device(0)
    s = dev.stream()
    raw = Raw(s)
    res = [await one_size(dev, s, raw, int(x), a.reps) for x in a.sizes.split(",")]
    for x in a.evict_sizes.split(","):
        if x:
            res.append(await one_size(dev, s, raw, int(x), a.reps, a.evict))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,65536,262144,1048576")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", default="")
    ap.add_argument("--evict", type=int, default=1 << 20)
    ap.add_argument("--evict-sizes", default="4096,65536")
    a = ap.parse_args()
    res = asyncio.run(probe(a))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
