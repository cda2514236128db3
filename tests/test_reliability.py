"""Reliability: cancellation storm, sticky fault, loop shutdown, soak (harness in
tests/reliability/harness.py; full-size figures by tools/reliability_report.py).

The tests at the end reproduce gpuaio bugs this suite found; each failed
before the fix (commit bdf49e9) and now guards against a regression.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine.pool import PinnedPool
from gpuaio.pytest_plugin import LoopWatchdog
from tests.conftest import latch
from tests.reliability.harness import (
    FAST_SIM,
    STEPS,
    StormConfig,
    Trouble,
    early_reuse_probe,
    pattern,
    run_loop_shutdown,
    run_soak,
    run_sticky_fault,
    run_storm,
)

ROOT = Path(__file__).resolve().parents[1]


def _loop_id(anyio_backend: Any) -> str:
    name, options = anyio_backend
    return "uvloop" if options.get("use_uvloop") else name


# -- cancellation storm ---------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.gpuaio_sim_config(**FAST_SIM)
@pytest.mark.gpuaio_max_loop_block_ms(250)
@pytest.mark.anyio
async def test_cancellation_storm(
    gpuaio_runtime: Any, anyio_backend: Any, gpuaio_loop_watchdog: LoopWatchdog
) -> None:
    """10,000 mixed ops (3,000 on uvloop and trio) with cancellation at every await point."""
    loop = _loop_id(anyio_backend)
    ops = 10_000 if loop == "asyncio" else 3_000
    stats = await run_storm(
        gpuaio_runtime, StormConfig(ops=ops, seed={"asyncio": 0, "uvloop": 1, "trio": 2}[loop])
    )
    assert stats.failures() == []
    assert stats.ops >= ops
    assert stats.cancelled_awaits > ops // 50
    assert stats.poisoned_blocks > 0
    assert stats.aborts_requested > 0
    if loop == "asyncio":  # enough transactions to land on every await point
        expected = {f"{k}@{i}" for k, n in STEPS.items() for i in range(n)}
        expected -= {"cross_stream@2"}  # Stream.wait() returns nothing to await
        assert expected <= set(stats.cancel_points)


@pytest.mark.timeout(300)
@pytest.mark.gpuaio_sim_config(**FAST_SIM)
@pytest.mark.parametrize("completion", [s for s in gpuaio.STRATEGIES if s != "events"])
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_cancellation_storm_other_completion(gpuaio_runtime: Any, completion: str) -> None:
    """The storm on the other completion strategies."""
    stats = await run_storm(gpuaio_runtime, StormConfig(ops=2_000, completion=completion))
    assert gpuaio_runtime.strategy == completion
    assert stats.failures() == []


@pytest.mark.timeout(300)
@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(**FAST_SIM)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_cancellation_storm_with_transient_faults(gpuaio_runtime: Any) -> None:
    """The storm with one-shot driver failures (fail_next) at 1% of the ops."""
    stats = await run_storm(
        gpuaio_runtime, StormConfig(ops=3_000, seed=7, transient_fault_rate=0.01)
    )
    assert stats.failures() == []
    assert stats.transient_faults_injected > 0
    assert stats.transient_errors_seen > 0


@pytest.mark.gpuaio_sim_only
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_storm_checks_detect_early_reuse(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, staged_only: Any
) -> None:
    """The harness can fail: a pool that ignores its guard events is caught."""
    assert await early_reuse_probe(gpuaio_runtime) == []

    original = PinnedPool.release

    def careless(self: PinnedPool, block: Any, events: Any = ()) -> int:
        for ev in events:
            self.backend.event_destroy(ev)
        return original(self, block)  # reusable at once, DMA or not

    monkeypatch.setattr(PinnedPool, "release", careless)
    problems = await early_reuse_probe(gpuaio_runtime)
    assert problems, "a pool that reuses blocks early must be caught"
    assert "first destination" in problems[0]


def test_trouble_catches_foreign_exceptions() -> None:
    """The harness can fail: exceptions in threads and gpuaio error logs are caught."""
    import logging
    import threading

    trouble = Trouble()
    with trouble.capture():
        t = threading.Thread(target=lambda: 1 / 0)
        t.start()
        t.join()
        logging.getLogger("gpuaio").error("something broke")
    assert len(trouble.items) == 2
    assert "ZeroDivisionError" in trouble.items[0]
    assert "something broke" in trouble.items[1]


# -- sticky fault -------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.gpuaio_sim_only
@pytest.mark.parametrize("completion", gpuaio.STRATEGIES)
@pytest.mark.anyio
async def test_sticky_fault_fails_every_await_fast(
    gpuaio_runtime: Any, completion: str, record_property: Any
) -> None:
    """Pending awaits on 3 streams all raise DeviceFatalError within 20 ms of the
    fault becoming visible, and later calls raise it at once.

    The fault strikes just after an engine's fault probe, and the sim's pending
    markers report it only 250 ms later, as on an H200: before the fix the
    ``events`` engine (and the former ``thread`` one) took about 250 ms (they waited for the
    markers), ``hostfunc`` (and the former ``flags``) about 50 ms (their probe interval).
    """
    stats = await run_sticky_fault(gpuaio_runtime, completion=completion)
    record_property("max_latency_ms", round(stats.max_latency_ms, 2))
    assert stats.pending == 12
    assert stats.failures() == [], stats.summary()
    assert stats.raised_fatal == 12
    assert stats.later_fatal == stats.later_calls == 5


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_no_leak_check  # nothing can be freed after a sticky fault
@pytest.mark.parametrize("completion", gpuaio.STRATEGIES)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_sticky_fault_is_logged_once(
    gpuaio_runtime: Any, completion: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 50-op program hits a sticky fault, then frees its buffers, drops its events
    and closes its streams and the runtime: the fault is logged once, at ERROR with
    its traceback. Before the fix each failing free logged another traceback
    (50 here; 5-6 per fault in a 50-op program on an H200)."""
    rt = gpuaio_runtime
    rt.set_completion(completion)
    caplog.set_level(logging.DEBUG, logger="gpuaio")
    dev = device_of(rt, 0)
    streams = [dev.stream() for _ in range(4)]
    bufs = [dev.empty(4096) for _ in range(50)]
    events = []
    ops: list[gpuaio.Operation] = []
    rt.backend.inject_fault(0, after_ops=20, code=700)
    for i, d in enumerate(bufs):
        s = streams[i % 4]
        try:
            if i % 3 == 0:
                ops.append(s.copy(np.empty(4096, np.uint8), d))  # staged D2H
            elif i % 3 == 1:
                ops.append(s.copy(d, np.full(4096, i, np.uint8)))
            else:
                ops.append(s.memset(d, i))
            events.append(s.record())
        except gpuaio.DeviceFatalError:
            pass  # the device faulted already
    fatal = 0
    with anyio.fail_after(20):
        for op in ops:
            try:
                await op
            except gpuaio.DeviceFatalError:
                fatal += 1
        for s in streams:
            with contextlib.suppress(gpuaio.DeviceFatalError):
                await s.aclose()
    assert fatal > 0
    for d in bufs:
        d.free()
    del ops, events, bufs, streams, d, s
    gc.collect()
    await anyio.to_thread.run_sync(rt.close)  # joins the reaper: every free has run

    records = [r for r in caplog.records if r.name == "gpuaio"]
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    exc_info = errors[0].exc_info
    assert exc_info is not None and isinstance(exc_info[1], gpuaio.DeviceFatalError)
    assert exc_info[2] is not None, "the one report carries the traceback"
    assert "ILLEGAL_ADDRESS" in errors[0].getMessage()
    with_traceback = [r for r in records if r.exc_info or r.exc_text]
    assert with_traceback == errors[:1], [r.getMessage() for r in with_traceback]
    # The frees were tried, and failed with the sticky error: quietly.
    quiet = [r for r in records if "logged already" in r.getMessage()]
    assert len(quiet) >= 50, len(quiet)


