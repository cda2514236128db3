"""What the first GIL release after a stretch of Python costs, with and without other threads.

``python tools/gil_tax_probe.py`` runs, in fresh processes, ``--rounds`` times:
``--pause-ms`` of pure Python on the main thread (it holds the GIL), then
one ``ctypes.memmove`` of 64 bytes (which releases and retakes the GIL, as
every driver call through cuda-bindings, a staging ``memmove`` and an event
loop's I/O poll do), timed, then a second one at once. Per setting it prints
the p50 and p90 of both, in microseconds:

* ``alone``: no other thread;
* ``sleeper``: another Python thread that sleeps ``--period-ms`` in a loop;
* ``blocked``: another Python thread blocked on a lock with no timeout;
* ``gpuaio``: in a running asyncio loop, with gpuaio's threads: a memset
  awaited on the fake GPU of ``tools/overhead_probe.py`` after each timed
  pair.

Why (issue 13, round twenty-six): on the CPU machine, the first release after
0.2 ms or more of Python cost 15-20 us instead of 1-3 us whenever another
thread had woken from a timed sleep and wanted the GIL back, gpuaio's
included; a 4 KiB copy's first release after other work pays it. Whether an
H200 host pays it too decides whether gpuaio's threads should avoid timed
waits while a loop is busy. No GPU is used.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SETTINGS = ("alone", "sleeper", "blocked", "gpuaio")


def spin(seconds: float) -> None:
    """Pure Python, holding the GIL, for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(setting: str, rounds: int, pause_s: float, period_s: float) -> dict[str, Any]:
    """Run ``setting`` in this process: p50 and p90 (us) of the first and second release."""
    first: list[float] = []
    second: list[float] = []
    if setting == "gpuaio":
        _in_gpuaio_loop(rounds, pause_s, first, second)
    else:
        if setting == "sleeper":
            threading.Thread(target=_sleep_forever, args=(period_s,), daemon=True).start()
        elif setting == "blocked":
            lock = threading.Lock()
            lock.acquire()
            threading.Thread(target=lock.acquire, daemon=True).start()
        time.sleep(0.05)  # the other thread is in its wait
        for _ in range(rounds):
            _timed_pair(pause_s, first, second)
    return {"setting": setting, **_pcts("first", first), **_pcts("second", second)}


_A, _B = ctypes.create_string_buffer(64), ctypes.create_string_buffer(64)


def _timed_pair(pause_s: float, first: list[float], second: list[float]) -> None:
    spin(pause_s)
    clock = time.perf_counter
    t0 = clock()
    ctypes.memmove(_A, _B, 64)
    t1 = clock()
    ctypes.memmove(_A, _B, 64)
    t2 = clock()
    first.append(t1 - t0)
    second.append(t2 - t1)


def _sleep_forever(period_s: float) -> None:
    while True:
        time.sleep(period_s)


def _in_gpuaio_loop(rounds: int, pause_s: float, first: list[float], second: list[float]) -> None:
    """The timed pairs in a running event loop (asyncio), each followed by an
    awaited memset on gpuaio's fake GPU (``tools/overhead_probe.py``)."""
    import anyio

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import overhead_probe

    import gpuaio

    gpuaio.use_backend(overhead_probe.fake_gpu(gpuaio, 5e-6, 2e-6))

    async def run() -> None:
        dev = gpuaio.Device(0)
        async with dev.stream() as stream:
            d = dev.empty(4)
            for _ in range(20):
                await stream.memset(d, 0)
            for _ in range(rounds):
                _timed_pair(pause_s, first, second)
                await stream.memset(d, 0)

    anyio.run(run)


def _pcts(name: str, values: list[float]) -> dict[str, float]:
    values = sorted(values)
    n = len(values)
    return {f"{name}_p50_us": values[n // 2] * 1e6, f"{name}_p90_us": values[(9 * n) // 10] * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--pause-ms", type=float, default=0.5)
    ap.add_argument("--period-ms", type=float, default=20.0)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process runs one setting
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    pause_s, period_s = args.pause_ms * 1e-3, args.period_ms * 1e-3
    if args.one:
        print(json.dumps(measure(args.one, args.rounds, pause_s, period_s)))
        return 0
    rows = []
    print(
        f"first and second GIL release (64-byte ctypes.memmove) after {args.pause_ms:g} ms "
        f"of Python, {args.rounds} rounds, us: p50 / p90"
    )
    for setting in args.settings.split(","):
        cmd = [sys.executable, __file__, "--one", setting, "--rounds", str(args.rounds)]
        cmd += ["--pause-ms", str(args.pause_ms), "--period-ms", str(args.period_ms)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{setting:<8} first {row['first_p50_us']:6.1f} / {row['first_p90_us']:6.1f}   "
            f"second {row['second_p50_us']:6.1f} / {row['second_p90_us']:6.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
