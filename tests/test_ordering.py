"""Events, cross-stream waits, synchronize, and loop liveness during big transfers."""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from tests.conftest import latch
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


async def _ticker(gaps: list[float], stop: anyio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await anyio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


@pytest.mark.parametrize("what", ["h2d_pageable", "d2h_pageable", "h2h", "host_memset"])
async def test_loop_keeps_running(
    stream: gpuaio.Stream, dev: gpuaio.Device, what: str, anyio_backend: Any
) -> None:
    """A 1 ms ticker keeps ticking (gaps < 5 ms) while a 256 MiB transfer runs."""
    n = 256 << 20
    a = np.ones(n, np.uint8)
    b = np.empty(n, np.uint8)
    d = dev.empty(n)
    if what == "d2h_pageable":
        await stream.memset(d, 5)
    gaps: list[float] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_ticker, gaps, stop)
        await anyio.sleep(0.01)
        t0 = time.perf_counter()
        if what == "h2d_pageable":
            await stream.copy(d, a)
        elif what == "d2h_pageable":
            await stream.copy(b, d)
        elif what == "h2h":
            await stream.copy(b, a)
        else:
            await stream.memset(b, 3)
        elapsed = time.perf_counter() - t0
        stop.set()
    assert len(gaps) > 3
    worst = max(gaps[1:])
    assert worst < 0.005, (
        f"loop blocked {worst * 1e3:.1f} ms during a {elapsed * 1e3:.0f} ms {what}"
    )
    if what == "d2h_pageable":
        assert (b == 5).all()
    elif what == "h2h":
        assert (b == 1).all()
    elif what == "host_memset":
        assert (b == 3).all()
