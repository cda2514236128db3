#!/usr/bin/env python
"""The fastest awaitable copy one can write by hand, size by size, against torch and CuPy.

Issue 13's first target asks gpuaio's awaited copy from and into pageable
memory to be as fast as the best of torch and CuPy at every size. Where it
is not, is the gap gpuaio's own cost, or what any awaitable that keeps the
event loop free must pay on this host? This probe measures, in one process,
per size and direction (the host side pageable, pre-touched):

* ``torch``, ``cupy``: the peers' blocking calls, timed as
  ``benchmarks/transfers.py`` times them (the best of the two is the target);
* ``naive``: ``cuMemcpyAsync`` + ``cuStreamSynchronize`` on the loop thread,
  through ``cuda.bindings`` (blocks the loop for the whole copy);
* ``hand_inline`` (up to ``--inline-max``, 1 MiB like gpuaio's inline
  path): what a user could write in a dozen lines: a ``memmove`` into a
  pinned block on the loop thread, ``cuMemcpyAsync``, ``cuEventRecord``, then
  ``cuEventQuery`` between bare yields of the task; into pageable memory the
  DMA into the block first and the ``memmove`` out after it. No checks, no
  ordering against other work, no completion engine;
* ``hand_thread``: a persistent thread runs ``naive`` and posts the result to
  the loop with ``call_soon_threadsafe``: the least a hand-off to another
  thread costs;
* ``gpuaio``: ``await stream.copy(dst, src)``.

And from and into pinned memory (``*_pinned`` rows, issue 13's second
target): ``raw``, the blocking call; ``hand_pinned``, ``cuMemcpyAsync``,
``cuEventRecord`` and ``cuEventQuery`` between bare yields; ``gpuaio``.

``floor`` is the faster of the two hand-written awaitables. Where the floor
is slower than the best peer, no awaitable in Python can meet the target on
this host; where it is faster, what is left is gpuaio's own cost.

A second section, ``stages``, splits an inline upload (4 KiB to 1 MiB) into
its call, whose ``memmove`` it includes, and its await, beside the
``memmove`` alone and the raw pinned DMA. A third, ``ladder``, goes from the
hand-written pinned 4 KiB upload to gpuaio's one piece at a time (gpuaio's
backend calls, then its classification and checks), counts the driver
calls of gpuaio's ops, and profiles the loop thread
(``floor_profile_<loop>.txt``). A fourth, ``cold``, times single copies one
at a time, back to back (``warm``) and each after ``--burn-ms`` of
unrelated Python on the loop thread (``cold``), as ``transfers.py`` does
from 8 MiB (one op per sample, between other methods' samples): gpuaio's
pinned and pageable copies, the raw call, torch's upload, and a pure-Python
function of about gpuaio's footprint (40 small functions), medians of
``--cold-reps``.

Microseconds throughout. GPU only (``--allow-sim`` runs it on the simulated
backend to check the script, with the hand-written methods through the
backend's calls). Writes ``floor_probe_<loop>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

# The benchmarks' harness, which puts this checkout's gpuaio on the path only
# where none is importable: a gpuaio on PYTHONPATH (another tree, a compiled
# install) is the one measured.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _harness as H
import transfers

import gpuaio
from gpuaio._api.runtime import current_runtime
from gpuaio._engine.pool import parse_size

RESULTS: dict[str, Any] = {"rows": [], "cold": []}
fmt = H.fmt_size  # 4KiB, 16MiB: as in record names


class _Yield:
    """One bare yield of the awaiting task: a turn of the loop, no coroutine."""

    def __await__(self) -> Any:
        yield


YIELD = _Yield()


class Raw:
    """The driver calls a hand-written copy makes, bound to one stream.

    On a GPU straight through ``cuda.bindings`` (as a user would write it);
    on the simulated backend through its calls, to check the script.
    """

    def __init__(self, stream: Any) -> None:
        rt = current_runtime()
        self.be = rt.backend
        self.native = stream._native
        self.cuda = self.be.name == "cuda"
        if self.cuda:
            from cuda.bindings import driver as cu

            self.cu = cu
            self.h = self.native.handle
            self.ctx = self.native.ctx
            cu.cuCtxSetCurrent(self.ctx)
            err, ev = cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)
            if int(err):
                raise RuntimeError(f"cuEventCreate: {err}")
            self.ev = ev
            self.not_ready = cu.CUresult.CUDA_ERROR_NOT_READY
        else:
            self.ev = self.be.event_create(0)

    def enter(self) -> None:
        """Make the stream's context current in this thread (hand_thread's worker)."""
        if self.cuda:
            self.cu.cuCtxSetCurrent(self.ctx)

    def copy(self, dst: int, src: int, n: int) -> None:
        if self.cuda:
            (err,) = self.cu.cuMemcpyAsync(dst, src, n, self.h)
            if err:
                raise RuntimeError(f"cuMemcpyAsync: {err}")
        else:
            self.be.memcpy_async(dst, src, n, self.native)

    def record(self) -> None:
        if self.cuda:
            self.cu.cuEventRecord(self.ev, self.h)
        else:
            self.be.event_record(self.ev, self.native)

    def fired(self) -> bool:
        if self.cuda:
            (err,) = self.cu.cuEventQuery(self.ev)
            if err == self.not_ready:
                return False
            if err:
                raise RuntimeError(f"cuEventQuery: {err}")
            return True
        return bool(self.be.event_query(self.ev))

    def sync(self) -> None:
        if self.cuda:
            (err,) = self.cu.cuStreamSynchronize(self.h)
            if err:
                raise RuntimeError(f"cuStreamSynchronize: {err}")
        else:
            self.be.stream_synchronize(self.native)

    def close(self) -> None:
        if self.cuda:
            self.cu.cuEventDestroy(self.ev)
        else:
            self.be.event_destroy(self.ev)


class _Counting:
    """Stands in for ``cuda.bindings.driver``: counts each ``cu*`` call by name."""

    def __init__(self, module: Any, counts: dict[str, int]) -> None:
        self._module = module
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if not (name.startswith("cu") and callable(value)):
            return value
        counts = self._counts

        def call(*a: Any, **k: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return value(*a, **k)

        return call


class Poster:
    """A persistent thread that runs a blocking call and posts its end to the loop."""

    def __init__(self, raw: Raw) -> None:
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.raw = raw
        self.thread = threading.Thread(target=self._run, name="floor-poster", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.raw.enter()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, loop, fut = job
            try:
                fn()
            except BaseException as exc:  # reported to the awaiting task
                loop.call_soon_threadsafe(fut.set_exception, exc)
            else:
                loop.call_soon_threadsafe(fut.set_result, None)

    async def run(self, fn: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.jobs.put((fn, loop, fut))
        await fut

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)


async def interleave(timers: dict[str, H.Timer], reps: int) -> dict[str, float]:
    """Median seconds per op of each timer (``_harness.interleave``: the order rotates)."""
    res = await H.interleave(timers, reps=reps, warmup=1)
    for name, err in res.errors.items():
        raise RuntimeError(f"{name} failed: {err}")
    return {name: statistics.median(v) for name, v in res.samples.items()}


async def sizes_section(
    sizes: list[int], reps: int, inline_max: int, peers: dict[str, Any]
) -> None:
    dev = gpuaio.Device(0)
    s = dev.stream()
    raw = Raw(s)
    poster = Poster(Raw(s))
    try:
        for n in sizes:
            await one_size(dev, s, raw, poster, n, reps, inline_max, peers)
    finally:
        poster.close()
        raw.close()
        poster.raw.close()
        await s.aclose()


async def one_size(
    dev: Any,
    s: Any,
    raw: Raw,
    poster: Poster,
    n: int,
    reps: int,
    inline_max: int,
    peers: dict[str, Any],
) -> None:
    memmove = ctypes.memmove
    torch, cupy = peers.get("torch"), peers.get("cupy")
    src = np.frombuffer(os.urandom(n), np.uint8).copy()
    dst = np.full(n, 0xA5, np.uint8)
    d = dev.empty(n)
    blk = gpuaio.pinned_empty(n)
    sp, dp, dd, bp = src.ctypes.data, dst.ctypes.data, d.ptr, blk.ctypes.data
    await s.copy(d, src)
    inner = max(1, min(256, (8 << 20) // n))

    def naive(to: int, frm: int, n: int = n) -> Callable[[], None]:
        def call() -> None:
            raw.copy(to, frm, n)
            raw.sync()

        return call

    async def hand_h2d(n: int = n, sp: int = sp, bp: int = bp, dd: int = dd) -> None:
        memmove(bp, sp, n)
        raw.copy(dd, bp, n)
        raw.record()
        while not raw.fired():
            await YIELD

    async def hand_d2h(n: int = n, dp: int = dp, bp: int = bp, dd: int = dd) -> None:
        raw.copy(bp, dd, n)
        raw.record()
        while not raw.fired():
            await YIELD
        memmove(dp, bp, n)

    thread_h2d, thread_d2h = naive(dd, sp), naive(dp, dd)
    timers: dict[str, dict[str, H.Timer]] = {
        "h2d": {
            "naive": H.sync_timer(naive(dd, sp), inner),
            "hand_thread": H.async_timer(lambda: poster.run(thread_h2d), inner),
            "gpuaio": H.async_timer(lambda: s.copy(d, src), inner),
        },
        "d2h": {
            "naive": H.sync_timer(naive(dp, dd), inner),
            "hand_thread": H.async_timer(lambda: poster.run(thread_d2h), inner),
            "gpuaio": H.async_timer(lambda: s.copy(dst, d), inner),
        },
    }
    pin = gpuaio.pinned_empty(n)
    pp = pin.ctypes.data

    async def hand_pinned(to: int, frm: int, n: int = n) -> None:
        raw.copy(to, frm, n)
        raw.record()
        while not raw.fired():
            await YIELD

    timers["h2d_pinned"] = {
        "raw": H.sync_timer(naive(dd, pp), inner),
        "hand_pinned": H.async_timer(lambda: hand_pinned(dd, pp), inner),
        "gpuaio": H.async_timer(lambda: s.copy(d, pin), inner),
    }
    timers["d2h_pinned"] = {
        "raw": H.sync_timer(naive(pp, dd), inner),
        "hand_pinned": H.async_timer(lambda: hand_pinned(pp, dd), inner),
        "gpuaio": H.async_timer(lambda: s.copy(pin, d), inner),
    }
    if n <= inline_max:
        timers["h2d"]["hand_inline"] = H.async_timer(hand_h2d, inner)
        timers["d2h"]["hand_inline"] = H.async_timer(hand_d2h, inner)
    keep: list[Any] = []
    if torch is not None:
        t_src, t_dst = torch.from_numpy(src), torch.from_numpy(dst)
        t_dev = t_src.to("cuda")
        torch.cuda.synchronize()
        keep += [t_dev]

        def t_h2d(t_src: Any = t_src) -> None:
            t_src.to("cuda", non_blocking=True)
            torch.cuda.synchronize()

        timers["h2d"]["torch"] = H.sync_timer(t_h2d, inner)
        timers["d2h"]["torch"] = H.sync_timer(
            lambda t_dst=t_dst, t_dev=t_dev: t_dst.copy_(t_dev), inner
        )
    if cupy is not None:
        c_dev = cupy.asarray(src)
        cupy.cuda.Device().synchronize()
        keep += [c_dev]

        def c_h2d(src: Any = src) -> None:
            cupy.asarray(src)
            cupy.cuda.get_current_stream().synchronize()

        timers["h2d"]["cupy"] = H.sync_timer(c_h2d, inner)
        timers["d2h"]["cupy"] = H.sync_timer(lambda c_dev=c_dev, dst=dst: c_dev.get(out=dst), inner)
    for direction, group in timers.items():
        med = await interleave(group, reps)
        us = {k: v * 1e6 for k, v in med.items()}
        row = report(n, direction, us)
        RESULTS["rows"].append(row)
    # Both gpuaio paths moved the right bytes (checked once, untimed).
    d2 = dev.empty(n)
    await s.copy(d2, src)
    back = np.zeros(n, np.uint8)
    await s.copy(back, d2)
    if not np.array_equal(back, src):
        print(f"  {n}: MISMATCH in gpuaio's round trip")
    del keep
    if torch is not None:
        torch.cuda.empty_cache()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


def report(n: int, direction: str, us: dict[str, float]) -> dict[str, Any]:
    # Pinned rows compare with the raw call (target 2), pageable ones with the
    # best of torch and CuPy (target 1).
    peers = {k: us[k] for k in ("torch", "cupy", "raw") if k in us}
    best_peer = min(peers.values()) if peers else None
    hands = [us[k] for k in ("hand_inline", "hand_thread", "hand_pinned") if k in us]
    floor = min(hands)
    row: dict[str, Any] = {"bytes": n, "dir": direction, "us": us, "floor_us": floor}
    if best_peer is not None:
        row["best_peer_us"] = best_peer
        row["floor_over_peer"] = best_peer / floor  # > 1: the floor beats the peer
        row["gpuaio_over_peer"] = best_peer / us["gpuaio"]
    row["gpuaio_over_floor"] = floor / us["gpuaio"]
    cols = "  ".join(f"{k} {v:8.1f}" for k, v in us.items())
    tail = (
        f"| floor/peer {row['floor_over_peer']:.2f} gpuaio/peer {row['gpuaio_over_peer']:.2f}"
        if best_peer is not None
        else ""
    )
    print(f"  {fmt(n):>7} {direction}: {cols} {tail} gpuaio/floor {row['gpuaio_over_floor']:.2f}")
    return row


# -- cold ----------------------------------------------------------------------
def _footprint() -> Callable[[], int]:
    """A pure-Python call of about gpuaio's footprint: 40 small functions, each its own dict."""
    src = "\n".join(
        f"D{i} = {{'k' + str(j): j for j in range(8)}}\n"
        f"def f{i}(x):\n    d = D{i}\n    return x + d['k1'] + d['k5'] + len(d)\n"
        for i in range(40)
    )
    ns: dict[str, Any] = {}
    exec(src, ns)
    fs = [ns[f"f{i}"] for i in range(40)]

    def call() -> int:
        x = 0
        for f in fs:
            x = f(x)
        return x

    return call


