"""``Backend.dma_async``: the staged transfers' DMAs between pinned and device
memory, which the CUDA backend enqueues with the GIL held."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import pytest

from gpuaio._core.errors import CudaError
from tests.test_copy import pattern

MiB = 1 << 20


def _pinned(be: Any, n: int) -> tuple[int, np.ndarray]:
    ptr = be.host_alloc(n)
    view = np.ctypeslib.as_array((ctypes.c_ubyte * n).from_address(ptr))
    return ptr, view


def test_dma_async_moves_pinned_and_device_memory_byte_exact(
    gpuaio_runtime: Any, gpuaio_backend_name: str
) -> None:
    """Pinned -> device -> pinned in stream order, byte-exact; on CUDA through
    libcuda's own call (the GIL held), not cuda-bindings'."""
    be = gpuaio_runtime.backend
    n = 3 * MiB + 5
    used: list[int] = []
    if gpuaio_backend_name == "cuda":
        from gpuaio.backends.cuda._raw import raw_calls

        raw = raw_calls()
        assert raw is not None, "libcuda's cuMemcpyAsync could not be loaded"
        real = raw.memcpy_async

        def counted(*a: Any) -> int:
            used.append(a[2])
            return int(real(*a))

        raw.memcpy_async = counted  # type: ignore[method-assign]
    s = be.stream_create(0)
    src, src_view = _pinned(be, n)
    back, back_view = _pinned(be, n)
    d = be.mem_alloc(0, n)
    try:
        src_view[:] = pattern(n, 21)
        back_view[:] = 0
        be.dma_async(d, src, n, s)
        be.dma_async(back, d, n, s)
        be.stream_synchronize(s)
        assert np.array_equal(back_view, src_view)
        if gpuaio_backend_name == "cuda":
            assert used == [n, n], "a DMA went through cuda-bindings"
    finally:
        if gpuaio_backend_name == "cuda":
            raw.memcpy_async = real  # type: ignore[method-assign]
        be.stream_destroy(s)
        be.mem_free(d)
        be.host_free(src)
        be.host_free(back)


def test_dma_async_refuses_pageable_memory_on_the_sim(
    gpuaio_runtime: Any, gpuaio_backend_name: str
) -> None:
    """The CUDA backend keeps the GIL across the call, which with pageable
    memory could last the whole copy: stricter, the sim refuses it, before
    anything is enqueued."""
    if gpuaio_backend_name != "sim":
        pytest.skip("the sim's check; CUDA's callers pass pinned memory only")
    be = gpuaio_runtime.backend
    s = be.stream_create(0)
    d = be.mem_alloc(0, MiB)
    host = np.zeros(MiB, np.uint8)
    try:
        with pytest.raises(CudaError, match="device or pinned only"):
            be.dma_async(d, host.ctypes.data, MiB, s)
        with pytest.raises(CudaError, match="device or pinned only"):
            be.dma_async(host.ctypes.data, d, MiB, s)
        be.stream_synchronize(s)
    finally:
        be.stream_destroy(s)
        be.mem_free(d)
