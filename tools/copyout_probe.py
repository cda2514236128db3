"""Where a small awaited download's time goes past the hand-written one's, a step at a time.

Issue 13, round fifty. A download of up to ``inline_max`` into pageable
memory is a DMA into a pinned block, then a copy-out into the caller's
array. In run JA's floor probe (an H100 host, uvloop) gpuaio's 1 MiB
download took 130.1 us and the same done by hand 106.6; 5.6 us more at 256
KiB and 2.9 at 64 KiB: a cost that grows with the size, not a fixed one.

This probe builds the hand-written download up towards gpuaio's, one
change per method (interleaved repetitions, medians in microseconds, one
process, gpuaio's backend and stream for every driver call):

* ``spin``: a DMA into a fixed pinned block (the bytes as far into a
  64-byte line as the destination's, as ``lent.staged_at`` places them),
  an event, the event queried until it has fired, ``ctypes.memmove`` out;
* ``aw_yield``: the same, awaited, yielding to the loop between queries (a
  hand-written awaitable);
* ``aw_copy``: the copy-out by gpuaio's own ``copy_small``;
* ``aw_pool``: a block of the size's class taken from gpuaio's pinned pool
  and handed back for each copy, as the library does;
* ``gpuaio_one``: ``await stream.copy(array, device)`` in one DMA
  (``down_piece_min`` 0 for the call);
* ``gpuaio``: the same with the defaults (in two pieces from
  ``GPUAIO_DOWN_PIECE_MIN``).

Each into a pre-touched array at page + 16 bytes (where glibc's
``mmap``-backed allocations put a large numpy array); every method's bytes
are checked after its first call. Prints a table per size and writes
``copyout_probe.json`` to ``--out``. Runs on the simulated backend too
(``GPUAIO_BACKEND=sim``), for its test.
"""

# The per-size closures below run within their own iteration.
# ruff: noqa: B023

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np
from _rawcuda import aligned, interleaved, parse_size, report, run_probe

import gpuaio
from gpuaio._engine.lent import copy_small, staged_at

SIZES = ("64K", "256K", "1M")


async def main_async(args: Any) -> dict[str, Any]:
    dev = gpuaio.Device(0)
    s = dev.stream()
    rt = s._rt  # the probe looks inside: the pool, the backend, the stream's handle
    stager = rt.stager
    if stager is None:
        raise SystemExit("staging is off (GPUAIO_STAGING=0): no small download to probe")
    pool, backend, native = stager.pool, rt.backend, s._seq.native
    ev = backend.event_create(0)
    results: dict[str, Any] = {}
    for size in args.sizes.split(","):
        n = parse_size(size)
        inner = max(1, (4 << 20) // n)
        src = np.arange(n, dtype=np.uint8) * np.uint8(7)
        gd = dev.empty(n)
        await s.copy(gd, src)
        dst = aligned(n, 16, 0xA5)
        p = dst.ctypes.data
        held = await anyio.to_thread.run_sync(lambda: pool.acquire(n))
        assert held is not None  # waits for a block: never None
        fixed = staged_at(held, p)

        def dma(at: int) -> None:
            backend.memcpy_async(at, gd.ptr, n, native)
            backend.event_record(ev, native)

        def spin() -> None:
            dma(fixed)
            while not backend.event_query(ev):
                pass
            ctypes.memmove(p, fixed, n)

        def by_hand(copy: Callable[[int, int, int], object], own: bool) -> Callable[[], Any]:
            async def call() -> None:
                block = pool.take_cached(n) if own else None
                at = fixed if block is None else staged_at(block, p)
                dma(at)
                while not backend.event_query(ev):  # noqa: ASYNC110 (a poll a turn, as gpuaio's)
                    await asyncio.sleep(0)
                copy(p, at, n)
                if block is not None:
                    pool.release_small(block)

            return call

        def awaited(pieces: bool) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                least = stager.down_piece_min
                if not pieces:
                    stager.down_piece_min = 0
                try:
                    await s.copy(dst, gd)
                finally:
                    stager.down_piece_min = least

            return call

        methods: dict[str, Callable[[], Any]] = {
            "spin": spin,
            "aw_yield": by_hand(ctypes.memmove, False),
            "aw_copy": by_hand(copy_small, False),
            "aw_pool": by_hand(copy_small, True),
            "gpuaio_one": awaited(False),
            "gpuaio": awaited(True),
        }

        def refill() -> None:
            dst.fill(0xA5)  # each method must write every byte itself

        def check(name: str) -> None:
            if not np.array_equal(dst, src):
                raise SystemExit(f"{size} {name}: the destination is not the source")

        samples = await interleaved(methods, args.reps, inner, refill, check)
        results[size] = report(size, n, inner, args.reps, samples)
        pool.release(held)
        gd.free()
    backend.event_destroy(ev)
    s.close()
    return results


def main() -> int:
    return run_probe(__doc__, SIZES, main_async, "copyout_probe.json")


if __name__ == "__main__":
    raise SystemExit(main())
