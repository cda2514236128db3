"""gpuaio.prefetch: order, bytes, bounds, closing and errors, on every event loop."""

from __future__ import annotations

import collections
import gc
import threading
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NamedTuple

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._engine.staging import Stager
from tests.conftest import latch, twice_async

pytestmark = pytest.mark.anyio

MIB = 1 << 20


class SourceBroken(Exception):
    pass


class Pair(NamedTuple):
    left: Any
    right: Any


class DLPackOnly:
    """A host tensor reachable only through DLPack (as a torch CPU tensor is)."""

    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._arr.__dlpack_device__()


def batch_of(i: int, n: int = MIB) -> np.ndarray:
    return np.full(n, i % 251, np.uint8)


async def to_host(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> np.ndarray:
    out = np.empty(d.shape, d.dtype)
    await stream.copy(out, d)
    return out


async def eventually(pred: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.perf_counter() + within
    while not pred():
        assert time.perf_counter() < deadline, "condition never became true"
        await anyio.sleep(0.005)


def pipeline_idle(dev: gpuaio.Device) -> Callable[[], bool]:
    rt = dev._runtime

    def idle() -> bool:
        if rt.engine(0).pending() or any(q.executor.busy for q in rt.sequencers()):
            return False
        stager = rt.stager
        if stager is None:
            return True
        stager.pool.trim()  # reclaims blocks whose GPU work has finished
        return stager.pool.stats().in_use == 0

    return idle


class Counting:
    """A sync source that counts pulls and notes when it was closed."""

    def __init__(self, count: int, n: int = MIB, fail_at: int | None = None) -> None:
        self.count = count
        self.n = n
        self.fail_at = fail_at
        self.pulled = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.generate()

    def generate(self) -> Iterator[np.ndarray]:
        try:
            for i in range(self.count):
                if i == self.fail_at:
                    raise SourceBroken(f"batch {i} is broken")
                self.pulled += 1
                yield batch_of(i, self.n)
        finally:
            self.closed.set()


async def acounting(src: Counting) -> AsyncIterator[np.ndarray]:
    try:
        for i in range(src.count):
            await anyio.lowlevel.checkpoint()
            if i == src.fail_at:
                raise SourceBroken(f"batch {i} is broken")
            src.pulled += 1
            yield batch_of(i, src.n)
    finally:
        src.closed.set()


# -- data ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("depth", [1, 3])
async def test_batches_in_order_byte_exact(
    stream: gpuaio.Stream, dev: gpuaio.Device, kind: str, depth: int
) -> None:
    src = Counting(8, n=3 * MIB + 5)
    source: Any = src if kind == "sync" else acounting(src)
    seen = 0
    async with gpuaio.prefetch(source, depth=depth) as batches:
        async for d in batches:
            assert isinstance(d, gpuaio.DeviceArray)
            assert d.kind is gpuaio.MemoryKind.DEVICE
            np.testing.assert_array_equal(await to_host(stream, d), batch_of(seen, src.n))
            seen += 1
    assert seen == 8
    assert src.closed.is_set()
    await eventually(pipeline_idle(dev))


async def test_nested_structures(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, (4, 8, 8), dtype=np.uint8)
    strided = rng.standard_normal((6, 10)).astype(np.float32)[:, ::3]  # not contiguous
    labels = np.arange(4, dtype=np.int64)
    ordered = collections.OrderedDict(b=np.float64(2.5), a=np.zeros(0, np.int16))
    batch = {
        "image": img,
        "label": [labels, (bytearray(b"xyz"), memoryview(b"abcd"))],
        "pair": Pair(DLPackOnly(np.arange(6, dtype=np.int32)), "tag"),
        "strided": strided,
        "ordered": ordered,
        "meta": {"name": "first", "index": 3, "none": None, "scale": 0.5},
    }
    async with gpuaio.prefetch([batch, batch], depth=2, stream=stream) as batches:
        results = [b async for b in batches]
    assert len(results) == 2
    for out in results:
        assert set(out) == set(batch)
        np.testing.assert_array_equal(await to_host(stream, out["image"]), img)
        d_labels, (d_ba, d_mv) = out["label"]
        assert isinstance(out["label"], list)
        assert isinstance(out["label"][1], tuple)
        np.testing.assert_array_equal(await to_host(stream, d_labels), labels)
        assert bytes(await to_host(stream, d_ba)) == b"xyz"
        assert bytes(await to_host(stream, d_mv)) == b"abcd"
        assert isinstance(out["pair"], Pair)
        assert out["pair"].right == "tag"
        np.testing.assert_array_equal(
            await to_host(stream, out["pair"].left), np.arange(6, dtype=np.int32)
        )
        assert out["strided"].shape == strided.shape
        np.testing.assert_array_equal(await to_host(stream, out["strided"]), strided)
        assert isinstance(out["ordered"], collections.OrderedDict)
        assert list(out["ordered"]) == ["b", "a"]
        assert out["ordered"]["b"].shape == ()
        assert out["ordered"]["a"].shape == (0,)
        assert float(await to_host(stream, out["ordered"]["b"])) == 2.5
        assert out["meta"] == batch["meta"]
    # The two batches got separate device memory.
    assert results[0]["image"].ptr != results[1]["image"].ptr


async def test_to_callable_and_user_stream(stream: gpuaio.Stream) -> None:
    got: list[Any] = []
    async for item in gpuaio.prefetch(
        [{"x": batch_of(1, 100)}], stream=stream, to=lambda d: ("wrapped", d)
    ):
        got.append(item)
    tag, d = got[0]["x"]
    assert tag == "wrapped"
    assert isinstance(d, gpuaio.DeviceArray)
    assert not stream.closed, "a stream the caller passed is not the loader's to close"
    np.testing.assert_array_equal(await to_host(stream, d), batch_of(1, 100))


async def test_memory_object_stream_source(stream: gpuaio.Stream) -> None:
    """An async producer task overlapping the consumer, through a memory object stream."""
    send, receive = anyio.create_memory_object_stream[np.ndarray](2)

    async def produce() -> None:
        async with send:
            for i in range(6):
                await send.send(batch_of(i, 4096))

    seen = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async with receive, gpuaio.prefetch(receive, depth=2) as batches:
            async for d in batches:
                seen.append(int((await to_host(stream, d))[0]))
    assert seen == list(range(6))


# -- bounds ----------------------------------------------------------------------


async def test_depth_bounds_pulls_and_cancelled_anext_loses_nothing(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    src = Counting(10)
    release = latch(dev, stream)
    async with gpuaio.prefetch(src, depth=3, stream=stream) as batches:
        with anyio.move_on_after(0.3) as scope:
            await batches.__anext__()  # the stream is held: no copy can finish
        assert scope.cancelled_caught
        assert src.pulled == 3, "exactly depth batches pulled while none can be handed over"
        assert batches.in_flight == 3
        release()
        seen = 0
        async for d in batches:
            assert src.pulled - seen <= 3 + 1
            np.testing.assert_array_equal(await to_host(stream, d), batch_of(seen))
            seen += 1
            assert batches.in_flight <= 3
    assert seen == 10, "the batch whose wait was cancelled is handed over next"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_backpressure_slow_consumer(kind: str, dev: gpuaio.Device) -> None:
    src = Counting(12, n=64 << 10)
    source: Any = src if kind == "sync" else acounting(src)
    depth = 2
    received = 0
    async with gpuaio.prefetch(source, depth=depth) as batches:
        async for _ in batches:
            received += 1
            await anyio.sleep(0.01)  # a slow consumer: the source could run far ahead
            assert src.pulled - received <= depth
    assert received == 12


async def test_pinned_budget_respected(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    rt = dev._runtime
    budget = 4 * MIB
    old = rt.extras.get("stager")
    stager = rt.extras["stager"] = Stager(rt, budget=budget)
    try:
        src = Counting(6, n=8 * MIB)
        seen = 0
        async with gpuaio.prefetch(src, depth=4) as batches:
            async for d in batches:
                np.testing.assert_array_equal(await to_host(stream, d), batch_of(seen, 8 * MIB))
                seen += 1
        assert seen == 6
        stats = stager.pool.stats()
        assert stats.peak_reserved <= budget
        assert stats.misses + stats.hits > 0, "pageable batches were staged through the pool"
    finally:
        await stream.synchronize()
        stager.close()
        rt.extras["stager"] = old


async def test_sync_source_never_blocks_the_loop(dev: gpuaio.Device) -> None:
    gate = threading.Event()

    def blocking_source() -> Iterator[np.ndarray]:
        gate.wait(5)  # a producer stuck in I/O or decoding
        yield batch_of(0, 1000)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.005)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with gpuaio.prefetch(blocking_source()) as batches:
            with anyio.move_on_after(0.2):
                await batches.__anext__()
            assert ticks >= 5, "the loop kept running while the source blocked"
            gate.set()
            assert (await batches.__anext__()).shape == (1000,)
        tg.cancel_scope.cancel()


async def test_producer_transfer_and_consumer_overlap(
    anyio_backend: Any, dev: gpuaio.Device
) -> None:
    if anyio_backend[0] != "asyncio" or anyio_backend[1]:
        pytest.skip("timing test: once, on asyncio")
    n, step = 6, 0.04

    def slow_source() -> Iterator[np.ndarray]:
        for i in range(n):
            time.sleep(step)  # producing takes `step`, off the loop
            yield batch_of(i, 256 << 10)

    sequential = 2 * n * step

    async def attempt() -> None:
        t0 = time.perf_counter()
        async with gpuaio.prefetch(slow_source(), depth=2) as batches:
            async for _ in batches:
                await anyio.sleep(step)  # consuming takes `step` too
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.8 * sequential, f"{elapsed:.3f}s vs {sequential:.3f}s sequential"

    # A whole-process stall of a loaded CI VM is a third of the margin.
    await twice_async(attempt)


# -- closing ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_early_break_closes_everything(kind: str, dev: gpuaio.Device) -> None:
    src = Counting(50, n=2 * MIB)
    source: Any = src if kind == "sync" else acounting(src)
    async with gpuaio.prefetch(source, depth=3) as batches:
        async for _ in batches:
            break
    assert src.closed.is_set(), "aclose() returns after the source is closed"
    assert src.pulled <= 1 + 3 + 1
    assert batches._stream is not None
    assert batches._stream.closed
    await eventually(pipeline_idle(dev))
    with pytest.raises(StopAsyncIteration):
        await batches.__anext__()


def assert_warned_unclosed(caught: list[warnings.WarningMessage]) -> None:
    """A ResourceWarning named an unclosed loader among ``caught``."""
    assert any(
        issubclass(w.category, ResourceWarning) and "unclosed <gpuaio.Prefetcher" in str(w.message)
        for w in caught
    ), [str(w.message) for w in caught]


async def test_break_without_context_manager(dev: gpuaio.Device) -> None:
    """An abandoned loader is closed when collected, with a ResourceWarning (as
    asyncio warns of an unclosed transport); one iterated to its end is not."""
    src = Counting(50, n=2 * MIB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async for _ in gpuaio.prefetch(src, depth=3):
            break
        gc.collect()
    assert_warned_unclosed(caught)
    await eventually(src.closed.is_set)
    await eventually(pipeline_idle(dev))
    assert src.pulled <= 1 + 3 + 1


async def test_an_abandoned_loader_is_collected_with_deliveries_pending(
    dev: gpuaio.Device,
) -> None:
    """The source's thread hands batches to the loop through callbacks. One still
    waiting to run when the loader is abandoned must not keep the loader alive:
    it held it strongly, and so ``test_break_without_context_manager`` failed on
    an H200 whenever a batch came in between the consumer's last await and its
    ``break``. Here the consumer blocks its loop until the thread has handed over
    every batch it may pull ahead, then breaks."""
    src = Counting(50, n=64 * 1024)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async for _ in gpuaio.prefetch(src, depth=3):
            deadline = time.perf_counter() + 10
            while src.pulled < 1 + 3:  # the batch being consumed, and three ahead
                assert time.perf_counter() < deadline, "the source was not pulled ahead"
                time.sleep(0.001)  # noqa: ASYNC251  (blocks the loop: deliveries queue up)
            time.sleep(0.05)  # noqa: ASYNC251  (the last one handed over too)
            break
        gc.collect()
    assert_warned_unclosed(caught)
    await eventually(src.closed.is_set)
    await eventually(pipeline_idle(dev))


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_cancellation_closes_everything(kind: str, dev: gpuaio.Device) -> None:
    src = Counting(50, n=2 * MIB)
    source: Any = src if kind == "sync" else acounting(src)
    received = 0
    with anyio.CancelScope() as scope:
        async with gpuaio.prefetch(source, depth=3) as batches:
            async for _ in batches:
                received += 1
                if received == 2:
                    scope.cancel()
                await anyio.sleep(0.01)
    assert scope.cancelled_caught
    assert received == 2
    await eventually(src.closed.is_set)
    await eventually(pipeline_idle(dev))


async def test_aclose_before_iterating(dev: gpuaio.Device) -> None:
    src = Counting(3)
    batches = gpuaio.prefetch(src)
    await batches.aclose()
    assert src.pulled == 0
    with pytest.raises(StopAsyncIteration):
        await batches.__anext__()


# -- errors ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_source_exception_reaches_consumer(
    kind: str, stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    src = Counting(10, n=4096, fail_at=3)
    source: Any = src if kind == "sync" else acounting(src)
    seen = []

    async def consume(batches: gpuaio.Prefetcher) -> None:
        async for d in batches:
            seen.append(int((await to_host(stream, d))[0]))

    async with gpuaio.prefetch(source, depth=2) as batches:
        with pytest.raises(SourceBroken, match="batch 3 is broken") as info:
            await consume(batches)
        with pytest.raises(StopAsyncIteration):
            await batches.__anext__()
    assert seen == [0, 1, 2], "batches before the failure come first"
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    expected = "generate" if kind == "sync" else "acounting"
    assert expected in frames, f"the source's frame is in the traceback: {frames}"
    assert src.closed.is_set()
    await eventually(pipeline_idle(dev))


async def test_iter_failure_and_bad_leaf(dev: gpuaio.Device) -> None:
    class Unopenable:
        def __iter__(self) -> Iterator[Any]:
            raise SourceBroken("cannot open")

    got: list[Any] = []

    async def consume(source: Any) -> None:
        async for b in gpuaio.prefetch(source):
            got.append(b)

    with pytest.raises(SourceBroken, match="cannot open"):
        await consume(Unopenable())
    bad = [batch_of(0, 10), {"x": np.array([object()], dtype=object)}]
    with pytest.raises(gpuaio.InvalidArgumentError, match="Python objects"):
        await consume(bad)
    assert len(got) == 1, "the good batch before the bad one was handed over"


async def test_argument_checks(dev: gpuaio.Device) -> None:
    with pytest.raises(gpuaio.InvalidArgumentError, match="depth"):
        gpuaio.prefetch([], depth=0)
    with pytest.raises(gpuaio.InvalidArgumentError, match="to must be"):
        gpuaio.prefetch([], to="jax")  # type: ignore[arg-type]
    with pytest.raises(gpuaio.InvalidArgumentError, match="iterable"):
        gpuaio.prefetch(42)  # type: ignore[arg-type]
    with pytest.raises(gpuaio.InvalidArgumentError, match="gpuaio Stream"):
        gpuaio.prefetch([], stream=object())  # type: ignore[arg-type]


async def test_one_consumer_at_a_time(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    release = latch(dev, stream)
    async with (
        gpuaio.prefetch(Counting(3), stream=stream) as batches,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(batches.__anext__)
        await anyio.sleep(0.05)
        with pytest.raises(RuntimeError, match="already waiting"):
            await batches.__anext__()
        release()
    assert batches.delivered == 1


async def test_a_loader_iterated_to_its_end_is_not_warned_about(dev: gpuaio.Device) -> None:
    async for _ in gpuaio.prefetch(Counting(3)):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        gc.collect()
