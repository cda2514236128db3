"""Tests of examples/ray_serve and examples/ray_data on a local Ray (127.0.0.1 only).

One local cluster (``ray.init(num_cpus=2)``) and one Serve instance for the
module, with both deployments of the Serve example; shut down at the end.
Replicas run gpuaio on the backend under test (the sim in CI). Skipped, with
the reason, where ray (the ``ray`` extra: ``pip install 'gpuaio[ray]'``) is
not installed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'gpuaio[ray]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
aiohttp = pytest.importorskip("aiohttp", reason="aiohttp is not installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BACKEND = "cuda" if os.environ.get("GPUAIO_TEST_BACKEND", "sim").lower() == "cuda" else "sim"
ROUNDS = 3

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")]),
    pytest.mark.timeout(240),
]


def _import(path: Path, name: str) -> Any:
    sys.path.insert(0, str(path.parent))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.remove(str(path.parent))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """A local Ray and Serve on 127.0.0.1 running both deployments, for the whole module."""
    serve_app = _import(EXAMPLES / "ray_serve" / "serve_app.py", "serve_app")
    loadtest = _import(EXAMPLES / "ray_serve" / "loadtest.py", "loadtest")
    argv = ["--backend", BACKEND, "--num-cpus", "2", "--rounds", str(ROUNDS), "--max-mib", "8"]
    argv += ["--slots", "2", "--pinned-budget", "64M", "--cpus-per-replica", "0.25"]
    argv += ["--gpus-per-replica", "0.25" if BACKEND == "cuda" else "0", "--no-write"]
    args = loadtest.parse_args(argv)
    args.port = _free_port()
    t0 = time.perf_counter()
    # start() exports the backend and the pinned budget for the driver: undo that afterwards.
    with pytest.MonkeyPatch.context() as mp:
        for key in ("GPUAIO_BACKEND", "GPUAIO_PINNED_BUDGET"):
            mp.delenv(key, raising=False)  # restored when the block ends
        serve_app.start(args)
    try:
        urls = serve_app.deploy(args)
        print(f"ray + serve + 2 apps up in {time.perf_counter() - t0:.1f} s")
        yield {"urls": urls, "args": args, "serve_app": serve_app, "loadtest": loadtest}
    finally:
        serve_app.stop()
        for name in ("serve_app", "loadtest"):
            sys.modules.pop(name, None)


def _payloads() -> list[bytes]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 4097, (3 << 20) + 5)]


@pytest.mark.parametrize("kind", ["gpuaio", "naive"])
async def test_deployment_answers(cluster: dict[str, Any], kind: str, anyio_backend: Any) -> None:
    """Both deployments answer byte for byte, serve /health, and refuse bad bodies."""
    url = cluster["urls"][kind]
    expected = cluster["serve_app"].common.expected
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/health") as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"
        for payload in _payloads() * 2:  # the second round reuses the grown device buffers
            async with session.post(f"{url}/process", data=payload) as resp:
                assert resp.status == 200
                assert await resp.read() == expected(payload, ROUNDS)
        async with session.post(f"{url}/process", data=b"") as resp:
            assert resp.status == 400
        async with session.post(f"{url}/process", data=bytes(9 << 20)) as resp:
            assert resp.status == 413


async def test_replicas_run_gpuaio_off_the_main_thread(
    cluster: dict[str, Any], anyio_backend: Any
) -> None:
    """Each replica is a process of its own whose gpuaio runs on a non-main loop thread,
    on the backend and with the pinned budget from its runtime_env."""
    infos = {}
    async with aiohttp.ClientSession() as session:
        for kind, url in cluster["urls"].items():
            async with session.get(f"{url}/info") as resp:
                assert resp.status == 200
                infos[kind] = json.loads(await resp.text())
    for info in infos.values():
        assert info["main_thread"] is False, info
        assert info["backend"] == BACKEND, info
        assert info["pinned_budget"] == "64M", info
        assert info["pid"] != os.getpid(), info
    assert infos["gpuaio"]["pid"] != infos["naive"]["pid"]


async def test_loadtest_short(cluster: dict[str, Any], anyio_backend: Any) -> None:
    """The load test's clients and probe, shortened: every answer right, /health answered.

    Timing is not asserted: on a loaded 2-core machine it says nothing.
    """
    args = cluster["args"]
    args.clients, args.seconds, args.size, args.probe_ms = 8, 2.0, 64 << 10, 20.0
    loadtest = cluster["loadtest"]
    with anyio.fail_after(120):
        results = await loadtest.load(cluster["urls"], args)
    for kind, (requests, health) in results.items():
        assert requests.errors == 0, kind
        assert len(requests.latencies) >= args.clients, (kind, len(requests.latencies))
        assert health.errors == 0, kind
        assert len(health.latencies) >= 1, kind
    for rec in loadtest.records(results, args):
        assert rec["value"] is not None and rec["baseline_value"] is not None, rec


def _marked_deployment(serve_app: Any) -> Any:
    """GpuaioReplica that reports, after its shutdown hook, what of gpuaio is left.

    Defined in a function so that Ray pickles it by value (the test module
    is not importable in the replica).
    """

    class Marked(serve_app.GpuaioReplica):  # type: ignore[misc, name-defined]
        def __init__(self, mark: str) -> None:
            super().__init__(ROUNDS, 8, 2)
            self.mark = mark

        async def __del__(self) -> None:
            await super().__del__()
            import gpuaio

            report = {
                "runtime_closed": gpuaio.current_runtime().closed,
                "streams_closed": self.service._slots.empty(),
                "threads": [t.name for t in threading.enumerate() if "gpuaio" in t.name],
            }
            tmp = f"{self.mark}.tmp"  # then renamed: the test never reads half a file
            await anyio.to_thread.run_sync(Path(tmp).write_text, json.dumps(report))
            os.replace(tmp, self.mark)

    return Marked


async def test_replica_shutdown_closes_gpuaio(
    cluster: dict[str, Any], tmp_path: Path, anyio_backend: Any
) -> None:
    """Stopping a replica runs its __del__: GPU work waited for, streams and runtime closed,
    no gpuaio thread left in the replica's process."""
    serve_app, args = cluster["serve_app"], cluster["args"]
    mark = tmp_path / "closed.json"
    deployment = serve.deployment(
        _marked_deployment(serve_app),
        name="marked",
        ray_actor_options=serve_app.actor_options(args),
    )
    url = f"http://127.0.0.1:{args.port}/marked"
    payload = _payloads()[1]
    await anyio.to_thread.run_sync(
        lambda: serve.run(deployment.bind(str(mark)), name="marked", route_prefix="/marked")
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/process", data=payload) as resp,
    ):
        assert resp.status == 200
        assert await resp.read() == serve_app.common.expected(payload, ROUNDS)
    await anyio.to_thread.run_sync(lambda: serve.delete("marked"))
    with anyio.fail_after(60):
        while not mark.exists():  # noqa: ASYNC110  (written by another process: nothing to wait on)
            await anyio.sleep(0.1)
    report = json.loads(mark.read_text())
    assert report == {"runtime_closed": True, "streams_closed": True, "threads": []}, report


