"""The gpuaio side of the Ray Data example: host batches in, device batches out, computed on.

:func:`run` takes any iterable of host batches (numpy arrays, or dicts of
them as Ray Data's ``iter_batches(batch_format="numpy")`` yields) and feeds
it to :func:`gpuaio.prefetch`. Three things overlap:

* the source is pulled on a worker thread of the loader (never on the loop),
* the next batches' uploads run on the loader's stream,
* the current batch is computed on, on a stream of its own: the service
  example's ``transform`` kernel over the batch's bytes, then a download of
  the result, which is checked byte for byte against the same transform done
  on the host (off the loop).

It needs neither Ray nor aiohttp: ``loader.py`` runs it over a Ray dataset,
``examples/gpu_check.py`` over a plain numpy iterator.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

import gpuaio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

import _common as common  # the kernel and its host twin

COLUMN = "data"
"""The column a dict batch's array is in (Ray Data's ``range_tensor`` calls it so)."""


@dataclass
class Summary:
    """What one pass over the source did."""

    batches: int = 0
    bytes: int = 0
    seconds: float = 0.0
    mismatches: int = 0
    depth: int = 0
    in_flight: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "gb_per_s": round(self.gb_per_s, 4),
            "mismatches": self.mismatches,
            "depth": self.depth,
            "in_flight": self.in_flight,
        }


def host_array(batch: Any) -> np.ndarray:
    """The array of a batch: the batch itself, or its :data:`COLUMN`."""
    arr = batch[COLUMN] if isinstance(batch, dict) else batch
    return np.ascontiguousarray(arr)


def _kept(source: Iterable[Any], kept: collections.deque[np.ndarray]) -> Iterator[Any]:
    """``source``'s batches, each remembered in ``kept`` to check its result against."""
    for batch in source:
        kept.append(host_array(batch))
        yield batch


def _check(host: np.ndarray, out: np.ndarray, rounds: int) -> bool:
    return common.expected(host.tobytes(), rounds) == out.tobytes()


async def run(
    source: Iterable[Any], *, rounds: int = 4, depth: int = 2, in_flight: int = 2
) -> Summary:
    """Upload, compute on and check every batch of ``source``; see the module docstring.

    At most ``depth`` batches are ahead in the loader and ``in_flight``
    batches are being computed on at once, so memory stays bounded.
    """
    dev = gpuaio.Device(0)
    kernel = common.make_kernel(dev)
    kept: collections.deque[np.ndarray] = collections.deque()
    pending: collections.deque[tuple[np.ndarray, np.ndarray, gpuaio.Operation]] = (
        collections.deque()
    )
    summary = Summary(depth=depth, in_flight=in_flight)

    async def finish_oldest() -> None:
        host, out, op = pending.popleft()
        await op
        if not await anyio.to_thread.run_sync(_check, host, out, rounds):
            summary.mismatches += 1

    t0 = time.perf_counter()
    async with (
        dev.stream() as compute,
        gpuaio.prefetch(_kept(source, kept), depth=depth, device=dev) as batches,
    ):
        async for batch in batches:
            host = kept.popleft()  # the loader keeps source order
            d = batch[COLUMN] if isinstance(batch, dict) else batch
            flat = d.reshape(d.size).view(np.uint8)
            n = flat.size
            out = np.empty(n, np.uint8)
            # The upload has completed (prefetch's guarantee): compute at once.
            compute.launch(
                kernel, common.grid_for(n), common.BLOCK, flat, np.uint64(n), np.uint32(rounds)
            )
            pending.append((host, out, compute.copy(out, flat)))
            summary.batches += 1
            summary.bytes += n
            while len(pending) >= in_flight:
                await finish_oldest()
        while pending:
            await finish_oldest()
    summary.seconds = time.perf_counter() - t0
    return summary


def numpy_batches(count: int, batch_bytes: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """``count`` batches of random bytes shaped like Ray Data's: ``{"data": (rows, 64)}``."""
    rng = np.random.default_rng(seed)
    rows = max(1, batch_bytes // 64)
    for _ in range(count):
        yield {COLUMN: rng.integers(0, 256, (rows, 64), dtype=np.uint8)}
