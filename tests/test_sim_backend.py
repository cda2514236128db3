"""The simulated backend on its own: data, ordering, CUDA's blocking rules, faults."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from gpuaio._core.errors import CudaError, DeviceFatalError, InvalidArgumentError
from gpuaio.backends._base import MemoryKind
from gpuaio.backends.sim import SimBackend, SimConfig, SimKernel

MIB = 1 << 20
HOLD_S = 0.15  # how long a latch keeps a stream busy in blocking-rule tests
FAST_S = 0.05  # "returned at once" (generous for a loaded 2-core CI box)


@pytest.fixture
def sim() -> Iterator[SimBackend]:
    backend = SimBackend(SimConfig(devices=2, device_memory=64 * MIB))
    yield backend
    backend.close()


def view(ptr: int, nbytes: int) -> npt.NDArray[np.uint8]:
    return np.frombuffer(memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)), np.uint8)


def pattern(nbytes: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def release_later(release: Callable[[], None], delay: float = HOLD_S) -> threading.Timer:
    timer = threading.Timer(delay, release)
    timer.start()
    return timer


def timed(fn: Callable[[], Any]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


class CudaArray:
    """A minimal ``__cuda_array_interface__`` exporter over device memory."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "data": (ptr, False),
            "shape": shape,
            "typestr": typestr,
            "strides": None,
            "version": 3,
        }


# -- memory ------------------------------------------------------------
def test_pointer_info_for_each_kind(sim: SimBackend) -> None:
    dev = sim.mem_alloc(1, 1000)
    managed = sim.mem_alloc_managed(0, 1000)
    pinned = sim.host_alloc(1000)
    user = np.zeros(4096, np.uint8)
    user_ptr = user.ctypes.data
    assert dev % 256 == 0
    assert pinned % 256 == 0
    assert sim.pointer_info(dev + 999).kind is MemoryKind.DEVICE
    assert sim.pointer_info(dev).device == 1
    assert sim.pointer_info(dev + 1000).kind is not MemoryKind.DEVICE
    assert sim.pointer_info(managed).kind is MemoryKind.MANAGED
    assert sim.pointer_info(pinned + 10).kind is MemoryKind.PINNED
    assert sim.pointer_info(pinned).device is None
    assert sim.pointer_info(user_ptr).kind is MemoryKind.PAGEABLE
    sim.host_register(user_ptr, 4096)
    assert sim.pointer_info(user_ptr + 4095).kind is MemoryKind.PINNED
    assert sim.host_device_pointer(user_ptr) == user_ptr
    with pytest.raises(CudaError) as info:
        sim.host_register(user_ptr + 100, 10)
    assert info.value.code == 712
    sim.host_unregister(user_ptr)
    assert sim.pointer_info(user_ptr).kind is MemoryKind.PAGEABLE
    with pytest.raises(CudaError) as info:
        sim.host_device_pointer(user_ptr)
    assert info.value.code == 1
    assert sim.host_device_pointer(pinned) == pinned
    sim.mem_free(dev)
    assert sim.pointer_info(dev).kind is MemoryKind.PAGEABLE
    sim.mem_free(managed)
    sim.host_free(pinned)


def test_freeing_unknown_pointers(sim: SimBackend) -> None:
    user = np.zeros(64, np.uint8)
    for free, call, code in [
        (sim.mem_free, "cuMemFree", 1),
        (sim.host_free, "cuMemFreeHost", 1),
        (sim.host_unregister, "cuMemHostUnregister", 713),
    ]:
        with pytest.raises(CudaError) as info:
            free(user.ctypes.data)
        assert (info.value.call, info.value.code) == (call, code)
    ptr = sim.mem_alloc(0, 16)
    sim.mem_free(ptr)
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        sim.mem_free(ptr)


