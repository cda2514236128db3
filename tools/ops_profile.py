"""Where the event loop's time goes with many tasks awaiting tiny ops, on the real backend.

``tools/overhead_probe.py --profile`` answers this on a fake GPU whose calls
cost nothing; this runs the same workload (``--tasks`` tasks, 16 streams,
each awaiting 4-byte device memsets back to back, uvloop by default) on the
configured backend, a CUDA GPU included, and prints the ops per second, the
driver calls per op and a cProfile of the loop thread by internal time
(driver calls included: their time is the C call's). Writes the text to
``--out`` too.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio

import gpuaio

NSTREAMS = 16


async def run(tasks: int, seconds: float, profile: cProfile.Profile | None) -> float:
    dev = gpuaio.Device(0)
    streams = [dev.stream() for _ in range(NSTREAMS)]
    d = dev.empty(4 * tasks)
    for s in streams:
        for k in range(20):
            await s.memset(d[:4], k)
    counts = [0] * tasks
    deadline = 0.0
    go = anyio.Event()

    async def worker(i: int) -> None:
        st, piece = streams[i % NSTREAMS], d[4 * i : 4 * i + 4]
        await go.wait()
        k = 0
        while time.perf_counter() < deadline:
            await st.memset(piece, k & 0xFF)
            k += 1
        counts[i] = k

    async with anyio.create_task_group() as tg:
        for i in range(tasks):
            tg.start_soon(worker, i)
        await anyio.sleep(0.01)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        if profile is not None:
            profile.enable()
        go.set()
    if profile is not None:
        profile.disable()
    rate = sum(counts) / (time.perf_counter() - t0)
    for s in streams:
        await s.aclose()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--loop", default="uvloop", choices=("asyncio", "uvloop", "trio"))
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", help="file to write the report to")
    args = ap.parse_args()
    backend, options = ("trio", {}) if args.loop == "trio" else ("asyncio", {})
    if args.loop == "uvloop":
        options = {"use_uvloop": True}
    plain = anyio.run(run, args.tasks, args.seconds, None, backend=backend, backend_options=options)
    prof = cProfile.Profile()
    profiled = anyio.run(
        run, args.tasks, args.seconds, prof, backend=backend, backend_options=options
    )
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    ops = profiled * args.seconds
    print(f"backend {gpuaio.backend_name()}, {args.loop}, {args.tasks} tasks", file=text)
    print(f"ops/s: {plain:.0f} (profiled: {profiled:.0f})", file=text)
    raw = stats.stats  # type: ignore[attr-defined]
    for (_file, _line, fn), (cc, _nc, _tt, ct, _callers) in sorted(raw.items()):
        if fn in ("memset_async", "event_record", "event_query", "stream_handle"):
            print(
                f"  {fn}: {cc / ops:.2f} calls/op, {ct / cc * 1e6:.2f} us each (cumulative)",
                file=text,
            )
    stats.sort_stats("tottime").print_stats(args.top)
    report = text.getvalue()
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
