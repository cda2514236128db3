#!/usr/bin/env python
"""Completion benchmark (suite ``completion``): how fast an awaited GPU op wakes its task.

For every completion strategy in ``gpuaio.STRATEGIES``, the watcher-only
``thread`` engine (``_thread_engine.py``: ``events`` without loop-side
polling, which shows what that polling buys) and every peer, on asyncio,
uvloop and trio, measured interleaved in one process:

* wake latency: the round trip of one awaited tiny op (a 4-byte memset of
  device memory: enqueue, GPU, completion detection, loop wake-up), p50 and
  p99 over ``--awaits`` awaits;
* throughput of awaited tiny ops with 1, 100 and 1,000 concurrent tasks
  (each task loops over its own 4-byte slice; one stream per task up to 16
  streams, round robin);
* idle CPU of the process over 2 s with nothing pending (gpuaio strategies).

Peers do the same memset with the raw driver call on their own streams, then
wait their way: ``cuStreamSynchronize`` on the loop thread (blocks the loop),
``anyio.to_thread.run_sync(cuStreamSynchronize)``, numba-cuda's
``Stream.async_done()`` (asyncio only), CuPy's and PyTorch's
``Stream.synchronize`` in a thread. A peer that cannot run gets null records
with a note saying why.

Last, the GIL stall: a pure-Python busy loop holds the GIL for ~1 s while a
stream runs 128 memsets, each followed by the strategy's completion marker;
the GPU time of that stream with the default strategy against ``hostfunc``.
The memsets are queued behind a host function that holds the stream, so the
count must stay well inside the stream's launch queue: enqueueing into a full
queue blocks the calling thread until the GPU drains it, which here would be
the loop thread that is to release the hold (the hang of earlier runs, with
2,000 memsets and their markers).
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import _harness as H
import _thread_engine
import anyio
import anyio.to_thread
import numpy as np

import gpuaio

TASKS = (1, 100, 1000)
NSTREAMS = 16
GIL_OPS = 128  # x2-3 queue entries each with markers: well inside the launch queue (256 hit
# the failsafe once in 10 hostfunc runs on an H200, 2026-12-02)
TO_THREAD = "memset + await anyio.to_thread.run_sync(cuStreamSynchronize)"
PEERS = ("numba", "cupy", "torch")
STRATEGIES: tuple[str, ...] = (*gpuaio.STRATEGIES, _thread_engine.register())
"""gpuaio's strategies, then the benchmark's own ``thread`` engine (registered here)."""


@dataclass
class Method:
    """One way of awaiting a tiny op."""

    name: str
    what: str
    one: Callable[[int, int], Awaitable[None]] | None
    """``one(task, value)``: enqueue a memset of the task's slice and wait for it."""
    strategy: str | None = None
    """The gpuaio completion strategy it needs (None for peers)."""
    yields: bool = True
    """False when ``one`` never yields to the loop (then workers checkpoint)."""
    note: str | None = None
    """Why it cannot run (then ``one`` is None)."""


# -- peers ----------------------------------------------------------------
def handle_int(h: Any) -> int:
    """A stream handle as an int: ``CUstream``, ctypes ``c_void_p`` or int."""
    if isinstance(h, int):
        return h
    value = getattr(h, "value", None)
    if isinstance(value, int):
        return value
    return int(h)


def load_peers(backend: str, enabled: bool) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """``NSTREAMS`` streams of each peer library that can run here; else a note why not."""
    peers: dict[str, list[Any]] = {}
    notes: dict[str, str] = {}
    for name in PEERS:
        if not enabled:
            notes[name] = f"{name} skipped (--no-peers)"
            continue
        if backend == "sim":
            notes[name] = f"the sim backend has no real device to share with {name}"
            continue
        try:
            if name == "numba":
                from numba import cuda as nb_cuda

                if not nb_cuda.is_available():
                    raise RuntimeError("numba.cuda.is_available() is False")
                streams = [nb_cuda.stream() for _ in range(NSTREAMS)]
                if not hasattr(streams[0], "async_done"):
                    raise RuntimeError("this numba-cuda has no Stream.async_done()")
            elif name == "cupy":
                import cupy

                cupy.zeros(1)
                streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(NSTREAMS)]
            else:
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError("torch.cuda.is_available() is False")
                torch.zeros(1, device="cuda")
                streams = [torch.cuda.Stream() for _ in range(NSTREAMS)]
            peers[name] = streams
        except Exception as exc:
            notes[name] = f"{name} could not run: {type(exc).__name__}: {exc}"
    for name, note in notes.items():
        print(f"  peer {name}: NOT measured: {note}")
    return peers, notes


