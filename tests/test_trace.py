"""Tracing (Chrome-trace JSON) and progress callbacks."""

from __future__ import annotations

import json
import math
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._core import trace as _trace

from .conftest import add_one_kernel, latch

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
_METADATA = {
    "process_name",
    "process_labels",
    "process_sort_index",
    "thread_name",
    "thread_sort_index",
}


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_chrome_trace(doc: Any) -> dict[tuple[int, int], str]:
    """Assert ``doc`` keeps the Trace Event Format's rules; return the thread names.

    Every event has ``ph``, ``name``, a numeric ``ts`` and integer
    ``pid``/``tid``; ``X`` events a non-negative ``dur``; ``M`` events name
    every process and thread used; ``X`` events on one track either follow
    one another or nest; every async ``b`` has one matching ``e`` (same
    ``cat``, ``id`` and ``name``, not earlier) and no ``e`` comes unopened.
    """
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list)
    process_names: dict[int, str] = {}
    thread_names: dict[tuple[int, int], str] = {}
    used: set[tuple[int, int]] = set()
    spans: defaultdict[tuple[int, int], list[tuple[float, float, str]]] = defaultdict(list)
    opened: dict[tuple[str, Any, str], float] = {}
    for ev in doc["traceEvents"]:
        assert isinstance(ev, dict), ev
        ph, name = ev.get("ph"), ev.get("name")
        assert isinstance(ph, str) and isinstance(name, str) and name, ev
        assert _is_number(ev.get("ts")), f"ts must be a number: {ev}"
        pid, tid = ev.get("pid"), ev.get("tid")
        assert _is_int(pid) and _is_int(tid), f"pid and tid must be integers: {ev}"
        assert "args" not in ev or isinstance(ev["args"], dict), ev
        if ph == "M":
            assert name in _METADATA, ev
            if name == "process_name":
                assert isinstance(ev["args"]["name"], str), ev
                process_names[pid] = ev["args"]["name"]
            elif name == "thread_name":
                assert isinstance(ev["args"]["name"], str), ev
                thread_names[pid, tid] = ev["args"]["name"]
            continue
        used.add((pid, tid))
        if ph == "X":
            dur = ev.get("dur")
            assert _is_number(dur) and dur >= 0, f"X needs a duration >= 0: {ev}"
            spans[pid, tid].append((ev["ts"], ev["ts"] + dur, name))
        elif ph in ("b", "e"):
            assert isinstance(ev.get("cat"), str) and ev["cat"], f"async needs a cat: {ev}"
            assert isinstance(ev.get("id"), str | int), f"async needs an id: {ev}"
            key = (ev["cat"], ev["id"], name)
            if ph == "b":
                assert key not in opened, f"async id reused while open: {ev}"
                opened[key] = ev["ts"]
            else:
                assert key in opened, f"e without its b: {ev}"
                assert ev["ts"] >= opened.pop(key), f"e before its b: {ev}"
        else:
            raise AssertionError(f"phase {ph!r} is not one gpuaio writes: {ev}")
    assert not opened, f"b without its e: {sorted(opened)}"
    for pid, tid in used:
        assert pid in process_names, f"no process_name for pid {pid}"
        assert (pid, tid) in thread_names, f"no thread_name for pid {pid} tid {tid}"
    eps = 1e-3  # µs: float rounding of ts + dur
    for track, evs in spans.items():
        stack: list[tuple[float, float, str]] = []
        for begin, end, name in sorted(evs, key=lambda e: (e[0], -e[1])):
            while stack and stack[-1][1] <= begin + eps:
                stack.pop()
            assert not stack or end <= stack[-1][1] + eps, (
                f"on track {track}, {name!r} [{begin}, {end}] overlaps {stack[-1]} "
                "without nesting in it"
            )
            stack.append((begin, end, name))
    return thread_names


