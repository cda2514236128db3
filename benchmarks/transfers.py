#!/usr/bin/env python
"""Transfer benchmark (suite ``transfers``): gpuaio copies against what users write.

For each size, H2D and D2H, interleaved after warm-up, median of ``--reps``:

* the raw driver call (``cuMemcpyAsync`` + ``cuStreamSynchronize``) from
  pageable and from pinned memory: the baselines;
* ``await stream.copy(...)`` from pageable (staged) and from pinned memory;
* PyTorch and CuPy doing the same (optional; a null record says why not);
* the host-copy ceiling: a numpy copy between pageable and pinned memory
  with 1-16 threads;
* the event-loop lag of a 1 ms ticker during gpuaio transfers and during the
  raw call made on the loop thread.

Then the 8 GiB loop-lag soak, pinned-pool peak against its budget, and
memory growth over 10,000 transfers. ``--sweep`` instead sweeps the staging
knobs (chunk size, depth, host threads) and writes suite ``transfers-sweep``.

Destination buffers are allocated and written once before timing
(pre-touched): page faults of fresh buffers would otherwise dominate.
``python benchmarks/transfers.py --help`` for options; ``GPUAIO_BACKEND=sim``
with ``--quick`` runs a small smoke version without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import _harness as H
import numpy as np

import gpuaio
from gpuaio._core.loopport import LoopPort
from gpuaio._engine.hostwork import HostPool
from gpuaio._engine.staging import Stager, StagingConfig

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FULL_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
QUICK_MAX = 16 * MiB
DERIVED_MIN = 64 * MiB
HOST_THREADS = (1, 2, 4, 8, 12, 16)
LAG_MIN_S = 0.05
SOAK_COUNT = 32
FLAT_COUNT = 10_000


RAW_PAGEABLE = "cuMemcpyAsync from pageable memory + cuStreamSynchronize (raw cuda.bindings)"
RAW_PINNED = "cuMemcpyAsync from pinned memory + cuStreamSynchronize (raw cuda.bindings)"
RAW_TO_PAGEABLE = "cuMemcpyAsync into pre-touched pageable memory + cuStreamSynchronize"
RAW_TO_PINNED = "cuMemcpyAsync into pinned memory + cuStreamSynchronize (raw cuda.bindings)"

# name -> (what it is, baseline method or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "h2d_naive_pageable": (RAW_PAGEABLE, None),
    "h2d_raw_pinned": (RAW_PINNED, None),
    "h2d_pageable": (
        "gpuaio: await stream.copy(device, pageable numpy array)",
        "h2d_naive_pageable",
    ),
    "h2d_pinned": (
        "gpuaio: await stream.copy(device, gpuaio.pinned_empty array)",
        "h2d_raw_pinned",
    ),
    "h2d_torch_pageable": (
        "torch: t.to('cuda', non_blocking=True) + torch.cuda.synchronize(), pageable t",
        "h2d_naive_pageable",
    ),
    "h2d_torch_pinned": (
        "torch: t.pin_memory().to('cuda', non_blocking=True) + synchronize (pinning not timed)",
        "h2d_raw_pinned",
    ),
    "h2d_cupy_asarray": (
        "cupy: cupy.asarray(numpy array) + stream synchronize",
        "h2d_naive_pageable",
    ),
    "d2h_naive_pageable": (RAW_TO_PAGEABLE, None),
    "d2h_raw_pinned": (RAW_TO_PINNED, None),
    "d2h_pageable": (
        "gpuaio: await stream.copy(pageable numpy array, device)",
        "d2h_naive_pageable",
    ),
    "d2h_pinned": (
        "gpuaio: await stream.copy(gpuaio.pinned_empty array, device)",
        "d2h_raw_pinned",
    ),
    "d2h_torch_to_cpu": (
        "torch: t.to('cpu'); allocates a fresh pageable tensor per call (page faults included)",
        "d2h_naive_pageable",
    ),
    "d2h_torch_copy_pageable": (
        "torch: pageable_cpu_tensor.copy_(t) into a pre-touched tensor",
        "d2h_naive_pageable",
    ),
    "d2h_torch_pinned": (
        "torch: pinned_cpu_tensor.copy_(t, non_blocking=True) + torch.cuda.synchronize()",
        "d2h_raw_pinned",
    ),
    "d2h_cupy_get": (
        "cupy: ndarray.get(out=pre-touched pageable numpy array)",
        "d2h_naive_pageable",
    ),
}
PEER_OF = {name: name.split("_")[1] for name in METHODS if "_torch_" in name or "_cupy_" in name}


# -- set-up ---------------------------------------------------------------
@dataclass
class Ctx:
    """Everything a measurement needs."""

    args: argparse.Namespace
    dev: gpuaio.Device
    stream: gpuaio.Stream
    peers: dict[str, Any]
    peer_notes: dict[str, str]
    copy_pools: dict[int, ThreadPoolExecutor] = field(default_factory=dict)

    @property
    def rt(self) -> Any:
        return H.runtime()

    @property
    def be(self) -> Any:
        return H.runtime().backend

    @property
    def native(self) -> Any:
        return self.stream._native

    def raw_copy(self) -> Callable[[int, int, int], None]:
        """``copy(dst, src, n)``: the baselines' ``cuMemcpyAsync`` and
        ``cuStreamSynchronize`` on the stream, called as a user calls them.

        On CUDA straight through cuda.bindings, not through the backend,
        whose hot-path calls go through gpuaio's own C functions in a
        compiled install (``gpuaio.backends.cuda._fast``): a baseline must
        not share what it is compared with. On the simulator, the backend.
        """
        be, native = self.be, self.native
        if be.name != "cuda":

            def through_backend(dst: int, src: int, n: int) -> None:
                be.memcpy_async(dst, src, n, native)
                be.stream_synchronize(native)

            return through_backend
        import cuda.bindings.driver as driver

        handle = native.handle

        def through_bindings(dst: int, src: int, n: int) -> None:
            (err,) = driver.cuMemcpyAsync(dst, src, n, handle)
            if err:
                raise RuntimeError(f"cuMemcpyAsync failed: {err!r}")
            (err,) = driver.cuStreamSynchronize(handle)
            if err:
                raise RuntimeError(f"cuStreamSynchronize failed: {err!r}")

        return through_bindings


def load_peers(backend: str, enabled: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Import torch and CuPy if they can use the GPU; else say why not."""
    peers: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name in ("torch", "cupy"):
        if not enabled:
            notes[name] = f"{name} skipped (--no-peers)"
            continue
        if backend == "sim":
            notes[name] = f"the sim backend has no real device memory to share with {name}"
            continue
        try:
            if name == "torch":
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError("torch.cuda.is_available() is False")
                torch.zeros(1, device="cuda")
                torch.cuda.synchronize()
                peers[name] = torch
            else:
                import cupy

                cupy.zeros(1)
                cupy.cuda.Device().synchronize()
                peers[name] = cupy
        except Exception as exc:
            notes[name] = f"{name} could not run: {type(exc).__name__}: {exc}"
    for name, note in notes.items():
        print(f"  peer {name}: NOT measured: {note}")
    return peers, notes