def burn(seconds: float) -> None:
    """Unrelated Python on the loop thread, as another benchmark method or a service's
    request handling would run between two copies."""
    end = time.perf_counter() + seconds
    table: dict[str, int] = {}
    i = 0
    while time.perf_counter() < end:
        table[str(i % 4096)] = i
        i += 1


async def cold_section(sizes: list[int], reps: int, burn_s: float, peers: dict[str, Any]) -> None:
    dev = gpuaio.Device(0)
    s = dev.stream()
    raw = Raw(s)
    footprint = _footprint()
    try:
        for n in sizes:
            d = dev.empty(n)
            pin = gpuaio.pinned_empty(n)
            src = np.ones(n, np.uint8)
            methods: dict[str, Callable[[], Any]] = {
                "raw_pinned": lambda d=d, pin=pin, n=n: (  # type: ignore[misc]
                    raw.copy(d.ptr, pin.ctypes.data, n),
                    raw.sync(),
                ),
                "gpuaio_pinned": lambda d=d, pin=pin: s.copy(d, pin),  # type: ignore[misc]
                "naive_pageable": lambda d=d, src=src, n=n: (  # type: ignore[misc]
                    raw.copy(d.ptr, src.ctypes.data, n),
                    raw.sync(),
                ),
                "gpuaio_pageable": lambda d=d, src=src: s.copy(d, src),  # type: ignore[misc]
                "python_footprint": footprint,
            }
            torch = peers.get("torch")
            if torch is not None:
                t_src = torch.from_numpy(src)

                def t_h2d(t_src: Any = t_src, torch: Any = torch) -> None:
                    t_src.to("cuda", non_blocking=True)
                    torch.cuda.synchronize()

                methods["torch_pageable"] = t_h2d
            for name, fn in methods.items():
                warm: list[float] = []
                cold: list[float] = []
                for r in range(reps):
                    for mode in ("warm", "cold") if r % 2 == 0 else ("cold", "warm"):
                        if mode == "cold":
                            burn(burn_s)
                        else:
                            res = fn()  # the one before, back to back
                            if isinstance(res, Awaitable):
                                await res
                        t0 = time.perf_counter()
                        res = fn()
                        if isinstance(res, Awaitable):
                            await res
                        (warm if mode == "warm" else cold).append(time.perf_counter() - t0)
                        await asyncio.sleep(0)
                w, c = statistics.median(warm) * 1e6, statistics.median(cold) * 1e6
                RESULTS["cold"].append({"bytes": n, "method": name, "warm_us": w, "cold_us": c})
                print(f"  {fmt(n):>7} {name:17} warm {w:9.1f} us  cold {c:9.1f} us  (+{c - w:.1f})")
    finally:
        raw.close()
        await s.aclose()


