#!/usr/bin/env python
"""Where the time of one small awaited copy goes, and the alternatives of issue 13.

``python tools/small_copy_probe.py --out DIR`` on a GPU machine prints and
writes (``DIR/small_copy_probe.json``, ``DIR/small_copy_profile.txt``):

1. **Driver costs** (cuda.bindings, no event loop): how long each call of a
   small copy's life takes to return (``cuMemcpyAsync`` from pinned memory,
   ``cuEventRecord``, ``cuEventQuery`` on a pending and a fired event) and
   the GPU turnaround (enqueue to event fired, busy-polled), for 4 KiB H2D
   and D2H and a 4-byte memset; and the blocking round trip
   (``cuMemcpyAsync`` + ``cuStreamSynchronize``).
2. **Alternatives** by size: the driver's own pageable H2D and D2H (how
   long the call blocks, and the whole round trip), ``cuMemcpyBatchAsync``
   into pageable memory (how much of the copy the call blocks),
   ``cuMemHostRegister`` in place for large buffers (register + DMA +
   unregister, as GB/s).
3. **gpuaio stage by stage** on uvloop, one task: the time ``stream.copy()``
   takes to return (describe, checks, pool, enqueue, marker) and the await
   after it (wait and wake), against a hand-written floor (the same pinned
   block, one ``cuMemcpyAsync``, one event, polled between
   ``asyncio.sleep(0)``), and the CPU used per op by the loop thread and by
   every other thread.
4. A cProfile (by own time) of the loop thread over awaited 4 KiB copies.

Medians of many repetitions, in microseconds; GPU only (``--allow-sim``
runs sections 3-4 on the simulated backend to check the script).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The benchmarks' harness, which puts this checkout's gpuaio on the path only
# where none is importable (a gpuaio on PYTHONPATH is the one measured).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _harness as H

import gpuaio
from gpuaio._api.runtime import current_runtime

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RESULTS: dict[str, Any] = {}
PROFILE: list[tuple[Path, str]] = []


def us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 2)


def put(name: str, value: Any) -> None:
    RESULTS[name] = value
    print(f"  {name:48s} {value}", flush=True)


def section(title: str, fn: Callable[[], Any]) -> None:
    print(f"\n== {title}", flush=True)
    try:
        fn()
    except Exception:  # one broken section must not cost the others
        traceback.print_exc()
        RESULTS[f"error: {title}"] = traceback.format_exc(limit=3)


def sizes(n: int) -> str:
    if n >= GiB:
        return f"{n // GiB}GiB"
    return f"{n // MiB}MiB" if n >= MiB else f"{n // KiB}KiB"


# -- 1. driver costs -------------------------------------------------------
def driver_costs() -> None:
    import cuda.bindings.driver as d

    rt = current_runtime()
    be = rt.backend
    s = gpuaio.Device(0).stream()
    native = s._native
    h = native.handle
    n = 4 * KiB
    dev = gpuaio.Device(0).empty(n)
    pin = gpuaio.pinned_empty(n)
    pin[:] = 7
    ev = be.event_create(0)
    reps = 2000

    def timed(fn: Callable[[], Any], k: int = reps) -> list[float]:
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def sync() -> None:
        d.cuStreamSynchronize(h)

    # Enqueue cost of a pinned 4 KiB H2D (the stream drained before each).
    samples = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        d.cuMemcpyAsync(dev.ptr, pin.ctypes.data, n, h)
        samples.append(time.perf_counter() - t0)
    sync()
    put("cuMemcpyAsync_h2d_pinned_4KiB_enqueue_us", us(samples))
    put("cuEventRecord_us", us(timed(lambda: d.cuEventRecord(ev.handle, h))))
    sync()
    put("cuEventQuery_fired_us", us(timed(lambda: d.cuEventQuery(ev.handle))))
    put("gpuaio_backend_event_query_fired_us", us(timed(lambda: be.event_query(ev))))
    put("gpuaio_backend_event_record_us", us(timed(lambda: be.event_record(ev, native))))
    sync()

    def turnaround(enqueue: Callable[[], Any]) -> tuple[float, float, int]:
        """(enqueue to fired, us; query time while pending, us; polls)"""
        tot, pend, polls = [], [], []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            enqueue()
            d.cuEventRecord(ev.handle, h)
            k = 0
            while True:
                q0 = time.perf_counter()
                (err,) = d.cuEventQuery(ev.handle)
                q1 = time.perf_counter()
                if not err:
                    break
                pend.append(q1 - q0)
                k += 1
            tot.append(q1 - t0)
            polls.append(k)
        return us(tot), (us(pend) if pend else 0.0), int(statistics.median(polls))

    d_ptr, p_ptr = dev.ptr, pin.ctypes.data
    for name, fn in (
        ("h2d_pinned_4KiB", lambda: d.cuMemcpyAsync(d_ptr, p_ptr, n, h)),
        ("d2h_pinned_4KiB", lambda: d.cuMemcpyAsync(p_ptr, d_ptr, n, h)),
        ("memset_4B", lambda: d.cuMemsetD32Async(d_ptr, 1, 1, h)),
    ):
        tot, pend, polls = turnaround(fn)
        put(f"turnaround_{name}_us", tot)
        put(f"cuEventQuery_pending_us_{name}", pend)
        put(f"turnaround_{name}_polls", polls)

    def round_trip(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            fn()
            d.cuStreamSynchronize(h)

        return call

    put(
        "roundtrip_h2d_pinned_4KiB_sync_us",
        us(timed(round_trip(lambda: d.cuMemcpyAsync(d_ptr, p_ptr, n, h)))),
    )
    put(
        "roundtrip_memset_4B_sync_us",
        us(timed(round_trip(lambda: d.cuMemsetD32Async(d_ptr, 1, 1, h)))),
    )
    be.event_destroy(ev)


def _call_and_total(
    d: Any, h: Any, reps: int, enqueue: Callable[[], Any]
) -> tuple[list[float], list[float]]:
    """Per rep: seconds until ``enqueue()`` returns, and until stream ``h`` is idle."""
    call, total = [], []
    for _ in range(reps):
        d.cuStreamSynchronize(h)
        t0 = time.perf_counter()
        enqueue()
        t1 = time.perf_counter()
        d.cuStreamSynchronize(h)
        t2 = time.perf_counter()
        call.append(t1 - t0)
        total.append(t2 - t0)
    return call, total


def _batch_copy(d: Any, dst: int, src: int, n: int, attr: Any, h: Any) -> None:
    """One ``cuMemcpyBatchAsync`` of ``n`` bytes (raises on an error code)."""
    res = d.cuMemcpyBatchAsync(
        [d.CUdeviceptr(dst)], [d.CUdeviceptr(src)], [n], 1, [attr], [0], 1, h
    )
    if res[0]:
        raise RuntimeError(f"cuMemcpyBatchAsync: {res[0]}")


# -- 2. alternatives -------------------------------------------------------
def alternatives(max_size: int) -> None:
    import cuda.bindings.driver as d

    s = gpuaio.Device(0).stream()
    h = s._native.handle
    dev_n = gpuaio.Device(0).empty(max_size)
    for n in (4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB):
        if n > max_size:
            break
        tag = sizes(n)
        src = np.random.default_rng(n).integers(0, 255, n, dtype=np.uint8)
        dst = np.full(n, 0xA5, np.uint8)
        reps = 400 if n <= MiB else 60

        h2d = functools.partial(d.cuMemcpyAsync, dev_n.ptr, src.ctypes.data, n, h)
        call, total = _call_and_total(d, h, reps, h2d)
        put(f"driver_h2d_pageable_{tag}_call_us", us(call))
        put(f"driver_h2d_pageable_{tag}_total_us", us(total))
        d2h = functools.partial(d.cuMemcpyAsync, dst.ctypes.data, dev_n.ptr, n, h)
        call, total = _call_and_total(d, h, reps, d2h)
        ok = bool(np.array_equal(dst, src))
        put(f"driver_d2h_pageable_{tag}_call_us", us(call))
        put(f"driver_d2h_pageable_{tag}_total_us", us(total))
        # The batch API into pageable memory, source order ANY.
        try:
            attr = d.CUmemcpyAttributes()
            attr.srcAccessOrder = d.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
            loc_dev = d.CUmemLocation()
            loc_dev.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            loc_dev.id = 0
            loc_host = d.CUmemLocation()
            loc_host.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST
            loc_host.id = 0
            attr.srcLocHint = loc_dev
            attr.dstLocHint = loc_host
            dst[:] = 0

            batch = functools.partial(_batch_copy, d, dst.ctypes.data, dev_n.ptr, n, attr, h)
            call, total = _call_and_total(d, h, reps, batch)
            put(f"batch_d2h_pageable_{tag}_call_us", us(call))
            put(f"batch_d2h_pageable_{tag}_total_us", us(total))
            put(f"batch_d2h_pageable_{tag}_ok", bool(np.array_equal(dst, src)) and ok)
        except Exception as e:
            put(f"batch_d2h_pageable_{tag}_error", repr(e)[:200])
    # Register in place: register + DMA + unregister, against the staged copy.
    for n in (64 * MiB, 256 * MiB, 1 * GiB):
        if n > max_size:
            break
        tag = sizes(n)
        src = np.empty(n, np.uint8)
        src[:] = 3  # touched
        reg, dma, unreg = [], [], []
        for _ in range(3):
            t0 = time.perf_counter()
            (err,) = d.cuMemHostRegister(src.ctypes.data, n, 0)
            t1 = time.perf_counter()
            if err:
                raise RuntimeError(f"cuMemHostRegister: {err}")
            d.cuMemcpyAsync(dev_n.ptr, src.ctypes.data, n, h)
            d.cuStreamSynchronize(h)
            t2 = time.perf_counter()
            d.cuMemHostUnregister(src.ctypes.data)
            t3 = time.perf_counter()
            reg.append(t1 - t0)
            dma.append(t2 - t1)
            unreg.append(t3 - t2)
        r, m, u = (statistics.median(x) for x in (reg, dma, unreg))
        put(f"register_{tag}_ms", round(r * 1e3, 2))
        put(f"register_dma_{tag}_ms", round(m * 1e3, 2))
        put(f"unregister_{tag}_ms", round(u * 1e3, 2))
        put(f"register_in_place_h2d_{tag}_GBps", round(n / (r + m + u) / 1e9, 2))
        del src


# -- 3. gpuaio stage by stage ----------------------------------------------
def thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process (Linux), by native id."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(parts[11]) + int(parts[12])) / tick
    except OSError:
        pass
    return out


async def stages(reps: int, profile_out: Path | None) -> None:
    dev = gpuaio.Device(0)
    s = dev.stream()
    rt = current_runtime()
    be = rt.backend
    for n in (4 * KiB, 64 * KiB, 1 * MiB):
        tag = sizes(n)
        d = dev.empty(n)
        host = np.random.default_rng(1).integers(0, 255, n, dtype=np.uint8)
        back = np.zeros(n, np.uint8)
        pin = gpuaio.pinned_empty(n)
        pin[:] = host
        for _ in range(50):
            await s.copy(d, host)
            await s.copy(back, d)
        assert np.array_equal(back, host)
        k = reps if n <= 64 * KiB else reps // 4
        cases: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("h2d_pageable", functools.partial(s.copy, d, host)),
            ("d2h_pageable", functools.partial(s.copy, back, d)),
            ("h2d_pinned", functools.partial(s.copy, d, pin)),
            ("d2h_pinned", functools.partial(s.copy, pin, d)),
            ("memset", functools.partial(s.memset, d, 1)),
        )
        for name, make in cases:
            if name == "memset" and n != 4 * KiB:
                continue
            call, wait, total = [], [], []
            main_tid = threading.get_native_id()
            cpu0 = thread_cpu()
            w0 = time.perf_counter()
            for _ in range(k):
                t0 = time.perf_counter()
                op = make()
                t1 = time.perf_counter()
                await op
                t2 = time.perf_counter()
                call.append(t1 - t0)
                wait.append(t2 - t1)
                total.append(t2 - t0)
            wall = time.perf_counter() - w0
            cpu1 = thread_cpu()
            loop_cpu = cpu1.get(main_tid, 0) - cpu0.get(main_tid, 0)
            other = sum(v - cpu0.get(t, 0) for t, v in cpu1.items() if t != main_tid)
            put(f"gpuaio_{name}_{tag}_call_us", us(call))
            put(f"gpuaio_{name}_{tag}_await_us", us(wait))
            put(f"gpuaio_{name}_{tag}_total_us", us(total))
            put(f"gpuaio_{name}_{tag}_mean_us", round(wall / k * 1e6, 2))
            put(f"gpuaio_{name}_{tag}_loop_cpu_us_per_op", round(loop_cpu / k * 1e6, 2))
            put(f"gpuaio_{name}_{tag}_other_threads_cpu_us_per_op", round(other / k * 1e6, 2))
        if be.name == "cuda":
            await floor(be, s, d, host, back, n, k)
    put("threads", sorted(t.name for t in threading.enumerate()))
    if profile_out is not None:
        n = 4 * KiB
        d = dev.empty(n)
        host = np.ones(n, np.uint8)
        back = np.zeros(n, np.uint8)
        cases = (
            ("h2d_pageable", functools.partial(s.copy, d, host)),
            ("d2h_pageable", functools.partial(s.copy, back, d)),
        )
        text = [
            await H.profile_awaits(
                make, reps, f"{name} 4KiB, {reps} awaited copies, uvloop, by tottime", 30
            )
            for name, make in cases
        ]
        PROFILE.append((profile_out, "".join(text)))


async def floor(be: Any, s: Any, d: Any, host: Any, back: Any, n: int, k: int) -> None:
    """The least a Python awaited copy can cost: a pinned block, one copy, one event."""
    import cuda.bindings.driver as drv

    h = s._native.handle
    blk = gpuaio.pinned_empty(n)
    ev = be.event_create(0)
    tag = sizes(n)
    view = blk  # numpy view of the pinned block

    async def wait_event() -> None:
        while True:
            await asyncio.sleep(0)
            (err,) = drv.cuEventQuery(ev.handle)
            if not err:
                return

    for name in ("h2d", "d2h"):
        total = []
        for _ in range(k):
            t0 = time.perf_counter()
            if name == "h2d":
                view[:] = host
                drv.cuMemcpyAsync(d.ptr, blk.ctypes.data, n, h)
            else:
                drv.cuMemcpyAsync(blk.ctypes.data, d.ptr, n, h)
            drv.cuEventRecord(ev.handle, h)
            await wait_event()
            if name == "d2h":
                back[:] = view
            total.append(time.perf_counter() - t0)
        put(f"floor_{name}_pageable_{tag}_total_us", us(total))
    be.event_destroy(ev)


# -- 5. timelines ------------------------------------------------------------
async def timelines() -> None:
    """Where one staged or pinned copy spends its time: every driver call, pool
    acquire and host-copy submission, by thread, relative to the call."""
    dev = gpuaio.Device(0)
    s = dev.stream()
    rt = current_runtime()
    be = rt.backend
    stager = rt.stager
    assert stager is not None
    pool = stager.pool
    host = rt.host
    log: list[tuple[float, str, str]] = []
    counts: dict[str, int] = {}

    def note(what: str) -> None:
        log.append((time.perf_counter(), threading.current_thread().name, what))

    def wrap(obj: Any, name: str, quiet: bool = False) -> None:
        fn = getattr(obj, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            if quiet:
                return fn(*a, **k)
            note(name + " >")
            try:
                return fn(*a, **k)
            finally:
                note(name + " <")

        setattr(obj, name, wrapped)

    for name in (
        "memcpy_async",
        "event_create",
        "event_destroy",
        "event_record",
        "event_synchronize",
        "host_alloc",
        "stream_synchronize",
    ):
        wrap(be, name)
    wrap(be, "event_query", quiet=True)
    wrap(pool, "acquire")
    wrap(host, "submit_copy")
    for job in ("_h2d", "_d2h", "_driver_or_staged"):  # a stream thread's host job
        if hasattr(stager, job):
            wrap(stager, job)
    wrap(rt.engine(0), "watch")
    # Each copy thread's slices (SlicedCopy looks the function up per slice).
    from gpuaio._engine import hostwork

    wrap(hostwork, "_copy_slice")
    cases = []
    for n in (4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB):
        src = np.random.default_rng(n).integers(0, 255, n, dtype=np.uint8)
        back = np.zeros(n, np.uint8)
        pin = gpuaio.pinned_empty(n)
        d = dev.empty(n)
        cases += [
            (f"h2d_pageable_{sizes(n)}", functools.partial(s.copy, d, src)),
            (f"d2h_pageable_{sizes(n)}", functools.partial(s.copy, back, d)),
            (f"h2d_pinned_{sizes(n)}", functools.partial(s.copy, d, pin)),
        ]
    for name, make in cases:
        for _ in range(3):  # warm: blocks cached, threads started
            await make()
        log.clear()
        counts.clear()
        t0 = time.perf_counter()
        op = make()
        note("copy() returned")
        op._add_done_callback(lambda: note("op resolved"))
        await op
        t1 = time.perf_counter()
        note("await returned")
        print(
            f"  -- {name}: {(t1 - t0) * 1e6:.0f} us; event queries {counts.get('event_query', 0)}"
        )
        rows = []
        for t, thread, what in log:
            rows.append(f"{(t - t0) * 1e6:9.1f} us  {thread[:22]:22s} {what}")
        for row in rows[:160]:
            print("    " + row)
        RESULTS[f"timeline_{name}"] = rows[:400]
        RESULTS[f"timeline_{name}_us"] = round((t1 - t0) * 1e6, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder for the JSON and the profile")
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--max-size", default="1G")
    ap.add_argument("--allow-sim", action="store_true")
    ap.add_argument("--label", default="", help="a name for this run (what changed)")
    ap.add_argument("--only-stages", action="store_true", help="section 3 only, no profile")
    ap.add_argument("--timelines", action="store_true", help="section 5 only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_size = {"K": KiB, "M": MiB, "G": GiB}[args.max_size[-1]] * int(args.max_size[:-1])
    be = current_runtime().backend
    on_gpu = be.name == "cuda"
    if not on_gpu and not args.allow_sim:
        print("small_copy_probe: needs a GPU (or --allow-sim to check the script)")
        return 2
    RESULTS["card"] = gpuaio.Device(0).name
    RESULTS["label"] = args.label
    RESULTS["git"] = os.environ.get("GPUAIO_GIT_COMMIT", "")
    RESULTS["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.timelines:
        import uvloop

        section("5. timelines", lambda: uvloop.run(timelines()))
        (out / f"small_copy_timelines{args.label}.json").write_text(
            json.dumps(RESULTS, indent=1) + "\n"
        )
        return 0
    if on_gpu and not args.only_stages:
        section("1. driver costs (us)", driver_costs)
        section("2. alternatives", lambda: alternatives(max_size))
    import uvloop

    section(
        "3. gpuaio stage by stage, uvloop, one task (us)",
        lambda: uvloop.run(
            stages(
                args.reps,
                None if args.only_stages else out / f"small_copy_profile{args.label}.txt",
            )
        ),
    )
    for path, text in PROFILE:
        path.write_text(text)
        print(f"  profile written to {path}")
    (out / f"small_copy_probe{args.label}.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