def filled(n: int, seed: int) -> np.ndarray:
    """A pageable array of ``n`` bytes, every page written with a varying pattern."""
    a = np.empty(n, np.uint8)
    words = n // 8
    if words:
        w = a[: words * 8].view(np.uint64)
        np.multiply(np.arange(words, dtype=np.uint64), np.uint64(0x9E3779B97F4A7C15), out=w)
        w ^= np.uint64(seed)
    a[words * 8 :] = seed & 0xFF
    return a


def same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.nbytes % 8 == 0:
        return bool(np.array_equal(a.view(np.uint64), b.view(np.uint64)))
    return bool(np.array_equal(a, b))


def gated_path() -> Any:
    """The runtime's gated path (``gpuaio._engine.gated``), or None."""
    from gpuaio._api.runtime import current_runtime

    try:
        return current_runtime().stager.gated
    except Exception:  # no runtime yet, or a build without the path
        return None


def threaded_copy(
    pool: ThreadPoolExecutor | None, threads: int, dst: np.ndarray, src: np.ndarray
) -> None:
    """numpy copy split over ``threads`` threads (the caller takes one share)."""
    n = dst.nbytes
    if threads <= 1 or pool is None or n < threads * 4096:
        np.copyto(dst, src)
        return
    step = ((-(-n // threads)) + 4095) & ~4095
    futs = [
        pool.submit(np.copyto, dst[a : a + step], src[a : a + step]) for a in range(step, n, step)
    ]
    np.copyto(dst[:step], src[:step])
    for f in futs:
        f.result()


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MiB
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one size -------------------------------------------------------------
async def bench_size(ctx: Ctx, n: int, derived: bool) -> list[H.Record]:
    """Every method at ``n`` bytes, both directions; lag; derived target records."""
    size = H.fmt_size(n)
    s, dev = ctx.stream, ctx.dev
    raw_copy = ctx.raw_copy()
    src = filled(n, 0x11)
    dst = np.full(n, 0xA5, np.uint8)  # pre-touched
    pin = gpuaio.pinned_empty(n)
    pin.fill(0x3C)
    d = dev.empty(n)
    src_p, dst_p, pin_p, d_p = src.ctypes.data, dst.ctypes.data, pin.ctypes.data, d.ptr

    # Correctness first: both gpuaio paths, both directions.
    await s.copy(d, src)
    await s.copy(dst, d)
    ok = same(dst, src)
    np.bitwise_not(src, out=pin)
    await s.copy(d, pin)
    pin.fill(0)
    await s.copy(pin, d)
    ok = ok and same(pin, np.bitwise_not(src))
    if not ok:
        print(f"  {size}: MISMATCH: gpuaio round trip did not reproduce the source")

    inner = max(1, min(256, (8 * MiB) // n))

    def raw(dst_ptr: int, src_ptr: int) -> Callable[[], None]:
        def call() -> None:
            raw_copy(dst_ptr, src_ptr, n)

        return call

    # How many of the pageable copies the gated path took (issue 13: a size's
    # samples have swung 3x within one run; which path each took is the question).
    gated = gated_path()
    taken = {"h2d_pageable": [0, 0], "d2h_pageable": [0, 0]}

    def tally(name: str, call: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        if gated is None or n < gated.least:
            return call
        count = taken[name]
        up = name.startswith("h2d")

        def counted() -> Awaitable[Any]:
            before = gated.uploads if up else gated.downloads
            op = call()
            count[0] += 1
            count[1] += (gated.uploads if up else gated.downloads) - before
            return op

        return counted

    timers: dict[str, H.Timer] = {
        "h2d_naive_pageable": H.sync_timer(raw(d_p, src_p), inner),
        "h2d_raw_pinned": H.sync_timer(raw(d_p, pin_p), inner),
        "h2d_pageable": H.async_timer(tally("h2d_pageable", lambda: s.copy(d, src)), inner),
        "h2d_pinned": H.async_timer(lambda: s.copy(d, pin), inner),
        "d2h_naive_pageable": H.sync_timer(raw(dst_p, d_p), inner),
        "d2h_raw_pinned": H.sync_timer(raw(pin_p, d_p), inner),
        "d2h_pageable": H.async_timer(tally("d2h_pageable", lambda: s.copy(dst, d)), inner),
        "d2h_pinned": H.async_timer(lambda: s.copy(pin, d), inner),
    }
    keep: list[Any] = []  # peer buffers, dropped at the end
    torch = ctx.peers.get("torch")
    if torch is not None:
        t_src = torch.from_numpy(src)
        t_pin = t_src.pin_memory()
        t_dev = t_src.to("cuda")
        t_dst = torch.from_numpy(dst)
        torch.cuda.synchronize()
        keep += [t_pin, t_dev]

        def t_h2d(t: Any) -> Callable[[], None]:
            def call() -> None:
                t.to("cuda", non_blocking=True)
                torch.cuda.synchronize()

            return call

        def t_d2h_pinned() -> None:
            t_pin.copy_(t_dev, non_blocking=True)
            torch.cuda.synchronize()

        timers["h2d_torch_pageable"] = H.sync_timer(t_h2d(t_src), inner)
        timers["h2d_torch_pinned"] = H.sync_timer(t_h2d(t_pin), inner)
        timers["d2h_torch_to_cpu"] = H.sync_timer(lambda: t_dev.to("cpu"), inner)
        timers["d2h_torch_copy_pageable"] = H.sync_timer(lambda: t_dst.copy_(t_dev), inner)
        timers["d2h_torch_pinned"] = H.sync_timer(t_d2h_pinned, inner)
    cupy = ctx.peers.get("cupy")
    if cupy is not None:
        c_dev = cupy.asarray(src)
        cupy.cuda.Device().synchronize()
        keep.append(c_dev)

        def c_h2d() -> None:
            cupy.asarray(src)
            cupy.cuda.get_current_stream().synchronize()

        timers["h2d_cupy_asarray"] = H.sync_timer(c_h2d, inner)
        timers["d2h_cupy_get"] = H.sync_timer(lambda: c_dev.get(out=dst), inner)
    for t in HOST_THREADS:
        pool = ctx.copy_pools.get(t)
        timers[f"host_copy_to_pinned_{t}threads"] = H.sync_timer(
            functools.partial(threaded_copy, pool, t, pin, src), inner
        )
        timers[f"host_copy_from_pinned_{t}threads"] = H.sync_timer(
            functools.partial(threaded_copy, pool, t, dst, pin), inner
        )

    res = await H.interleave(timers, reps=ctx.args.reps, warmup=ctx.args.warmup)
    for name, err in res.errors.items():
        print(f"  {size}: {name} FAILED: {err}")
    if any(c for c, _ in taken.values()):
        print(
            f"  {size}: gated path took "
            + ", ".join(f"{name} {h}/{c}" for name, (c, h) in taken.items() if c)
        )

    def gbps(name: str) -> float | None:
        m = res.median(name)
        return n / m / 1e9 if m else None

    records: list[H.Record] = []
    for name, (what, base) in METHODS.items():
        rname = f"{name}_{size}"
        value = gbps(name)
        note: str | None = None
        peer = PEER_OF.get(name)
        if peer is not None and peer not in ctx.peers:
            note = ctx.peer_notes.get(peer, f"{peer} not available")
        elif name in res.errors:
            note = f"failed: {res.errors[name]}"
        extra: dict[str, Any] = {"what": what, "samples": len(res.samples.get(name, []))}
        if name in ("h2d_pageable", "h2d_pinned", "d2h_pageable", "d2h_pinned"):
            extra["verified"] = ok
        if name in taken and taken[name][0]:
            calls, hits = taken[name]
            extra["gated"] = f"{hits}/{calls}"
        if base is None:
            records.append(H.record(rname, "GB/s", value, note=note, **extra))
        else:
            records.append(
                H.record(
                    rname, "GB/s", value, METHODS[base][0], gbps(base), "higher", note=note, **extra
                )
            )
    for direction, label in (("to_pinned", ""), ("from_pinned", "_d2h")):
        best: tuple[float, int] | None = None
        for t in HOST_THREADS:
            v = gbps(f"host_copy_{direction}_{t}threads")
            what = (
                f"numpy copy pageable -> pinned, {t} thread(s)"
                if direction == "to_pinned"
                else f"numpy copy pinned -> pageable, {t} thread(s)"
            )
            records.append(
                H.record(f"host_copy_{direction}_{t}threads_{size}", "GB/s", v, what=what)
            )
            if v is not None and (best is None or v > best[0]):
                best = (v, t)
        records.append(
            H.record(
                f"host_copy_ceiling{label}_{size}",
                "GB/s",
                best[0] if best else None,
                what=f"best of host_copy_{direction}_*threads",
                threads=best[1] if best else None,
            )
        )
    by_name = {r["name"]: r for r in records}

    # Event-loop lag during each gpuaio transfer and the raw call on the loop.
    lag_ops: dict[str, Callable[[], Awaitable[Any]]] = {
        "h2d_pageable": lambda: s.copy(d, src),
        "h2d_pinned": lambda: s.copy(d, pin),
        "d2h_pageable": lambda: s.copy(dst, d),
        "d2h_pinned": lambda: s.copy(pin, d),
    }

    def on_loop(call: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            call()
            await H.checkpoint()

        return run

    lag_ops["h2d_naive_pageable"] = on_loop(raw(d_p, src_p))
    lag_ops["d2h_naive_pageable"] = on_loop(raw(dst_p, d_p))
    lags: dict[str, H.LagStats] = {}
    for name, op in lag_ops.items():
        lags[name] = await measure_lag(op)
    raw_desc = {"h2d": RAW_PAGEABLE, "d2h": RAW_TO_PAGEABLE}
    for name in ("h2d_pageable", "h2d_pinned", "d2h_pageable", "d2h_pinned"):
        naive = lags[f"{name[:3]}_naive_pageable"]
        for q in ("p50", "p99"):
            mine = getattr(lags[name], f"{q}_ms")
            base = getattr(naive, f"{q}_ms")
            records.append(
                H.record(
                    f"lag_{q}_{name}_{size}",
                    "ms",
                    mine,
                    f"{q} lag of a 1 ms ticker while {raw_desc[name[:3]]} runs on the loop thread",
                    base,
                    "lower",
                    max_ms=lags[name].max_ms,
                    ticks=lags[name].samples,
                )
            )
    for name in ("h2d_naive_pageable", "d2h_naive_pageable"):
        for q in ("p50", "p99"):
            records.append(
                H.record(
                    f"lag_{q}_{name}_{size}",
                    "ms",
                    getattr(lags[name], f"{q}_ms"),
                    better="lower",
                    what="the raw call made on the loop thread",
                    max_ms=lags[name].max_ms,
                    ticks=lags[name].samples,
                )
            )

    records += peer_records(by_name, size, n)
    if derived:
        records += derived_records(by_name, size)
    print_size(size, by_name, lags)

    del keep
    if torch is not None:
        torch.cuda.empty_cache()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
    return records


async def measure_lag(op: Callable[[], Awaitable[Any]]) -> H.LagStats:
    """Ticker lag while ``op`` runs back to back for >= 50 ms (and >= 3 times)."""
    await op()  # warm
    async with H.loop_lag() as ticker:
        t0 = time.perf_counter()
        k = 0
        while k < 3 or time.perf_counter() - t0 < LAG_MIN_S:
            await op()
            k += 1
    return ticker.stats()


PEERS = {
    "h2d": ("h2d_torch_pageable", "h2d_cupy_asarray"),
    "d2h": ("d2h_torch_to_cpu", "d2h_torch_copy_pageable", "d2h_cupy_get"),
}
"""Each direction's peer methods, of which the fastest is target 1's bar."""
PINNED_MIN = 1 * MiB
"""From this size a pinned copy is judged against the raw call (issue 13's target 2)."""


def pinned_target(n: int) -> float:
    """Issue 13's target 2: gpuaio's pinned copy over the raw call's speed."""
    return 0.97 if n >= DERIVED_MIN else 0.9


def _values(by_name: dict[str, H.Record], size: str) -> Callable[[str], float | None]:
    """The value of method ``name``'s record at ``size`` (None if it has none)."""

    def value(name: str) -> float | None:
        rec = by_name.get(f"{name}_{size}")
        return rec["value"] if rec else None

    return value


def peer_records(by_name: dict[str, H.Record], size: str, n: int) -> list[H.Record]:
    """The targets every size has (issue 13's targets 1 and 2).

    ``<dir>_pageable_vs_best_peer_<size>``: gpuaio's pageable copy against the
    fastest of the peers that ran, target 1.0 (null, with a note, when no
    peer ran); from ``PINNED_MIN``, ``<dir>_pinned_vs_raw_<size>``: its
    pinned copy against the raw call (``pinned_target``).
    """
    out: list[H.Record] = []
    v = _values(by_name, size)

    for dirn, peers in PEERS.items():
        ran = {p: got for p in peers if (got := v(p)) is not None}
        best = max(ran, key=ran.__getitem__) if ran else None
        out.append(
            H.record(
                f"{dirn}_pageable_vs_best_peer_{size}",
                "GB/s",
                v(f"{dirn}_pageable"),
                f"the fastest of torch and CuPy in this run ({best})" if best else None,
                ran[best] if best else None,
                "higher",
                note=None if best else f"no peer ran ({', '.join(peers)} are null)",
                target=1.0 if best else None,
                peer=best,
            )
        )
        if n >= PINNED_MIN:
            out.append(
                H.record(
                    f"{dirn}_pinned_vs_raw_{size}",
                    "GB/s",
                    v(f"{dirn}_pinned"),
                    RAW_PINNED if dirn == "h2d" else RAW_TO_PINNED,
                    v(f"{dirn}_raw_pinned"),
                    "higher",
                    target=pinned_target(n),
                )
            )
    return out


def derived_records(by_name: dict[str, H.Record], size: str) -> list[H.Record]:
    """The records with explicit targets for large sizes (issue 13's target 3)."""
    out: list[H.Record] = []
    v = _values(by_name, size)

    for dirn, ceiling in (("h2d", "host_copy_ceiling"), ("d2h", "host_copy_ceiling_d2h")):
        raw_pageable = RAW_PAGEABLE if dirn == "h2d" else RAW_TO_PAGEABLE
        out.append(
            H.record(
                f"{dirn}_pageable_vs_naive_{size}",
                "GB/s",
                v(f"{dirn}_pageable"),
                raw_pageable,
                v(f"{dirn}_naive_pageable"),
                "higher",
                target=3.0,
            )
        )
        dma, host = v(f"{dirn}_raw_pinned"), v(ceiling)
        limit = min(dma, host) if dma is not None and host is not None else None
        out.append(
            H.record(
                f"{dirn}_pageable_vs_ceiling_{size}",
                "GB/s",
                v(f"{dirn}_pageable"),
                f"min(pinned DMA {dirn}_raw_pinned, multi-threaded host copy {ceiling})",
                limit,
                "higher",
                target=0.85,
                dma_gbps=dma,
                host_copy_gbps=host,
            )
        )
    return out


def print_size(size: str, by_name: dict[str, H.Record], lags: dict[str, H.LagStats]) -> None:
    print(f"\n{size}: GB/s (median), ratio vs baseline, loop lag p99 during the transfer")
    for dirn in ("h2d", "d2h"):
        for name in METHODS:
            if not name.startswith(dirn):
                continue
            rec = by_name[f"{name}_{size}"]
            val = "   null" if rec["value"] is None else f"{rec['value']:7.2f}"
            ratio = f"{rec['ratio']:6.2f}x" if rec["ratio"] is not None else "       "
            lag = f"  lag p99 {lags[name].p99_ms:7.3f} ms" if name in lags else ""
            note = f"  ({rec['note']})" if rec.get("note") else ""
            print(f"  {name:<26} {val} {ratio}{lag}{note}")
    ceil_h = by_name[f"host_copy_ceiling_{size}"]
    ceil_d = by_name[f"host_copy_ceiling_d2h_{size}"]
    print(
        f"  host copy ceiling: to pinned {ceil_h['value']} GB/s ({ceil_h.get('threads')} threads), "
        f"from pinned {ceil_d['value']} GB/s ({ceil_d.get('threads')} threads)"
    )


# -- soak, pool, memory ---------------------------------------------------
@contextlib.contextmanager
def counting_wakes() -> Iterator[list[int]]:
    """Count gpuaio's wake-ups of event loops from other threads while inside.

    Each one cuts a loop's sleep towards its next timer short, and asyncio
    and trio then sleep a whole millisecond more (their selectors round the
    timeout up): ``tools/wake_lag_probe.py`` measures that on its own.
    """
    wakes: list[int] = []
    real = LoopPort.post

    def post(self: LoopPort, callbacks: list[Callable[[], None]]) -> None:
        if threading.get_ident() != self.thread:
            wakes.append(len(callbacks))
        real(self, callbacks)

    LoopPort.post = post  # type: ignore[method-assign]
    try:
        yield wakes
    finally:
        LoopPort.post = real  # type: ignore[method-assign]


async def soak(ctx: Ctx) -> list[H.Record]:
    """``loop_lag_8GiB_pageable``: 32 x 256 MiB pageable H2D while a 1 ms ticker runs.

    The copies are submitted at once and awaited with ``gpuaio.wait_all``;
    ``loop_lag_8GiB_pageable_one_by_one`` awaits the same copies one by one
    (a wake-up per copy), for comparison.
    """
    n = 4 * MiB if ctx.args.quick else 256 * MiB
    s, raw_copy = ctx.stream, ctx.raw_copy()
    src = filled(n, 0x22)
    d = ctx.dev.empty(n)
    await s.copy(d, src)

    async def ours(one_by_one: bool) -> tuple[H.LagStats, float, int]:
        with counting_wakes() as wakes:
            async with H.loop_lag() as ticker:
                t0 = time.perf_counter()
                ops = [s.copy(d, src) for _ in range(SOAK_COUNT)]
                if one_by_one:
                    for op in ops:
                        await op
                else:
                    await gpuaio.wait_all(ops)
                dt = time.perf_counter() - t0
        return ticker.stats(), SOAK_COUNT * n / dt / 1e9, len(wakes)

    async def naive() -> tuple[H.LagStats, float]:
        async with H.loop_lag() as ticker:
            t0 = time.perf_counter()
            for _ in range(SOAK_COUNT):
                raw_copy(d.ptr, src.ctypes.data, n)
                await H.checkpoint()
            dt = time.perf_counter() - t0
        return ticker.stats(), SOAK_COUNT * n / dt / 1e9

    mine: list[tuple[H.LagStats, float, int]] = []
    single: list[tuple[H.LagStats, float, int]] = []
    theirs: list[tuple[H.LagStats, float]] = []
    for _ in range(max(1, min(3, ctx.args.reps))):
        mine.append(await ours(False))
        single.append(await ours(True))
        theirs.append(await naive())
    base = H.median([t[0].p99_ms for t in theirs])
    total = H.fmt_size(SOAK_COUNT * n)
    note = None if n == 256 * MiB else f"quick run: {SOAK_COUNT} x {H.fmt_size(n)} = {total}"
    records = []
    for name, runs, how in (
        ("loop_lag_8GiB_pageable", mine, "awaited with gpuaio.wait_all"),
        ("loop_lag_8GiB_pageable_one_by_one", single, "awaited one by one"),
    ):
        p99 = H.median([m[0].p99_ms for m in runs])
        rec = H.record(
            name,
            "ms",
            p99,
            f"p99 lag with the same transfers as {RAW_PAGEABLE}, called on the loop thread",
            base,
            "lower",
            note=note,
            target=1.0 if name == "loop_lag_8GiB_pageable" else None,
            target_of="value",
            p50_ms=H.median([m[0].p50_ms for m in runs]),
            max_ms=max(m[0].max_ms for m in runs),
            gbps=H.median([m[1] for m in runs]),
            baseline_gbps=H.median([t[1] for t in theirs]),
            loop_wakes=[m[2] for m in runs],
            ticks=[m[0].samples for m in runs],
            transfers=f"{SOAK_COUNT} x {H.fmt_size(n)} pageable H2D, submitted at once on "
            f"one stream, {how}",
        )
        records.append(rec)
        print(
            f"\nloop lag while {SOAK_COUNT} x {H.fmt_size(n)} pageable H2D stream through gpuaio, "
            f"{how}: p99 {p99:.3f} ms, p50 {rec['p50_ms']:.3f} ms, wake-ups from other threads "
            f"{rec['loop_wakes']} over {rec['ticks']} ticks (raw call on the loop: p99 "
            f"{base:.1f} ms); {rec['gbps']} GB/s vs {rec['baseline_gbps']} GB/s"
        )
    return records


async def memory_flat(ctx: Ctx) -> list[H.Record]:
    """``memory_flat_10k``: RSS and pinned-pool growth over 10,000 1 MiB transfers."""
    n = 1 * MiB
    count = ctx.args.flat_count
    s = ctx.stream
    host = filled(n, 0x33)
    back = np.full(n, 0x5A, np.uint8)
    d = ctx.dev.empty(n)
    stager = ctx.rt.stager

    def pool_mib() -> float | None:
        return stager.pool.stats().reserved / MiB if stager is not None else None

    for i in range(200):
        await (s.copy(d, host) if i % 2 == 0 else s.copy(back, d))
    gc.collect()
    rss0, pool0 = rss_mib(), pool_mib()
    t0 = time.perf_counter()
    for i in range(count):
        await (s.copy(d, host) if i % 2 == 0 else s.copy(back, d))
    dt = time.perf_counter() - t0
    gc.collect()
    rss1, pool1 = rss_mib(), pool_mib()
    ok = same(back, host)
    note = None if count == FLAT_COUNT else f"{count} transfers instead of {FLAT_COUNT}"
    print(
        f"\nmemory over {count} x 1 MiB pageable H2D/D2H: RSS {rss0:.1f} -> {rss1:.1f} MiB, "
        f"pinned pool {pool0} -> {pool1} MiB ({count / dt:.0f} transfers/s, data ok: {ok})"
    )
    return [
        H.record(
            "memory_flat_10k",
            "MiB",
            rss1 - rss0,
            better="lower",
            note=note,
            what="RSS growth over the transfers (after 200 warm-up transfers)",
            rss_before_mib=rss0,
            rss_after_mib=rss1,
            pinned_reserved_before_mib=pool0,
            pinned_reserved_after_mib=pool1,
            transfers=count,
            transfers_per_s=count / dt,
            verified=ok,
        ),
        H.record(
            "memory_flat_10k_pinned",
            "MiB",
            None if pool0 is None or pool1 is None else pool1 - pool0,
            better="lower",
            note=note if stager is not None else "staging is off (GPUAIO_STAGING=0)",
            what="pinned pool reserved-bytes growth over the same transfers",
        ),
    ]


def pinned_peak(ctx: Ctx) -> H.Record:
    """``pinned_peak_vs_budget``: the pool never reserves more than its budget."""
    stager = ctx.rt.stager
    if stager is None:
        return H.record("pinned_peak_vs_budget", "MiB", None, better="lower", note="staging is off")
    st = stager.pool.stats()
    rec = H.record(
        "pinned_peak_vs_budget",
        "MiB",
        st.peak_reserved / MiB,
        "pinned budget (GPUAIO_PINNED_BUDGET, default 1 GiB)",
        st.budget / MiB,
        "lower",
        target=st.budget / MiB,
        target_of="value",
        hits=st.hits,
        misses=st.misses,
        waits=st.waits,
    )
    print(
        f"\npinned pool: peak reserved {st.peak_reserved / MiB:.0f} MiB of a "
        f"{st.budget / MiB:.0f} MiB budget (hits {st.hits}, misses {st.misses}, waits {st.waits})"
    )
    return rec


# -- sweep ----------------------------------------------------------------
def install(rt: Any, stager: Stager, host: HostPool) -> None:
    rt.extras["stager"] = stager
    rt.host = host


async def sweep(ctx: Ctx) -> list[H.Record]:
    """Staging knobs: chunk x depth x host threads, each against the default, interleaved."""
    rt, s, dev = ctx.rt, ctx.stream, ctx.dev
    sizes: tuple[int, ...]
    chunks: tuple[int, ...]
    depths: tuple[int, ...]
    threads: tuple[int, ...]
    if ctx.args.quick:
        sizes, chunks, depths, threads = (4 * MiB, 16 * MiB), (1, 4), (2, 4), (2, 4)
    else:
        sizes, chunks, depths, threads = (
            (256 * MiB, 1 * GiB),
            (8, 16, 32, 64),
            (2, 4, 8),
            (4, 8, 12),
        )
    if ctx.args.sizes:
        sizes = tuple(ctx.args.sizes)
    default_cfg = StagingConfig()
    default_host = rt.host
    default_stager = rt.stager
    if default_stager is None:
        print("staging is off (GPUAIO_STAGING=0): nothing to sweep")
        return []
    default_desc = (
        f"default staging: chunk {default_cfg.max_chunk // MiB} MiB, depth {default_cfg.depth}, "
        f"{default_host.threads} host threads"
    )
    print(f"sweep against the {default_desc}")
    bufs = {}
    for n in sizes:
        src = filled(n, 0x44)
        bufs[n] = (src, np.full(n, 0x5A, np.uint8), dev.empty(n))
    records: list[H.Record] = []
    table: dict[tuple[int, int, int], dict[str, float | None]] = {}
    for c in chunks:
        for dp in depths:
            for t in threads:
                cand = Stager(rt, StagingConfig(max_chunk=c * MiB, depth=dp))
                cand_host = HostPool(t)
                pools = {
                    "default": (default_stager, default_host),
                    "candidate": (cand, cand_host),
                }
                timers: dict[str, H.Timer] = {}
                for n, (src, dst, d) in bufs.items():
                    for who in pools:
                        timers[f"{who}:h2d:{n}"] = H.async_timer(
                            functools.partial(s.copy, d, src), 1
                        )
                        timers[f"{who}:d2h:{n}"] = H.async_timer(
                            functools.partial(s.copy, dst, d), 1
                        )

                def before(name: str, pools: dict[str, Any] = pools) -> None:
                    install(rt, *pools[name.split(":")[0]])

                res = await H.interleave(
                    timers, reps=ctx.args.reps, warmup=ctx.args.warmup, before=before
                )
                install(rt, default_stager, default_host)
                cand.close()
                cand_host.close()
                row: dict[str, float | None] = {}
                for n in sizes:
                    for dirn in ("h2d", "d2h"):
                        mine = res.median(f"candidate:{dirn}:{n}")
                        base = res.median(f"default:{dirn}:{n}")
                        v = n / mine / 1e9 if mine else None
                        b = n / base / 1e9 if base else None
                        row[f"{dirn}_{H.fmt_size(n)}"] = v
                        err = res.errors.get(f"candidate:{dirn}:{n}")
                        records.append(
                            H.record(
                                f"sweep_{dirn}_{H.fmt_size(n)}_chunk{c}MiB_depth{dp}_threads{t}",
                                "GB/s",
                                v,
                                default_desc,
                                b,
                                "higher",
                                note=f"failed: {err}" if err else None,
                                chunk_mib=c,
                                depth=dp,
                                threads=t,
                            )
                        )
                table[(c, dp, t)] = row
                ratios = [r["ratio"] for r in records[-len(row) :]]
                cells = (
                    f"{k} {_fmt(v)} ({'null' if q is None else f'{q:.2f}'}x)"
                    for (k, v), q in zip(row.items(), ratios, strict=True)
                )
                print(f"  chunk {c:3d} MiB depth {dp} threads {t:2d}: " + "  ".join(cells))
    print_sweep(table)
    return records


def _fmt(v: float | None) -> str:
    return "  null" if v is None else f"{v:6.2f}"


def print_sweep(table: dict[tuple[int, int, int], dict[str, float | None]]) -> None:
    if not table:
        return
    cols = list(next(iter(table.values())))
    best = {col: max(table, key=lambda k: table[k][col] or 0.0) for col in cols}
    print("\nsweep: gpuaio pageable GB/s (median); * marks the best per column")
    print("  (each line above also gives the ratio to the default, measured interleaved)")
    print(f"  {'chunk MiB':>9} {'depth':>5} {'threads':>7}  " + "  ".join(f"{c:>12}" for c in cols))
    for key, row in table.items():
        cells = "  ".join(f"{_fmt(row[c]):>11}{'*' if best[c] == key else ' '}" for c in cols)
        print(f"  {key[0]:>9} {key[1]:>5} {key[2]:>7}  {cells}")


# -- main -----------------------------------------------------------------
async def run(args: argparse.Namespace, card: H.Card) -> list[H.Record]:
    dev = gpuaio.Device(0)
    peers: dict[str, Any] = {}
    notes: dict[str, str] = {}
    if not args.sweep:
        peers, notes = load_peers(card.backend, not args.no_peers)
    H.freeze_heap()
    pools = {
        t: ThreadPoolExecutor(t - 1, thread_name_prefix="bench-copy") for t in HOST_THREADS if t > 1
    }
    for pool in pools.values():
        pool.submit(lambda: None).result()
    records: list[H.Record] = []
    async with dev.stream() as s:
        ctx = Ctx(args, dev, s, peers, notes, pools)
        try:
            if args.sweep:
                return await sweep(ctx)
            biggest = max(args.sizes, default=0)
            threshold = min(DERIVED_MIN, biggest)
            for n in args.sizes:
                t0 = time.perf_counter()
                records += await bench_size(ctx, n, derived=n >= threshold)
                print(f"  ({H.fmt_size(n)} took {time.perf_counter() - t0:.1f} s)")
            if not args.no_soak:
                records += await soak(ctx)
                records += await memory_flat(ctx)
                records.append(pinned_peak(ctx))
        finally:
            for pool in pools.values():
                pool.shutdown()
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="sizes up to 16 MiB, fewer reps")
    p.add_argument(
        "--sizes",
        type=lambda t: [H.parse_size(x) for x in t.split(",") if x.strip()],
        help="comma-separated sizes, e.g. 64K,16M,1G (default 4K..1G; --quick up to 16M)",
    )
    p.add_argument("--reps", type=int, help="timed repetitions per method (default 7; quick 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    p.add_argument(
        "--loop", choices=H.LOOPS, default="asyncio", help="event loop (default asyncio)"
    )
    p.add_argument("--no-peers", action="store_true", help="skip torch and CuPy")
    p.add_argument(
        "--no-soak",
        action="store_true",
        help="sizes only: skip the 8 GiB soak, the memory check and the pool's peak "
        "(A/B runs of a few sizes)",
    )
    p.add_argument(
        "--sweep", action="store_true", help="sweep chunk size x depth x host threads instead"
    )
    p.add_argument(
        "--flat-count", type=int, default=FLAT_COUNT, help="transfers in memory_flat_10k"
    )
    p.add_argument("--out-dir", help="where to write the results (default benchmarks/results)")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=float(os.environ.get("GPUAIO_BENCH_SWITCH_INTERVAL", "0")) or None,
        help="sys.setswitchinterval() in seconds for the whole run (default: Python's 0.005; "
        "or $GPUAIO_BENCH_SWITCH_INTERVAL)",
    )
    args = p.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
        print(f"  sys.setswitchinterval({args.switch_interval})")
    if args.sizes is None and not args.sweep:
        args.sizes = [n for n in FULL_SIZES if not args.quick or n <= QUICK_MAX]
    if args.reps is None:
        args.reps = 5 if args.quick else 7
    if args.reps < 5:
        p.error("--reps must be at least 5 (medians of >= 5 repetitions)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    H.watchdog()
    reason = H.loop_unavailable(args.loop)
    if reason:
        print(f"cannot run on {args.loop}: {reason}")
        return 2
    card = H.detect_card()
    suite = "transfers-sweep" if args.sweep else "transfers"
    H.banner(suite, card)
    print(
        f"  loop {args.loop}; reps {args.reps} (+{args.warmup} warm-up), interleaved; "
        "destinations pre-touched (page faults of fresh buffers would dominate)"
    )
    t0 = time.perf_counter()
    records = H.run_on(args.loop, run, args, card)
    print()
    H.print_targets(records)
    config = {
        "loop": args.loop,
        "reps": args.reps,
        "warmup": args.warmup,
        "quick": args.quick,
        "staging": _staging_desc(),
        "heap": "frozen once the peers were imported (gc.freeze)",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    H.write_results(suite, records, args.out_dir, card=card, config=config)
    print(f"suite took {time.perf_counter() - t0:.0f} s")
    return 0


def _staging_desc() -> dict[str, Any]:
    cfg = StagingConfig()
    return {
        "chunk_bytes": cfg.max_chunk,
        "depth": cfg.depth,
        "inline_max": cfg.inline_max,
        "host_threads": H.runtime().host.threads,
    }


if __name__ == "__main__":
    sys.exit(main())
