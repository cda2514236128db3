#!/usr/bin/env python
"""Awaited small ops per second, this checkout against another gpuaio (suite ``ops_rate``).

What the stream sequencer costs or saves per op: each configuration runs in
a fresh process for this checkout's gpuaio and for the package in
``--baseline DIR`` (a copy of an earlier commit: ``git archive <rev> gpuaio
| tar -x -C /tmp/base``, then ``--baseline /tmp/base``), alternating, and
the record holds the medians and their ratio (this / baseline):

* ``ops_memset_1task_<loop>``: one task awaiting 4-byte device memsets;
* ``ops_memset_1000tasks_<loop>``: 1,000 tasks, 16 streams;
* ``ops_h2d_4KiB_<loop>`` / ``ops_d2h_4KiB_<loop>``: one task awaiting 4 KiB
  copies from / into pageable memory (the small, cached-block paths);
* ``ops_d2h_then_h2d_4KiB_<loop>``: a D2H into a pageable buffer and an H2D
  from it, started together and awaited together (the pattern stream order
  is about: the H2D must read what the D2H wrote);
* ``ops_h2d_4KiB_1000tasks_<loop>``: 1,000 tasks on 16 streams, each
  awaiting 4 KiB copies from its own pageable buffer (small staged copies
  in company), with a pinned block per task reserved first;
* ``ops_h2d_4KiB_1000tasks_unreserved_<loop>``: the same without the
  reservation, counted over a second window once the pool has filled on
  demand during a first (whether streams recover from blocks missed early).

Runs on the simulated backend too (``GPUAIO_BACKEND=sim``), where the figures
are CPU costs of this machine, not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = (
    "memset_1task",
    "memset_1000tasks",
    "h2d_4KiB",
    "d2h_4KiB",
    "d2h_then_h2d_4KiB",
    "h2d_4KiB_1000tasks",
    "h2d_4KiB_1000tasks_unreserved",
)
LOOPS = ("asyncio", "uvloop", "trio")


def measure(case: str, loop: str, seconds: float) -> float:
    """Awaited ops per second of ``case`` on ``loop`` (in this process)."""
    import anyio
    import numpy as np

    import gpuaio

    async def main() -> float:
        dev = gpuaio.Device(0)
        streams = [dev.stream() for _ in range(16)]
        n = 4096
        d = dev.empty(1 << 16)
        host = np.zeros(n, np.uint8)
        for s in streams[:1]:  # warm up: threads, cached pinned blocks
            for _ in range(50):
                await s.copy(d[:n], host)
                await s.copy(host, d[:n])
                await s.memset(d[:4], 1)
        done = 0
        deadline = time.perf_counter() + seconds
        t0 = time.perf_counter()
        s = streams[0]
        if case == "memset_1000tasks":
            counts = [0] * 1000

            async def worker(i: int) -> None:
                st = streams[i % 16]
                piece = d[4 * (i % 1000) : 4 * (i % 1000) + 4]
                while time.perf_counter() < deadline:
                    await st.memset(piece, i & 0xFF)
                    counts[i] += 1

            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(worker, i)
            done = sum(counts)
        elif case.startswith("h2d_4KiB_1000tasks"):
            counts = [0] * 1000
            dst = dev.empty(1000 * n)
            if case == "h2d_4KiB_1000tasks":
                # As a service does at start-up (docs/services.md): a pinned
                # block per upload in flight, allocated before the window, not
                # in it (a driver allocation takes about a millisecond).
                await gpuaio.reserve_pinned(n, concurrent=1000)
                start = time.perf_counter()
            else:
                # Unreserved: the pool fills on demand during a first window
                # of the same length, which is not counted.
                start = time.perf_counter() + seconds
            deadline = start + seconds

            async def uploader(i: int) -> None:
                st = streams[i % 16]
                src = np.full(n, i & 0xFF, np.uint8)
                piece = dst[i * n : (i + 1) * n]
                while (now := time.perf_counter()) < deadline:
                    await st.copy(piece, src)
                    counts[i] += now >= start

            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(uploader, i)
            done = sum(counts)
            t0 = start
        else:
            while time.perf_counter() < deadline:
                for _ in range(20):
                    if case == "memset_1task":
                        await s.memset(d[:4], 7)
                    elif case == "h2d_4KiB":
                        await s.copy(d[:n], host)
                    elif case == "d2h_4KiB":
                        await s.copy(host, d[:n])
                    else:
                        a = s.copy(host, d[:n])
                        b = s.copy(d[n : 2 * n], host)
                        await a
                        await b
                    done += 1
        elapsed = time.perf_counter() - t0
        for st in streams:
            await st.aclose()
        return done / elapsed

    backend, options = ("trio", {}) if loop == "trio" else ("asyncio", {})
    if loop == "uvloop":
        options = {"use_uvloop": True}
    return float(anyio.run(main, backend=backend, backend_options=options))


def child(pkg_dir: str, case: str, loop: str, seconds: float) -> float:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [pkg_dir, os.environ.get("PYTHONPATH")])),
    )
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, loop, str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--baseline", required=True, metavar="DIR", help="folder holding a gpuaio package"
    )
    ap.add_argument("--baseline-name", default="baseline", help="what the baseline is (a commit)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated, of: " + " ".join(CASES)
    )
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1])
    import gpuaio

    card = gpuaio.Device(0).name
    records: list[dict[str, Any]] = []
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")
    for loop in args.loops.split(","):
        for case in cases:
            ours, base = [], []
            for _ in range(args.reps):
                base.append(child(args.baseline, case, loop, args.seconds))
                ours.append(child(here, case, loop, args.seconds))
            v, b = statistics.median(ours), statistics.median(base)
            rec = {
                "name": f"ops_{case}_{loop}",
                "metric": "ops/s",
                "value": round(v),
                "baseline": f"gpuaio at {args.baseline_name}",
                "baseline_value": round(b),
                "ratio": round(v / b, 3),
                "better": "higher",
            }
            records.append(rec)
            print(f"{rec['name']:36s} {v:10.0f} {b:10.0f}  x{v / b:.2f}", flush=True)
    result = {
        "suite": "ops_rate",
        "card": card,
        "backend": gpuaio.backend_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": os.environ.get("GPUAIO_GIT_COMMIT", ""),
        "records": records,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(measure(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    else:
        main()
