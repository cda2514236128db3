"""How late a 1 ms ticker runs when another thread wakes its event loop now and then.

``python tools/wake_lag_probe.py`` runs the ticker of ``benchmarks/transfers.py``'s
soak (a task that sleeps 1 ms in a loop, via anyio, and records how late each
tick lands) on asyncio, uvloop and trio while a plain thread wakes the loop
(``call_soon_threadsafe``, trio's ``run_sync_soon``) with a no-op, at random
intervals around a mean. No GPU and no gpuaio: the loop is never blocked, it
only gets woken.

Why: asyncio's selector rounds its timeout *up* to whole milliseconds
(``selectors.EpollSelector.select``: "round away from zero to wait at least
timeout seconds"). A wake-up from another thread that lands ``t`` into a 1 ms
sleep leaves ``1 - t`` ms to the ticker's timer, and the loop then sleeps a
whole 1 ms: the tick lands ``t`` late, so a woken tick is late by a uniform
0-1 ms. With one wake-up per 8 ms (32 staged 256 MiB copies awaited one by one
through a 0.25 s soak) an eighth of the ticks is hit, and the p99 lateness is
the 92nd percentile of 0-1 ms plus the loop's own lateness: about 1 ms.

Prints, per loop and mean wake interval, the p50/p99/max lateness in ms and
the share of ticks later than 0.5 ms; ``--out FILE`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import threading
import time
from typing import Any

import anyio
import sniffio

LOOPS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


def _percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def _waker_of_this_loop() -> Any:
    """The running loop's thread-safe "run this soon" (what gpuaio's wake-ups call)."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


async def _measure(ticks: int, mean_interval: float, seed: int) -> dict[str, float]:
    """``ticks`` 1 ms sleeps while a thread wakes this loop every ~``mean_interval`` s."""
    wake = _waker_of_this_loop()
    stop = threading.Event()
    rng = random.Random(seed)
    wakes = 0

    def waker() -> None:
        nonlocal wakes
        while not stop.wait(rng.uniform(0.5, 1.5) * mean_interval):
            try:
                wake(lambda: None)
            except RuntimeError:  # the loop has finished (trio: RunFinishedError)
                return
            wakes += 1

    thread = threading.Thread(target=waker, daemon=True) if mean_interval else None
    if thread is not None:
        thread.start()
    late: list[float] = []
    try:
        last = time.perf_counter()
        for _ in range(ticks):
            await anyio.sleep(1e-3)
            now = time.perf_counter()
            late.append(max(0.0, now - last - 1e-3) * 1e3)
            last = now
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    return {
        "p50_ms": round(_percentile(late, 50), 4),
        "p99_ms": round(_percentile(late, 99), 4),
        "max_ms": round(max(late), 4),
        "late_over_0_5ms": round(sum(x > 0.5 for x in late) / len(late), 4),
        "wakes_per_tick": round(wakes / len(late), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loops", default="asyncio,uvloop,trio", help="comma-separated loops")
    p.add_argument(
        "--intervals",
        default="0,0.008,0.032,0.25",
        help="mean seconds between wake-ups, comma-separated (0: none)",
    )
    p.add_argument("--ticks", type=int, default=2000, help="ticks per configuration")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    intervals = [float(x) for x in args.intervals.split(",")]
    rows: list[dict[str, Any]] = []
    print(f"1 ms ticker lateness (ms), {args.ticks} ticks each, Python {platform.python_version()}")
    print(f"  {'loop':<8} {'wake every':>10} {'p50':>7} {'p99':>7} {'max':>7} {'>0.5ms':>7}")
    for loop in args.loops.split(","):
        backend, options = LOOPS[loop]
        for k, interval in enumerate(intervals):
            try:
                res = anyio.run(
                    _measure, args.ticks, interval, k, backend=backend, backend_options=options
                )
            except ImportError as exc:
                print(f"  {loop:<8} unavailable: {exc}")
                break
            rows.append({"loop": loop, "mean_wake_interval_s": interval, **res})
            every = f"{interval * 1e3:.0f} ms" if interval else "never"
            print(
                f"  {loop:<8} {every:>10} {res['p50_ms']:7.3f} {res['p99_ms']:7.3f} "
                f"{res['max_ms']:7.3f} {res['late_over_0_5ms']:7.1%}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"python": platform.python_version(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
