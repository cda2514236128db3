"""Tiny memsets deferred to their batch (``gpuaio._engine.completion._queue``).

A memset of one to four aligned words of device memory joins its stream's
open batch without being enqueued; the seal enqueues the batch's words in
one call (``Backend.stream_write_words``), then the marker. What must hold:
the bytes land; everything enqueued on the stream after such a memset,
by gpuaio or through the handed-out handle, comes after it on the GPU; a
failed batch write fails its ops, only once the rest of the batch is done;
and memsets that do not fit are enqueued at once, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

import gpuaio
from gpuaio._core.errors import CudaError
from gpuaio._engine.completion._queue import StreamQueue
from tests.test_marker_batches import _FakeMarkers, _queue_of, _warm

pytestmark = pytest.mark.anyio


class _Calls:
    """Counts the backend's memset calls, and the batch writes of watched streams' queues
    (``written``: the words of each, as it is made; it then raises ``fail``, if set)."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.memsets = self.writes = self.words = 0
        self.written: list[list[int]] = []
        self.fail: BaseException | None = None
        self._monkeypatch = monkeypatch
        memset = backend.memset_async

        def memset_async(*args: Any) -> None:
            self.memsets += 1
            memset(*args)

        monkeypatch.setattr(backend, "memset_async", memset_async)

    def watch(self, stream: gpuaio.Stream) -> None:
        """Count the batch writes of ``stream``'s queue (it has one: an op was watched).

        The queue's own callable, not the backend's: a queue is the engine's
        for its ``CUstream`` address, which the driver reuses once a stream is
        destroyed, and it may outlive the stream by ``RETIRE_S``. Use with
        ``keep_queues``: a queue retired meanwhile would be replaced.
        """
        q = _queue_of(stream)
        write = q.write

        def counted(native: Any, words: list[int]) -> None:
            self.written.append(list(words))
            if self.fail is not None:
                raise self.fail
            self.writes += 1
            self.words += len(words) // 2
            write(native, words)

        self._monkeypatch.setattr(q, "write", counted)

    def reset(self) -> None:
        self.memsets = self.writes = self.words = 0


@pytest.fixture
def calls(dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch) -> _Calls:
    return _Calls(dev._runtime.backend, monkeypatch)


def _is_deferred(op: gpuaio.Operation, words: list[int], written: list[list[int]]) -> bool:
    """Whether ``op`` went into its batch as ``words``, not enqueued.

    The words still wait in the batch, or its seal wrote them (``written``,
    from :class:`_Calls`): on a GPU the watcher may seal it any time.
    """
    batch = op._poll[2] if op._poll is not None else None
    if batch is None:
        return False
    pending = batch.words  # the batch's words stay set until they are written
    return pending == words or (pending is None and words in written)


async def _deferred_memset(
    stream: gpuaio.Stream,
    target: gpuaio.DeviceArray,
    value: int,
    words: list[int],
    calls: _Calls,
) -> gpuaio.Operation:
    """``stream.memset(target, value)``, deferred as ``words``: the first of up to
    20 tries that is (the others are awaited).

    An op may also get a marker of its own, rightly: when its batch is busy
    and its stream's host thread takes it, it joins only once that thread
    ran it; or when the watcher holds the batch, as on GPU runs AR and AS
    (about one try in ten, on the GPU only).
    """
    tries = []
    for _ in range(20):
        op = stream.memset(target, value)
        with anyio.fail_after(10):
            while op._poll is None and not op.done():  # noqa: ASYNC110
                await anyio.sleep(0.001)  # queued on the host thread
        if _is_deferred(op, words, calls.written):
            return op
        q = _queue_of(stream)
        tries.append((op._poll, q.open, q.batching, len(q.entries), q.detached))
        with anyio.fail_after(10):
            await op
    raise AssertionError(f"no memset was deferred: {tries[:3]}")


@pytest.mark.usefixtures("keep_queues")  # the counted queues stay the streams'
async def test_tiny_memsets_of_many_tasks_go_to_the_gpu_in_batches(
    dev: gpuaio.Device, calls: _Calls
) -> None:
    streams = [dev.stream() for _ in range(2)]
    ntasks, rounds = 100, 10
    d = dev.empty(ntasks, np.uint32)
    for s in streams:
        await _warm(s, d)  # 400 bytes: enqueued at once
        calls.watch(s)
    calls.reset()

    async def worker(i: int) -> None:
        for j in range(rounds):
            await streams[i % 2].memset(d[i : i + 1], i * 1000 + j)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(ntasks):
                tg.start_soon(worker, i)
    out = np.empty(ntasks, np.uint32)
    await streams[0].copy(out, d)
    assert out.tolist() == [i * 1000 + rounds - 1 for i in range(ntasks)]
    ops = ntasks * rounds
    assert calls.memsets + calls.words == ops  # each op went to the GPU exactly once
    assert calls.memsets < ops // 4, (calls.memsets, calls.words)
    assert calls.writes * 4 < calls.words  # several ops a call
    for s in streams:
        await s.aclose()


