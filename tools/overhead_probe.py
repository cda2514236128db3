"""Loop-thread CPU cost of awaited tiny ops, on a GPU that costs (almost) nothing.

``python tools/overhead_probe.py`` runs ``await stream.memset(d4, 0)`` loops
(``--op h2d-pinned``, ``h2d-pageable``, ``d2h-pinned`` or ``d2h-pageable``:
4 KiB uploads from, or downloads into, pinned or pageable memory instead)
with 1, 100 and 1,000 concurrent tasks (16 streams, round robin) on
asyncio, uvloop and trio, and prints per
configuration the median over repetitions (with the min-max spread) of:

* ``loop us/op``: CPU time of the event-loop thread per awaited op;
* ``proc us/op``: CPU time of the whole process per op (watcher thread too);
* ``ops/s``: awaited ops per second of wall time;
* ``p50 us``: for 1 task, the median time of one ``await stream.memset(...)``.

A second table gives the wake-up delay of a task awaiting a 1 ms op (past
the loop's polling window, so it sleeps) while another task of the same loop
keeps polling tiny ops: median and worst of 30, each after a pause of 1 to
1.3 ms (a fixed pause locks in phase with the loops' sweeps).

The backend is a fake GPU: the simulated backend's memory, with streams,
memsets and events that are a few Python statements each, so what is left is
gpuaio's own per-op cost. Each stream models a GPU queue: an op starts
``--launch-us`` after it is enqueued (default 5) or when the op before it
ends, whichever is later, and runs for ``--gpu-us`` (default 2), about what
a 4-byte memset takes on an H100; an event fires once its stream reaches it.
``--call-us`` spins that long in each memset, copy, event record and event
query call, standing in for what a real driver call costs the calling
thread (1-3 us through cuda-bindings on an H200 host, context check
included): with it, fewer driver calls per op show as they would on a GPU.

``--baseline DIR`` also loads the gpuaio package in ``DIR`` (say a copy of an
earlier commit: ``git archive HEAD~1 gpuaio | tar -x -C /tmp/base``, then
``--baseline /tmp/base/gpuaio``) and measures both in this process, each
configuration of one right after the other's, and adds the median of these
pairs' ratios (current / baseline): robust when the machine's speed drifts.
``--floor`` also times, with 1 task, a hand-written awaitable of the same op
on the same fake GPU (the driver calls, then a bare yield between event
queries; a ``memmove`` through a pinned block for pageable memory): what
the op would cost with nothing of gpuaio's around it, as
``tools/floor_probe.py``'s ``hand_inline`` does on a GPU.
``--profile`` prints a cProfile (by tottime) of the loop thread in the
1,000-task case, and the Python calls per op. These are CPU figures of this
machine, not GPU figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import importlib.util
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import numpy as np
import sniffio

import gpuaio

LOOPS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
TASKS = (1, 100, 1000)
NSTREAMS = 16


class _Stream:
    __slots__ = ("busy_until", "device")

    def __init__(self, device: int) -> None:
        self.device = device
        self.busy_until = 0.0  # perf_counter() time the queued work is done


class _Event:
    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = 0.0  # perf_counter() time its stream reaches the last record


class _FakeGPU:
    """Mixed into a SimBackend: its memory; streams, memsets and events modelled cheaply.

    A stream is an in-order queue: an op starts ``launch_s`` after it is
    enqueued or when the op before it ends, whichever is later, and takes
    ``gpu_s``; a recorded event fires when the stream reaches it. No worker
    threads, no locks.
    """

    launch_s = 5e-6
    gpu_s = 2e-6
    call_s = 0.0
    copy_bps = 0.0  # a copy's bytes per second on top of gpu_s (0: copies take gpu_s)

    def _call(self) -> float:
        """The host cost of one driver call (``--call-us``), spent spinning; returns now."""
        now = time.perf_counter()
        if self.call_s:
            end = now + self.call_s
            while now < end:
                now = time.perf_counter()
        return now

    def stream_create(self, device: int, priority: int = 0) -> Any:
        return _Stream(device)

    def stream_handle(self, stream: Any) -> int:
        return id(stream)

    def stream_destroy(self, stream: Any) -> None:
        pass

    def stream_synchronize(self, stream: Any) -> None:
        time.sleep(max(0.0, stream.busy_until - time.perf_counter()))

    def memset_async(self, ptr: int, value: int, itemsize: int, count: int, stream: Any) -> None:
        start = max(self._call() + self.launch_s, stream.busy_until)
        stream.busy_until = start + self.gpu_s

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        # Timing only: the probe measures gpuaio's CPU cost, not the bytes.
        start = max(self._call() + self.launch_s, stream.busy_until)
        bps = self.copy_bps
        stream.busy_until = start + self.gpu_s + (nbytes / bps if bps else 0.0)

    def stream_write_words(self, stream: Any, words: Any) -> None:
        # One call; each word a third of a memset's GPU time (0.63 us a word
        # on an H200 in run AO, against about 2 us a memset).
        start = max(self._call() + self.launch_s, stream.busy_until)
        stream.busy_until = start + self.gpu_s / 3 * (len(words) // 2)

    def event_create(self, device: int, blocking_sync: bool = False) -> Any:
        return _Event()

    def event_destroy(self, event: Any) -> None:
        pass

    def event_record(self, event: Any, stream: Any) -> None:
        self._call()
        event.at = stream.busy_until

    def event_query(self, event: Any) -> bool:
        return self._call() >= event.at  # type: ignore[no-any-return]

    def event_synchronize(self, event: Any) -> None:
        time.sleep(max(0.0, event.at - time.perf_counter()))

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        stream.busy_until = max(stream.busy_until, event.at)


def fake_gpu(
    lib: ModuleType, launch_s: float, gpu_s: float, call_s: float = 0.0, copy_bps: float = 0.0
) -> Any:
    """A fake-GPU backend for the gpuaio package ``lib``."""
    from_sim = importlib.import_module(lib.__name__ + ".backends.sim")
    attrs = {"launch_s": launch_s, "gpu_s": gpu_s, "call_s": call_s, "copy_bps": copy_bps}
    cls = type("FakeGPU", (_FakeGPU, from_sim.SimBackend), attrs)
    return cls(from_sim.SimConfig())


def thread_engine() -> ModuleType:
    """``benchmarks/_thread_engine.py``, which registers the ``thread`` strategy."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_thread_engine.py"
    spec = importlib.util.spec_from_file_location("_thread_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_package(init_dir: str, name: str) -> ModuleType:
    """Import the gpuaio package in ``init_dir`` under another ``name``."""
    path = Path(init_dir).resolve()
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py", submodule_search_locations=[str(path)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no Python package in {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


OPS = ("memset", "h2d-pinned", "h2d-pageable", "d2h-pinned", "d2h-pageable")
"""``--op``: a 4-byte device memset, or a 4 KiB upload from (download into) pinned or
pageable memory."""
COPY_BYTES = 4096


def op_factory(
    lib: ModuleType, dev: Any, op: str, tasks: int, nbytes: int = COPY_BYTES
) -> Callable[[Any, int], Any]:
    """``start(stream, i)``: enqueue task ``i``'s op of kind ``op`` (a copy of
    ``nbytes``); returns the Operation."""
    if op == "memset":
        d = dev.empty(4 * tasks)
        parts = [d[4 * i : 4 * i + 4] for i in range(tasks)]
        return lambda s, i: s.memset(parts[i], 0)
    d = dev.empty(nbytes * tasks)
    devs = [d[nbytes * i : nbytes * (i + 1)] for i in range(tasks)]
    if op.endswith("-pinned"):
        hosts = [lib.pinned_empty(nbytes) for _ in range(tasks)]
    else:
        hosts = [np.zeros(nbytes, np.uint8) for _ in range(tasks)]
    if op.startswith("d2h"):
        return lambda s, i: s.copy(hosts[i], devs[i])
    return lambda s, i: s.copy(devs[i], hosts[i])


async def run_case(
    lib: ModuleType,
    tasks: int,
    total_ops: int,
    lat: list[float] | None,
    op: str = "memset",
    nbytes: int = COPY_BYTES,
    cold_s: float = 0.0,
) -> tuple[float, float, float]:
    """Awaited ops from ``tasks`` tasks; per op: (wall s, loop CPU s, process CPU s).

    With ``lat`` (1 task), each op's time is appended to it, each after
    ``cold_s`` of unrelated Python when given (then the per-op figures
    include that too: only ``lat`` is meaningful).
    """
    dev = lib.Device(0)
    streams = [dev.stream() for _ in range(min(NSTREAMS, tasks))]
    per_task = max(1, total_ops // tasks)
    start = op_factory(lib, dev, op, tasks, nbytes)
    for s in streams:  # warm-up: the watcher thread, the loop's port
        for _ in range(50):
            await start(s, 0)

    async def worker(i: int) -> None:
        s = streams[i % len(streams)]
        if lat is not None:
            clock = time.perf_counter
            for _ in range(per_task):
                if cold_s:
                    burn(cold_s)
                t0 = clock()
                await start(s, i)
                lat.append(clock() - t0)
            return
        for _ in range(per_task):
            await start(s, i)

    c0, p0, t0 = time.thread_time(), time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(tasks):
            tg.start_soon(worker, i)
    t1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
    for s in streams:
        s.close()
    n = per_task * tasks
    return (t1 - t0) / n, (c1 - c0) / n, (p1 - p0) / n


async def run_mixed(lib: ModuleType, n: int = 30) -> list[float]:
    """Wake-up delays of a task awaiting 1 ms ops while another task polls tiny ones."""
    dev = lib.Device(0)
    busy, slow = dev.stream(), dev.stream()
    d = dev.empty(8)
    jitter = np.random.default_rng(13)
    delays: list[float] = []
    stop = False

    async def poller() -> None:
        while not stop:
            await busy.memset(d[:4], 0)

    async def sleeper() -> None:
        nonlocal stop
        for _ in range(n):
            done_at = slow._native.busy_until = time.perf_counter() + 1e-3  # 1 ms of work
            await slow.memset(d[4:], 0)
            delays.append(time.perf_counter() - max(done_at, slow._native.busy_until))
            # A pause of a random length: with a fixed 1 ms the cycle locked in
            # phase with the loops' sweeps (every LOOP_SWEEP_S), and the delay
            # came out about 100 or about 260 us depending on which phase a
            # process fell into (issue 13, eleventh round), not on the code.
            await anyio.sleep(0.001 + float(jitter.uniform(0.0, 3e-4)))
        stop = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(poller)
        tg.start_soon(sleeper)
    busy.close()
    slow.close()
    return delays


def floor_op(lib: ModuleType, fake: Any, op: str, nbytes: int = COPY_BYTES) -> Callable[[], Any]:
    """``once()``: one hand-written awaitable of ``op`` on ``fake``, no gpuaio: the
    driver calls, a bare yield between event queries, and for pageable memory a
    ``memmove`` through a pinned block."""
    if sniffio.current_async_library() == "trio":
        import trio

        yield_now: Callable[[], Any] = trio.lowlevel.checkpoint
    else:
        yield_now = _asyncio_yield
    dev = lib.Device(0)
    d = dev.empty(nbytes)
    dptr = d.ptr
    pinned = lib.pinned_empty(nbytes)
    block = lib.pinned_empty(nbytes)
    host = np.zeros(nbytes, np.uint8)
    native, event = fake.stream_create(0), fake.event_create(0)
    pageable = op.endswith("-pageable")
    hptr = (block if pageable else pinned).ctypes.data
    uptr = host.ctypes.data
    h2d = op.startswith("h2d")

    async def once() -> None:
        if op == "memset":
            fake.memset_async(dptr, 0, 4, 1, native)
        elif h2d:
            if pageable:
                ctypes.memmove(hptr, uptr, nbytes)
            fake.memcpy_async(dptr, hptr, nbytes, native)
        else:
            fake.memcpy_async(hptr, dptr, nbytes, native)
        fake.event_record(event, native)
        while not fake.event_query(event):
            await yield_now()
        if pageable and not h2d:
            ctypes.memmove(uptr, hptr, nbytes)

    # The buffers behind the addresses live as long as once() does (a tuple
    # built in each call would add to the floor it measures).
    once.keep = (d, pinned, block, host)  # type: ignore[attr-defined]
    return once


async def run_floor(
    lib: ModuleType,
    fake: Any,
    total_ops: int,
    op: str,
    nbytes: int = COPY_BYTES,
    cold_s: float = 0.0,
) -> list[float]:
    """Per-op times of a hand-written awaitable of ``op`` on ``fake`` (:func:`floor_op`), 1 task."""
    once = floor_op(lib, fake, op, nbytes)
    for _ in range(50):
        await once()
    clock = time.perf_counter
    lat = []
    for _ in range(total_ops):
        if cold_s:
            burn(cold_s)
        t0 = clock()
        await once()
        lat.append(clock() - t0)
    return lat


async def _asyncio_yield() -> None:
    await asyncio.sleep(0)


def measure(
    lib: ModuleType,
    loop: str,
    tasks: int,
    total_ops: int,
    op: str,
    nbytes: int = COPY_BYTES,
    cold_s: float = 0.0,
) -> dict[str, float]:
    backend, opts = LOOPS[loop]
    lat: list[float] | None = [] if tasks == 1 else None
    wall, cpu, proc = anyio.run(
        run_case, lib, tasks, total_ops, lat, op, nbytes, cold_s,
        backend=backend, backend_options=opts,
    )  # fmt: skip
    row = {"loop_us": cpu * 1e6, "proc_us": proc * 1e6, "ops": 1.0 / wall}
    if lat:
        row["p50_us"] = float(np.percentile(lat, 50) * 1e6)
    return row


def burn(seconds: float) -> None:
    """``--cold-ms``: unrelated Python on the loop thread (``floor_probe.burn``)."""
    from floor_probe import burn as floor_burn

    floor_burn(seconds)


def profile(lib: ModuleType, loop: str, total_ops: int, top: int, op: str) -> None:
    backend, opts = LOOPS[loop]
    prof = cProfile.Profile()
    ops = 0

    async def profiled() -> None:
        nonlocal ops
        prof.enable()  # inside the loop: profiles the loop thread only
        try:
            await run_case(lib, 1000, total_ops, None, op)
        finally:
            prof.disable()
        ops = total_ops + 50 * NSTREAMS

    anyio.run(profiled, backend=backend, backend_options=opts)
    stats = pstats.Stats(prof, stream=sys.stdout)
    calls = stats.total_calls  # type: ignore[attr-defined]
    print(
        f"\ncProfile of {lib.__name__}, {loop}, 1000 tasks: {calls / ops:.1f} Python calls per op"
    )
    stats.sort_stats("tottime").print_stats(top)


def fmt(values: list[float], spec: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, spec)
    return f"{med:{spec}} [{min(values):{spec}}-{max(values):{spec}}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--launch-us", type=float, default=5.0, help="enqueue-to-start latency")
    ap.add_argument("--gpu-us", type=float, default=2.0, help="GPU time of one op")
    ap.add_argument(
        "--call-us",
        type=float,
        default=0.0,
        help="host time of each memset, copy, event record and query call (spun)",
    )
    ap.add_argument("--ops", type=int, default=20_000, help="awaited ops per measurement")
    ap.add_argument("--bytes", type=int, default=COPY_BYTES, help="bytes a copy op moves")
    ap.add_argument(
        "--gbps", type=float, default=0.0, help="fake copies' GB/s on top of --gpu-us (0: none)"
    )
    ap.add_argument(
        "--tasks", default=",".join(map(str, TASKS)), help="comma-separated concurrent tasks"
    )
    ap.add_argument(
        "--cold-ms",
        type=float,
        default=0.0,
        help="1 task: run this much unrelated Python before each timed op (p50 only)",
    )
    ap.add_argument("--reps", type=int, default=5, help="repetitions (interleaved)")
    # The fake GPU has no stream memory ops (flags) and no host functions.
    # "thread" is the benchmarks' watcher-only engine (benchmarks/_thread_engine.py).
    ap.add_argument("--strategy", default="events", choices=("events", "thread"))
    ap.add_argument("--loops", default=",".join(LOOPS), help="comma-separated: " + ",".join(LOOPS))
    ap.add_argument("--op", default="memset", choices=OPS, help="the awaited op")
    ap.add_argument("--baseline", metavar="DIR", help="also measure the gpuaio package in DIR")
    ap.add_argument(
        "--floor", action="store_true", help="also time a hand-written awaitable (1 task)"
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the 1,000-task case")
    ap.add_argument("--profile-loop", default="asyncio", choices=list(LOOPS))
    ap.add_argument("--top", type=int, default=30, help="profile rows to print")
    args = ap.parse_args(argv)
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    task_counts = [int(t) for t in args.tasks.split(",") if t.strip()]

    libs = {"current": gpuaio}
    if args.baseline:
        libs = {"baseline": load_package(args.baseline, "gpuaio_baseline"), **libs}
    fakes = {}
    for name, lib in libs.items():
        if args.strategy == "thread":
            thread_engine().register(lib)
        fakes[name] = fake_gpu(
            lib, args.launch_us * 1e-6, args.gpu_us * 1e-6, args.call_us * 1e-6, args.gbps * 1e9
        )
        lib.use_backend(fakes[name], completion=args.strategy)
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    mixed: dict[tuple[str, str], list[float]] = {}
    floor: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for loop in loops:
            for tasks in task_counts:
                for name, lib in libs.items():
                    cold = args.cold_ms * 1e-3 if tasks == 1 else 0.0
                    row = measure(lib, loop, tasks, args.ops, args.op, args.bytes, cold)
                    results.setdefault((name, loop, tasks), []).append(row)
                if args.floor and tasks == 1:
                    backend, opts = LOOPS[loop]
                    lat = anyio.run(
                        run_floor, gpuaio, fakes["current"], args.ops, args.op, args.bytes,
                        args.cold_ms * 1e-3,
                        backend=backend, backend_options=opts,
                    )  # fmt: skip
                    floor.setdefault(loop, []).append(float(np.percentile(lat, 50) * 1e6))
            for name, lib in libs.items():
                backend, opts = LOOPS[loop]
                delays = anyio.run(run_mixed, lib, backend=backend, backend_options=opts)
                mixed.setdefault((name, loop), []).extend(delays)

    cold = f", each after {args.cold_ms:g} ms of other work" if args.cold_ms else ""
    print(
        f"fake GPU (launch {args.launch_us:g} us, {args.gpu_us:g} us/op, "
        f"{args.call_us:g} us/driver call, copies {args.gbps:g} GB/s), {args.op} "
        f"({args.bytes} bytes{cold}), "
        f"{args.strategy}, "
        f"{args.ops} ops x {args.reps} reps: median [min-max]"
    )
    print(
        f"{'package':<9} {'loop':<8} {'tasks':>5}  {'loop us/op':>20}  {'proc us/op':>20}  "
        f"{'ops/s':>26}  p50 us"
    )
    for loop in loops:
        for tasks in task_counts:
            for name in libs:
                rows = results[name, loop, tasks]
                col = {k: [r[k] for r in rows] for k in rows[0]}
                p50 = fmt(col["p50_us"], ".1f") if "p50_us" in col else ""
                print(
                    f"{name:<9} {loop:<8} {tasks:>5}  {fmt(col['loop_us'], '5.1f'):>20}  "
                    f"{fmt(col['proc_us'], '5.1f'):>20}  {fmt(col['ops'], '7.0f'):>26}  {p50}"
                )
    if floor:
        print("\nhand-written awaitable of the same op, 1 task (--floor): p50 us; gpuaio / it")
        for loop in floor:
            cur = [r["p50_us"] for r in results["current", loop, 1]]
            ratios = [c / f for c, f in zip(cur, floor[loop], strict=True)]
            print(f"floor     {loop:<8} {fmt(floor[loop], '5.1f'):>20}  {fmt(ratios, '.2f'):>17}")
    print("\nwake-up delay after a 1 ms op while another task polls, us: median, max")
    for loop in loops:
        for name in libs:
            delays = [x * 1e6 for x in mixed[name, loop]]
            print(f"{name:<9} {loop:<8} {statistics.median(delays):9.0f} {max(delays):9.0f}")
    if args.baseline:
        print("\ncurrent / baseline, median of paired runs [min-max]: loop us/op, ops/s, p50")
        for loop in loops:
            for tasks in task_counts:
                base, cur = results["baseline", loop, tasks], results["current", loop, tasks]
                pairs = list(zip(base, cur, strict=True))
                ratios = {k: [c[k] / b[k] for b, c in pairs] for k in pairs[0][0]}
                cols = [fmt(ratios[k], ".2f") for k in ("loop_us", "ops", "p50_us") if k in ratios]
                print(f"{loop:<8} {tasks:>5}  " + "  ".join(f"{c:>17}" for c in cols))
    if args.profile:
        for lib in libs.values():
            profile(lib, args.profile_loop, args.ops, args.top, args.op)


if __name__ == "__main__":
    main()
