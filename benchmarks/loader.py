#!/usr/bin/env python
"""Loader benchmark (suite ``loader``): ``gpuaio.prefetch`` over an epoch.

A producer makes ``--batches`` fresh pageable batches of ``--size`` bytes
(64 MiB: an XOR of a base array, into a new array, as a decode or augment
step would); a consumer kernel of comparable time runs over each batch on
the device. Measured in one process, alternating, median of ``--reps``:

* each stage alone, over the epoch: produce, transfer (``await
  stream.copy`` of a pageable batch), compute (``await launch``);
* the sequential epoch: produce, copy, compute, one batch after the other;
* ``gpuaio.prefetch(source, depth=--depth)`` with an awaited kernel per batch
  (the source runs on the loader's thread);
* PyTorch's ``DataLoader(pin_memory=True)`` with ``.to("cuda",
  non_blocking=True)`` and the same kernel on torch's stream, with
  ``--workers`` worker processes and with none.

Targets: the prefetch epoch is at most 1.1 x max(produce, transfer, compute),
and beats the sequential sum. The event loop's lag during the prefetch
epoch is recorded too.

The consumer kernel spins for a set time (``%globaltimer``) after reading
its batch; by default that time is the produce time of one batch, measured
first (``--compute-ms`` overrides it).

GPU run (H100)::

    python benchmarks/loader.py

Anywhere, on the simulated backend where there is no GPU (``auto`` falls
back to it with a warning)::

    GPUAIO_BACKEND=auto python benchmarks/loader.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import _harness as H
import numpy as np

import gpuaio

CONSUME_SRC = r"""
extern "C" __global__ void consume(const unsigned char* data, unsigned long long n,
                                   unsigned long long spin_ns, unsigned int* out) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned int acc = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += stride * 16) {
        acc += data[i];
    }
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < spin_ns);
    if (acc == 0xFFFFFFFFu) out[0] = acc;  /* keeps the reads */
}
"""

GRID = 264
BLOCK = 256


def _consume_sim(grid: Any, block: Any, data: Any, n: Any, spin_ns: Any, out: Any) -> None:
    time.sleep(int(spin_ns) / 1e9)


class Setup:
    """What every method shares: the base data, the kernel, the stage timings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = args.size
        self.dev = gpuaio.Device(0)
        self.kernel = self.dev.compile(CONSUME_SRC, "consume", sim=_consume_sim)
        self.base = np.random.default_rng(0).integers(0, 256, self.n, dtype=np.uint8)
        self.out = self.dev.empty(1, np.uint32)
        self.spin_ns = 0

    def produce(self, i: int) -> np.ndarray:
        """A fresh pageable batch (new memory, so page faults are paid as in real loaders)."""
        return np.bitwise_xor(self.base, np.uint8(i & 0xFF))

    def source(self) -> Iterator[np.ndarray]:
        for i in range(self.args.batches):
            yield self.produce(i)

    def launch(self, stream: gpuaio.Stream, batch: Any) -> gpuaio.Operation:
        return stream.launch(
            self.kernel, GRID, BLOCK, batch, np.uint64(self.n), np.uint64(self.spin_ns), self.out
        )


# -- the methods ------------------------------------------------------------------


async def stage_produce(st: Setup) -> float:
    t0 = time.perf_counter()
    for i in range(st.args.batches):
        st.produce(i)
    return time.perf_counter() - t0


async def stage_transfer(st: Setup, stream: gpuaio.Stream) -> float:
    hosts = [st.produce(i) for i in range(2)]
    d = st.dev.empty(st.n)
    t0 = time.perf_counter()
    for i in range(st.args.batches):
        await stream.copy(d, hosts[i % 2])
    return time.perf_counter() - t0


async def stage_compute(st: Setup, stream: gpuaio.Stream) -> float:
    d = st.dev.empty(st.n)
    await stream.copy(d, st.base)
    t0 = time.perf_counter()
    for _ in range(st.args.batches):
        await st.launch(stream, d)
    return time.perf_counter() - t0