def _ray_data(cluster: dict[str, Any]) -> Any:
    pytest.importorskip("pyarrow", reason="ray[data] is not installed (pyarrow missing)")
    return _import(EXAMPLES / "ray_data" / "loader.py", "loader")


async def test_ray_data_into_prefetch(
    cluster: dict[str, Any], anyio_backend: Any, gpuaio_runtime: Any
) -> None:
    """A Ray dataset's numpy batches go through gpuaio.prefetch; every result is right.

    (The pipeline runs in this process, on the test's runtime: without it
    gpuaio would start one from the environment, which chooses no backend.)"""
    loader = _ray_data(cluster)
    batches, batch_bytes = 6, 256 << 10
    ds = loader.make_dataset(batches, batch_bytes)
    with anyio.fail_after(120):
        summary = await loader.pipeline.run(
            loader.numpy_batches(ds, batch_bytes), rounds=ROUNDS, depth=2
        )
    assert summary.batches == batches
    assert summary.bytes == batches * (batch_bytes // loader.ROW_BYTES) * loader.ROW_BYTES
    assert summary.mismatches == 0


async def test_ray_data_iter_torch_batches_comparison(
    cluster: dict[str, Any], anyio_backend: Any
) -> None:
    """The iter_torch_batches(device="cuda", pin_memory=True) side of the comparison."""
    loader = _ray_data(cluster)
    reason = loader.torch_unavailable()
    if reason is not None:
        pytest.skip(f"iter_torch_batches comparison needs PyTorch with CUDA: {reason}")
    batch_bytes = 256 << 10
    ds = loader.make_dataset(4, batch_bytes)
    with anyio.fail_after(120):
        result = await loader.torch_pass(ds, batch_bytes, ROUNDS)
    assert result["batches"] == 4
    assert result["first_batch_checked"] is True