async def stages_section(sizes: list[int], reps: int) -> None:
    """An inline upload's call (its ``memmove`` included) and await, against the
    ``memmove`` alone into a pinned block and the raw pinned DMA, back to back."""
    dev = gpuaio.Device(0)
    s = dev.stream()
    raw = Raw(s)
    try:
        for n in sizes:
            d = dev.empty(n)
            src = np.frombuffer(os.urandom(n), np.uint8).copy()
            blk = gpuaio.pinned_empty(n)
            bp, sp = blk.ctypes.data, src.ctypes.data
            call: list[float] = []
            wait: list[float] = []
            move: list[float] = []
            dma: list[float] = []
            for _ in range(reps):
                t0 = time.perf_counter()
                op = s.copy(d, src)
                t1 = time.perf_counter()
                await op
                t2 = time.perf_counter()
                ctypes.memmove(bp, sp, n)
                t3 = time.perf_counter()
                raw.copy(d.ptr, bp, n)
                raw.sync()
                t4 = time.perf_counter()
                call.append(t1 - t0)
                wait.append(t2 - t1)
                move.append(t3 - t2)
                dma.append(t4 - t3)
            row = {
                "bytes": n,
                "call_us": statistics.median(call) * 1e6,
                "await_us": statistics.median(wait) * 1e6,
                "memmove_us": statistics.median(move) * 1e6,
                "raw_pinned_us": statistics.median(dma) * 1e6,
            }
            RESULTS.setdefault("stages", []).append(row)
            print(
                f"  {fmt(n):>7} h2d pageable: call {row['call_us']:.1f} await {row['await_us']:.1f}"
                f" | memmove {row['memmove_us']:.1f} raw pinned {row['raw_pinned_us']:.1f} us"
            )
    finally:
        raw.close()
        await s.aclose()