def _ops(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The operations' begin events, in order."""
    return [e for e in doc["traceEvents"] if e["ph"] == "b" and e.get("cat") == "gpuaio.op"]


def _chunks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and "chunk" in e["name"]]


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
    check_chrome_trace(doc)
    ops = _ops(doc)
    assert [e["name"].split()[0] for e in ops] == ["copy", "memset"]
    assert ops[0]["args"]["bytes"] == n
    ends = {e["id"]: e for e in doc["traceEvents"] if e["ph"] == "e"}
    assert all(ends[e["id"]]["args"]["ok"] is True for e in ops)
    assert ops[1]["ts"] >= ends[ops[0]["id"]]["ts"] - 1, "the memset was enqueued after"
    chunks = _chunks(doc)
    assert {c["name"] for c in chunks} == {"gpuaio stage h2d chunk"}
    assert sum(c["args"]["bytes"] for c in chunks) == n, "every byte copied once, traced"


async def test_trace_keeps_the_format_rules(
    stream: gpuaio.Stream, dev: gpuaio.Device, tmp_path: Path
) -> None:
    """Two tasks enqueue overlapping ops on one stream: staged copies of several
    chunks each way, a memset and a kernel; the trace follows the format."""
    n = 8 << 20  # 4 MiB chunks: 2 per copy
    k = add_one_kernel(dev)
    outs: dict[int, np.ndarray] = {}

    async def work(i: int) -> None:
        host = np.full(n, i, np.uint8)
        d = dev.empty(n)
        ops = [
            stream.copy(d, host),
            stream.memset(d[: n // 2], 7),
            stream.launch(k, (n + 255) // 256, 256, d, np.uint64(n)),
        ]
        await gpuaio.wait_all(ops)
        out = np.empty(n, np.uint8)
        await stream.copy(out, d)
        outs[i] = out

    path = tmp_path / "t.json"
    with gpuaio.trace(path):
        async with anyio.create_task_group() as tg:
            tg.start_soon(work, 1)
            tg.start_soon(work, 2)
    for i in (1, 2):  # the traced work did its job
        assert (outs[i][: n // 2] == 8).all() and (outs[i][n // 2 :] == i + 1).all()
    doc = json.loads(path.read_text())
    threads = check_chrome_trace(doc)
    ops = _ops(doc)
    assert (
        sorted(e["name"].split()[0] for e in ops) == ["add_one"] * 2 + ["copy"] * 4 + ["memset"] * 2
    )
    assert len({(e["pid"], e["tid"]) for e in ops}) == 1, "one track: the stream's"
    stream_track = (ops[0]["pid"], ops[0]["tid"])
    assert threads[stream_track] == f"stream {stream.handle:#x}"
    chunks = _chunks(doc)
    for way in ("h2d", "d2h"):
        these = [c for c in chunks if way in c["name"]]
        assert len({c["args"]["chunk"] for c in these}) >= 2, "several chunks"
        assert sum(c["args"]["bytes"] for c in these) == 2 * n
    for c in chunks:  # on the threads that copied them: copy threads, or the
        # stream's host thread for chunks it copies itself (SOLO_CHUNK)
        track = (c["pid"], c["tid"])
        assert track != stream_track
        assert threads[track].startswith(("gpuaio-host", "gpuaio-stream")), threads[track]
        assert c["pid"] not in {e["pid"] for e in ops}


def test_committed_example_trace_keeps_the_format_rules() -> None:
    """docs/img/trace-staged-copy.json (made by tools/trace_example.py)."""
    doc = json.loads((ROOT / "docs/img/trace-staged-copy.json").read_text())
    threads = check_chrome_trace(doc)
    assert len(_ops(doc)) == 2 and len(_chunks(doc)) >= 2
    assert all(threads[c["pid"], c["tid"]].startswith("gpuaio-host") for c in _chunks(doc))


async def test_concurrent_traces_record_only_their_own_task(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    """Each task's trace() holds its own ops and their chunks, not the others'."""
    sizes = {"a": 3 << 20, "b": 5 << 20, "untraced": 7 << 20}
    both_tracing = anyio.Event()
    started: set[str] = set()
    tracers: dict[str, gpuaio.Tracer] = {}
    dst = {name: dev.empty(n) for name, n in sizes.items()}

    async def copies(name: str) -> None:
        n = sizes[name]
        host = np.full(n, len(name), np.uint8)
        await stream.copy(dst[name], host)
        await stream.copy(host, dst[name])

    async def traced(name: str) -> None:
        with gpuaio.trace() as tracer:
            tracers[name] = tracer
            started.add(name)
            if len(started) == 2:
                both_tracing.set()
            await both_tracing.wait()  # both blocks open while both tasks copy
            await copies(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(traced, "a")
        tg.start_soon(traced, "b")
        await both_tracing.wait()
        tg.start_soon(copies, "untraced")
    for name in ("a", "b"):
        doc = tracers[name].chrome_trace()
        check_chrome_trace(doc)
        ops = _ops(doc)
        assert [e["args"]["bytes"] for e in ops] == [sizes[name]] * 2, name
        chunks = _chunks(doc)
        assert sum(c["args"]["bytes"] for c in chunks) == 2 * sizes[name], name


async def test_ops_pending_at_exit_are_left_out(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    """An op captures the tracer when enqueued, but one still pending when the
    block ends stays out of the trace, although it completes later."""
    d = dev.empty(4096)
    with gpuaio.trace() as tracer:
        await stream.memset(d, 1)
        release = latch(dev, stream)
        pending = stream.memset(d, 2)
    release()
    await pending
    doc = tracer.chrome_trace()
    check_chrome_trace(doc)
    # (On a GPU the latch's first use runs its kernel once, open: that completes.)
    assert [e["name"] for e in _ops(doc) if e["name"] != "latch"] == ["memset device"]


async def test_trace_records_the_loaders_copies(stream: gpuaio.Stream) -> None:
    """The loader enqueues its copies from loop callbacks, outside the consumer
    task's context: they still land in the consumer's trace."""
    batches = [np.full(4096, i, np.uint8) for i in range(3)]
    with gpuaio.trace() as tracer:
        async with gpuaio.prefetch(batches, stream=stream) as loader:
            async for _batch in loader:
                pass
    doc = tracer.chrome_trace()
    check_chrome_trace(doc)
    copies = [e for e in _ops(doc) if e["name"].startswith("copy")]
    assert [e["args"]["bytes"] for e in copies] == [4096] * 3


def test_nvtx_ranges_on_the_copying_threads(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``nvtx`` installed, each staged slice copy is an NVTX range on the
    thread that copies it, traced or not."""
    calls: list[tuple[str, str, str]] = []

    class FakeNvtx:
        @staticmethod
        def push_range(name: str, domain: str) -> None:
            calls.append(("push", name, threading.current_thread().name))

        @staticmethod
        def pop_range(domain: str) -> None:
            calls.append(("pop", "", threading.current_thread().name))

    monkeypatch.setattr(_trace, "_nvtx", FakeNvtx)
    # Staged copies: not gated ones (GPUAIO_GATED_MAX), whose native threads record none.
    monkeypatch.setattr(dev._runtime.stager, "gated", None)
    n = 4 << 20
    host = np.arange(n, dtype=np.uint8)
    out = np.empty(n, np.uint8)

    async def main() -> None:
        async with dev.stream() as s:
            d = dev.empty(n)
            await s.copy(d, host)
            await s.copy(out, d)

    anyio.run(main)
    assert np.array_equal(out, host)
    pushed = [c for c in calls if c[0] == "push"]
    assert {c[1] for c in pushed} == {"gpuaio stage h2d chunk", "gpuaio stage d2h chunk"}
    assert all(c[2].startswith(("gpuaio-host", "gpuaio-stream")) for c in calls)
    depth: defaultdict[str, int] = defaultdict(int)
    for kind, _, thread in calls:  # balanced on each thread
        depth[thread] += 1 if kind == "push" else -1
        assert depth[thread] >= 0
    assert not any(depth.values())


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
    # Each chunk's report comes from the stream's host thread; the last one
    # from whichever thread found the copy complete (a polling loop's too).
    assert all(name.startswith("gpuaio-stream") for *_, name in seen[:-1]), seen


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
