"""``tools/overhead_probe.py`` (its downloads, its hand-written floor on the fake GPU)
and ``tools/gil_tax_probe.py``.

The probe's figures are CPU figures of the machine it runs on; these tests
check that it measures what it says: the ops go the direction named, and
the floor waits for the fake GPU's event like gpuaio's await does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import gpuaio
from gpuaio._api.runtime import _drop_current

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import overhead_probe  # noqa: E402


class _Counting:
    """Counts the fake GPU's enqueue calls by name."""

    def __init__(self, fake: Any) -> None:
        self.calls: dict[str, int] = {}
        for name in ("memcpy_async", "memset_async", "event_record"):
            orig = getattr(fake, name)
            setattr(fake, name, self._counted(name, orig))

    def _counted(self, name: str, orig: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return orig(*args)

        return call


LAUNCH_S, GPU_S = 200e-6, 100e-6


@contextlib.contextmanager
def _backend(fake: Any) -> Iterator[Any]:
    """``fake`` as gpuaio's backend within the block."""
    rt = gpuaio.use_backend(fake)
    try:
        yield fake
    finally:
        rt.close()
        _drop_current(rt)


@pytest.fixture
def fake() -> Iterator[Any]:
    """The probe's fake GPU (200 us launch, 100 us an op), as gpuaio's backend for the test."""
    with _backend(overhead_probe.fake_gpu(gpuaio, LAUNCH_S, GPU_S)) as fake:
        yield fake


def _run_tool(name: str, *args: str) -> str:
    """Run ``tools/<name>`` on the simulator with ``args``; its output (it must succeed)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args],
        env={**os.environ, "GPUAIO_BACKEND": "sim"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("op", overhead_probe.OPS)
def test_the_floor_enqueues_the_op_and_waits_for_its_event(fake: Any, op: str) -> None:
    counting = _Counting(fake)
    lat = anyio.run(overhead_probe.run_floor, gpuaio, fake, 20, op)
    assert len(lat) == 20
    # Each op waited for its event: at least the fake GPU's launch and run time.
    assert min(lat) >= (LAUNCH_S + GPU_S) * 0.999
    enqueue = "memset_async" if op == "memset" else "memcpy_async"
    # 50 warm-up ops and the 20 timed, each one enqueue and one event record.
    assert counting.calls == {enqueue: 70, "event_record": 70}


@pytest.mark.parametrize("op", ["h2d-pageable", "d2h-pinned", "d2h-pageable"])
def test_the_probe_copies_go_the_direction_named(fake: Any, op: str) -> None:
    async def labels() -> str:
        dev = gpuaio.Device(0)
        s = dev.stream()
        try:
            start = overhead_probe.op_factory(gpuaio, dev, op, 2)
            copy = start(s, 1)
            await copy
            return copy.label
        finally:
            s.close()

    label = anyio.run(labels)
    kind = "pinned" if op.endswith("pinned") else "pageable"
    assert label.endswith(f"{kind}->device" if op.startswith("h2d") else f"device->{kind}"), label


def test_the_probe_runs_with_its_floor_on_the_fake_gpu() -> None:
    args = ["--op", "d2h-pageable", "--loops", "asyncio", "--floor", "--ops", "300", "--reps", "1"]
    out = _run_tool("overhead_probe.py", *args)
    floor = [ln for ln in out.splitlines() if ln.startswith("floor ")]
    assert len(floor) == 1 and floor[0].split()[1] == "asyncio", out


def test_fake_copies_take_their_bytes_over_the_bandwidth_given() -> None:
    nbytes, bps = 1 << 20, 2e9
    with _backend(overhead_probe.fake_gpu(gpuaio, LAUNCH_S, GPU_S, copy_bps=bps)) as fake:
        lat = anyio.run(overhead_probe.run_floor, gpuaio, fake, 5, "h2d-pinned", nbytes)
    assert min(lat) >= (LAUNCH_S + GPU_S + nbytes / bps) * 0.999


def test_cold_ops_each_come_after_the_other_work(fake: Any) -> None:
    cold_s, n = 30e-3, 3  # 90 ms: well past the 50 warm-up ops (15 ms)
    t0 = time.perf_counter()
    lat = anyio.run(overhead_probe.run_floor, gpuaio, fake, n, "memset", 4096, cold_s)
    elapsed = time.perf_counter() - t0
    assert len(lat) == n and min(lat) >= (LAUNCH_S + GPU_S) * 0.999
    # The other work ran before each timed op, outside its time.
    assert elapsed - sum(lat) >= n * cold_s


def test_the_gil_tax_probe_times_both_releases_in_each_setting(tmp_path: Path) -> None:
    out = tmp_path / "tax.json"
    _run_tool("gil_tax_probe.py", "--rounds", "40", "--pause-ms", "0.2", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [r["setting"] for r in rows] == ["alone", "sleeper", "blocked", "gpuaio"]
    for r in rows:
        # A release and a retake of the GIL take some time, and p90 >= p50.
        assert 0 < r["first_p50_us"] <= r["first_p90_us"], r
        assert 0 < r["second_p50_us"] <= r["second_p90_us"], r


def test_the_timeline_marks_each_op_in_the_order_it_ran(fake: Any) -> None:
    """``tools/timeline_probe.py``: for gpuaio's await and the hand-written one,
    the driver call comes before the marker, the query that finds the copy
    done comes after the fake GPU finished it, and the await returns last."""
    import timeline_probe

    rec = timeline_probe.Recorder()
    rec.wrap(fake)

    async def both() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        dev = gpuaio.Device(0)
        s = dev.stream()
        try:
            start = overhead_probe.op_factory(gpuaio, dev, "d2h-pageable", 1)
            ours = await timeline_probe.timeline(lambda: start(s, 0), rec, 5, warmup=2)
        finally:
            s.close()
        once = overhead_probe.floor_op(gpuaio, fake, "d2h-pageable")
        return ours, await timeline_probe.timeline(once, rec, 5, warmup=2)

    for rows in anyio.run(both):
        assert len(rows) == 5
        for r in rows:
            # The query that let the await return: the loop's, or the
            # completion thread's (``w_hit``), whichever came last.
            hit = max(r.get("hit", 0.0), r.get("w_hit", 0.0))
            assert r["memcpy"] <= r["memcpy_ret"] <= r["record"] <= r["record_ret"], r
            assert r["record_ret"] < hit <= r["return"], r
            assert r["gpu_done"] >= r["memcpy"] + LAUNCH_S + GPU_S, r
            assert hit >= r["gpu_done"], r
            if "wake" in r:  # woken across threads: after the watcher's hit
                assert r["w_hit"] <= r["wake"] <= r["return"], r


def test_the_download_probe_times_both_ways_and_their_copy_outs(tmp_path: Path) -> None:
    """``tools/download_probe.py`` on the simulator: a record per size (and per
    size again after the evicting copy) with gpuaio's stamps in order (call,
    copy-out, await) and one copy-out per download, which the probe checks."""
    out = tmp_path / "dl.json"
    args = ("--reps", "8", "--sizes", "4096,262144", "--evict-sizes", "4096", "--evict", "65536")
    _run_tool("download_probe.py", *args, "--out", str(out))
    rows = json.loads(out.read_text())
    assert [(r["bytes"], r["evict_bytes"]) for r in rows] == [(4096, 0), (262144, 0), (4096, 65536)]
    for r in rows:
        g = r["gpuaio"]
        assert 0 < g["call"] <= g["copy_start"] <= g["copy_end"] <= g["await"], r
        for way in ("hand", "hand_pool"):
            h = r[way]
            assert 0 < h["call"] <= h["fired"] <= h["await"], r
        assert 0 <= r["gpuaio_copy_out_on_loop"] <= 1, r


@pytest.mark.parametrize("extra", [(), ("--bytes", "65536", "--evict", "262144")])
def test_the_timeline_probe_runs_on_the_fake_gpu(extra: tuple[str, ...]) -> None:
    args = ("--op", "h2d-pinned", "--loops", "asyncio", "--ops", "200", *extra)
    out = _run_tool("timeline_probe.py", *args)
    rows = [ln.split()[:3] for ln in out.splitlines()[1:]]
    assert rows == [["asyncio", "h2d-pinned", "gpuaio"], ["asyncio", "h2d-pinned", "hand"]], out
    if extra:
        assert "65536 B copies" in out and "a 262144 B host copy before each" in out, out


@pytest.mark.parametrize("backend", [(), ("--sim",)], ids=["fake", "sim"])
def test_the_timeline_probe_writes_medians_per_size_after_a_burn(
    tmp_path: Path, backend: tuple[str, ...]
) -> None:
    """``--bytes`` as a list, ``--burn-ms`` and ``--out`` (the options ``--gpu``
    runs with; ``--sim`` runs ``--gpu``'s code on the simulated backend): a
    record per size and method, marks in the order they ran."""
    out = tmp_path / "tl.json"
    args = ("--op", "h2d-pinned", "--loops", "asyncio", "--ops", "60", "--bytes", "4K,64K")
    args += backend
    text = _run_tool("timeline_probe.py", *args, "--burn-ms", "0.2", "--out", str(out))
    assert "0.2 ms of Python before each" in text, text
    doc = json.loads(out.read_text())
    assert doc["burn_ms"] == 0.2
    got = [(r["bytes"], r["method"]) for r in doc["records"]]
    assert got == [(4096, "gpuaio"), (4096, "hand"), (65536, "gpuaio"), (65536, "hand")], got
    for r in doc["records"]:
        assert r["memcpy"] <= r["memcpy_ret"] <= r["record"] <= r["record_ret"] < r["return"], r
        assert r["memcpy_share"] == 1.0, r


def test_the_after_probe_times_each_method_after_each_predecessor(tmp_path: Path) -> None:
    """``tools/after_probe.py`` on the simulator: per size and direction, a
    median for every method after every kind of predecessor."""
    _run_tool(
        "after_probe.py", "--allow-sim", "--sizes", "4K", "--reps", "2", "--out", str(tmp_path)
    )
    res = json.loads((tmp_path / "after_probe_asyncio.json").read_text())
    assert [(r["size"], r["way"]) for r in res["rows"]] == [("4KiB", "h2d"), ("4KiB", "d2h")]
    for r in res["rows"]:
        keys = {
            f"{b}:{m}" for b in ("same", "raw", "staged", "burn") for m in ("gpuaio", "hand", "raw")
        }
        assert set(r["median_us"]) == keys, r
        assert all(v > 0 for v in r["median_us"].values()), r
