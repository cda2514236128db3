"""Ray Data into gpuaio.prefetch: a dataset's numpy batches become device batches.

``ds.iter_batches(batch_format="numpy")`` is a plain iterator of
``{"data": ndarray}`` batches; :func:`pipeline.run` hands it to
:func:`gpuaio.prefetch`, which pulls it on a worker thread, uploads ahead on
its own stream, and yields device batches that are computed on (and checked
byte for byte) while the next ones upload.

Where PyTorch with CUDA is present, the same dataset also goes through
``ds.iter_torch_batches(device="cuda", pin_memory=True)`` for comparison
(the same kernel, launched on PyTorch's current stream); elsewhere that
comparison is skipped and the reason printed.

Run it (a local Ray on 127.0.0.1)::

    python examples/ray_data/loader.py --batches 64 --batch-mib 4
    GPUAIO_BACKEND=sim python examples/ray_data/loader.py --batches 8 --batch-mib 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

import gpuaio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline

HOST = "127.0.0.1"
ROW_BYTES = 4096
"""Each dataset row: a (512,) int64 tensor."""


def make_dataset(batches: int, batch_bytes: int) -> Any:
    """A dataset of ``batches`` x ``batch_bytes`` bytes (``range_tensor``: row i is all i)."""
    import ray.data

    rows_per_batch = max(1, batch_bytes // ROW_BYTES)
    return ray.data.range_tensor(batches * rows_per_batch, shape=(ROW_BYTES // 8,))


def numpy_batches(ds: Any, batch_bytes: int) -> Any:
    """The dataset as an iterator of numpy batches, ``{"data": (rows, 512) int64}``."""
    rows = max(1, batch_bytes // ROW_BYTES)
    return ds.iter_batches(batch_format="numpy", batch_size=rows, prefetch_batches=2)


def torch_unavailable() -> str | None:
    """Why the ``iter_torch_batches`` comparison cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch has no CUDA device"
    if gpuaio.backend_name() != "cuda":
        return "gpuaio is on the simulated backend"
    return None


async def torch_pass(ds: Any, batch_bytes: int, rounds: int) -> dict[str, Any]:
    """``iter_torch_batches(device="cuda", pin_memory=True)`` with the same kernel per batch.

    Ray Data uploads each batch on PyTorch's current stream, blocking the
    thread that iterates (here the event loop's: this is the comparison); the
    kernel and the download then run on that stream through gpuaio. The
    first batch's result is checked against the host transform.
    """
    import torch

    dev = gpuaio.Device(0)
    kernel = pipeline.common.make_kernel(dev)
    stream = dev.wrap_stream(torch.cuda.current_stream())
    rows = max(1, batch_bytes // ROW_BYTES)
    count = nbytes = 0
    first: tuple[np.ndarray, np.ndarray] | None = None
    pending: list[gpuaio.Operation] = []
    t0 = time.perf_counter()
    for batch in ds.iter_torch_batches(
        batch_size=rows, device="cuda", pin_memory=True, prefetch_batches=2
    ):
        t = batch[pipeline.COLUMN]
        flat = t.reshape(-1).view(torch.uint8)
        n = flat.numel()
        out = np.empty(n, np.uint8)
        if first is None:
            first = (flat.cpu().numpy(), out)
        args = (flat, np.uint64(n), np.uint32(rounds))
        stream.launch(kernel, pipeline.common.grid_for(n), pipeline.common.BLOCK, *args)
        pending.append(stream.copy(out, flat))
        if len(pending) >= 2:  # as many in flight as pipeline.run keeps
            await pending.pop(0)
        count += 1
        nbytes += n
    await gpuaio.wait_all(pending)
    seconds = time.perf_counter() - t0
    ok = first is not None and pipeline.common.expected(first[0].tobytes(), rounds) == (
        first[1].tobytes()
    )
    return {
        "batches": count,
        "bytes": nbytes,
        "seconds": round(seconds, 4),
        "gb_per_s": round(nbytes / seconds / 1e9, 4) if seconds else 0.0,
        "first_batch_checked": ok,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--batch-mib", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=4, help="kernel work per byte")
    p.add_argument("--depth", type=int, default=2, help="gpuaio.prefetch depth")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    import ray

    batch_bytes = int(args.batch_mib * (1 << 20))
    ray.init(
        num_cpus=args.num_cpus,
        _node_ip_address=HOST,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        ds = make_dataset(args.batches, batch_bytes)
        summary = anyio.run(
            lambda: pipeline.run(
                numpy_batches(ds, batch_bytes), rounds=args.rounds, depth=args.depth
            )
        )
        result: dict[str, Any] = {
            "backend": gpuaio.backend_name(),
            "gpuaio_prefetch": summary.as_dict(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("GPUAIO_")},
        }
        print(f"gpuaio.prefetch: {json.dumps(summary.as_dict())}")
        reason = torch_unavailable()
        if reason is None:
            result["iter_torch_batches"] = anyio.run(torch_pass, ds, batch_bytes, args.rounds)
            print(f"iter_torch_batches: {json.dumps(result['iter_torch_batches'])}")
        else:
            result["iter_torch_batches"] = {"skipped": reason}
            print(f"iter_torch_batches comparison skipped: {reason}")
    finally:
        ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if summary.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