async def _then_short_memset(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> list[int]:
    await stream.memset(d[2:4], 9)  # two bytes: a short op enqueued at once
    return [7, 7, 9, 9]


async def _then_pinned_copy(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> list[int]:
    host = gpuaio.pinned_empty(8)
    await stream.copy(host, d)
    return host[:4].tolist()


async def _then_pageable_copy(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> list[int]:
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    return out[:4].tolist()


async def _then_synchronize(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> list[int]:
    await stream.synchronize()
    return await _then_pageable_copy(stream, d)


async def _then_other_stream(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> list[int]:
    other = stream.device.stream()
    other.wait(stream)
    out = np.empty(8, np.uint8)
    await other.copy(out, d)
    await other.aclose()
    return out[:4].tolist()


async def _then_raw_work_on_the_handle(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> list[int]:
    # Another library enqueueing on the handed-out CUstream, behind gpuaio's back.
    handle = stream.handle
    backend = stream._rt.backend
    native = backend.stream_from_handle(stream.device.ordinal, handle)
    host = gpuaio.pinned_empty(8)
    backend.memcpy_async(host.ctypes.data, d.ptr, 8, native)
    await anyio.to_thread.run_sync(backend.stream_synchronize, native)
    return host[:4].tolist()


@pytest.mark.parametrize(
    "then",
    [
        _then_short_memset,
        _then_pinned_copy,
        _then_pageable_copy,
        _then_synchronize,
        _then_other_stream,
        _then_raw_work_on_the_handle,
    ],
    ids=lambda f: f.__name__.removeprefix("_then_"),
)
@pytest.mark.usefixtures("always_batch")
async def test_what_follows_a_deferred_memset_comes_after_it(
    dev: gpuaio.Device,
    stream: gpuaio.Stream,
    then: Callable[[gpuaio.Stream, gpuaio.DeviceArray], Awaitable[list[int]]],
    calls: _Calls,
) -> None:
    d = dev.empty(8)
    await _warm(stream, d)
    calls.watch(stream)
    first = await _deferred_memset(stream, d[:4], 7, [d.ptr, 0x07070707], calls)
    with anyio.fail_after(10):
        seen = await then(stream, d)
        await first
    assert seen[:2] == [7, 7] and seen[2:] in ([7, 7], [9, 9])
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    assert out.tolist() == [*seen, 0, 0, 0, 0]


@pytest.mark.usefixtures("always_batch")
async def test_a_deferred_memset_nobody_awaits_still_lands(
    dev: gpuaio.Device, stream: gpuaio.Stream, calls: _Calls
) -> None:
    d = dev.empty(4, np.uint32)
    await _warm(stream, d)
    calls.watch(stream)
    words = [d.ptr + 4, 0xABCD, d.ptr + 8, 0xABCD]
    op = await _deferred_memset(stream, d[1:3], 0xABCD, words, calls)
    with anyio.fail_after(10):
        # Nothing to wait on without polling for it, which would seal the
        # batch itself: the watcher must, as nobody polls.
        while not op.done():  # noqa: ASYNC110
            await anyio.sleep(0.005)
    out = np.empty(4, np.uint32)
    await stream.copy(out, d)
    assert out.tolist() == [0, 0xABCD, 0xABCD, 0]


@pytest.mark.parametrize(
    "case",
    ["unaligned", "three_bytes", "five_words", "managed", "pinned"],
)
@pytest.mark.usefixtures("always_batch")
async def test_memsets_that_are_not_a_few_device_words_are_enqueued_at_once(
    dev: gpuaio.Device, stream: gpuaio.Stream, calls: _Calls, case: str
) -> None:
    d = dev.empty(64)
    m = dev.managed_empty(64)
    host = gpuaio.pinned_empty(64)
    await _warm(stream, d)
    await stream.memset(m, 0)
    await stream.memset(host, 0)
    calls.watch(stream)
    target, whole = {
        "unaligned": (d[1:5], d),
        "three_bytes": (d[4:7], d),
        "five_words": (d[:20], d),
        "managed": (m[:4], m),
        "pinned": (host[:4], host),
    }[case]
    calls.reset()
    op = stream.memset(target, 5)
    assert op._poll is None or op._poll[2] is None or op._poll[2].words is None
    with anyio.fail_after(10):
        await op
    assert calls.writes == 0
    assert calls.memsets == (0 if case == "pinned" else 1)  # pinned: a host step
    out = np.empty(64, np.uint8)
    await stream.copy(out, whole)
    n = target.nbytes if hasattr(target, "nbytes") else len(target)
    start = {"unaligned": 1, "three_bytes": 4}.get(case, 0)
    expect = [0] * 64
    expect[start : start + n] = [5] * n
    assert out.tolist() == expect


@pytest.mark.usefixtures("always_batch")
async def test_a_failed_batch_write_fails_its_ops(
    dev: gpuaio.Device, stream: gpuaio.Stream, calls: _Calls
) -> None:
    d = dev.empty(8)
    await _warm(stream, d)
    calls.watch(stream)
    calls.fail = CudaError("cuStreamBatchMemOp", 801, "CUDA_ERROR_NOT_SUPPORTED")
    op = await _deferred_memset(stream, d[:4], 3, [d.ptr, 0x03030303], calls)
    with anyio.fail_after(10), pytest.raises(CudaError, match="cuStreamBatchMemOp"):
        await op
    calls.fail = None
    await stream.memset(d[4:], 4)  # the stream goes on
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    assert out.tolist() == [0, 0, 0, 0, 4, 4, 4, 4]
    d.free()  # its uses were all released


@pytest.mark.patches_compiled
@pytest.mark.usefixtures("always_batch")
async def test_a_loop_defers_no_memset_past_the_streams_share_of_the_launch_queue(
    dev: gpuaio.Device, stream: gpuaio.Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joining a batch may seal it, which enqueues its words and marker, and
    enqueueing into a full launch queue blocks: from ``direct_limit`` ops
    pending on the stream, a loop's memsets go to its host thread."""
    n, limit = 200, 4
    d = dev.empty(n, np.uint32)
    await _warm(stream, d)
    monkeypatch.setattr(dev._runtime.engine(dev.ordinal), "direct_limit", limit)
    q = _queue_of(stream)
    joins: list[tuple[int, int]] = []  # (thread, ops pending before the join)
    join = StreamQueue.join

    def recorded(self: StreamQueue, *args: Any, **kwargs: Any) -> Any:
        if self is q:
            joins.append((threading.get_ident(), len(q.entries)))
        return join(self, *args, **kwargs)

    monkeypatch.setattr(StreamQueue, "join", recorded)
    ops = [stream.memset(d[i : i + 1], i + 1) for i in range(n)]
    with anyio.fail_after(30):
        await gpuaio.wait_all(ops)
    loop = threading.get_ident()
    on_loop = [pending for thread, pending in joins if thread == loop]
    assert on_loop, "no memset joined a batch from the loop"
    assert max(on_loop) < limit, on_loop
    out = np.empty(n, np.uint32)
    await stream.copy(out, d)
    assert out.tolist() == list(range(1, n + 1))


def test_a_batch_writes_its_deferred_words_before_its_marker() -> None:
    # Unit level: the words go before the marker; a flush writes them and
    # leaves the batch open; after a failed write the marker is still
    # placed, and the batch's ops fail only once it fired.
    markers = _FakeMarkers()
    q = markers.queue()
    ops = [gpuaio.Operation(f"op{i}", None) for i in range(4)]
    now = 0.0
    q.join(ops[0], "s", now, [16, 1])
    q.join(ops[1], "s", now)  # a short op enqueued by its caller
    q.join(ops[2], "s", now, [20, 2, 24, 2])
    assert q.open.words == [16, 1, 20, 2, 24, 2] and not markers.log
    assert q.flush()
    assert markers.log == [[16, 1, 20, 2, 24, 2]] and q.open is not None
    q.join(ops[3], "s", now, [28, 3])
    assert q.seal()
    assert markers.log[1:] == [[28, 3], markers.placed[-1]]
    markers.fire_all()
    q.drain([])
    assert all(op.done() and op.exception() is None for op in ops)

    bad = [gpuaio.Operation(f"bad{i}", None) for i in range(2)]
    markers.fail_write = CudaError("cuStreamBatchMemOp", 1, "CUDA_ERROR_INVALID_VALUE")
    q.join(bad[0], "s", now, [32, 4])
    q.join(bad[1], "s", now)
    assert q.seal()
    q.drain([])
    assert not any(op.done() for op in bad)  # its marker has not fired
    markers.fire_all()
    q.drain([])
    assert all(isinstance(op.exception(), CudaError) for op in bad)

    # A flush that fails seals its batch: the ops after it join a new one.
    victim, after = gpuaio.Operation("victim", None), gpuaio.Operation("after", None)
    q.join(victim, "s", now, [36, 5])
    assert q.flush() and q.open is None
    markers.fail_write = None
    q.join(after, "s", now, [40, 6])
    assert q.seal()
    assert markers.log[-2:] == [[40, 6], markers.placed[-1]]
    markers.fire_all()
    q.drain([])
    assert isinstance(victim.exception(), CudaError)
    assert after.done() and after.exception() is None
