"""The cache of pageable host addresses: fast on repeats, never wrong.

``describe`` keeps the addresses the driver called pageable, so that a repeated
small copy skips ``cuPointerGetAttributes``. Only that answer is kept (a stale
one is merely slower); registration and :func:`gpuaio._api.describe.forget`
end every entry; nothing refers to the user's arrays, so they stay resizable.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api import describe as _describe
from gpuaio._api.describe import describe
from tests.test_copy import pattern

pytestmark = pytest.mark.anyio


def test_only_pageable_answers_are_kept_and_the_map_is_bounded(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = gpuaio_runtime
    calls: list[int] = []
    real = rt.backend.pointer_info

    def counting(ptr: int) -> Any:
        calls.append(ptr)
        return real(ptr)

    monkeypatch.setattr(rt.backend, "pointer_info", counting)
    # A new generation first: an earlier test's array at the address numpy
    # hands out again is still known to be pageable (rightly: it is).
    _describe._invalidate()
    a = np.ones(4096, np.uint8)
    for _ in range(3):
        assert describe(a, rt).kind is gpuaio.MemoryKind.PAGEABLE
    assert len(calls) == 1, "asked once, then known"
    _describe._invalidate()
    describe(a, rt)
    assert len(calls) == 2, "a new generation asks again"
    monkeypatch.setattr(_describe, "_PAGEABLE_KEEP", 8)
    keep = [np.ones(64, np.uint8) for _ in range(20)]
    for arr in keep:
        describe(arr, rt)
    assert len(_describe._pageable) <= 8


def test_a_pinned_allocation_ends_every_pageable_entry(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pageable address, once freed, may come back as pinned memory gpuaio
    allocates (the compiled suite with one simulated runtime for the session
    met it: a pinned array exported through DLPack classified pageable).
    Made to happen here: after a pinned allocation the driver calls the
    cached address pinned, and describe asks it again instead of answering
    from the cache."""
    rt = gpuaio_runtime
    _describe._invalidate()
    a = np.ones(4096, np.uint8)
    assert describe(a, rt).kind is gpuaio.MemoryKind.PAGEABLE  # now cached
    real = rt.backend.pointer_info
    pinned = gpuaio.pinned_empty(16)
    addr, now = a.ctypes.data, pinned.ctypes.data

    def reused(ptr: int) -> Any:
        return real(now if ptr == addr else ptr)

    monkeypatch.setattr(rt.backend, "pointer_info", reused)
    try:
        assert describe(a, rt).kind is gpuaio.MemoryKind.PINNED
    finally:
        monkeypatch.undo()
        del pinned


async def test_registering_a_classified_array_changes_its_path(dev: gpuaio.Device) -> None:
    """Classified pageable, then registered: the next copy goes direct (no
    staging); unregistered: staged again. Data exact throughout."""
    rt: Any = dev._runtime
    s = dev.stream()
    n = 1 << 20
    arr = pattern(n, 4)
    d = dev.empty(n)
    await s.copy(d, arr)
    assert describe(arr, rt).kind is gpuaio.MemoryKind.PAGEABLE
    pool = rt.stager.pool
    reg = gpuaio.register_host(arr)
    try:
        assert describe(arr, rt).kind is gpuaio.MemoryKind.PINNED
        before = pool.stats()
        arr[:] = pattern(n, 5)
        await s.copy(d, arr)
        after = pool.stats()
        assert (after.hits, after.misses) == (before.hits, before.misses), "registered: direct"
    finally:
        reg.unregister()
    assert describe(arr, rt).kind is gpuaio.MemoryKind.PAGEABLE
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    assert np.array_equal(out, pattern(n, 5))
    await s.aclose()


async def test_an_array_stays_resizable_and_is_read_at_its_new_address(
    dev: gpuaio.Device,
) -> None:
    """gpuaio keeps no reference to a copied array (NumPy refuses to resize an
    array that is weakly referenced), and a copy after ``resize`` reads the data
    where it now is."""
    s = dev.stream()
    arr = np.zeros(4096, np.uint8)
    d = dev.empty(4096)
    await s.copy(d, arr)
    arr.resize(8 << 20, refcheck=False)  # large: reallocated, the old block freed
    arr[:] = pattern(8 << 20, 6)
    big = dev.empty(8 << 20)
    await s.copy(big, arr)
    out = np.zeros(8 << 20, np.uint8)
    await s.copy(out, big)
    assert np.array_equal(out, arr)
    await s.aclose()


async def test_a_device_array_is_described_once_and_freed_without_the_collector(
    dev: gpuaio.Device, stream: gpuaio.Stream
) -> None:
    """A device view's description is built once and kept on the view (its layout
    is read-only). The cache holds the allocation, not the view: a view that
    referred to itself would leave freeing its memory to the cyclic collector."""
    import gc
    import weakref

    rt = dev._runtime
    d = dev.empty(64, np.uint32)
    first = describe(d, rt)
    assert describe(d, rt) is first
    assert (first.ptr, first.nbytes, first.shape) == (d.ptr, 256, (64,))
    part = d[16:32]
    assert describe(part, rt).ptr == d.ptr + 64
    for name in ("shape", "dtype", "offset"):
        with pytest.raises(AttributeError):
            setattr(d, name, getattr(d, name))
    host = np.arange(64, dtype=np.uint32)
    # A cached block for the download: else (its upload the driver's, which
    # leaves none) it goes through the host thread, whose job may still hold
    # the array when the test lets go of it.
    await anyio.to_thread.run_sync(rt.stager.pool.reserve, 256, 1)
    await stream.copy(d, host)
    out = np.zeros(64, np.uint32)
    await stream.copy(out, d)
    assert np.array_equal(out, host)
    view, alloc = weakref.ref(d), weakref.ref(d.allocation)
    gc.disable()
    try:
        del d, part, first
        assert view() is None, "the view outlived its last reference until a collection"
        # Gone, or handed to the reaper thread to be freed.
        left = alloc()
        assert left is None or left._freed, "the allocation was not released"
    finally:
        gc.enable()
    d = dev.empty(4)
    d.free()
    with pytest.raises(gpuaio.BufferFreedError):
        describe(d, rt)