async def sequential(st: Setup, stream: gpuaio.Stream) -> float:
    t0 = time.perf_counter()
    for i in range(st.args.batches):
        host = st.produce(i)
        d = st.dev.empty(st.n)
        await stream.copy(d, host)
        await st.launch(stream, d)
    return time.perf_counter() - t0


async def prefetched(st: Setup, stream: gpuaio.Stream) -> float:
    t0 = time.perf_counter()
    async with gpuaio.prefetch(st.source(), depth=st.args.depth) as it:
        async for d in it:
            await st.launch(stream, d)
    return time.perf_counter() - t0


async def prefetched_lag(st: Setup, stream: gpuaio.Stream) -> list[float]:
    """The event loop's lateness (s) with a 1 ms ticker, over one prefetch epoch."""
    async with H.loop_lag() as ticker:
        await prefetched(st, stream)
    return ticker.lateness


def torch_method(st: Setup, workers: int) -> Callable[[], float]:
    """PyTorch's DataLoader with pinned memory and non-blocking copies (sync, on the loop)."""
    import torch
    import torch.utils.data

    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device")
    device = torch.device(f"cuda:{st.dev.ordinal}")

    class Batches(torch.utils.data.Dataset[Any]):
        def __len__(self) -> int:
            return int(st.args.batches)

        def __getitem__(self, i: int) -> Any:
            return torch.from_numpy(st.produce(i))

    # Workers persist across epochs (started by the warm-up epoch), as a
    # training loop would set it up; fork keeps the closure-based dataset.
    loader = torch.utils.data.DataLoader(
        Batches(),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=True,
        prefetch_factor=2 if workers else None,
        persistent_workers=workers > 0,
        multiprocessing_context="fork" if workers else None,
    )

    def epoch() -> float:
        wrapped = st.dev.wrap_stream(torch.cuda.current_stream(device))
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for batch in loader:
            x = batch.to(device, non_blocking=True)
            st.launch(wrapped, x)  # the same kernel, on torch's stream
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        wrapped.close()
        return elapsed

    return epoch


# -- suite -----------------------------------------------------------------------


async def suite(args: argparse.Namespace) -> list[H.Record]:
    st = Setup(args)
    size = H.fmt_size(args.size)
    nb = args.batches
    async with st.dev.stream() as stream:
        # Warm up (allocations, the kernel, staging threads, page cache).
        st.produce(0)
        await stage_transfer(st, stream)
        per_batch_produce = await stage_produce(st) / nb
        st.spin_ns = int(
            (args.compute_ms * 1e6) if args.compute_ms is not None else per_batch_produce * 1e9
        )
        await stage_compute(st, stream)
        print(
            f"  {nb} batches of {size}; depth {args.depth}; consumer kernel "
            f"{st.spin_ns / 1e6:.2f} ms per batch"
        )

        torch_notes: dict[str, str] = {}
        methods: dict[str, Callable[[], Any]] = {
            "produce": lambda: stage_produce(st),
            "transfer": lambda: stage_transfer(st, stream),
            "compute": lambda: stage_compute(st, stream),
            "sequential": lambda: sequential(st, stream),
            "prefetch": lambda: prefetched(st, stream),
        }
        for label, workers in (("torch", args.workers), ("torch_w0", 0)):
            try:
                fn = torch_method(st, workers)
            except Exception as exc:  # torch missing, or no CUDA (the sim)
                torch_notes[label] = f"{type(exc).__name__}: {exc}"
                continue

            async def run_torch(fn: Callable[[], float] = fn) -> float:
                return fn()

            methods[label] = run_torch
        result = await H.interleave(methods, reps=args.reps, warmup=1)
        lags = await prefetched_lag(st, stream)
    for name, err in result.errors.items():
        torch_notes.setdefault(name, err)
        print(f"  {name} failed: {err}")
    med = {name: result.median(name) for name in methods}
    for name, value in med.items():
        if value is not None:
            print(f"  {name:<11} {value:8.3f} s/epoch  ({value / nb * 1e3:7.2f} ms/batch)")
    return records(args, med, torch_notes, lags, st)


