#!/usr/bin/env python
"""Small pageable uploads through the driver's own staging: may the loop make that call? (issue 13)

A 4 KiB upload from pageable memory costs gpuaio 4-5 us more than one from
pinned memory on an H200 host (run DD): a pinned block from the pool, a
``memmove`` into it, the block's hand-back when the copy completes. The
driver's ``cuMemcpyAsync`` from the pageable buffer itself costs what a
pinned one does (6.3 against 6.2 us, run A), but CUDA says it "may
synchronize with the stream" first, and it uses the driver's own staging
memory, which other threads' pageable copies use too. The stager's
``direct_up_max`` (``GPUAIO_DIRECT_UP_MAX``) hands uploads up to that size to
the driver only where the stream is idle. Three sections, one process:

* ``calls`` (no loop): per size, how long that call takes to return with
  the stream idle; with the stream busy for about 2 ms (large device
  memsets enqueued first: does the call wait for them?); and with the
  stream idle while another thread runs 16 MiB pageable uploads through
  the driver on another stream (does it wait for their staging?). Each
  time, the source is overwritten once the call returns, and the device's
  bytes are checked against what it held at the call.
* ``e2e``: ``await stream.copy(device, pageable)`` with the direct path on
  and off, toggled per call in one process (the stager's
  ``direct_up_max``), in paired rounds, and a pinned upload of the same
  size for reference: per size, the median over rounds of each round's
  off / on time ratio (above 1: the direct path faster).
* the rule, written before any run (:func:`judge`).

``python tools/direct_upload_probe.py --loop uvloop --json out.json``; on the
simulated backend (``GPUAIO_BACKEND=sim --quick``) it only checks the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import gpuaio
from gpuaio._api.runtime import current_runtime

KiB, MiB = 1 << 10, 1 << 20
SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
BUSY_S = 2e-3
"""How long the busy stream's work should take: far above any call's own cost."""
WAITS_S = 50e-6
"""A call taking this long or more waited for something: the loop would stall."""
STALL_S = 1e-3
"""No call may take this long, even once: issue 13's bound on the loop's lag."""


def _fmt(n: int) -> str:
    return f"{n // MiB}MiB" if n >= MiB else f"{n // KiB}KiB"


def _us(xs: list[float], q: float = 50) -> float:
    return round(float(np.percentile(xs, q)) * 1e6, 2)


# -- calls -----------------------------------------------------------------
class _Busy:
    """Device memsets that keep a stream busy for about ``BUSY_S``."""

    def __init__(self, be: Any, dev: gpuaio.Device, native: Any, quick: bool) -> None:
        self.be, self.native = be, native
        self.buf = dev.empty((16 if quick else 1024) * MiB)
        self.count = 1
        self.enqueue()  # the first touch of the buffer is no measure
        be.stream_synchronize(native)
        # Calibrate: double the memsets until they take BUSY_S.
        while True:
            t0 = time.perf_counter()
            self.enqueue()
            be.stream_synchronize(native)
            took = time.perf_counter() - t0
            if took >= BUSY_S or self.count >= 4096:
                self.took = took
                return
            self.count *= 2

    def enqueue(self) -> None:
        n = self.buf.nbytes // 4
        for _ in range(self.count):
            self.be.memset_async(self.buf.ptr, 0, 4, n, self.native)


def _upload(
    be: Any,
    native: Any,
    dptr: int,
    src: np.ndarray[Any, Any],
    back: np.ndarray[Any, Any],
    before: Callable[[], None] | None,
    i: int,
) -> tuple[float, bool]:
    """One timed driver call uploading ``src`` (filled with ``i``) to ``dptr``
    after ``before()``; the source is overwritten once the call returns. Returns
    (seconds the call took, whether the device then held what the source held at the call)."""
    n = src.nbytes
    src[:] = i & 0xFF
    if before is not None:
        before()
    t0 = time.perf_counter()
    be.memcpy_async(dptr, src.ctypes.data, n, native)
    took = time.perf_counter() - t0
    src[:] = (i + 1) & 0xFF  # the call returned: the source is the caller's again
    be.memcpy_async(back.ctypes.data, dptr, n, native)
    be.stream_synchronize(native)
    return took, bool((back == i & 0xFF).all())


def calls_section(reps: int, quick: bool) -> list[dict[str, Any]]:
    rt = current_runtime()
    be = rt.backend
    dev = gpuaio.Device(0)
    s, other = dev.stream(), dev.stream()
    native, other_native = s._native, other._native
    busy = _Busy(be, dev, native, quick)
    print(f"calls: busy work of {busy.count} memsets takes {busy.took * 1e6:.0f} us", flush=True)
    big = 4 * MiB if quick else 16 * MiB
    big_src = np.ones(big, np.uint8)
    big_dst = dev.empty(big)
    stop = threading.Event()
    uploads = [0]

    def noisy() -> None:  # another thread's pageable uploads through the driver
        while not stop.is_set():
            be.memcpy_async(big_dst.ptr, big_src.ctypes.data, big, other_native)
            be.stream_synchronize(other_native)
            uploads[0] += 1

    rows = []
    for n in SIZES:
        d = dev.empty(n)
        back = gpuaio.pinned_empty(n)
        src = np.zeros(n, np.uint8)
        row: dict[str, Any] = {"bytes": n}
        bad = 0
        ptr = d.ptr
        for case, before in (("idle", None), ("busy", busy.enqueue)):
            k = reps if case == "idle" else max(5, reps // 20)
            got = [_upload(be, native, ptr, src, back, before, i) for i in range(k)]
            bad += sum(not ok for _, ok in got)
            xs = [t for t, _ in got]
            row[f"{case}_p50_us"], row[f"{case}_p99_us"] = _us(xs), _us(xs, 99)
            row[f"{case}_max_us"] = _us(xs, 100)
        th = threading.Thread(target=noisy, daemon=True)
        before_n = uploads[0]
        th.start()
        time.sleep(0.01)
        got = [_upload(be, native, ptr, src, back, None, i) for i in range(reps)]
        stop.set()
        th.join()
        stop.clear()
        bad += sum(not ok for _, ok in got)
        xs = [t for t, _ in got]
        row["beside_p50_us"], row["beside_p99_us"] = _us(xs), _us(xs, 99)
        row["beside_max_us"] = _us(xs, 100)
        row["beside_uploads"] = uploads[0] - before_n
        row["busy_us"] = round(busy.took * 1e6, 1)
        row["bad"] = bad
        rows.append(row)
        print(
            f"calls {_fmt(n):>6}: idle {row['idle_p50_us']} us (max {row['idle_max_us']}), "
            f"busy stream {row['busy_p50_us']} us (its work {row['busy_us']} us), beside "
            f"{row['beside_uploads']} other uploads p50/p99/max {row['beside_p50_us']}/"
            f"{row['beside_p99_us']}/{row['beside_max_us']} us, bad bytes {bad}",
            flush=True,
        )
    s.close()
    other.close()
    return rows


# -- e2e -------------------------------------------------------------------
async def e2e_section(rounds: int, per: int) -> list[dict[str, Any]]:
    stager = current_runtime().stager
    assert stager is not None
    dev = gpuaio.Device(0)
    s = dev.stream()
    clock = time.perf_counter
    rows = []
    for n in SIZES:
        src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        pin = gpuaio.pinned_empty(n)
        pin[:] = src
        d = dev.empty(n)
        back = np.zeros(n, np.uint8)
        arms: dict[str, tuple[Any, int]] = {
            "on": (src, n),
            "off": (src, 0),
            "pinned": (pin, 0),
        }
        for host, limit in arms.values():
            stager.direct_up_max = limit
            for _ in range(20):
                await s.copy(d, host)
        times: dict[str, list[float]] = {k: [] for k in arms}
        ratios = []
        for r in range(rounds):
            order = ("on", "off", "pinned") if r % 2 == 0 else ("pinned", "off", "on")
            med: dict[str, float] = {}
            for arm in order:
                host, limit = arms[arm]
                stager.direct_up_max = limit
                xs = []
                for _ in range(per):
                    t0 = clock()
                    await s.copy(d, host)
                    xs.append(clock() - t0)
                med[arm] = statistics.median(xs)
                times[arm].append(med[arm] * 1e6)
            ratios.append(med["off"] / med["on"])
        stager.direct_up_max = n
        await s.copy(d, src)
        src[:] = 0  # awaited: the source is the caller's again
        await s.copy(back, d)
        if back.tobytes() != np.random.default_rng(n).integers(0, 256, n, np.uint8).tobytes():
            raise AssertionError(f"{n} bytes: a direct upload is not byte-exact")
        row: dict[str, Any] = {"bytes": n, "per_arm": per, "rounds": rounds}
        row["ratio"] = round(statistics.median(ratios), 4)
        row["faster_rounds"] = sum(x > 1 for x in ratios)
        for arm in arms:
            row[f"{arm}_us"] = round(statistics.median(times[arm]), 2)
        rows.append(row)
        print(
            f"e2e {_fmt(n):>6}: off/on {row['ratio']:.3f} ({row['faster_rounds']}/{rounds}), "
            f"on {row['on_us']} us, off {row['off_us']} us, pinned {row['pinned_us']} us",
            flush=True,
        )
    stager.direct_up_max = 0
    s.close()
    return rows


# -- the rule ----------------------------------------------------------------
def judge(procs: list[dict[str, Any]]) -> int:
    """The ``DIRECT_UP_MAX`` the rule picks from several processes' results (0: rejected).

    A size is kept where, in every process: no byte was wrong; the call on
    an idle stream, and beside another thread's pageable uploads, returned
    within ``WAITS_S`` in 99% of calls and within ``STALL_S`` in every one
    (the loop does not stall: a rare long call is the host's, a frequent one
    a wait); and the awaited direct upload was at least 3% faster than the
    staged one (off / on >= 1.03) in at least three rounds of four. The
    setting is the largest size up to which every size is kept (4 KiB
    first). A busy stream's call is reported, not judged: the path is taken
    only on an idle stream.
    """
    keep = 0
    for n in SIZES:
        ok = bool(procs)
        for p in procs:
            call = next((r for r in p.get("calls", ()) if r["bytes"] == n), None)
            e2e = next((r for r in p.get("e2e", ()) if r["bytes"] == n), None)
            if call is None or e2e is None:  # not measured: not kept
                ok = False
                break
            waits_us, stall_us = WAITS_S * 1e6, STALL_S * 1e6
            ok &= call["bad"] == 0
            ok &= call["idle_p99_us"] < waits_us and call["beside_p99_us"] < waits_us
            ok &= call["idle_max_us"] < stall_us and call["beside_max_us"] < stall_us
            ok &= e2e["ratio"] >= 1.03 and e2e["faster_rounds"] >= (3 * e2e["rounds"] + 3) // 4
        if not ok:
            break
        keep = n
    return keep


async def _e2e(args: argparse.Namespace) -> list[dict[str, Any]]:
    return await e2e_section(args.rounds, args.per)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--judge", nargs="+", metavar="JSON", help="apply the rule to these results")
    ap.add_argument("--reps", type=int, default=400, help="calls: calls per size and case")
    ap.add_argument("--rounds", type=int, default=4, help="e2e: paired rounds per size")
    ap.add_argument("--per", type=int, default=300, help="e2e: awaited copies per arm and round")
    ap.add_argument("--quick", action="store_true", help="few repetitions: checks the script")
    args = ap.parse_args()
    if args.judge:
        procs = []
        for path in args.judge:
            with open(path) as f:
                procs.append(json.load(f))
        keep = judge(procs)
        print(f"rule: GPUAIO_DIRECT_UP_MAX={keep} ({_fmt(keep) if keep else 'off'})")
        return 0
    if args.quick:
        args.reps, args.rounds, args.per = 20, 2, 10
    out: dict[str, Any] = {"loop": args.loop, "backend": current_runtime().backend.name}
    out["calls"] = calls_section(args.reps, args.quick)
    if args.loop == "uvloop":
        import uvloop

        out["e2e"] = uvloop.run(_e2e(args))
    else:
        out["e2e"] = asyncio.run(_e2e(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