def peer_handle(name: str, stream: Any) -> int:
    if name == "numba":
        return handle_int(stream.handle)
    if name == "cupy":
        return int(stream.ptr)
    return int(stream.cuda_stream)


# -- methods --------------------------------------------------------------
def make_methods(
    loop: str,
    streams: list[gpuaio.Stream],
    slices: list[gpuaio.DeviceArray],
    peers: dict[str, list[Any]],
    notes: dict[str, str],
) -> list[Method]:
    """Every strategy and peer, bound to this loop's streams and buffers."""
    be = H.runtime().backend
    natives = [s._native for s in streams]
    ptrs = [a.ptr for a in slices]
    methods: list[Method] = []
    for strategy in STRATEGIES:

        async def ours(i: int, v: int) -> None:
            await streams[i % NSTREAMS].memset(slices[i], v)

        methods.append(
            Method(
                strategy,
                f"gpuaio ({strategy}): await stream.memset(4 bytes of device memory)",
                ours,
                strategy=strategy,
            )
        )

    async def raw_sync(i: int, v: int) -> None:
        h = natives[i % NSTREAMS]
        be.memset_async(ptrs[i], v, 4, 1, h)
        be.stream_synchronize(h)

    async def to_thread_sync(i: int, v: int) -> None:
        h = natives[i % NSTREAMS]
        be.memset_async(ptrs[i], v, 4, 1, h)
        await anyio.to_thread.run_sync(be.stream_synchronize, h)

    methods.append(
        Method(
            "raw_sync_on_loop",
            "memset + cuStreamSynchronize called on the loop thread (blocks the loop)",
            raw_sync,
            yields=False,
        )
    )
    methods.append(Method("to_thread_sync", TO_THREAD, to_thread_sync))

    wrapped = {
        name: [be.stream_from_handle(0, peer_handle(name, s)) for s in streams_]
        for name, streams_ in peers.items()
    }

    def peer(
        name: str, what: str, make: Callable[[], Callable[[int, int], Awaitable[None]]]
    ) -> None:
        if name not in peers:
            methods.append(Method(PEER_METHOD[name], what, None, note=notes.get(name)))
        elif name == "numba" and loop == "trio":
            note = "numba-cuda's Stream.async_done() returns an asyncio future: not usable on trio"
            methods.append(Method(PEER_METHOD[name], what, None, note=note))
        else:
            methods.append(Method(PEER_METHOD[name], what, make()))

    def numba_one() -> Callable[[int, int], Awaitable[None]]:
        nb, hs = peers["numba"], wrapped["numba"]

        async def one(i: int, v: int) -> None:
            j = i % NSTREAMS
            be.memset_async(ptrs[i], v, 4, 1, hs[j])
            await nb[j].async_done()

        return one

    def thread_one(name: str) -> Callable[[], Callable[[int, int], Awaitable[None]]]:
        def make() -> Callable[[int, int], Awaitable[None]]:
            ps, hs = peers[name], wrapped[name]

            async def one(i: int, v: int) -> None:
                j = i % NSTREAMS
                be.memset_async(ptrs[i], v, 4, 1, hs[j])
                await anyio.to_thread.run_sync(ps[j].synchronize)

            return one

        return make

    peer("numba", "memset on a numba stream + await Stream.async_done()", numba_one)
    peer(
        "cupy",
        "memset on a cupy stream + await anyio.to_thread.run_sync(stream.synchronize)",
        thread_one("cupy"),
    )
    peer(
        "torch",
        "memset on a torch.cuda.Stream + await anyio.to_thread.run_sync(stream.synchronize)",
        thread_one("torch"),
    )
    return methods


PEER_METHOD = {
    "numba": "numba_async_done",
    "cupy": "cupy_sync_in_thread",
    "torch": "torch_sync_in_thread",
}


def use_strategy(strategy: str | None) -> None:
    """Switch gpuaio's completion strategy if ``strategy`` is not the current one."""
    if strategy is not None and H.runtime().strategy != strategy:
        gpuaio.configure(completion=strategy)  # type: ignore[arg-type]