async def ladder_section(reps: int, profile_ops: int, out: Path) -> None:
    """From the hand-written pinned 4 KiB upload to gpuaio's, one piece at a time;
    the driver calls each of gpuaio's ops makes; a profile of the loop thread."""
    from gpuaio._api.describe import describe
    from gpuaio._api.transfers import check_copy

    rt = current_runtime()
    be = rt.backend
    dev = gpuaio.Device(0)
    s = dev.stream()
    raw = Raw(s)
    nat = s._native
    n = 4096
    d = dev.empty(n)
    pin = gpuaio.pinned_empty(n)
    src = np.ones(n, np.uint8)
    ev = be.event_create(0)
    dp, pp = d.ptr, pin.ctypes.data

    async def hand_raw() -> None:
        raw.copy(dp, pp, n)
        raw.record()
        while not raw.fired():
            await YIELD

    async def hand_backend() -> None:  # gpuaio's backend calls: context check, errors
        be.memcpy_async(dp, pp, n, nat)
        be.event_record(ev, nat)
        while not be.event_query(ev):
            await YIELD

    async def hand_described() -> None:  # and gpuaio's classification and checks
        di = describe(d, rt, "dst")
        si = describe(pin, rt, "src")
        check_copy(di, si)
        be.memcpy_async(di.ptr, si.ptr, n, nat)
        be.event_record(ev, nat)
        while not be.event_query(ev):
            await YIELD

    methods: dict[str, Callable[[], Awaitable[None]]] = {
        "hand_raw": hand_raw,
        "hand_backend": hand_backend,
        "hand_described": hand_described,
        "gpuaio_pinned": lambda: s.copy(d, pin),
        "gpuaio_pageable": lambda: s.copy(d, src),
    }
    try:
        med = await interleave({k: H.async_timer(f, 256) for k, f in methods.items()}, reps)
        rows = {k: v * 1e6 for k, v in med.items()}
        RESULTS["ladder"] = rows
        for k, v in rows.items():
            print(f"  4KiB h2d {k:16} {v:7.2f} us")
        # Driver calls per op: every ``cu*`` call of the CUDA backend's modules.
        if be.name == "cuda":
            import importlib

            counts: dict[str, int] = {}
            mods = [
                importlib.import_module(f"gpuaio.backends.cuda.{m}")
                for m in ("_driver", "_streams", "_memory", "_launch")
            ]
            real = mods[0].driver
            proxy = _Counting(real, counts)
            pairs = (("pinned", methods["gpuaio_pinned"]), ("pageable", methods["gpuaio_pageable"]))
            for label, fn in pairs:
                counts.clear()
                for m in mods:
                    m.driver = proxy  # type: ignore[attr-defined]
                try:
                    for _ in range(1000):
                        await fn()
                finally:
                    for m in mods:
                        m.driver = real  # type: ignore[attr-defined]
                per_op = {k: v / 1000 for k, v in sorted(counts.items())}
                RESULTS.setdefault("calls_per_op", {})[label] = per_op
                print(f"  driver calls per op, gpuaio {label}: {per_op}")
        # A profile of the loop thread, by own time; main() writes it, off the loop.
        RESULTS["profile_text"] = "".join(
            [
                await H.profile_awaits(
                    methods[f"gpuaio_{label}"],
                    profile_ops,
                    f"4 KiB h2d {label}, {profile_ops} awaited copies, by own time",
                    35,
                )
                for label in ("pinned", "pageable")
            ]
        )
    finally:
        be.event_destroy(ev)
        raw.close()
        await s.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sizes", default="4K,64K,256K,1M,4M,16M,64M")
    ap.add_argument("--cold-sizes", default="4K,1M,64M")
    ap.add_argument("--stage-sizes", default="4K,256K,1M")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--cold-reps", type=int, default=41)
    ap.add_argument("--burn-ms", type=float, default=2.0)
    ap.add_argument("--inline-max", default="1M")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--skip", default="", help="sections to skip: sizes,stages,ladder,cold")
    ap.add_argument("--out", default=".")
    ap.add_argument("--allow-sim", action="store_true")
    args = ap.parse_args()
    be = current_runtime().backend
    if be.name != "cuda" and not args.allow_sim:
        print("floor_probe: needs a GPU (or --allow-sim to check the script)")
        return 2
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    sizes = [parse_size(x) for x in args.sizes.split(",") if x.strip()]
    cold_sizes = [parse_size(x) for x in args.cold_sizes.split(",") if x.strip()]
    stage_sizes = [parse_size(x) for x in args.stage_sizes.split(",") if x.strip()]
    RESULTS.update(
        card=gpuaio.Device(0).name,
        loop=args.loop,
        git=os.environ.get("GPUAIO_GIT_COMMIT", ""),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        python=sys.version.split()[0],
        gpuaio_compiled=H.compiled(),
        reps=args.reps,
        burn_ms=args.burn_ms,
    )
    peers, _ = transfers.load_peers(be.name, not args.no_peers)
    RESULTS["peers"] = sorted(peers)
    hot = RESULTS["gpuaio_compiled"]
    print(f"gpuaio from {Path(gpuaio.__file__).parent}, hot path compiled: {hot or 'no'}")

    async def run() -> None:
        if "sizes" not in skip:
            print(f"sizes ({args.loop}), medians of {args.reps} interleaved rounds, us per copy:")
            await sizes_section(sizes, args.reps, parse_size(args.inline_max), peers)
        if "stages" not in skip:
            print(
                f"stages ({args.loop}): an inline upload, back to back, medians of {args.cold_reps}"
            )
            await stages_section(stage_sizes, args.cold_reps)
        if "ladder" not in skip:
            print(f"ladder ({args.loop}): a 4 KiB upload from the hand-written one to gpuaio's")
            await ladder_section(args.reps, 3000, Path(args.out))
        if "cold" not in skip:
            print(
                f"cold ({args.loop}): one copy at a time, after {args.burn_ms} ms of other Python"
            )
            await cold_section(cold_sizes, args.cold_reps, args.burn_ms * 1e-3, peers)

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"floor_probe_{args.loop}.json"
    profile = RESULTS.pop("profile_text", None)
    if profile:
        (out / f"floor_profile_{args.loop}.txt").write_text(profile)
    (out / name).write_text(json.dumps(RESULTS, indent=1) + "\n")
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