def test_out_of_memory_budget() -> None:
    sim = SimBackend(SimConfig(device_memory=MIB))
    try:
        with pytest.raises(CudaError) as info:
            sim.mem_alloc(0, 2 * MIB)
        assert (info.value.call, info.value.code) == ("cuMemAlloc", 2)
        assert not isinstance(info.value, DeviceFatalError)
        a = sim.mem_alloc(0, MIB // 2)
        sim.mem_alloc(0, MIB // 2)
        with pytest.raises(CudaError, match="OUT_OF_MEMORY"):
            sim.mem_alloc(0, 1)
        sim.mem_free(a)
        sim.mem_alloc(0, MIB // 2)
        with pytest.raises(CudaError, match="INVALID_DEVICE"):
            sim.mem_alloc(1, 16)
    finally:
        sim.close()


def test_mem_free_waits_for_the_device(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 1024)
    release = sim.hold(s)
    sim.memset_async(dev, 1, 1, 1024, s)
    release_later(release)
    assert timed(lambda: sim.mem_free(dev)) >= HOLD_S * 0.9


def test_mem_free_async_waits_for_nothing(sim: SimBackend) -> None:
    """``cuMemFreeAsync`` on an idle stream: the memory is back at once while
    the device is busy (the held stream is released only 5 s later, so a
    free that waited would take that long)."""
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 64 * MIB)  # all of it: another fits only once it is back
    timer = release_later(sim.hold(s), delay=5.0)
    try:
        assert timed(lambda: sim.mem_free_async(dev)) < 2.5
        again = sim.mem_alloc(0, 64 * MIB)
    finally:
        timer.cancel()
        timer.function()
    sim.mem_free_async(again)
    with pytest.raises(CudaError, match="INVALID_VALUE"):
        sim.mem_free_async(dev)  # freed already
    managed = sim.mem_alloc_managed(0, 1024)
    with pytest.raises(CudaError, match="INVALID_VALUE"):
        sim.mem_free_async(managed)  # stream-ordered frees take device memory only
    sim.mem_free(managed)


def test_host_free_async_waits_for_nothing(sim: SimBackend) -> None:
    """The host pool's stream-ordered free: back at once while a stream is busy."""
    s = sim.stream_create(0)
    pinned = sim.host_alloc(4096)
    timer = release_later(sim.hold(s), delay=5.0)
    try:
        assert timed(lambda: sim.host_free_async(pinned)) < 2.5
    finally:
        timer.cancel()
        timer.function()
    assert sim.pointer_info(pinned).kind is MemoryKind.PAGEABLE
    with pytest.raises(CudaError, match="INVALID_VALUE"):
        sim.host_free_async(pinned)  # freed already
    dev = sim.mem_alloc(0, 4096)
    with pytest.raises(CudaError, match="INVALID_VALUE"):
        sim.host_free_async(dev)  # pinned memory only
    sim.mem_free(dev)


@pytest.mark.parametrize("use", ["memset", "upload", "download", "launch", "running"])
def test_frees_that_wait_for_nothing_refuse_memory_queued_work_uses(
    sim: SimBackend, use: str
) -> None:
    """Stricter than CUDA, where it would be a silent use after free: a
    stream-ordered free of memory that a queued (or running) copy, memset or
    launch still uses fails and keeps the memory; once the work is done it
    goes through. A free that waits for the device (``cuMemFree``) is fine."""
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 4096)
    pinned = sim.host_alloc(4096)
    free_async = sim.mem_free_async
    if use == "running":
        started = threading.Event()

        def slow(grid: Any, block: Any, a: Any) -> None:
            started.set()
            time.sleep(HOLD_S)

        kernel = SimKernel(slow, "slow", 0.0)
        sim.launch(kernel, (1, 1, 1), (1, 1, 1), [CudaArray(dev, (4096,), "|u1")], 0, s)
        assert started.wait(5)
    else:
        release = sim.hold(s)
        if use == "memset":
            sim.memset_async(dev, 1, 1, 4096, s)
        elif use == "upload":
            sim.memcpy_async(dev, pinned, 4096, s)
            free_async = sim.host_free_async
        elif use == "download":
            sim.memcpy_async(pinned, dev, 4096, s)
        else:
            kernel = SimKernel(lambda grid, block, a: None, "k", 0.0)
            sim.launch(kernel, (1, 1, 1), (1, 1, 1), [CudaArray(dev + 1024, (16,), "|u1")], 0, s)
        release_later(release)
    ptr = pinned if free_async == sim.host_free_async else dev
    with pytest.raises(CudaError, match="still used by cu") as info:
        free_async(ptr)
    assert info.value.code == 1
    assert sim.pointer_info(ptr).kind is not MemoryKind.PAGEABLE, "freed all the same"
    sim.stream_synchronize(s)
    free_async(ptr)
    assert sim.pointer_info(ptr).kind is MemoryKind.PAGEABLE
    if ptr == dev:
        sim.host_free(pinned)
    else:
        sim.mem_free(dev)


# -- copies ------------------------------------------------------------
@pytest.mark.parametrize("src_kind", ["pageable", "pinned", "device", "managed"])
@pytest.mark.parametrize("dst_kind", ["pageable", "pinned", "device", "managed"])
def test_copy_is_byte_exact_for_each_kind_pair(
    sim: SimBackend, src_kind: str, dst_kind: str
) -> None:
    n = 100_003
    keep: list[npt.NDArray[np.uint8]] = []

    def alloc(kind: str) -> int:
        if kind == "pageable":
            keep.append(np.zeros(n, np.uint8))
            return int(keep[-1].ctypes.data)
        if kind == "pinned":
            return sim.host_alloc(n)
        if kind == "device":
            return sim.mem_alloc(0, n)
        return sim.mem_alloc_managed(0, n)

    src, dst = alloc(src_kind), alloc(dst_kind)
    data = pattern(n)
    view(src, n)[:] = data
    s = sim.stream_create(0)
    sim.memcpy_async(dst, src, n, s)
    sim.stream_synchronize(s)
    assert np.array_equal(view(dst, n), data)


def test_peer_copy(sim: SimBackend) -> None:
    a, b = sim.mem_alloc(0, 4096), sim.mem_alloc(1, 4096)
    view(a, 4096)[:] = pattern(4096, 1)
    s = sim.stream_create(1)
    sim.memcpy_peer_async(b, 1, a, 0, 4096, s)
    sim.stream_synchronize(s)
    assert np.array_equal(view(b, 4096), pattern(4096, 1))
    with pytest.raises(CudaError, match="INVALID_DEVICE"):
        sim.memcpy_peer_async(b, 1, a, 7, 4096, s)
    assert sim.can_access_peer(0, 1)
    assert not sim.can_access_peer(0, 0)


def test_copy_takes_time_at_the_configured_bandwidth() -> None:
    sim = SimBackend(SimConfig(dma_gbps=0.01))  # 10 MB/s: 1 MB takes 0.1 s
    try:
        s = sim.stream_create(0)
        dev, pinned = sim.mem_alloc(0, 1_000_000), sim.host_alloc(1_000_000)
        start = time.monotonic()
        sim.memcpy_async(dev, pinned, 1_000_000, s)
        assert time.monotonic() - start < FAST_S
        sim.stream_synchronize(s)
        assert time.monotonic() - start >= 0.095
    finally:
        sim.close()


def test_copy_out_of_bounds_is_rejected(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 100)
    pinned = sim.host_alloc(200)
    with pytest.raises(CudaError) as info:
        sim.memcpy_async(dev, pinned, 200, s)
    assert (info.value.call, info.value.code) == ("cuMemcpyAsync", 1)


# -- ordering and blocking rules ---------------------------------------
def test_ops_run_in_order_within_a_stream(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 64)
    seen: list[str] = []

    def slow(grid: Any, block: Any, arr: npt.NDArray[np.uint8]) -> None:
        seen.append("slow")
        arr[:] = 1

    sim.launch(
        SimKernel(slow, "slow", 0.1), (1, 1, 1), (1, 1, 1), [CudaArray(dev, (64,), "|u1")], 0, s
    )
    sim.memset_async(dev, 2, 1, 64, s)
    sim.launch_host_func(s, lambda: seen.append("host"))
    sim.stream_synchronize(s)
    assert seen == ["slow", "host"]
    assert (view(dev, 64) == 2).all()


def test_h2d_from_pageable_waits_for_the_stream_then_snapshots(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 4096)
    src = pattern(4096, 2)
    release = sim.hold(s)
    release_later(release)
    assert timed(lambda: sim.memcpy_async(dev, src.ctypes.data, 4096, s)) >= HOLD_S * 0.9
    src[:] = 0  # the source may be reused as soon as the call returns
    sim.stream_synchronize(s)
    assert np.array_equal(view(dev, 4096), pattern(4096, 2))


def test_d2h_to_pinned_is_async_and_to_pageable_blocks(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev, pinned = sim.mem_alloc(0, 256), sim.host_alloc(256)
    view(dev, 256)[:] = 9
    release = sim.hold(s)
    assert timed(lambda: sim.memcpy_async(pinned, dev, 256, s)) < FAST_S
    assert (view(pinned, 256) == 0).all()  # still queued behind the latch
    release()
    sim.stream_synchronize(s)
    assert (view(pinned, 256) == 9).all()

    out = np.zeros(256, np.uint8)
    release_later(sim.hold(s))
    assert timed(lambda: sim.memcpy_async(out.ctypes.data, dev, 256, s)) >= HOLD_S * 0.9
    assert (out == 9).all()  # complete on return


def test_async_kinds_return_while_the_stream_is_held(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev, dev2, pinned = sim.mem_alloc(0, 256), sim.mem_alloc(0, 256), sim.host_alloc(256)
    release = sim.hold(s)
    for call in [
        lambda: sim.memcpy_async(dev, pinned, 256, s),
        lambda: sim.memcpy_async(dev2, dev, 256, s),
        lambda: sim.memset_async(dev, 7, 4, 64, s),
        lambda: sim.launch(lambda g, b: None, (1, 1, 1), (1, 1, 1), [], 0, s),
    ]:
        assert timed(call) < FAST_S
    release()
    sim.stream_synchronize(s)


def test_full_launch_queue_blocks_the_enqueuing_thread() -> None:
    sim = SimBackend(SimConfig(launch_queue=8))
    try:
        s = sim.stream_create(0)
        dev = sim.mem_alloc(0, 256)
        release = sim.hold(s)  # queued, then running (no longer in the queue)
        for k in range(7):
            assert timed(lambda k=k: sim.memset_async(dev, k, 1, 256, s)) < FAST_S
        release_later(release)

        def two_more() -> None:  # the queue is full by the second at the latest
            sim.memset_async(dev, 8, 1, 256, s)
            sim.memset_async(dev, 9, 1, 256, s)

        assert timed(two_more) >= HOLD_S * 0.8
        sim.stream_synchronize(s)
        out = np.empty(256, np.uint8)
        sim.memcpy_async(out.ctypes.data, dev, 256, s)
        assert (out == 9).all()
    finally:
        sim.close()
    with pytest.raises(InvalidArgumentError, match="launch_queue"):
        SimConfig(launch_queue=0)


def test_host_to_host_copy_is_synchronous(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    pinned = sim.host_alloc(512)
    src = pattern(512, 3)
    release_later(sim.hold(s))
    assert timed(lambda: sim.memcpy_async(pinned, src.ctypes.data, 512, s)) >= HOLD_S * 0.9
    assert np.array_equal(view(pinned, 512), src)


def test_memset_patterns_and_blocking(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 64)
    sim.memset_async(dev, 0x1FF, 1, 64, s)
    sim.memset_async(dev, 0x12345, 2, 8, s)
    sim.memset_async(dev + 16, 0xDEADBEEF, 4, 4, s)
    sim.stream_synchronize(s)
    got = view(dev, 64)
    assert (got[:16].view("<u2") == 0x2345).all()
    assert (got[16:32].view("<u4") == 0xDEADBEEF).all()
    assert (got[32:] == 0xFF).all()

    pinned = sim.host_alloc(64)
    release_later(sim.hold(s))
    assert timed(lambda: sim.memset_async(pinned, 5, 1, 64, s)) >= HOLD_S * 0.9
    assert (view(pinned, 64) == 5).all()

    user = np.zeros(64, np.uint8)
    for itemsize in (1, 2, 4):
        with pytest.raises(CudaError) as info:
            sim.memset_async(user.ctypes.data, 1, itemsize, 64 // itemsize, s)
        assert (info.value.call, info.value.code) == (f"cuMemsetD{8 * itemsize}Async", 1)


# -- events and cross-stream waits -------------------------------------
def test_event_query_semantics(sim: SimBackend) -> None:
    s1, s2 = sim.stream_create(0), sim.stream_create(0)
    ev = sim.event_create(0)
    assert sim.event_query(ev)  # never recorded
    release = sim.hold(s1)
    sim.event_record(ev, s1)
    assert not sim.event_query(ev)
    sim.event_record(ev, s2)  # the most recent record is what counts
    sim.stream_synchronize(s2)
    assert sim.event_query(ev)
    sim.event_record(ev, s1)
    assert not sim.event_query(ev)
    release_later(release, 0.05)
    sim.event_synchronize(ev)
    assert sim.event_query(ev)
    with pytest.raises(CudaError, match="INVALID_HANDLE"):
        sim.event_record(sim.event_create(1), s1)
    sim.event_destroy(ev)
    with pytest.raises(CudaError, match="INVALID_HANDLE"):
        sim.event_query(ev)


def test_stream_wait_event_orders_two_streams(sim: SimBackend) -> None:
    producer, consumer = sim.stream_create(0), sim.stream_create(0, priority=-5)
    a, b = sim.mem_alloc(0, 1024), sim.mem_alloc(0, 1024)
    ev = sim.event_create(0)
    sim.stream_wait_event(consumer, ev)  # never recorded: no wait
    release = sim.hold(producer)
    sim.memset_async(a, 3, 1, 1024, producer)
    sim.event_record(ev, producer)
    sim.stream_wait_event(consumer, ev)
    sim.memcpy_async(b, a, 1024, consumer)
    sim.event_record(ev, consumer)  # re-recording does not change the pending wait
    time.sleep(0.05)
    assert (view(b, 1024) == 0).all()
    release()
    sim.stream_synchronize(consumer)
    assert (view(b, 1024) == 3).all()


def test_stream_memory_ops(sim: SimBackend) -> None:
    waiter, writer = sim.stream_create(0), sim.stream_create(0)
    flags = sim.host_alloc(8)
    dev = sim.mem_alloc(0, 16)
    flag = sim.host_device_pointer(flags)
    sim.stream_wait_value32(waiter, flag, 2)
    sim.memset_async(dev, 1, 1, 16, waiter)
    release = sim.hold(writer)
    sim.stream_write_value32(writer, flag, 1)
    sim.stream_write_value32(writer, flag, 2)
    time.sleep(0.05)
    assert (view(dev, 16) == 0).all()
    release()
    sim.stream_synchronize(waiter)
    assert (view(dev, 16) == 1).all()
    assert int.from_bytes(bytes(view(flags, 4)), "little") == 2
    user = np.zeros(4, np.uint32)
    with pytest.raises(CudaError, match="cuStreamWriteValue32"):
        sim.stream_write_value32(writer, user.ctypes.data, 1)
    managed = sim.mem_alloc_managed(0, 16)
    with pytest.raises(CudaError, match="cuStreamWriteValue32"):
        sim.stream_write_value32(writer, managed, 1)
    with pytest.raises(CudaError, match="cuStreamWriteValue32"):
        sim.stream_write_value32(writer, dev + 2, 1)  # not 4-byte aligned


def test_stream_write_words_store_in_stream_order(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 16)
    release = sim.hold(s)
    sim.memset_async(dev, 0xAB, 1, 16, s)
    sim.stream_write_words(s, [dev, 0x11223344, dev + 8, 7, dev, 5])
    sim.memset_async(dev + 12, 9, 4, 1, s)
    time.sleep(0.02)
    assert (view(dev, 16) == 0).all()  # nothing ran while the stream was held
    release()
    sim.stream_synchronize(s)
    words = np.frombuffer(bytes(view(dev, 16)), "<u4")
    assert words.tolist() == [5, 0xABABABAB, 7, 9]


# -- streams -------------------------------------------------------------
def test_stream_handles_and_destroy(sim: SimBackend) -> None:
    s = sim.stream_create(0, priority=-99)
    assert sim.stream_priority_range(0) == (0, -5)
    assert s.priority == -5
    assert sim.stream_from_handle(0, sim.stream_handle(s)) is s
    with pytest.raises(CudaError) as info:
        sim.stream_from_handle(0, 12345)
    assert info.value.code == 400
    ev = sim.event_create(0)
    ran: list[int] = []

    def body(grid: Any, block: Any) -> None:
        ran.append(1)

    sim.launch(SimKernel(body, "k", 0.05), (1, 1, 1), (1, 1, 1), [], 0, s)
    sim.event_record(ev, s)
    sim.stream_destroy(s)  # returns at once, queued work still runs
    assert not ran
    sim.event_synchronize(ev)
    assert ran == [1]
    with pytest.raises(CudaError, match="INVALID_HANDLE"):
        sim.memset_async(sim.mem_alloc(0, 4), 0, 1, 4, s)
    with pytest.raises(CudaError):
        sim.stream_from_handle(0, sim.stream_handle(s))


def test_kernel_receives_array_views(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 24 * 4)

    def fill(grid: Any, block: Any, out: npt.NDArray[np.float32], scale: int) -> None:
        assert (grid, block) == ((2, 1, 1), (32, 1, 1))
        out[...] = np.arange(24, dtype=np.float32).reshape(4, 6) * scale

    kernel = sim.compile(0, "__global__ void fill() {}", "fill", [], fill)
    sim.launch(kernel, (2, 1, 1), (32, 1, 1), [CudaArray(dev, (4, 6), "<f4"), 3], 0, s)
    sim.stream_synchronize(s)
    got = view(dev, 96).view(np.float32)
    assert np.array_equal(got, np.arange(24, dtype=np.float32) * 3)
    with pytest.raises(InvalidArgumentError, match="sim="):
        sim.compile(0, "src", "k", [], None)
    with pytest.raises(CudaError, match="cuLaunchKernel"):
        sim.launch(kernel, (0, 1, 1), (1, 1, 1), [], 0, s)


# -- faults --------------------------------------------------------------
def test_inject_fault_is_sticky_and_drops_queued_work(sim: SimBackend) -> None:
    s, other = sim.stream_create(0), sim.stream_create(0)
    dev = sim.mem_alloc(0, 64)
    ev_ok, ev_bad, ev_other = sim.event_create(0), sim.event_create(0), sim.event_create(0)
    sim.inject_fault(0, after_ops=1)
    release = sim.hold(other)
    sim.event_record(ev_other, other)
    sim.memset_async(dev, 1, 1, 64, s)
    sim.event_record(ev_ok, s)
    sim.memset_async(dev, 2, 1, 64, s)  # this one faults
    sim.memset_async(dev, 3, 1, 64, s)  # dropped
    sim.event_record(ev_bad, s)
    with pytest.raises(DeviceFatalError) as info:
        sim.event_synchronize(ev_bad)
    assert (info.value.call, info.value.code) == ("cuEventSynchronize", 700)
    assert info.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert (view(dev, 64) == 1).all()
    assert sim.ops_executed(0) == 1
    calls: list[Callable[[], object]] = [
        lambda: sim.event_query(ev_ok),
        lambda: sim.event_query(ev_other),
        lambda: sim.stream_synchronize(other),
        lambda: sim.memset_async(dev, 0, 1, 64, s),
        lambda: sim.event_record(ev_ok, s),
        lambda: sim.mem_alloc(0, 16),
    ]
    for call in calls:
        with pytest.raises(DeviceFatalError):
            call()
    release()
    # the other device is unaffected
    s1 = sim.stream_create(1)
    sim.memset_async(sim.mem_alloc(1, 16), 1, 1, 16, s1)
    sim.stream_synchronize(s1)


def test_fault_wakes_blocked_waiters(sim: SimBackend) -> None:
    held, other = sim.stream_create(0), sim.stream_create(0)
    dev = sim.mem_alloc(0, 64)
    ev = sim.event_create(0)
    sim.hold(held)  # never released
    sim.event_record(ev, held)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            sim.event_synchronize(ev)
        except BaseException as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for t in waiters:
        t.start()
    time.sleep(0.05)
    assert not errors
    sim.inject_fault(0, code=719)
    sim.memset_async(dev, 1, 1, 64, other)
    for t in waiters:
        t.join(2.0)
        assert not t.is_alive()
    assert len(errors) == 2
    assert all(isinstance(e, DeviceFatalError) and e.code == 719 for e in errors)
    with pytest.raises(DeviceFatalError):
        sim.stream_synchronize(held)


def test_failing_kernel_faults_the_device(sim: SimBackend) -> None:
    s = sim.stream_create(0)

    def boom(grid: Any, block: Any) -> None:
        raise ValueError("kernel exploded")

    sim.launch(boom, (1, 1, 1), (1, 1, 1), [], 0, s)
    with pytest.raises(DeviceFatalError) as info:
        sim.stream_synchronize(s)
    assert (info.value.code, info.value.name) == (719, "CUDA_ERROR_LAUNCH_FAILED")
    assert "kernel exploded" in info.value.detail


def test_fail_next(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    dev = sim.mem_alloc(0, 64)
    pinned = sim.host_alloc(64)
    sim.fail_next("cuMemAlloc", 2)
    with pytest.raises(CudaError) as info:
        sim.mem_alloc(0, 16)
    assert (info.value.call, info.value.code) == ("cuMemAlloc", 2)
    assert not isinstance(info.value, DeviceFatalError)
    sim.mem_alloc(0, 16)

    sim.fail_next("cuMemcpyAsync", device=1)
    sim.memcpy_async(dev, pinned, 64, s)  # device 0: unaffected
    sim.fail_next("cuMemcpyAsync")
    with pytest.raises(CudaError, match="cuMemcpyAsync"):
        sim.memcpy_async(dev, pinned, 64, s)
    sim.memcpy_async(dev, pinned, 64, s)
    sim.stream_synchronize(s)
    assert sim.ops_executed(0) == 2  # nothing was enqueued by the failed call


def test_hold_and_release(sim: SimBackend) -> None:
    s = sim.stream_create(0)
    ev = sim.event_create(0)
    release = sim.hold(s)
    sim.event_record(ev, s)
    time.sleep(0.03)
    assert not sim.event_query(ev)
    release()
    release()  # idempotent
    sim.event_synchronize(ev)
    assert sim.event_query(ev)
    sim.launch_host_func(s, lambda: None)
    sim.stream_synchronize(s)
    assert sim.ops_executed(0) == 0  # latches, records and host funcs are not counted


# -- configuration and lifecycle -----------------------------------------
def test_device_properties_and_config_from_env() -> None:
    cfg = SimConfig.from_env({"GPUAIO_SIM_DEVICES": "8", "GPUAIO_SIM_DMA_GBPS": "55"})
    assert (cfg.devices, cfg.dma_gbps, cfg.pageable_gbps) == (8, 55.0, 4.0)
    sim = SimBackend(cfg)
    try:
        assert sim.device_count() == 8
        props = sim.device_properties(7)
        assert props.name == "gpuaio simulated device"
        assert props.pci_bus_id == "0000:00:07.0"
        assert (props.compute_capability, props.multiprocessors) == ((9, 0), 132)
        assert sim.driver_version() == "sim"
        with pytest.raises(CudaError) as info:
            sim.device_properties(8)
        assert info.value.code == 101
    finally:
        sim.close()
    with pytest.raises(InvalidArgumentError):
        SimConfig.from_env({"GPUAIO_SIM_DEVICES": "many"})


def test_close_does_not_hang() -> None:
    sim = SimBackend()
    streams = [sim.stream_create(0) for _ in range(4)]
    dev = sim.mem_alloc(0, 64)
    for s in streams:
        sim.hold(s)  # never released
        sim.memset_async(dev, 1, 1, 64, s)
    names = {t.name for t in threading.enumerate()}
    assert sum(n.startswith("gpuaio-sim-stream-") for n in names) >= 4
    ev = sim.event_create(0)
    sim.event_record(ev, streams[0])
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            sim.event_synchronize(ev)
        except CudaError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert timed(sim.close) < 1.0
    waiter.join(1.0)
    assert not waiter.is_alive()
    assert [type(e) for e in errors] == [CudaError]  # CUDA_ERROR_DEINITIALIZED
    assert all(not s.thread.is_alive() for s in streams if s.thread)
    sim.close()  # idempotent
