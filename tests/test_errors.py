"""Bad input is rejected before anything is enqueued; device faults fail awaits fast."""

from __future__ import annotations

import gc
import time
import warnings
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from tests.conftest import add_one_kernel, latch

pytestmark = pytest.mark.anyio


def _ops_executed(dev: gpuaio.Device) -> int | None:
    backend = dev._runtime.backend
    counter = getattr(backend, "ops_executed", None)
    return counter(dev.ordinal) if counter else None


BAD_COPIES: list[tuple[str, Any, str]] = [
    ("size", lambda d: (d.empty(10), np.zeros(11, np.uint8)), "size mismatch"),
    ("dtype", lambda d: (d.empty(4, np.float32), np.zeros(4, np.int32)), "dtype mismatch"),
    (
        "shape",
        lambda d: (d.empty((2, 8), np.float32), np.zeros((4, 4), np.float32)),
        "shape mismatch",
    ),
    ("readonly", lambda d: (_ro(16), d.empty(16)), "read-only"),
    ("bytes_dst", lambda d: (b"x" * 16, d.empty(16)), "read-only"),
    (
        "noncontig_src",
        lambda d: (d.empty(8, np.float32), np.zeros(16, np.float32)[::2]),
        "not C-contiguous",
    ),
    (
        "noncontig_dst",
        lambda d: (np.zeros(16, np.float32)[::2], d.empty(8, np.float32)),
        "not C-contiguous",
    ),
    ("overlap", lambda d: _overlap(), "overlap"),
]


def _ro(n: int) -> np.ndarray:
    a = np.zeros(n, np.uint8)
    a.setflags(write=False)
    return a


def _overlap() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(100, np.uint8)
    return a[10:60], a[:50]


@pytest.mark.parametrize(("case", "make", "message"), BAD_COPIES, ids=[c[0] for c in BAD_COPIES])
async def test_bad_copy_rejected(
    stream: gpuaio.Stream, dev: gpuaio.Device, case: str, make: Any, message: str
) -> None:
    dst, src = make(dev)
    before = _ops_executed(dev)
    with pytest.raises(gpuaio.InvalidArgumentError, match=message):
        stream.copy(dst, src)
    await anyio.sleep(0.01)
    assert _ops_executed(dev) == before
    assert dev._runtime.engine(0).pending() == 0


