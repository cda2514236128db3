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


async def test_failing_progress_callback_is_logged_not_raised(
    stream: gpuaio.Stream, dev: gpuaio.Device, caplog: pytest.LogCaptureFixture
) -> None:
    n = 16 << 20
    host = np.arange(n, dtype=np.uint32).view(np.uint8)[:n]
    d = dev.empty(n)

    def broken(done: int, total: int) -> None:
        raise RuntimeError("progress display went away")

    with caplog.at_level("ERROR", logger="gpuaio"):
        await stream.copy(d, host, progress=broken)
        out = np.empty_like(host)
        await stream.copy(out, d, progress=broken)
    assert np.array_equal(out, host), "a failing callback must not disturb the copy"
    assert any("progress callback" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("sized", [True, False], ids=["list", "generator"])
async def test_progress_of_loader(stream: gpuaio.Stream, sized: bool) -> None:
    batches = [np.full(4096, i, np.uint8) for i in range(5)]
    seen: list[tuple[int, int | None, int]] = []
    got: list[int] = []

    def cb(done: int, total: int | None) -> None:
        seen.append((done, total, len(got)))

    source = batches if sized else (b for b in batches)
    async with gpuaio.prefetch(source, stream=stream, progress=cb) as loader:
        async for batch in loader:
            host = np.empty(4096, np.uint8)
            await stream.copy(host, batch)
            got.append(int(host[0]))
    assert got == [0, 1, 2, 3, 4]
    total = 5 if sized else None
    # Each report comes after its batch was handed over (before the consumer
    # has processed it), then one closing report with the total known.
    assert seen == [(i + 1, total, i) for i in range(5)] + [(5, 5, 5)]


async def test_progress_of_loader_stops_without_closing_report_on_break(
    stream: gpuaio.Stream,
) -> None:
    seen: list[tuple[int, int | None]] = []
    source = [np.zeros(64, np.uint8)] * 4
    async with gpuaio.prefetch(
        source, stream=stream, progress=lambda a, b: seen.append((a, b))
    ) as loader:
        async for _ in loader:
            break
    assert seen == [(1, 4)]


async def test_loader_progress_must_be_callable(stream: gpuaio.Stream) -> None:
    with pytest.raises(gpuaio.InvalidArgumentError, match="progress must be a callable"):
        gpuaio.prefetch([], stream=stream, progress=3)  # type: ignore[arg-type]


def test_progress_bar_units_and_unknown_total() -> None:
    pytest.importorskip("tqdm")
    import io

    out = io.StringIO()
    bar = gpuaio.progress_bar("epoch", unit="batch", file=out, mininterval=0)
    bar(1, None)
    bar(2, None)
    bar(3, 3)  # the loader's closing report: the total becomes known
    text = out.getvalue()
    assert "epoch" in text and "batch" in text and "3/3" in text
    out = io.StringIO()
    byte_bar = gpuaio.progress_bar("upload", file=out, mininterval=0)
    byte_bar(1 << 20, 2 << 20)
    byte_bar(2 << 20, 2 << 20)
    assert "2.00M" in out.getvalue()