def _expect_child_prints(source: str, expected: str) -> None:
    """Run ``source`` in a fresh interpreter (30 s at most); it must print ``expected``."""
    proc = subprocess.run(
        [sys.executable, "-c", source],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout.strip() == expected, proc.stdout + proc.stderr


def _fault_child(
    backend: str, completion: str = "events", loop: str = "asyncio", fault: str = "illegal_address"
) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.reliability.fault_child",
            "--backend",
            backend,
            "--completion",
            completion,
            "--loop",
            loop,
            "--fault",
            fault,
            "--timeout",
            "50",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    result["returncode"] = proc.returncode
    return result


@pytest.mark.timeout(90)
@pytest.mark.gpuaio_sim_only
def test_sticky_fault_in_a_subprocess_sim() -> None:
    """The subprocess harness the GPU test uses, on the simulated backend."""
    result = _fault_child("sim", loop="trio")
    assert result["returncode"] == 0, result
    assert result["failures"] == 0, result
    assert result["raised_fatal"] == result["pending"] == 12
    assert result["max_latency_ms"] < 20, result


@pytest.mark.timeout(90)
@pytest.mark.gpuaio_gpu
@pytest.mark.parametrize("fault", ["illegal_address", "trap"])
@pytest.mark.parametrize("completion", gpuaio.STRATEGIES)
def test_sticky_fault_kernel(completion: str, fault: str, record_property: Any) -> None:
    """A kernel writes to address 0x10, or traps: every pending await raises
    DeviceFatalError within 20 ms of the driver first reporting the fault, and
    every later call raises it. The driver's report time is measured in the same
    run (a thread polls a never-recorded event's query): on an H200 about 150 ms
    after the launch for an illegal address, 340 ms for a trap. In a subprocess:
    the context is lost for good."""
    result = _fault_child("cuda", completion=completion, fault=fault)
    record_property("max_latency_ms", result["max_latency_ms"])
    record_property("driver_report_ms", result["driver_report_ms"])
    assert result["returncode"] == 0, result
    assert result["raised_fatal"] == result["pending"] == 12
    assert result["max_latency_ms"] < 20, result
    assert result["later_fatal"] == result["later_calls"]


# -- loop shutdown with ops in flight -------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_loop_ends_with_ops_in_flight(gpuaio_runtime: Any, loop: str) -> None:
    """No crash, no callback on the closed loop, every op completes, nothing leaks."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    stats = run_loop_shutdown(gpuaio_runtime, loop)
    assert stats.ops == 18
    assert stats.failures() == []
    assert stats.callbacks_after_close == 0


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_config(d2d_gbps=0.5)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {}), ("trio", {})], ids=["asyncio", "trio"])
@pytest.mark.anyio
async def test_runtime_closed_with_ops_in_flight(gpuaio_runtime: Any) -> None:
    """Closing the runtime fails pending awaits at once, waits for the GPU work in
    flight (the pinned blocks it uses), and leaves no thread behind."""
    import threading

    from tests.conftest import latch

    dev = device_of(gpuaio_runtime, 0)
    s = dev.stream()
    # The work must still be in flight when close() starts: on the sim a slow
    # copy keeps it so; a GPU copies 64 MiB in microseconds, so a latch holds
    # the stream and opens soon after close() began.
    release = None if dev.backend == "sim" else latch(dev, s)
    trouble = Trouble()
    with trouble.capture():
        trouble.watch_loop()
        big = 64 << 20
        n = 2 << 20
        ops = [
            s.copy(dev.empty(big), dev.empty(big)),  # ~130 ms at 0.5 GB/s
            s.copy(dev.empty(n), pattern(n, 3)),  # staged behind it: pinned blocks in flight
            s.memset(dev.empty(64), 1),
            s.copy(np.empty(4096, np.uint8), dev.empty(4096)),
        ]
        await anyio.sleep(0.02)
        assert not any(op.done() for op in ops)
        t0 = time.perf_counter()
        closer = threading.Thread(target=gpuaio_runtime.close, name="closer")
        closer.start()
        if release is not None:
            threading.Timer(0.1, release).start()
        outcomes: list[str] = []
        with anyio.fail_after(5):
            for op in ops:
                try:
                    await op
                    outcomes.append("completed")
                except RuntimeError as exc:  # CudaError is a RuntimeError too
                    outcomes.append(str(exc))
        ended_after = time.perf_counter() - t0
        await anyio.to_thread.run_sync(closer.join, 10)
        assert not closer.is_alive()
        # Ops watched when the engine closed fail at once (the big copy surely
        # was); one still queued behind a staging job may run to completion first.
        closed = "gpuaio completion engine closed with the operation pending"
        assert outcomes[0] == closed
        assert set(outcomes) <= {closed, "completed"}
        assert ended_after < 1.0
    assert trouble.items == []
    left = [t.name for t in threading.enumerate() if t.name.startswith("gpuaio-sim-stream")]
    assert left == []


# The children's end: close the runtime on a thread; it must return within 12 s.
_CLOSE_IN_A_THREAD = r"""
time.sleep(0.1)
t = threading.Thread(target=rt.close, daemon=True)
t.start()
t.join(12)
print("hung" if t.is_alive() else "closed", flush=True)
os._exit(0)
"""

_CLOSE_HANG_CHILD = (
    r"""
import os, threading, time
import numpy as np
import gpuaio
from gpuaio.backends.sim import SimBackend, SimConfig
rt = gpuaio.use_backend(SimBackend(SimConfig()))
dev = gpuaio.Device(0)
s = dev.stream()
rt.backend.hold(s._native)  # GPU work that never ends (a hung kernel)
op = s.copy(dev.empty(2 << 20), np.ones(2 << 20, np.uint8))  # staged: pinned blocks in flight
"""
    + _CLOSE_IN_A_THREAD
)


_CLOSE_HANG_CACHED_CHILD = (
    r"""
import os, threading, time
import anyio
import numpy as np
import gpuaio
from gpuaio.backends.sim import SimBackend, SimConfig
rt = gpuaio.use_backend(SimBackend(SimConfig()))
dev = gpuaio.Device(0)
d = dev.empty(64 << 10)
async def small():
    # A download: it leaves its pinned block cached (an upload may be the
    # driver's, GPUAIO_DIRECT_UP_MAX).
    await dev.stream().copy(np.ones(64 << 10, np.uint8), d)
anyio.run(small)
assert rt.stager.pool.stats().reserved > 0
s = dev.stream()
rt.backend.hold(s._native)  # GPU work that never ends (a hung kernel)
op = s.copy(dev.empty(4096), d[:4096])
"""
    + _CLOSE_IN_A_THREAD
)


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_only
def test_runtime_close_returns_with_cached_blocks_while_gpu_work_never_ends() -> None:
    """A pinned free waits for all of the device's work (as cuMemFreeHost
    does): the pool's close freed its cached blocks without a bound, and hung
    behind a kernel that never ends. Now within the pool's bound (5 s)."""
    _expect_child_prints(_CLOSE_HANG_CACHED_CHILD, "closed")


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_only
def test_runtime_close_returns_when_gpu_work_never_ends() -> None:
    """Found by this suite (fixed in bdf49e9): Runtime.close() never returned while a
    stream never drained; PinnedPool.close() waited without limit for the guard
    events of blocks in flight (also from the atexit hook). Now bounded (5 s)."""
    _expect_child_prints(_CLOSE_HANG_CHILD, "closed")


