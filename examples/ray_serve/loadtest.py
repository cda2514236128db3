"""Load test of the Ray Serve example: the gpuaio deployment against its blocking twin.

Starts a local Ray and Serve on 127.0.0.1, deploys both applications
(``serve_app.py``), warms them up, then, one deployment after the other,
``--clients`` clients (default 32) POST ``--size``-byte bodies for
``--seconds`` while a probe process sends ``GET /health`` every
``--probe-ms``. Every answer is checked byte for byte. Reports request and
health p50/p99 for both, writes them to
``<--out>/<date>-<card>-ray_serve.json`` and stops Ray.

Bounded: the two load phases together last at most 20 s (``--seconds`` is
per deployment, at most 10), each request has a timeout, and the cluster is
shut down however the run ends. The HTTP clients and the health probe are
the service example's (``examples/service/loadtest.py``).

GPU host (one replica per GPU)::

    python examples/ray_serve/loadtest.py --replicas 1 --gpus-per-replica 1

Anywhere (the simulated backend)::

    python examples/ray_serve/loadtest.py --backend sim
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve_app  # noqa: E402


def _service_loadtest() -> Any:
    """``examples/service/loadtest.py``, under a name that is not this module's."""
    name = "service_loadtest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, serve_app.SERVICE / "loadtest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


service_loadtest = _service_loadtest()

H = service_loadtest.H
Phase = service_loadtest.Phase
MAX_SECONDS = 10.0
"""Longest load phase per deployment: two of them, 20 s in all."""
BASELINE = "blocking deployment: the service example's NaiveService on the replica's loop"


async def measure(url: str, payload: bytes, answer: bytes, args: argparse.Namespace) -> list[Phase]:
    """(requests, /health probes) against one deployment for ``args.seconds``."""
    probe_args = argparse.Namespace(probe_ms=args.probe_ms, uvloop=False)
    probe = await service_loadtest.HealthProbe.start(url, probe_args)
    try:
        await asyncio.sleep(0.2)
        await probe.cut()  # from here on, probes run beside the load
        requests = await service_loadtest.run_requests(
            url, payload, answer, args.clients, 1 << 30, args.seconds, args.timeout_s
        )
        health = await probe.cut()
    finally:
        await probe.close()
    return [requests, health]


async def load(urls: dict[str, str], args: argparse.Namespace) -> dict[str, list[Phase]]:
    payload = service_loadtest.payload_of(args.size, 1)
    answer = serve_app.common.expected(payload, args.rounds)
    for url in urls.values():  # warm-up: replicas, kernels, buffers, connections
        await service_loadtest.run_requests(url, payload, answer, 2, 4, 60, args.timeout_s)
    results = {}
    for kind, url in urls.items():
        results[kind] = await measure(url, payload, answer, args)
        req, health = results[kind]
        print(
            f"{kind:>6}: {req.rps:7.1f} req/s, request p50 {req.ms(50):7.2f} p99 "
            f"{req.ms(99):7.2f} ms ({len(req.latencies)} ok, {req.errors} errors); /health p50 "
            f"{health.ms(50):7.2f} p99 {health.ms(99):7.2f} ms ({len(health.latencies)} probes, "
            f"{health.errors} errors)",
            flush=True,
        )
    return results


def records(results: dict[str, list[Phase]], args: argparse.Namespace) -> list[dict[str, Any]]:
    ours, base = results.get("gpuaio"), results.get("naive")
    size = H.fmt_size(args.size)
    recs = []

    def value(phases: list[Phase] | None, i: int, what: str, q: float = 0) -> float | None:
        if phases is None:
            return None
        ph = phases[i]
        return ph.rps if what == "rps" else ph.ms(q)

    extra = {"clients": args.clients, "seconds": args.seconds, "replicas": args.replicas}
    recs.append(
        H.record(
            f"ray_serve_rps_c{args.clients}_{size}",
            "req/s",
            value(ours, 0, "rps"),
            BASELINE,
            value(base, 0, "rps"),
            "higher",
            **extra,
        )
    )
    for i, what in ((0, "request"), (1, "health")):
        for q in (50, 99):
            recs.append(
                H.record(
                    f"ray_serve_{what}_p{q}_c{args.clients}_{size}",
                    "ms",
                    value(ours, i, "ms", q),
                    BASELINE,
                    value(base, i, "ms", q),
                    "lower",
                    ok=len(ours[i].latencies) if ours else None,
                    baseline_ok=len(base[i].latencies) if base else None,
                    errors=(ours[i].errors if ours else 0) + (base[i].errors if base else 0),
                    **extra,
                )
            )
    return recs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    serve_app.add_arguments(p)
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=MAX_SECONDS, help="load per deployment")
    p.add_argument("--size", type=H.parse_size, default=1 << 20, help="request body")
    p.add_argument("--probe-ms", type=float, default=10.0, help="/health period")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request")
    p.add_argument("--label", default=None, help="what ran this, stored in the results")
    p.add_argument("--out", default=str(HERE / "results"), help="results folder")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.seconds = min(args.seconds, MAX_SECONDS)
    if args.port == 8000:
        args.port = free_port()
    return serve_app.settle(args)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((serve_app.HOST, 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serve_app.start(args)
    try:
        urls = serve_app.deploy(args)
        results = asyncio.run(load(urls, args))
    finally:
        serve_app.stop()
    recs = records(results, args)
    errors = sum(ph.errors for phases in results.values() for ph in phases)
    if not args.no_write:
        card = H.detect_card()
        config = {k: v for k, v in vars(args).items() if k not in ("out", "no_write")}
        H.write_results("ray_serve", recs, args.out, card=card, config={"loadtest": config})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
