"""Events, cross-stream waits, synchronize, and loop liveness during big transfers."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio import CudaError
from gpuaio._core.operation import Operation
from tests.conftest import latch, twice_async
from tests.test_copy import pattern

pytestmark = pytest.mark.anyio


async def test_event_orders_two_streams(dev: gpuaio.Device) -> None:
    a, b = dev.stream(), dev.stream()
    n = 1 << 20
    d = dev.empty(n)
    await a.memset(d, 1)
    release = latch(dev, a)
    a.memset(d, 7)  # held behind the latch
    ev = a.record()
    b.wait(ev)
    out = np.empty(n, np.uint8)
    copy = b.copy(out, d)  # must see the 7s, not the 1s
    await anyio.sleep(0.05)
    assert not ev.done() and not copy.done()
    release()
    await copy
    assert (out == 7).all()
    await ev  # reached on the GPU before ``copy`` ran; its resolution may lag a scan
    a.close()
    b.close()


async def test_wait_on_stream(dev: gpuaio.Device) -> None:
    a, b = dev.stream(), dev.stream()
    d = dev.empty(4096)
    release = latch(dev, a)
    a.memset(d, 9)
    b.wait(a)
    out = np.empty(4096, np.uint8)
    op = b.copy(out, d)
    await anyio.sleep(0.03)
    assert not op.done()
    release()
    await op
    assert (out == 9).all()


async def test_synchronize_waits_for_everything(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    release = latch(dev, stream)
    d = dev.empty(4096)
    op = stream.memset(d, 3)
    sync = stream.synchronize()
    await anyio.sleep(0.03)
    assert not sync.done() and not op.done()
    release()
    await sync
    assert op.done()


async def test_event_wait_before_record_is_enqueued(dev: gpuaio.Device) -> None:
    """An event recorded behind a host job is honoured by a wait issued earlier."""
    a, b = dev.stream(), dev.stream()
    n = 4 << 20
    host = pattern(n, 2)
    d = dev.empty(n)
    a.copy(d, host)  # pageable: goes through the executor
    ev = a.record()  # deferred behind it
    b.wait(ev)
    out = np.empty(n, np.uint8)
    await b.copy(out, d)
    np.testing.assert_array_equal(out, host)


@pytest.mark.gpuaio_sim_only  # a record failing on the stream's thread: injected
async def test_a_wait_on_an_event_whose_record_failed_still_orders(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event recorded behind a host job, whose record then fails on the stream's
    thread: a wait issued for it must still order later work after what the
    event stood for. It used to let that work run at once, so a copy read the
    buffer before the upload ahead of the event had landed, and returned the old
    bytes without an error (found by the cancellation storm with transient
    faults)."""
    a, b = dev.stream(), dev.stream()
    n = 4096
    d = dev.empty(n)
    await a.memset(d, 0x5A)
    src = pattern(n, 3)
    be = dev._runtime.backend
    release = latch(dev, a)  # the upload's DMA waits behind this
    gate = threading.Event()

    def held() -> bool:  # keeps the stream's thread busy: what follows is deferred
        gate.wait(10)
        return False

    a._seq.host(Operation("gate", a), held, after_gpu=False)
    try:
        up = a.copy(d, src)  # a host job behind the gate
        ev = a.record()  # recorded by the stream's thread, later
        real = be.event_record

        def failing(event: Any, stream: Any) -> None:
            if event is ev._native:
                raise CudaError("cuEventRecord", 1, "CUDA_ERROR_INVALID_VALUE", "injected")
            real(event, stream)

        monkeypatch.setattr(be, "event_record", failing)
        b.wait(ev)
        out = np.empty(n, np.uint8)
        copy = b.copy(out, d)  # must see the upload, not the 0x5A before it
        gate.set()
        with pytest.raises(CudaError, match="injected"):
            await ev  # the record's failure is reported where it is awaited
        await anyio.sleep(0.05)  # time for the copy to run, were it not held back
    finally:
        gate.set()
        release()
    await up
    await copy
    np.testing.assert_array_equal(out, src)


async def _ticker(gaps: list[float], stop: anyio.Event, ticks: list[float] | None = None) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await anyio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        if ticks is not None:
            ticks.append(now)
        last = now


