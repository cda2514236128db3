"""Several devices: peer copies, cross-device ordering, scatter/gather.

On the simulated backend these run with 2 or 3 devices; on CUDA they need as
many GPUs and skip otherwise.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from tests.conftest import latch
from tests.test_copy import pattern

pytestmark = [pytest.mark.anyio, pytest.mark.gpuaio_sim_config(devices=3)]


def devices(rt: Any, n: int) -> list[gpuaio.Device]:
    if rt.backend.device_count() < n:
        pytest.skip(f"needs {n} devices")
    return [device_of(rt, i) for i in range(n)]


@pytest.mark.parametrize("n", [1, 4095, 8 << 20], ids=lambda n: f"{n}B")
async def test_peer_copy_both_ways(gpuaio_runtime: Any, n: int) -> None:
    d0, d1 = devices(gpuaio_runtime, 2)
    data = pattern(n, 21)
    a, b = d0.empty(n), d1.empty(n)
    s0, s1 = d0.stream(), d1.stream()
    await s0.copy(a, data)
    await s0.copy(b, a)  # peer copy enqueued on device 0's stream
    back = np.empty(n, np.uint8)
    await s1.copy(back, b)
    np.testing.assert_array_equal(back, data)
    await s1.memset(b, 3)
    await s1.copy(a, b)  # and the other way, on device 1's stream
    await s0.copy(back, a)
    assert (back == 3).all()


async def test_event_orders_streams_of_two_devices(gpuaio_runtime: Any) -> None:
    d0, d1 = devices(gpuaio_runtime, 2)
    s0, s1 = d0.stream(), d1.stream()
    n = 1 << 20
    a, b = d0.empty(n), d1.empty(n)
    await s0.memset(a, 1)
    release = latch(d0, s0)
    s0.memset(a, 9)
    s1.wait(s0.record())
    op = s1.copy(b, a)  # must not start before device 0's memset
    await anyio.sleep(0.03)
    assert not op.done()
    release()
    await op
    out = np.empty(n, np.uint8)
    await s1.copy(out, b)
    assert (out == 9).all()


async def test_cancel_during_cross_device_copy(gpuaio_runtime: Any) -> None:
    d0, d1 = devices(gpuaio_runtime, 2)
    s0 = d0.stream()
    n = 4 << 20
    data = pattern(n, 5)
    a, b = d0.empty(n), d1.empty(n)
    await s0.copy(a, data)
    release = latch(d0, s0)
    op = s0.copy(b, a)
    with anyio.move_on_after(0.01):
        await op
    assert not op.done()
    release()
    await op
    out = np.empty(n, np.uint8)
    await d1.stream().copy(out, b)
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("ndev", [2, 3])
async def test_scatter_gather_roundtrip(gpuaio_runtime: Any, ndev: int) -> None:
    devs = devices(gpuaio_runtime, ndev)
    host = np.arange(10 * 1001, dtype=np.float32).reshape(1001, 10)
    parts = await gpuaio.scatter(host, devs)
    assert [p.device for p in parts] == [d.ordinal for d in devs]
    assert sum(p.shape[0] for p in parts) == 1001
    assert max(p.shape[0] for p in parts) - min(p.shape[0] for p in parts) <= 1
    out = np.zeros_like(host)
    assert await gpuaio.gather(parts, out) is out
    np.testing.assert_array_equal(out, host)


async def test_scatter_gather_reject_bad_input(gpuaio_runtime: Any) -> None:
    devs = devices(gpuaio_runtime, 2)
    with pytest.raises(gpuaio.InvalidArgumentError, match="at least one axis"):
        await gpuaio.scatter(np.float32(1), devs)
    parts = await gpuaio.scatter(np.zeros((4, 2), np.int32), devs)
    with pytest.raises(gpuaio.InvalidArgumentError, match="rows"):
        await gpuaio.gather(parts, np.zeros((5, 2), np.int32))
    ro = np.zeros((4, 2), np.int32)
    ro.setflags(write=False)
    with pytest.raises(gpuaio.InvalidArgumentError, match="writable"):
        await gpuaio.gather(parts, ro)
