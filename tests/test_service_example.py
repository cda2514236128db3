"""Smoke test of examples/service: both apps answer correctly; the load test runs.

Skipped where aiohttp (an example-only dependency) is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuaio

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

SERVICE = Path(__file__).resolve().parent.parent / "examples" / "service"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")]),
]


@pytest.fixture
def service_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.syspath_prepend(str(SERVICE))
    names = ("_common", "gpuaio_app", "naive_app")
    mods = {name: importlib.import_module(name) for name in names}
    yield mods
    for name in names:
        sys.modules.pop(name, None)


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    # A 413 answer leaves the rest of the body unread; don't linger 10 s draining it.
    runner = web.AppRunner(app, access_log=None, lingering_time=0.1)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("app_name", ["gpuaio_app", "naive_app"])
async def test_app_answers(
    service_modules: dict[str, Any], dev: gpuaio.Device, app_name: str, anyio_backend: Any
) -> None:
    common = service_modules["_common"]
    args = argparse.Namespace(
        rounds=3, slots=2, max_mib=8, uvloop=False, port=0, exit_with_parent=False
    )
    app = service_modules[app_name].make_app(args)
    rng = np.random.default_rng(9)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 4097, 3 << 20)]
    async with serving(app) as url, aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"
        for payload in payloads * 2:  # the second round reuses the grown buffers
            async with session.post(f"{url}/process", data=payload) as resp:
                assert resp.status == 200
                assert await resp.read() == common.expected(payload, 3)
        async with session.post(f"{url}/process", data=b"") as resp:
            assert resp.status == 400
        async with session.post(f"{url}/process", data=bytes(9 << 20)) as resp:
            assert resp.status == 413


def read_results(folder: Path) -> dict[str, Any]:
    files = sorted(folder.glob("*-service.json"))
    assert len(files) == 1, files
    result: dict[str, Any] = json.loads(files[0].read_text())
    return result


async def test_loadtest_quick(
    service_modules: dict[str, Any], tmp_path: Path, anyio_backend: Any, dev: gpuaio.Device
) -> None:
    """The load generator runs both servers end to end and writes a results file."""
    if dev.backend != "sim":
        pytest.skip("the full load test is run by hand on a GPU (see its docstring)")
    import anyio.to_thread

    argv = [
        "--quick",
        "--concurrency",
        "1,2",
        "--requests",
        "4",
        "--large-requests",
        "2",
        "--large",
        "1MiB",
        "--out",
        str(tmp_path),
    ]
    env = {"GPUAIO_BACKEND": "sim", "GPUAIO_BENCH_WATCHDOG_S": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("OUT", raising=False)
        mp.setattr(sys, "path", list(sys.path))  # undo loadtest's sys.path additions
        loadtest = importlib.import_module("loadtest")
        assert await anyio.to_thread.run_sync(loadtest.main, argv) == 0
    sys.modules.pop("loadtest", None)
    doc = read_results(tmp_path)
    names = {r["name"] for r in doc["records"]}
    assert {"service_rps_c1_256KiB", "service_p99_c2_256KiB", "service_health_p99_during_1MiB"} <= (
        names
    )
    for rec in doc["records"]:
        assert rec["value"] is not None, rec
        assert rec["baseline_value"] is not None, rec