# -- soak --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.gpuaio_sim_config(**FAST_SIM)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_soak_short(gpuaio_runtime: Any) -> None:
    """10,000 small awaited ops; memory, pool and pending table stay flat."""
    stats = await run_soak(gpuaio_runtime, 10_000, workers=4, sample_every=500, warmup=0.3)
    assert stats.failures() == []
    assert stats.ops >= 10_000
    assert len(stats.samples) >= 10
    assert stats.max_pending <= 4 + 1


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.gpuaio_sim_config(**FAST_SIM)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_soak_million(gpuaio_runtime: Any) -> None:
    """1,000,000 small awaited ops with RSS, pinned pool and pending table flat."""
    stats = await run_soak(gpuaio_runtime, 1_000_000, workers=8, sample_every=10_000)
    assert stats.failures() == []
    assert stats.ops >= 1_000_000


# -- bugs this suite found (regression tests; each failed before bdf49e9) ---------------------

_DEADLOCK_CHILD = r"""
import os, sys, time
import gpuaio
from gpuaio.backends.sim import SimBackend, SimConfig
rt = gpuaio.use_backend(SimBackend(SimConfig()), completion="hostfunc")
dev = gpuaio.Device(0)
s = dev.stream()
d = dev.empty(64)
s.record()            # dropped at once: the host function's closure holds the last reference
time.sleep(0.05)      # the marker has fired
op = s.memset(d, 1)   # the sim worker drops the old marker, and with it the Event
deadline = time.monotonic() + 1.5
while not op.done() and time.monotonic() < deadline:
    time.sleep(0.01)
print("completed" if op.done() else "deadlocked", flush=True)
os._exit(0)
"""


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_only
def test_event_finalizer_does_not_deadlock() -> None:
    """Found by the storm (fixed in bdf49e9): Event.__del__ called backend.event_destroy
    in whatever thread dropped the last reference: a sim worker holding the backend
    lock (deadlock, every time with the hostfunc strategy), a CUDA host function (where
    driver calls are not allowed), or the cyclic GC anywhere."""
    _expect_child_prints(_DEADLOCK_CHILD, "completed")


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_only
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_failed_d2h_chunk_keeps_its_block_guarded(
    gpuaio_runtime: Any, staged_only: Any
) -> None:
    """Found by this suite (fixed in bdf49e9): when event_create/event_record failed
    after a chunk's DMA was enqueued, _staging._d2h handed the pinned block back
    unguarded; the late DMA then overwrote it under another, successful transfer."""
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    n = 2 << 20  # > inline_max (1 MiB): the chunked D2H path, two 1 MiB chunks
    s1, s2 = dev.stream(), dev.stream()
    src = dev.empty(n)
    await s1.memset(src, 0x11)
    release1, release2 = latch(dev, s1), latch(dev, s2)
    rt.backend.fail_next("cuEventRecord")  # the chunk's guard event, after its DMA
    failed = s1.copy(np.empty(n, np.uint8), src)
    await anyio.sleep(0.05)  # the job has met the failure
    data = pattern(n, 5)
    d2 = dev.empty(n)
    ok = s2.copy(d2, data)  # a later, unrelated transfer: must not get that block
    await anyio.sleep(0.05)
    release1()  # the failed copy's DMA runs now
    with anyio.fail_after(10), pytest.raises(gpuaio.CudaError, match="cuEventRecord"):
        await failed
    release2()
    with anyio.fail_after(10):
        await ok
        out = np.empty(n, np.uint8)
        await s2.copy(out, d2)
    assert int((out != data).sum()) == 0, "an unrelated, successful copy was corrupted"


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_only
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_failed_marker_keeps_small_d2h_block_guarded(gpuaio_runtime: Any) -> None:
    """Found by this suite (fixed in bdf49e9): Stream._device_step resolved the op,
    running its done callbacks (which hand the small D2H's pinned block back), when
    watch() failed after the DMA was enqueued."""
    rt = gpuaio_runtime
    assert rt.strategy == "events"
    dev = device_of(rt, 0)
    n = 4096  # <= inline_max: the small D2H path, block released by a done callback
    s1, s2 = dev.stream(), dev.stream()
    src = dev.empty(n)
    await s1.memset(src, 0x11)
    # Pinned ahead: the small uploads below may be the driver's and leave no block.
    await anyio.to_thread.run_sync(rt.stager.pool.reserve, n, 2)
    for s in (s1, s2):  # leave cached pinned blocks: small copies then take them inline
        await s.copy(np.empty(n, np.uint8), src)
        await s.copy(dev.empty(n), np.empty(n, np.uint8))
    # A copy above that ran on a stream's host thread may still count as
    # running there after its await returned (the thread counts a job done
    # after it ran): the next copy would then queue behind it on that thread
    # instead of taking the inline path, and fail later.
    for s in (s1, s2):
        ex = s._seq.executor
        assert await anyio.to_thread.run_sync(ex.wait_for, ex.submitted, 10)
    release1, release2 = latch(dev, s1), latch(dev, s2)
    rt.backend.fail_next("cuEventRecord")  # the completion marker, after the DMA
    with pytest.raises(gpuaio.CudaError, match="cuEventRecord"):
        s1.copy(np.empty(n, np.uint8), src)  # raises at once: the small, inline path
    data = pattern(n, 6)
    d2 = dev.empty(n)
    ok = s2.copy(d2, data)  # small H2D: takes the same pinned block
    release1()
    with anyio.fail_after(10):
        await s1.synchronize()
    release2()
    with anyio.fail_after(10):
        await ok
        out = np.empty(n, np.uint8)
        await s2.copy(out, d2)
    assert int((out != data).sum()) == 0, "an unrelated, successful copy was corrupted"


