"""Memsets of 8/16/32-bit patterns on every memory kind, and kernel launches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpuaio
from tests.conftest import add_one_kernel
from tests.test_copy import buffer, pattern

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", ["pageable", "pinned", "registered", "device", "managed"])
@pytest.mark.parametrize(
    ("width", "value", "dtype"),
    [(1, 0xAB, np.uint8), (2, 0xBEEF, np.uint16), (4, 0xDEADBEEF, np.uint32), (4, -2, np.int32)],
)
async def test_memset_patterns(
    stream: gpuaio.Stream, dev: gpuaio.Device, kind: str, width: int, value: int, dtype: Any
) -> None:
    count = 4097
    n = count * width
    with buffer(kind, dev, n) as buf:
        # Fill with noise first so an unwritten byte cannot pass.
        if kind in ("device", "managed"):
            await stream.copy(buf, pattern(n, 3))
        else:
            buf[:] = pattern(n, 3)
        await stream.memset(buf, value, width=width)
        out = np.empty(n, np.uint8)
        await stream.copy(out, buf)
    expect = np.full(count, value, dtype=dtype)
    np.testing.assert_array_equal(out.view(dtype), expect)


async def test_memset_width_from_dtype(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    d = dev.empty(100, np.uint16)
    await stream.memset(d, 0x1234)
    out = np.empty(100, np.uint16)
    await stream.copy(out, d)
    assert (out == 0x1234).all()


async def test_memset_partial_view(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    d = dev.empty(1000)
    await stream.memset(d, 1)
    await stream.memset(d[100:200], 2)
    out = np.empty(1000, np.uint8)
    await stream.copy(out, d)
    assert (out[:100] == 1).all() and (out[100:200] == 2).all() and (out[200:] == 1).all()


async def test_launch_kernel(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    k = add_one_kernel(dev)
    n = 100_000
    data = pattern(n, 5)
    d = dev.empty(n)
    await stream.copy(d, data)
    await stream.launch(k, (n + 255) // 256, 256, d, np.uint64(n))
    await stream.launch(k, (n + 255) // 256, 256, d, np.uint64(n // 2))
    out = np.empty(n, np.uint8)
    await stream.copy(out, d)
    expect = data.copy()
    expect += 1
    expect[: n // 2] += 1
    np.testing.assert_array_equal(out, expect)


async def test_launch_many_then_await_last(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    k = add_one_kernel(dev)
    d = dev.empty(1024)
    await stream.memset(d, 0)
    ops = [stream.launch(k, 4, 256, d, np.uint64(1024)) for _ in range(50)]
    await ops[-1]
    # Stream order: the last one done implies all earlier ones are.
    assert all(op.done() for op in ops)
    out = np.empty(1024, np.uint8)
    await stream.copy(out, d)
    assert (out == 50).all()
