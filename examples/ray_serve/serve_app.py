"""The example service as a Ray Serve deployment, with its blocking twin.

``POST <prefix>/process`` uploads the body to the GPU, runs the example
service's ``transform`` kernel over it and answers with the result;
``GET <prefix>/health`` answers ``ok``; ``GET <prefix>/info`` says where
the replica runs (process, thread, backend, pinned budget). The GPU work is the service
example's, unchanged: :class:`GpuaioReplica` calls
``GpuService.transform`` (gpuaio: the replica's event loop keeps serving
while a request is on the GPU) and :class:`NaiveReplica` calls
``NaiveService.transform`` (blocking driver calls on the replica's event
loop, the situation of Ray issue #40328). Both live in ``examples/service``.

gpuaio in a replica process:

* Serve runs a replica's ``__init__`` and ``__call__`` on an event loop in a
  thread other than the process's main thread. gpuaio needs nothing from the
  main thread: its runtime starts on first use, in whatever thread that is.
* The runtime is per process: each replica is a Ray worker process of its
  own, with its own streams, worker threads and pinned pool. Ray starts
  workers fresh (they are not forked from a process that had used gpuaio),
  so :class:`gpuaio.ForkedProcessError` does not arise; it would, were
  gpuaio used in a process forked after it initialized CUDA.
* The backend and the pinned budget are read from the environment when the
  runtime starts: ``GPUAIO_BACKEND`` and ``GPUAIO_PINNED_BUDGET`` go in the
  replica's ``runtime_env`` (see :func:`actor_options`). Replicas on one host
  share its RAM: each may page-lock up to its own budget.
* When Serve stops a replica it calls the deployment's ``__del__`` (awaited,
  on the replica's loop) and then kills the process, without ``atexit``
  handlers: ``__del__`` waits for the replica's GPU work, closes its streams
  and closes gpuaio's runtime (its threads and pinned memory) off the loop.

Run it (127.0.0.1 only)::

    python examples/ray_serve/serve_app.py --replicas 2 --gpus-per-replica 1
    curl --data-binary @file http://127.0.0.1:8000/gpuaio/process > out

``loadtest.py`` beside this file compares the two deployments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

import gpuaio

HERE = Path(__file__).resolve().parent
SERVICE = HERE.parent / "service"
sys.path.insert(0, str(SERVICE))

import _common as common  # noqa: E402  (also serve_app.common: the kernel's host twin)
import gpuaio_app  # noqa: E402
import naive_app  # noqa: E402

HOST = "127.0.0.1"
KINDS = ("gpuaio", "naive")


async def read_body(request: Request, limit: int) -> np.ndarray | Response:
    """The body in a fresh numpy buffer, copied chunk by chunk; or the error answer."""
    n = int(request.headers.get("content-length", "-1"))
    if n < 0:
        return PlainTextResponse("Content-Length required", status_code=411)
    if n > limit:
        return PlainTextResponse("body too large", status_code=413)
    if n == 0:
        return PlainTextResponse("empty body", status_code=400)
    buf = await common.body_buffer(n)  # a large one's pages mapped off the loop
    off = 0
    async for chunk in request.stream():
        k = len(chunk)
        if off + k > n:
            return PlainTextResponse("body longer than Content-Length", status_code=400)
        buf[off : off + k] = np.frombuffer(chunk, np.uint8)
        off += k
    if off != n:
        return PlainTextResponse("body shorter than Content-Length", status_code=400)
    return buf


class _Replica:
    """What both deployments share: routing, body handling, the process's gpuaio runtime."""

    def __init__(self, rounds: int, max_mib: int) -> None:
        self.rounds = rounds
        self.max_bytes = max_mib << 20
        self.dev = gpuaio.Device(0)  # the runtime of this replica's process starts here
        self._closed = False

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path.endswith("/health"):
            return PlainTextResponse("ok")
        if path.endswith("/info"):
            return JSONResponse(self.info())
        if request.method != "POST" or not request.url.path.rstrip("/").endswith("/process"):
            return PlainTextResponse("not found", status_code=404)
        body = await read_body(request, self.max_bytes)
        if isinstance(body, Response):
            return body
        out = await self.transform(body)
        # Serve pickles the answer to send it to its HTTP proxy, so it must be
        # bytes, and the proxy hop copies it anyway.
        return Response(out.tobytes(), media_type="application/octet-stream")

    def info(self) -> dict[str, Any]:
        """Where this replica's gpuaio runs (``GET <prefix>/info``): process, thread, backend."""
        return {
            "pid": os.getpid(),
            "main_thread": threading.current_thread() is threading.main_thread(),
            "thread": threading.current_thread().name,
            "backend": self.dev.backend,
            "pinned_budget": os.environ.get("GPUAIO_PINNED_BUDGET"),
        }

    async def transform(self, body: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    async def close_service(self) -> None:
        raise NotImplementedError

    async def __del__(self) -> None:
        """Serve's shutdown hook: stop this replica's GPU work and gpuaio's runtime.

        Serve awaits it once when it stops the replica, then kills the
        process (``atexit`` handlers, gpuaio's included, do not run).
        """
        if self._closed:
            return
        self._closed = True
        await self.close_service()
        # Runtime.close() joins gpuaio's threads and frees its pinned pool:
        # blocking calls, so not on the replica's event loop.
        await asyncio.to_thread(gpuaio.current_runtime().close)


class GpuaioReplica(_Replica):
    """The deployment written with gpuaio: requests overlap on the GPU, the loop stays free."""

    def __init__(self, rounds: int, max_mib: int, slots: int) -> None:
        super().__init__(rounds, max_mib)
        self.service = gpuaio_app.GpuService(
            self.dev, rounds=rounds, slots=slots, max_bytes=self.max_bytes
        )

    async def transform(self, body: np.ndarray) -> np.ndarray:
        return await self.service.transform(body)

    async def close_service(self) -> None:
        await self.service.aclose()


class NaiveReplica(_Replica):
    """The same deployment with blocking driver calls on the replica's event loop."""

    def __init__(self, rounds: int, max_mib: int, slots: int) -> None:
        super().__init__(rounds, max_mib)
        self.service = naive_app.NaiveService(self.dev, rounds=rounds, max_bytes=self.max_bytes)

    async def transform(self, body: np.ndarray) -> np.ndarray:
        return self.service.transform(body)  # blocks the loop: the point of this twin

    async def close_service(self) -> None:
        self.service.shutdown()


REPLICAS = {"gpuaio": GpuaioReplica, "naive": NaiveReplica}


def gpuaio_env(backend: str | None, pinned_budget: str) -> dict[str, str]:
    """The environment a replica's gpuaio runtime starts from.

    ``PYTHONPATH`` carries this folder and the service example's, so that the
    replica can import the deployment's module.
    """
    paths = [str(HERE), str(SERVICE)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {"GPUAIO_PINNED_BUDGET": pinned_budget, "PYTHONPATH": os.pathsep.join(paths)}
    if backend:
        env["GPUAIO_BACKEND"] = backend
    return env


def actor_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ray_actor_options`` of each replica: its GPUs, CPUs and gpuaio's environment."""
    return {
        "num_gpus": args.gpus_per_replica,
        "num_cpus": args.cpus_per_replica,
        "runtime_env": {"env_vars": gpuaio_env(args.backend, args.pinned_budget)},
    }


def build(kind: str, args: argparse.Namespace) -> Any:
    """The Serve application of ``kind`` (``"gpuaio"`` or ``"naive"``), bound to ``args``."""
    from ray import serve

    deployment = serve.deployment(
        REPLICAS[kind],
        name=f"{kind}_replica",
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing,
        ray_actor_options=actor_options(args),
        # A stopping replica's __del__ waits for its GPU work: give it time.
        graceful_shutdown_timeout_s=30,
    )
    return deployment.bind(args.rounds, args.max_mib, args.slots)


def start(args: argparse.Namespace) -> int:
    """Start a local Ray and Serve on 127.0.0.1; returns Serve's HTTP port."""
    import ray
    from ray import serve

    # The driver's own gpuaio (the load test checks answers with it) uses the
    # same backend as the replicas.
    for key, value in gpuaio_env(args.backend, args.pinned_budget).items():
        if key != "PYTHONPATH":
            os.environ[key] = value
    ray.init(
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        _node_ip_address=HOST,
        include_dashboard=False,
        log_to_driver=args.log_to_driver,
        configure_logging=False,
    )
    serve.start(http_options={"host": HOST, "port": args.port})
    return int(args.port)


def deploy(args: argparse.Namespace, kinds: tuple[str, ...] = KINDS) -> dict[str, str]:
    """Run each kind's application under ``/<kind>``; returns their base URLs."""
    from ray import serve

    run_many = getattr(serve, "run_many", None)  # Ray 2.44+: deploys them side by side
    if run_many is not None:
        from ray.serve.api import RunTarget

        run_many([RunTarget(build(k, args), name=k, route_prefix=f"/{k}") for k in kinds])
    else:
        for kind in kinds:
            serve.run(build(kind, args), name=kind, route_prefix=f"/{kind}")
    return {kind: f"http://{HOST}:{args.port}/{kind}" for kind in kinds}


def stop() -> None:
    """Shut Serve down (each replica's ``__del__`` runs) and stop the local Ray."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the deployments and of the local cluster."""
    p.add_argument("--replicas", type=int, default=1, help="replicas of each deployment")
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="num_gpus of each replica (default: 1 on a CUDA host, 0 on the sim)",
    )
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--backend", default=None, help="GPUAIO_BACKEND for the replicas")
    p.add_argument(
        "--pinned-budget",
        default="256M",
        help="GPUAIO_PINNED_BUDGET of each replica (all replicas of a host share its RAM)",
    )
    p.add_argument("--rounds", type=int, default=16, help="kernel work per byte")
    p.add_argument("--slots", type=int, default=8, help="gpuaio: requests on the GPU at once")
    p.add_argument("--max-mib", type=int, default=64, help="largest request body")
    p.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests per replica")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray")
    p.add_argument("--log-to-driver", action="store_true", help="print the replicas' logs")


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on the machine."""
    if args.gpus_per_replica is None:
        backend = args.backend or os.environ.get("GPUAIO_BACKEND")
        if backend is None:
            try:  # the driver's own choice: a CUDA host, or an error saying how to choose sim
                backend = gpuaio.backend_name()
            except gpuaio.NoDeviceError as exc:
                raise SystemExit(f"{exc} (here: --backend sim)") from None
        args.gpus_per_replica = 1.0 if backend != "sim" else 0.0
    if args.backend is None:
        args.backend = os.environ.get("GPUAIO_BACKEND")
    if args.gpus_per_replica == 0 and args.num_gpus is None:
        args.num_gpus = 0
    return args


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    args = settle(p.parse_args(argv))
    start(args)
    try:
        for kind, url in deploy(args).items():
            print(f"{kind}: {url}/process  {url}/health", flush=True)
        print("serving; Ctrl-C stops", flush=True)
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


if __name__ == "__main__":
    main()