def records(
    args: argparse.Namespace,
    med: dict[str, float | None],
    torch_notes: dict[str, str],
    lags: list[float],
    st: Setup,
) -> list[H.Record]:
    size = H.fmt_size(args.size)
    nb = args.batches
    ours = med.get("prefetch")
    stages = [med.get(k) for k in ("produce", "transfer", "compute")]
    bound = max(s for s in stages if s is not None) if all(s is not None for s in stages) else None
    common: dict[str, Any] = {"batches": nb, "depth": args.depth, "spin_ms": st.spin_ns / 1e6}
    recs = [
        H.record(
            f"loader_epoch_{size}",
            "s",
            ours,
            "sequential produce + copy + compute per batch",
            med.get("sequential"),
            "lower",
            **common,
        ),
        H.record(
            f"loader_epoch_over_stage_bound_{size}",
            "x",
            (ours / bound) if ours is not None and bound else None,
            "max(produce, transfer, compute) over the epoch, each alone (bound_s)",
            None,
            "lower",
            target=1.1,
            target_of="value",
            bound_s=bound,
            produce_s=stages[0],
            transfer_s=stages[1],
            compute_s=stages[2],
            **common,
        ),
    ]
    for label, workers in (("torch", args.workers), ("torch_w0", 0)):
        recs.append(
            H.record(
                f"loader_epoch_vs_torch_dataloader_w{workers}_{size}",
                "s",
                ours,
                f"torch DataLoader(num_workers={workers}, pin_memory=True) + "
                ".to(cuda, non_blocking=True), same kernel",
                med.get(label),
                "lower",
                note=torch_notes.get(label),
                workers=workers,
                **common,
            )
        )
    for stage, value in zip(("produce", "transfer", "compute"), stages, strict=True):
        recs.append(
            H.record(
                f"loader_stage_{stage}_{size}",
                "ms/batch",
                value / nb * 1e3 if value is not None else None,
                **common,
            )
        )
    ms = [x * 1e3 for x in lags]
    recs.append(
        H.record(
            f"loader_loop_lag_p99_{size}",
            "ms",
            H.percentile(ms, 99) if ms else None,
            better="lower",
            max_ms=max(ms) if ms else None,
            samples=len(ms),
            **common,
        )
    )
    return recs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small and short (CI, sim)")
    p.add_argument("--size", type=H.parse_size, default=None, help="batch bytes (64MiB)")
    p.add_argument("--batches", type=int, default=None, help="batches per epoch (48)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="epochs per method (3)")
    p.add_argument("--workers", type=int, default=2, help="torch DataLoader workers")
    p.add_argument("--compute-ms", type=float, default=None, help="kernel time per batch")
    p.add_argument("--loop", default="asyncio", choices=H.LOOPS)
    p.add_argument("--out-dir", default=None, help="default benchmarks/results")
    args = p.parse_args(argv)
    for key, full, quick in (
        ("size", 64 << 20, 4 << 20),
        ("batches", 48, 12),
        ("reps", 3, 1),
    ):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.quick and args.compute_ms is None:
        args.compute_ms = 5.0  # the sim's producer is too quick to set a useful kernel time
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    H.watchdog()
    card = H.detect_card()
    H.banner("loader", card)
    reason = H.loop_unavailable(args.loop)
    if reason:
        raise SystemExit(reason)
    t0 = time.perf_counter()
    records = H.run_on(args.loop, suite, args)
    print()
    H.print_targets(records)
    config = {
        "size": args.size,
        "batches": args.batches,
        "depth": args.depth,
        "reps": args.reps,
        "workers": args.workers,
        "loop": args.loop,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    H.write_results("loader", records, args.out_dir, card=card, config=config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