# -- measurements ---------------------------------------------------------
async def latencies(methods: list[Method], awaits: int, reps: int) -> H.Interleaved:
    """Round-trip seconds of single awaited ops, in ``reps`` interleaved blocks."""
    per_block = -(-awaits // reps)
    samples: dict[str, list[float]] = {m.name: [] for m in methods if m.one}
    by_name = {m.name: m for m in methods}

    def timer(m: Method) -> Callable[[], Awaitable[float]]:
        one = m.one
        assert one is not None

        async def run() -> float:
            for k in range(10):  # warm after a strategy switch
                await one(0, k)
            out = samples[m.name]
            for k in range(per_block):
                t0 = time.perf_counter()
                await one(0, k)
                out.append(time.perf_counter() - t0)
            return 0.0

        return run

    res = await H.interleave(
        {name: timer(by_name[name]) for name in samples},
        reps=reps,
        warmup=1,
        before=lambda name: use_strategy(by_name[name].strategy),
    )
    for name in samples:
        if name in res.errors:
            samples[name] = []
        else:
            samples[name] = samples[name][per_block:]  # the warm-up round
    return H.Interleaved(samples, res.errors)


async def throughput_once(m: Method, ntasks: int, duration: float) -> float:
    """Ops/s of ``ntasks`` tasks each awaiting tiny ops back to back for ``duration`` s.

    The clock starts once every task is spawned and waiting, so spawning
    1,000 tasks does not eat into the measured window.
    """
    one = m.one
    assert one is not None
    counts = [0] * ntasks
    go = anyio.Event()
    deadline = 0.0
    yields = m.yields

    async def worker(i: int) -> None:
        await go.wait()
        k = 0
        while time.perf_counter() < deadline:
            await one(i, k & 0x7FFFFFFF)
            k += 1
            if not yields:
                await H.checkpoint()
        counts[i] = k

    async with anyio.create_task_group() as tg:
        for i in range(ntasks):
            tg.start_soon(worker, i)
        await anyio.sleep(0.01)
        t0 = time.perf_counter()
        deadline = t0 + duration
        go.set()
    return sum(counts) / (time.perf_counter() - t0)


async def throughputs(
    methods: list[Method], ntasks: int, duration: float, reps: int
) -> H.Interleaved:
    by_name = {m.name: m for m in methods if m.one}

    def timer(m: Method) -> Callable[[], Awaitable[float]]:
        return lambda: throughput_once(m, ntasks, duration)

    return await H.interleave(
        {name: timer(m) for name, m in by_name.items()},
        reps=reps,
        warmup=1,
        before=lambda name: use_strategy(by_name[name].strategy),
    )


async def idle_cpu(stream: gpuaio.Stream, slot: gpuaio.DeviceArray, seconds: float) -> float:
    """Process CPU time over ``seconds`` of idling, as % of one core."""
    for k in range(50):
        await stream.memset(slot, k)
    await anyio.sleep(0.2)
    c0, w0 = time.process_time(), time.perf_counter()
    await anyio.sleep(seconds)
    return 100.0 * (time.process_time() - c0) / (time.perf_counter() - w0)


# -- one loop -------------------------------------------------------------
async def loop_suite(
    loop: str,
    args: argparse.Namespace,
    peers: dict[str, list[Any]],
    notes: dict[str, str],
    default: str,
) -> list[H.Record]:
    """Every measurement of one event loop."""
    dev = gpuaio.Device(0)
    streams = [dev.stream() for _ in range(NSTREAMS)]
    d = dev.empty(max(TASKS), np.uint32)
    slices = [d[i : i + 1] for i in range(max(TASKS))]
    methods = make_methods(loop, streams, slices, peers, notes)
    print(f"\n[{loop}] wake latency ({args.awaits} awaits per method, {args.reps} blocks)")
    lat = await latencies(methods, args.awaits, args.reps)
    thr: dict[int, H.Interleaved] = {}
    for n in TASKS:
        print(f"[{loop}] throughput with {n} task(s), {args.reps} x {args.duration} s per method")
        thr[n] = await throughputs(methods, n, args.duration, args.reps)
    idle: dict[str, float] = {}
    for strategy in STRATEGIES:
        use_strategy(strategy)
        idle[strategy] = await idle_cpu(streams[0], slices[0], args.idle)
    use_strategy(default)
    for s in streams:
        await s.aclose()
    return loop_records(loop, methods, lat, thr, idle, default)


def loop_records(
    loop: str,
    methods: list[Method],
    lat: H.Interleaved,
    thr: dict[int, H.Interleaved],
    idle: dict[str, float],
    default: str,
) -> list[H.Record]:
    records: list[H.Record] = []
    us = {name: [x * 1e6 for x in v] for name, v in lat.samples.items()}
    base_lat = us.get("to_thread_sync") or []
    # uvloop: issue 13's target 5; asyncio: the looser bar it had before.
    lat_targets = {"uvloop": (15.0, 60.0), "asyncio": (40.0, 200.0)}
    rows: list[str] = []
    for m in methods:
        gp = m.strategy is not None
        note = m.note or (f"failed: {lat.errors[m.name]}" if m.name in lat.errors else None)
        samples = us.get(m.name) or []
        for q in (50, 99):
            value = H.percentile(samples, q) if samples else None
            target = None
            if gp and m.name == default and loop in lat_targets:
                target = lat_targets[loop][0 if q == 50 else 1]
            records.append(
                H.record(
                    f"wake_p{q}_{loop}_{m.name}",
                    "us",
                    value,
                    f"{TO_THREAD} (p{q})" if gp else None,
                    H.percentile(base_lat, q) if gp and base_lat else None,
                    "lower",
                    note=note,
                    target=target,
                    target_of="value",
                    what=m.what,
                    samples=len(samples),
                )
            )
        cells = [
            f"{H.percentile(samples, 50):8.1f} {H.percentile(samples, 99):8.1f}"
            if samples
            else f"{'null':>8} {'null':>8}"
        ]
        for n, res in thr.items():
            value = res.median(m.name)
            tnote = note or (f"failed: {res.errors[m.name]}" if m.name in res.errors else None)
            target = 100_000.0 if gp and m.name == default and n == 1000 else None
            records.append(
                H.record(
                    f"throughput_{n}tasks_{loop}_{m.name}",
                    "ops/s",
                    value,
                    f"{TO_THREAD}, same tasks" if gp else None,
                    res.median("to_thread_sync") if gp else None,
                    "higher",
                    note=tnote,
                    target=target,
                    target_of="value",
                    what=m.what,
                    streams=min(n, NSTREAMS),
                )
            )
            cells.append(f"{value:10.0f}" if value else f"{'null':>10}")
        rows.append(f"  {m.name:<22} " + " ".join(cells) + (f"  ({note})" if note else ""))
    for strategy, pct in idle.items():
        records.append(
            H.record(
                f"idle_cpu_{loop}_{strategy}",
                "% of one core",
                pct,
                better="lower",
                target=1.0 if strategy == default else None,  # issue 13: < 1% of a core
                target_of="value",
                what="process CPU time / wall time over an idle period, nothing pending",
            )
        )
    print(
        f"\n[{loop}] {'method':<22} {'p50 us':>8} {'p99 us':>8} "
        + " ".join(f"{f'{n} tasks':>10}" for n in thr)
    )
    print("\n".join(rows))
    print("  idle CPU: " + ", ".join(f"{k} {v:.2f}%" for k, v in idle.items()))
    return records


def unavailable(loop: str, reason: str, default: str) -> list[H.Record]:
    """Null records for a loop that cannot run here."""
    names = [*STRATEGIES, "raw_sync_on_loop", "to_thread_sync", *PEER_METHOD.values()]
    out = []
    for name in names:
        out += [
            H.record(f"wake_p{q}_{loop}_{name}", "us", None, better="lower", note=reason)
            for q in (50, 99)
        ]
        out += [
            H.record(f"throughput_{n}tasks_{loop}_{name}", "ops/s", None, note=reason)
            for n in TASKS
        ]
    out += [
        H.record(f"idle_cpu_{loop}_{s}", "% of one core", None, better="lower", note=reason)
        for s in STRATEGIES
    ]
    print(f"\n[{loop}] NOT measured: {reason}")
    return out


# -- GIL stall ------------------------------------------------------------
class GpuTimer:
    """CUDA timing events around a stretch of a stream (cuda backend only)."""

    def __init__(self) -> None:
        from cuda.bindings import driver

        self._d = driver
        err, self._ctx = driver.cuCtxGetCurrent()
        if err or not int(self._ctx):
            raise RuntimeError("no current CUDA context on this thread")
        self.start = self._check(driver.cuEventCreate(0))
        self.end = self._check(driver.cuEventCreate(0))

    def _check(self, result: tuple[Any, ...]) -> Any:
        if result[0]:
            raise RuntimeError(f"CUDA error {result[0]!r}")
        return result[1] if len(result) > 1 else None

    def record(self, event: Any, stream: Any) -> None:
        self._check(self._d.cuEventRecord(event, stream.handle))

    def elapsed_ms(self) -> float:
        self._check(self._d.cuCtxSetCurrent(self._ctx))
        self._check(self._d.cuEventSynchronize(self.end))
        return float(self._check(self._d.cuEventElapsedTime(self.start, self.end)))


def busy(seconds: float) -> None:
    """Hold the GIL in a pure-Python loop (released only at switch intervals)."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


async def gil_once(strategy: str, busy_s: float) -> float:
    """One GIL-stall run with ``strategy``, in a process of its own (see :func:`gil_stall`)."""
    use_strategy(strategy)  # nothing is pending yet: this process has run no op
    rt = H.runtime()
    be = rt.backend
    dev = gpuaio.Device(0)
    s = dev.stream()
    d = dev.empty(1, np.uint32)
    await s.memset(d, 0)
    on_gpu = be.name == "cuda"
    timer = GpuTimer() if on_gpu else None
    for k in range(20):
        await s.memset(d, k)
    gate = threading.Event()

    def hold() -> None:  # holds the stream until released (waits without the GIL)
        gate.wait()

    be.launch_host_func(s._native, hold)
    # Failsafe: should an enqueue below block on a full launch queue, the
    # hold is released from here and the run is reported as failed
    # instead of deadlocking the benchmark.
    forced = threading.Event()

    def failsafe() -> None:
        if not gate.is_set():
            forced.set()
            gate.set()

    guard = threading.Timer(10.0, failsafe)
    guard.daemon = True
    guard.start()
    if timer is not None:
        timer.record(timer.start, s._native)
    ops = [s.memset(d, k) for k in range(GIL_OPS)]
    if timer is not None:
        timer.record(timer.end, s._native)
    hog = threading.Thread(target=busy, args=(busy_s,), daemon=True)
    hog.start()
    await anyio.sleep(0.005)
    t0 = time.perf_counter()
    gate.set()
    guard.cancel()
    if forced.is_set():
        raise RuntimeError("an enqueue blocked on a full launch queue; lower GIL_OPS")
    wall: float | None = None
    if timer is None:

        def drained() -> float:
            be.stream_synchronize(s._native)
            return time.perf_counter()

        wall = (await anyio.to_thread.run_sync(drained) - t0) * 1e3
    await anyio.to_thread.run_sync(hog.join)
    await gpuaio.wait_all(ops)
    await s.aclose()
    if timer is not None:
        return await anyio.to_thread.run_sync(timer.elapsed_ms)
    assert wall is not None
    return wall


async def gil_stall(args: argparse.Namespace, default: str) -> list[H.Record]:
    """GPU time of memsets + markers while Python is busy: default strategy vs hostfunc.

    Each run is a fresh process that starts with its strategy (an earlier
    version switched strategies with ``gpuaio.configure()`` in one process,
    which refuses to while operations pend, and crashed on a GPU).
    """
    on_gpu = H.runtime().backend.name == "cuda"
    busy_s = args.busy

    async def one_run(strategy: str) -> float:
        cmd = [sys.executable, __file__, "--gil-child", strategy, "--busy", str(busy_s)]
        with anyio.fail_after(120):
            done = await anyio.run_process(cmd, check=False)
        if done.returncode:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"the child exited with {done.returncode}: {' | '.join(tail)}")
        return float(done.stdout.decode().strip().splitlines()[-1])

    other = "hostfunc"
    res = await H.interleave(
        {st: functools.partial(one_run, st) for st in STRATEGIES},
        reps=args.gil_reps,
        warmup=0,
    )
    for name, err in res.errors.items():
        print(f"  GIL stall with {name} FAILED: {err}")
    mine, theirs = res.median(default), res.median(other)
    sim_note = None
    if not on_gpu:
        sim_note = (
            "sim: host wall time to drain the stream; the sim's stream workers are Python "
            "threads that need the GIL for every op, so this does not model a GPU"
        )
    note = sim_note
    if default == other:
        note = f"the default strategy is {other}: nothing to compare"
    for name in (default, other):
        if name in res.errors:
            note = f"{name} failed: {res.errors[name]}"
    print(
        f"\nGIL stall: {GIL_OPS} memsets + markers while Python spins for {busy_s} s; GPU time: "
        + ", ".join(f"{st} {_ms(res.median(st))}" for st in STRATEGIES)
    )
    per_strategy = [
        H.record(
            f"gil_stall_gpu_ms_{st}",
            "ms",
            res.median(st),
            better="lower",
            note=sim_note if st not in res.errors else f"failed: {res.errors[st]}",
            what=f"the same with the {st} strategy",
        )
        for st in STRATEGIES
    ]
    return [
        *per_strategy,
        H.record(
            "gil_stall_gpu_ms",
            "ms",
            mine,
            f"{other} strategy (a cuLaunchHostFunc marker, which needs the GIL, after each op)",
            theirs,
            "lower",
            note=note,
            what=(
                f"GPU time (CUDA timing events) of {GIL_OPS} 4-byte memsets each followed by "
                f"the {default} strategy's marker, while a pure-Python loop holds the GIL"
            ),
            ops=GIL_OPS,
            busy_s=busy_s,
            switch_interval_ms=sys.getswitchinterval() * 1e3,
            samples=len(res.samples.get(default, [])),
        ),
    ]


def _ms(v: float | None) -> str:
    return "null" if v is None else f"{v:.1f} ms"


# -- main -----------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer awaits, shorter runs")
    p.add_argument(
        "--loops", default=",".join(H.LOOPS), help="comma-separated: asyncio,uvloop,trio"
    )
    p.add_argument("--awaits", type=int, help="awaits per method for latency (default 2000)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 5)")
    p.add_argument("--duration", type=float, help="seconds per throughput sample (default 0.15)")
    p.add_argument("--idle", type=float, help="seconds of idle-CPU measurement (default 2)")
    p.add_argument("--busy", type=float, help="seconds the GIL hog spins (default 1)")
    p.add_argument("--gil-reps", type=int, help="GIL-stall repetitions per strategy (default 3)")
    p.add_argument("--no-peers", action="store_true", help="skip numba, CuPy and torch")
    p.add_argument("--no-gil-stall", action="store_true", help="skip the GIL-stall comparison")
    p.add_argument("--out-dir", help="where to write the results (default benchmarks/results)")
    p.add_argument("--gil-child", metavar="STRATEGY", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "awaits": 300 if quick else 2000,
        "reps": 5,
        "duration": 0.1 if quick else 0.15,
        "idle": 0.5 if quick else 2.0,
        "busy": 0.2 if quick else 1.0,
        "gil_reps": 1 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    for loop in args.loops:
        if loop not in H.LOOPS:
            p.error(f"unknown loop {loop!r}; choose from {H.LOOPS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gil_child:  # one GIL-stall run, for gil_stall() in the parent
        print(H.run_on("asyncio", gil_once, args.gil_child, args.busy))
        return 0
    H.watchdog()
    card = H.detect_card()
    H.banner("completion", card)
    default = H.runtime().strategy
    print(
        f"  strategies {STRATEGIES} (default {default}); loops {args.loops}; "
        f"{NSTREAMS} streams; to_thread waits share anyio's default limiter (40 threads)"
    )
    peers, notes = load_peers(card.backend, not args.no_peers)
    H.freeze_heap()
    t0 = time.perf_counter()
    records: list[H.Record] = []
    for loop in args.loops:
        reason = H.loop_unavailable(loop)
        if reason:
            records += unavailable(loop, reason, default)
            continue
        t_loop = time.perf_counter()
        records += H.run_on(loop, loop_suite, loop, args, peers, notes, default)
        print(f"  ({loop} took {time.perf_counter() - t_loop:.0f} s)")
    if args.no_gil_stall:
        note = "not run (--no-gil-stall)"
        records += [H.record("gil_stall_gpu_ms", "ms", None, better="lower", note=note)]
    else:
        records += H.run_on("asyncio", gil_stall, args, default)
    print()
    H.print_targets(records)
    config = {
        "loops": args.loops,
        "default_strategy": default,
        "strategies": list(STRATEGIES),
        "awaits": args.awaits,
        "reps": args.reps,
        "duration_s": args.duration,
        "idle_s": args.idle,
        "busy_s": args.busy,
        "streams": NSTREAMS,
        "heap": "frozen once the peers were imported (gc.freeze)",
        "peer_notes": notes,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    H.write_results("completion", records, args.out_dir, card=card, config=config)
    print(f"suite took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