async def test_not_a_buffer(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    with pytest.raises(gpuaio.BufferTypeError, match="not a buffer"):
        stream.copy(dev.empty(4), [1, 2, 3, 4])
    with pytest.raises(TypeError):
        stream.copy(dev.empty(4), object())


async def test_freed_buffer(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    d = dev.empty(64)
    d.free()
    with pytest.raises(gpuaio.BufferFreedError):
        stream.copy(np.zeros(64, np.uint8), d)
    with pytest.raises(gpuaio.BufferFreedError):
        stream.memset(d, 0)


async def test_closed_stream(dev: gpuaio.Device) -> None:
    s = dev.stream()
    await s.aclose()
    assert s.closed
    with pytest.raises(gpuaio.StreamClosedError):
        s.memset(dev.empty(4), 0)
    with pytest.raises(gpuaio.StreamClosedError):
        s.copy(dev.empty(4), np.zeros(4, np.uint8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"value": 256, "width": 1}, "does not fit"),
        ({"value": 1, "width": 3}, "width must be 1, 2 or 4"),
        ({"value": 1.5}, "must be an int"),
        ({"value": True}, "must be an int"),
    ],
)
async def test_bad_memset(
    stream: gpuaio.Stream, dev: gpuaio.Device, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(gpuaio.InvalidArgumentError, match=message):
        stream.memset(dev.empty(8), **kwargs)


async def test_memset_width_needed(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    with pytest.raises(gpuaio.InvalidArgumentError, match="width"):
        stream.memset(dev.empty(4, np.float64), 0)
    with pytest.raises(gpuaio.InvalidArgumentError, match="whole number"):
        stream.memset(dev.empty(6), 0, width=4)
    with pytest.raises(gpuaio.InvalidArgumentError, match="read-only"):
        stream.memset(_ro(8), 0)


async def test_bad_launch(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    k = add_one_kernel(dev)
    with pytest.raises(gpuaio.InvalidArgumentError, match="grid"):
        stream.launch(k, 0, 32)
    with pytest.raises(gpuaio.InvalidArgumentError, match="1024 threads"):
        stream.launch(k, 1, (64, 32))
    with pytest.raises(gpuaio.InvalidArgumentError, match="block"):
        stream.launch(k, 1, "x")
    with pytest.raises(gpuaio.InvalidArgumentError, match="shared_mem"):
        stream.launch(k, 1, 32, shared_mem=-1)


async def test_bad_allocations(dev: gpuaio.Device) -> None:
    with pytest.raises(gpuaio.InvalidArgumentError, match="negative"):
        dev.empty(-1)
    with pytest.raises(gpuaio.InvalidArgumentError, match="priority"):
        dev.stream(priority=1000)
    with pytest.raises(gpuaio.NoDeviceError):
        gpuaio.Device(99)
    with pytest.raises(gpuaio.CudaError, match="OUT_OF_MEMORY"):
        dev.empty(1 << 50)


async def test_wrong_device(dev: gpuaio.Device) -> None:
    if dev._runtime.backend.device_count() < 2:
        pytest.skip("needs two devices")
    other = device_of(dev._runtime, 1)
    s = dev.stream()
    with pytest.raises(gpuaio.InvalidArgumentError, match="device 1"):
        s.copy(other.empty(8), np.zeros(8, np.uint8))
    with pytest.raises(gpuaio.InvalidArgumentError, match="device 1"):
        s.memset(other.empty(8), 0)


@pytest.mark.gpuaio_sim_config(devices=2)
@pytest.mark.gpuaio_sim_only
async def test_wrong_device_sim(dev: gpuaio.Device) -> None:
    await test_wrong_device(dev)


@pytest.mark.gpuaio_sim_only
async def test_sticky_fault_fails_pending_awaits(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    backend: Any = dev._runtime.backend
    d = dev.empty(1 << 20)
    release = latch(dev, stream)
    ops = [stream.memset(d, i) for i in range(10)]
    other = dev.stream()
    other_op = other.memset(dev.empty(16), 1)
    await other_op
    backend.inject_fault(0, after_ops=0, code=700)
    t0 = time.perf_counter()
    release()
    for op in ops:
        with pytest.raises(gpuaio.DeviceFatalError, match="ILLEGAL_ADDRESS"):
            await op
    assert time.perf_counter() - t0 < 0.1
    # At the call, on every stream of the device (a copy checks the engine
    # its stream last looked up, Transfers._live), before anything is enqueued.
    for s in (stream, other):
        with pytest.raises(gpuaio.DeviceFatalError):
            s.memset(d, 0)
        with pytest.raises(gpuaio.DeviceFatalError):
            s.copy(np.zeros(d.nbytes, np.uint8), d)
    with pytest.raises(gpuaio.DeviceFatalError):
        dev.empty(8)


@pytest.mark.gpuaio_sim_only
async def test_failing_kernel_is_sticky(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    def boom(grid: Any, block: Any) -> None:
        raise RuntimeError("illegal memory access in the simulated kernel")

    k = dev.compile("", "boom", sim=boom)
    with pytest.raises(gpuaio.DeviceFatalError, match="LAUNCH_FAILED"):
        await stream.launch(k, 1, 1)
    with pytest.raises(gpuaio.DeviceFatalError):
        await stream.synchronize()


@pytest.mark.gpuaio_sim_only
async def test_enqueue_error_names_the_call(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    backend: Any = dev._runtime.backend
    d = dev.empty(16)
    backend.fail_next("cuMemsetD8Async", code=1)
    with pytest.raises(gpuaio.CudaError) as info:
        stream.memset(d, 1)
    assert info.value.call == "cuMemsetD8Async"
    assert info.value.name == "CUDA_ERROR_INVALID_VALUE"
    assert not isinstance(info.value, gpuaio.DeviceFatalError)
    await stream.memset(d, 2)  # not sticky: the stream still works


@pytest.mark.gpuaio_sim_only
async def test_error_in_host_job_reaches_await(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    backend: Any = dev._runtime.backend
    backend.fail_next("cuMemcpyAsync", code=1)
    stager = dev._runtime.stager
    dev._runtime.extras["stager"] = None  # the driver's own path
    try:
        op = stream.copy(dev.empty(16), np.zeros(16, np.uint8))
        with pytest.raises(gpuaio.CudaError, match="cuMemcpyAsync"):
            await op
    finally:
        dev._runtime.extras["stager"] = stager


@pytest.mark.gpuaio_sim_only
async def test_failed_enqueue_releases_the_op(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    backend: Any = dev._runtime.backend
    d = dev.empty(64)
    backend.fail_next("cuMemsetD8Async", code=1)
    with pytest.raises(gpuaio.CudaError):
        stream.memset(d, 1)
    assert d.allocation._users == 0, "a failed enqueue must not leave the buffer marked in use"
    d.free()
    assert d.allocation.freed


# -- a failed op nobody awaited warns (asyncio's "exception was never retrieved") --
def _failed_op(exc: BaseException) -> gpuaio.Operation:
    op = gpuaio.Operation("copy", None)
    op._resolve(exc)
    return op


def _collect(make: Any) -> list[warnings.WarningMessage]:
    """This test's ResourceWarnings about ops (gc may finalize earlier tests' objects too)."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
        gc.collect()
    return [
        w
        for w in caught
        if issubclass(w.category, ResourceWarning) and "<gpuaio.Operation" in str(w.message)
    ]


def test_an_unretrieved_failure_warns() -> None:
    def drop() -> None:
        _failed_op(RuntimeError("boom"))

    caught = _collect(drop)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "copy" in text and "never retrieved" in text and "boom" in text


def test_a_retrieved_failure_or_a_success_does_not_warn() -> None:
    async def awaited() -> None:
        with pytest.raises(RuntimeError):
            await _failed_op(RuntimeError("seen"))

    def checked() -> None:
        assert isinstance(_failed_op(RuntimeError("seen")).exception(), RuntimeError)

    def fine() -> None:
        op = gpuaio.Operation("copy", None)
        op._resolve(None)

    assert _collect(lambda: anyio.run(awaited)) == []
    assert _collect(checked) == []
    assert _collect(fine) == []
    # Errors the library reports another way: an abort the caller asked for,
    # and device faults (logged once per device by the runtime).
    assert _collect(lambda: _failed_op(gpuaio.OperationAbortedError("aborted"))) == []
    # and an op still pending when the runtime closed (a shutdown, not a failure)
    from gpuaio._core.operation import ClosedWhilePendingError

    assert _collect(lambda: _failed_op(ClosedWhilePendingError())) == []
    assert (
        _collect(
            lambda: _failed_op(
                gpuaio.DeviceFatalError("cuEventQuery", 700, "CUDA_ERROR_ILLEGAL_ADDRESS")
            )
        )
        == []
    )
