"""Check the gpuaio side of the Ray examples on this machine's backend, without Ray.

Ray may not be installable where the GPU is. Ray only hosts the examples'
gpuaio code, so this runs that code without it:

* **Serve**: the GPU handler of ``examples/ray_serve`` (the service
  example's ``GpuService.transform``, which the deployment calls) served by
  the service example's plain aiohttp server on 127.0.0.1, in a process of
  its own like a replica. ``--clients`` clients POST for ``--seconds`` while
  a probe process sends ``GET /health``; every answer is checked byte for
  byte. The blocking twin (``NaiveService``) is run the same way for
  comparison.
* **Data**: ``examples/ray_data/pipeline.py`` (what the Ray Data example
  runs over ``iter_batches(batch_format="numpy")``) over a plain numpy
  iterator through :func:`gpuaio.prefetch`, each result checked byte for
  byte.

Writes a JSON summary to ``--out``; exits non-zero if any answer was wrong,
a health probe failed or none answered. Needs aiohttp; runs in under 60 s::

    python3 examples/gpu_check.py --out ray-gpu-check.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "service"))
sys.path.insert(0, str(HERE / "ray_data"))

import loadtest as service_loadtest  # noqa: E402  (examples/service/loadtest.py)
import pipeline  # noqa: E402  (examples/ray_data/pipeline.py)

import gpuaio  # noqa: E402

H = service_loadtest.H


def _phase(ph: Any) -> dict[str, Any]:
    return {
        "ok": len(ph.latencies),
        "errors": ph.errors,
        "p50_ms": H._clean(ph.ms(50)),
        "p99_ms": H._clean(ph.ms(99)),
        "per_s": round(ph.rps, 2),
    }


async def check_handler(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``name``'s app ("gpuaio" or "naive") under load, with /health probed beside it."""
    server_args = argparse.Namespace(
        rounds=args.rounds, slots=args.slots, size=args.size, large=args.size, uvloop=False
    )
    payload = service_loadtest.payload_of(args.size, 1)
    answer = pipeline.common.expected(payload, args.rounds)
    server = await service_loadtest.start_server(name, server_args)
    try:
        await service_loadtest.run_requests(server.url, payload, answer, 2, 4, 60, 60)  # warm-up
        probe = await service_loadtest.HealthProbe.start(
            server.url, argparse.Namespace(probe_ms=args.probe_ms, uvloop=False)
        )
        try:
            await asyncio.sleep(0.2)
            await probe.cut()
            requests = await service_loadtest.run_requests(
                server.url, payload, answer, args.clients, 1 << 30, args.seconds, 60
            )
            health = await probe.cut()
        finally:
            await probe.close()
    finally:
        await service_loadtest.stop_server(server)
    result = {"requests": _phase(requests), "health": _phase(health)}
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


async def check_all(args: argparse.Namespace) -> dict[str, Any]:
    serve: dict[str, Any] = {
        "clients": args.clients,
        "seconds": args.seconds,
        "size": args.size,
        "rounds": args.rounds,
    }
    for name in ("gpuaio", "naive"):
        serve[name] = await check_handler(name, args)
    summary = await pipeline.run(
        pipeline.numpy_batches(args.batches, int(args.batch_mib * (1 << 20))),
        rounds=args.loader_rounds,
        depth=2,
    )
    print(f"loader: {json.dumps(summary.as_dict())}", flush=True)
    return {"serve_handler": serve, "data_loader": summary.as_dict()}


def passed(doc: dict[str, Any]) -> bool:
    """Every answer right, /health answered throughout, every loader batch right."""
    for name in ("gpuaio", "naive"):
        res = doc["serve_handler"][name]
        if res["requests"]["errors"] or not res["requests"]["ok"]:
            return False
        if res["health"]["errors"] or not res["health"]["ok"]:
            return False
    loader = doc["data_loader"]
    return bool(loader["mismatches"] == 0 and loader["batches"] > 0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON summary")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0, help="load per handler")
    p.add_argument("--size", type=H.parse_size, default=1 << 20, help="request body")
    p.add_argument("--rounds", type=int, default=16, help="kernel work per byte (handler)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--probe-ms", type=float, default=10.0)
    p.add_argument("--batches", type=int, default=32, help="loader batches")
    p.add_argument("--batch-mib", type=float, default=4.0)
    p.add_argument("--loader-rounds", type=int, default=4)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    H.watchdog(120)  # a hang ends with tracebacks, not a silent timeout
    t0 = time.perf_counter()
    card = H.detect_card()
    print(f"gpuaio {gpuaio.__version__} on {card.name} ({card.backend})", flush=True)
    doc: dict[str, Any] = {
        "check": "gpuaio side of examples/ray_serve and examples/ray_data, without Ray",
        "backend": card.backend,
        "card": card.name,
        "driver": card.driver,
        "ray_installed": _has("ray"),
        "git": H.git_commit(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GPUAIO_")},
    }
    try:
        doc.update(asyncio.run(check_all(args)))
        doc["passed"] = passed(doc)
    except Exception as exc:
        doc["passed"] = False
        doc["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        doc["seconds"] = round(time.perf_counter() - t0, 2)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}: passed={doc.get('passed')} in {doc['seconds']} s", flush=True)
    return 0 if doc["passed"] else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
