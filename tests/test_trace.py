"""Tracing (Chrome-trace JSON) and progress callbacks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import gpuaio

pytestmark = pytest.mark.anyio


async def test_trace_of_staged_copy(
    stream: gpuaio.Stream, dev: gpuaio.Device, tmp_path: Path
) -> None:
    n = 8 << 20
    host = np.ones(n, np.uint8)
    d = dev.empty(n)
    path = tmp_path / "t.json"
    with gpuaio.trace(path) as tracer:
        await stream.copy(d, host)
        await stream.memset(d, 0)
    await stream.copy(host, d)  # after the block: not recorded
    doc = json.loads(path.read_text())
    assert doc == tracer.chrome_trace()
    ops = [e for e in doc["traceEvents"] if e["pid"] == "device 0"]
    assert [e["name"].split()[0] for e in ops] == ["copy", "memset"]
    assert ops[0]["args"]["bytes"] == n and ops[0]["args"]["ok"] is True
    assert all(e["ph"] == "X" and e["dur"] >= 0 for e in doc["traceEvents"])
    assert ops[1]["ts"] >= ops[0]["ts"] + ops[0]["dur"] - 1
    chunks = [e for e in doc["traceEvents"] if e["pid"] == "host"]
    assert chunks and all("chunk" in e["name"] for e in chunks)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
async def test_progress_of_staged_copy(
    stream: gpuaio.Stream, dev: gpuaio.Device, direction: str
) -> None:
    n = 16 << 20
    host = np.ones(n, np.uint8)
    d = dev.empty(n)
    seen: list[tuple[int, int, str]] = []

    def cb(done: int, total: int) -> None:
        seen.append((done, total, threading.current_thread().name))

    if direction == "h2d":
        await stream.copy(d, host, progress=cb)
    else:
        await stream.copy(host, d, progress=cb)
    dones = [s[0] for s in seen]
    assert len(dones) >= 2, "a staged copy reports each chunk"
    assert dones == sorted(dones) and dones[-1] == n
    assert all(t == n for _, t, _ in seen)
    assert all(name != threading.main_thread().name for *_, name in seen)


async def test_progress_of_direct_copy(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    seen: list[tuple[int, int]] = []
    await stream.copy(dev.empty(4096), dev.empty(4096), progress=lambda a, b: seen.append((a, b)))
    assert seen == [(4096, 4096)]