@pytest.mark.timeout(60)
@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(devices=2, marker_fault_delay_s=0.25)
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
@pytest.mark.anyio
async def test_pool_survives_a_fault_on_another_device(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by this suite (fixed in bdf49e9): the pinned pool kept blocks guarded by a
    faulted device's events for good and acquire() waited on them, so a healthy
    device's transfer failed with the other device's DeviceFatalError once the
    budget was spent."""
    monkeypatch.setenv("GPUAIO_PINNED_BUDGET", "2M")  # read when the stager is made
    rt = gpuaio_runtime
    d0, d1 = device_of(rt, 0), device_of(rt, 1)
    s0, s1 = d0.stream(), d1.stream()
    release = latch(d0, s0)
    n = 1 << 20
    ops = [s0.copy(np.empty(n, np.uint8), d0.empty(n)) for _ in range(2)]  # staged D2H
    await anyio.sleep(0.05)
    assert rt.stager.pool.budget == 2 << 20
    rt.backend.inject_fault(0, after_ops=0)
    with contextlib.suppress(gpuaio.DeviceFatalError):
        d0.stream().memset(d0.empty(64), 0)  # device 0 faults
    for op in ops:
        with pytest.raises(gpuaio.DeviceFatalError):
            await op
    release()
    # Device 1 is healthy: its staged transfers must work.
    host = pattern(2 * n, 9)
    d = d1.empty(2 * n)
    await s1.copy(d, host)
    out = np.empty(2 * n, np.uint8)
    await s1.copy(out, d)
    assert np.array_equal(out, host)