async def _check_liveness(
    stream: gpuaio.Stream,
    dev: gpuaio.Device,
    what: str,
    a: np.ndarray,
    b: np.ndarray,
    d: gpuaio.DeviceArray,
) -> None:
    """Run ``what`` once beside a 1 ms ticker; assert the ticker kept ticking."""
    await stream.memset(d, 5)
    gaps: list[float] = []
    ticks: list[float] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_ticker, gaps, stop, ticks)
        await anyio.sleep(0.01)
        t0 = time.perf_counter()
        if what == "h2d_pageable":
            await stream.copy(d, a)
        elif what == "d2h_pageable":
            await stream.copy(b, d)
        elif what == "h2h":
            for _ in range(8):  # a longer window: short host ops see few ticks
                await stream.copy(b, a)
        else:
            for _ in range(8):
                await stream.memset(b, 3)
        elapsed = time.perf_counter() - t0
        stop.set()
    assert len(gaps) > 3
    worst = max(gaps[1:])
    msg = f"loop blocked {worst * 1e3:.1f} ms during a {elapsed * 1e3:.0f} ms {what}"
    if dev.backend == "cuda":
        # A loop blocked by the transfer would miss every tick for the length
        # of one op (12-45 ms here). Gaps of 5-7 ms were seen on an H200 with
        # 13 host threads copying (the kernel's scheduler, not a block);
        # tighter loop lag is a benchmark target, not this test's.
        assert worst < 0.010, msg
    else:
        # On a 2-core CI VM any busy thread (even a plain numpy copy, which
        # releases the GIL) delays a 1 ms ticker by 5-20 ms now and then
        # through the VM's scheduler alone. A loop blocked by the transfer
        # instead misses every tick for its whole duration: require that the
        # ticker kept ticking through the transfer and never stopped for half of it.
        during = sum(1 for t in ticks if t0 < t <= t0 + elapsed)
        assert during >= 0.4 * elapsed / 0.0011, f"{during} ticks in {elapsed * 1e3:.0f} ms"
        assert worst < max(0.025, 0.5 * elapsed), msg


@pytest.mark.gpuaio_sim_config(dma_gbps=4.0, pageable_gbps=2.0)
@pytest.mark.parametrize("what", ["h2d_pageable", "d2h_pageable", "h2h", "host_memset"])
async def test_loop_keeps_running(
    stream: gpuaio.Stream, dev: gpuaio.Device, what: str, anyio_backend: Any
) -> None:
    """A 1 ms ticker keeps ticking (gaps < 10 ms on a GPU) while a 256 MiB transfer runs."""
    n = 256 << 20
    a = np.ones(n, np.uint8)
    # Pre-touched buffers: first-touch page faults take the kernel's memory
    # map lock, which stalls every thread of the process, gpuaio or not.
    b = np.zeros(n, np.uint8)
    d = dev.empty(n)
    await stream.memset(d, 5)
    # Warm the path up outside the measured window: threads, and the pinned
    # pool grown to its steady size (pinning pages takes the memory map lock).
    for _ in range(3):
        await stream.copy(d, a)
        await stream.copy(b, d)
    # Twice: in the CI of stop 45 a whole-process stall of the VM made a
    # 149 ms gap in a window in which the ticker still ticked at least 74 times.
    await twice_async(lambda: _check_liveness(stream, dev, what, a, b, d))
    if what == "d2h_pageable":
        assert (b == 5).all()
    elif what == "h2h":
        assert (b == 1).all()
    elif what == "host_memset":
        assert (b == 3).all()


async def test_thousands_of_ops_on_a_held_stream_never_block_the_loop(
    strategy_dev: gpuaio.Device,
) -> None:
    """A stream's launch queue holds about 1,000 entries; enqueueing into a full
    one blocks the caller. gpuaio must then enqueue off the loop thread, or the
    loop (which here is also what releases the stream) would deadlock. Each
    completion strategy's markers take their share of the queue (a host
    function far more than an event record)."""
    import threading

    dev = strategy_dev
    stream = dev.stream()
    n_ops = 3000
    d = dev.empty(4, np.uint8)
    release = latch(dev, stream)
    forced = threading.Event()

    ops: list[gpuaio.Operation] = []
    stuck_after: list[int] = []

    def failsafe() -> None:  # only if the loop thread got stuck in an enqueue
        import faulthandler
        import os
        import subprocess
        import sys

        stuck_after.append(len(ops))
        faulthandler.dump_traceback(sys.stderr, all_threads=True)  # where it was stuck
        spy = os.environ.get("GPUAIO_PY_SPY")  # native stacks too, where allowed
        if spy:
            subprocess.run([spy, "dump", "--native", "--pid", str(os.getpid())], check=False)
        forced.set()
        release()

    timer = threading.Timer(20.0, failsafe)
    timer.daemon = True
    timer.start()
    try:
        t0 = time.perf_counter()
        for k in range(n_ops):
            ops.append(stream.memset(d, k % 251))
        enqueue_s = time.perf_counter() - t0
        assert not forced.is_set(), (
            f"an enqueue blocked the loop thread after {stuck_after} ops "
            f"({dev._runtime.engine(0).pending_on(stream._key)} pending on the stream)"
        )
        await anyio.sleep(0.05)
        assert not any(op.done() for op in ops), "ops ran while the stream was held"
        release()
        await gpuaio.wait_all(ops)
    finally:
        timer.cancel()
    assert not forced.is_set()
    assert enqueue_s < 10.0
    out = np.empty(4, np.uint8)
    await stream.copy(out, d)
    assert (out == (n_ops - 1) % 251).all(), "the ops did not run in enqueue order"
    await stream.aclose()
