"""Find what stalls the event loop: sample the loop thread's stack while a ticker is late."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections import Counter

import numpy as np

import gpuaio


def main() -> None:
    last_tick = [time.perf_counter()]
    samples: Counter[str] = Counter()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            time.sleep(0.0005)
            late = time.perf_counter() - last_tick[0]
            if late > 0.004:
                names = {t.ident: t.name for t in threading.enumerate()}
                for ident, frame in sys._current_frames().items():
                    if ident == threading.get_ident():
                        continue
                    stack = traceback.extract_stack(frame)[-4:]
                    where = "".join(
                        f"  {f.filename.split('/')[-1]}:{f.lineno} {f.name}\n" for f in stack
                    )
                    samples[f"[{names.get(ident, ident)}]\n{where}"] += 1

    async def ticker() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.001)
            last_tick[0] = time.perf_counter()

    async def run() -> None:
        dev = gpuaio.Device(0)
        n = 256 << 20
        if "--demo-like" in sys.argv:  # the set-up `python -m gpuaio demo` does first
            from gpuaio.__main__ import ADD_ONE, _add_one_sim

            dev.compile(ADD_ONE, "add_one", sim=_add_one_sim)
            gpuaio.pinned_empty(n)
            host = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
        else:
            host = np.ones(n, np.uint8)
        back = np.empty(n, np.uint8)
        back[:] = 0
        d = dev.empty(n)
        t = asyncio.ensure_future(ticker())
        async with dev.stream() as s:
            for i in range(3):
                t0 = time.perf_counter()
                await s.copy(d, host)
                t1 = time.perf_counter()
                await s.copy(back, d)
                d2h = (time.perf_counter() - t1) * 1e3
                print(f"round {i}: h2d {(t1 - t0) * 1e3:.1f} ms, d2h {d2h:.1f} ms")
        stop.set()
        await t

    threading.Thread(target=sampler, daemon=True).start()
    asyncio.run(run())
    for stack, count in samples.most_common(14):
        print(f"{count} samples (loop late by > 4 ms) of thread {stack}")


if __name__ == "__main__":
    main()
