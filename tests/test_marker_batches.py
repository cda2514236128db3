"""Short ops that share one completion marker (``gpuaio._engine.completion._queue``).

What must hold: every op still resolves only once its work is done, in
stream order; nothing an op's completion waits for was enqueued after it
(a kernel that waits for the host, work another library enqueues); ops
nobody awaits still resolve and release their buffers; and a lone op gets
its marker at once, as before batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._core.errors import CudaError
from gpuaio._engine.completion import _queue, _tuning
from tests.conftest import latch

pytestmark = pytest.mark.anyio


class _Records:
    """Counts the event records the completion engine makes (markers)."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.fail: BaseException | None = None
        real = backend.event_record

        def record(event: Any, stream: Any) -> None:
            if self.fail is not None:
                exc, self.fail = self.fail, None
                raise exc
            self.count += 1
            real(event, stream)

        monkeypatch.setattr(backend, "event_record", record)


class _FakeMarkers:
    """Markers for a bare StreamQueue: ``place`` makes one, ``fire_all`` fires every one made.

    ``log`` lists what was enqueued, in order: each marker, and the words of
    each ``write`` of deferred memsets (which raises ``fail_write`` if set).
    """

    def __init__(self) -> None:
        self.placed: list[object] = []
        self.fired: set[int] = set()
        self.log: list[object] = []
        self.fail_write: BaseException | None = None

    def place(self, native: Any) -> object:
        ev = object()
        self.placed.append(ev)
        self.log.append(ev)
        return ev

    def write(self, native: Any, words: list[int]) -> None:
        if self.fail_write is not None:
            raise self.fail_write
        self.log.append(list(words))

    def queue(self) -> Any:
        """A bare StreamQueue on these markers (recycling nothing)."""
        return _queue.StreamQueue(self.is_fired, lambda ev: None, self.place, self.write)

    def is_fired(self, ev: object) -> bool:
        return id(ev) in self.fired

    def fire_all(self) -> None:
        self.fired.update(id(ev) for ev in self.placed)


@pytest.fixture
def records(dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch) -> _Records:
    return _Records(dev._runtime.backend, monkeypatch)


def _queue_of(stream: gpuaio.Stream) -> Any:
    """The stream's completion queue (None if the watcher retired it, empty)."""
    return stream._rt.engine(stream._ordinal)._queues.get(stream._key)  # type: ignore[attr-defined]


async def _warm(stream: gpuaio.Stream, d: gpuaio.DeviceArray) -> None:
    """Make the stream's queue: its first op gets a marker of its own."""
    await stream.memset(d, 0)


async def test_short_ops_of_many_tasks_share_markers(dev: gpuaio.Device, records: _Records) -> None:
    streams = [dev.stream() for _ in range(2)]
    ntasks, rounds = 200, 10
    d = dev.empty(4 * ntasks)
    order: list[list[int]] = [[] for _ in range(ntasks)]

    async def worker(i: int) -> None:
        part = d[4 * i : 4 * i + 4]
        s = streams[i % 2]
        for j in range(rounds):
            await s.memset(part, (i + j) % 251)
            order[i].append(j)

    before = records.count
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(ntasks):
                tg.start_soon(worker, i)
    markers = records.count - before
    out = np.empty(4 * ntasks, np.uint8)
    for s in streams:
        await s.synchronize()
    await streams[0].copy(out, d)
    expect = np.repeat(np.array([(i + rounds - 1) % 251 for i in range(ntasks)], np.uint8), 4)
    np.testing.assert_array_equal(out, expect)
    assert all(o == list(range(rounds)) for o in order)
    # One marker per op before batches: 2,000. Each loop turn enqueues about
    # 100 ops per stream, in batches of BATCH_S of expected GPU time (25).
    assert markers <= ntasks * rounds // 4, markers
    assert dev._runtime.engine(0).pending() == 0
    for s in streams:
        s.close()


async def test_a_lone_task_gets_each_marker_at_once(
    dev: gpuaio.Device, records: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batching one op at a time would only place its marker later (at the
    # first poll): a lone op's marker is recorded during its call. A new
    # queue's second short op opens a batch, to see whether others join;
    # then one does every BATCH_PROBE_S: not within this test.
    monkeypatch.setattr(_queue, "BATCH_PROBE_S", 60.0)
    monkeypatch.setattr(_queue, "RETIRE_S", 60.0)
    s = dev.stream()
    # A new queue: the one an earlier test's stream left at this CUstream
    # address (the driver reuses them) would remember that stream's company.
    engine: Any = dev._runtime.engine(dev.ordinal)
    with engine._lock:
        left = engine._queues.pop(s._key, None)
    assert left is None or not left.entries
    d = dev.empty(4)
    at_call = []
    for i in range(50):
        before = records.count
        op = s.memset(d, i)
        at_call.append(records.count > before)
        await op
    assert at_call == [True, False] + [True] * 48
    q = _queue_of(s)
    assert q is not None and not q.batching and q.open is None
    out = np.empty(4, np.uint8)
    await s.copy(out, d)
    assert (out == 49).all()
    s.close()


def _blocking_kernel(dev: gpuaio.Device) -> tuple[gpuaio.Kernel | None, threading.Event]:
    """On sim, a kernel launched through gpuaio that runs until the event is set."""
    opened = threading.Event()
    if dev._runtime.backend.name != "sim":
        return None, opened

    def wait_for_host(grid: Any, block: Any) -> None:
        opened.wait(30)

    kernel = dev.compile("(sim)", "wait_for_host", sim=wait_for_host)
    return kernel, opened


def _hold_by_launch(dev: gpuaio.Device, stream: gpuaio.Stream) -> Callable[[], None]:
    """Launch, through gpuaio, a kernel that waits for the host until the returned call."""
    kernel, opened = _blocking_kernel(dev)
    if kernel is None:
        return latch(dev, stream)  # on a GPU, conftest's latch is such a launch
    stream.launch(kernel, 1, 1)
    return opened.set


@pytest.mark.usefixtures("always_batch")
async def test_a_batch_is_sealed_before_a_kernel_that_waits_for_the_host(
    dev: gpuaio.Device, stream: gpuaio.Stream
) -> None:
    d = dev.empty(8)
    await _warm(stream, d)
    first = stream.memset(d[:4], 1)
    second = stream.memset(d[4:], 2)
    assert first._poll is not None and second._poll is not None
    assert first._poll[2] is second._poll[2]  # one batch (on a GPU the watcher may seal it now)
    release = _hold_by_launch(dev, stream)
    after = stream.memset(d[:4], 3)
    try:
        # The batch's marker went on before the kernel: it completes while
        # the kernel still waits (before the fix it waited for the kernel).
        with anyio.fail_after(10):
            await first
            await second
        assert not after.done()
    finally:
        release()
    with anyio.fail_after(10):
        await after
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    assert (out[:4] == 3).all() and (out[4:] == 2).all()


@pytest.mark.usefixtures("always_batch")
def test_a_sweep_seals_a_batch_nobody_polls_for_once_it_is_old(
    gpuaio_runtime: Any, long_stand_down: Any
) -> None:
    # While loops poll, the watcher stands down (here for good), and a poll
    # seals only the batch of the op it waits for: the batch of a stream
    # nobody awaits is sealed by a loop's sweep once BATCH_AGE_S old, so its
    # ops resolve and release their buffers.
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    busy, other = dev.stream(), dev.stream()
    d = dev.empty(4)
    buf = dev.empty(64)
    engine = long_stand_down
    engine._loop_polling_until = time.perf_counter() + 60  # as if loops polled
    time.sleep(0.05)  # the watcher has stood down by now, for 60 s
    other.memset(buf[:4], 0)  # the first op of a queue has a marker of its own
    orphans = [other.memset(buf[i : i + 4], i) for i in range(4, 64, 4)]
    del buf
    polled = busy.memset(d, 1)
    for s in (busy, other):
        rt.backend.stream_synchronize(s._native)

    def sweep() -> None:
        time.sleep(2 * _tuning.LOOP_SWEEP_S)  # each stream is drained once per sweep
        engine._next_sweep = 0.0
        engine.poll_for(polled)

    sweep()
    assert polled.done() and not any(op.done() for op in orphans)  # young: left open
    time.sleep(_tuning.BATCH_AGE_S)
    sweep()  # seals it
    sweep()  # finds its marker fired
    assert all(op.done() and op.exception() is None for op in orphans)
    assert all(op._allocs is None for op in orphans)  # released
    busy.close()
    other.close()


@pytest.mark.usefixtures("always_batch")
async def test_ops_nobody_awaits_resolve_with_no_loop_polling(dev: gpuaio.Device) -> None:
    s = dev.stream()
    d = dev.empty(64)
    ops = [s.memset(d[i : i + 4], i) for i in range(0, 64, 4)]
    # Nothing polls: the watcher seals the batch and resolves it.
    done = threading.Event()
    ops[-1]._add_done_callback(done.set)
    assert await anyio.to_thread.run_sync(done.wait, 10)
    await ops[-1]  # its callback runs just before it counts as done
    assert all(op.done() and op.exception() is None for op in ops)
    s.close()


@pytest.mark.usefixtures("always_batch")
async def test_closing_a_stream_seals_its_batch(dev: gpuaio.Device) -> None:
    s = dev.stream()
    d = dev.empty(16)
    await _warm(s, d)
    ops = [s.memset(d[i : i + 4], 9) for i in range(0, 16, 4)]
    assert _queue_of(s).open is not None
    s.close()  # releases the stream on its host thread, after sealing
    with anyio.fail_after(10):
        for op in ops:
            await op
    out = np.empty(16, np.uint8)
    s2 = dev.stream()
    await s2.copy(out, d)
    assert (out == 9).all()
    s2.close()


@pytest.mark.usefixtures("always_batch")
async def test_a_stream_whose_handle_was_handed_out_batches_nothing(
    dev: gpuaio.Device, records: _Records
) -> None:
    # Another library may enqueue on the handle, behind gpuaio's back: a
    # batch's marker placed after that work would wait for it.
    s = dev.stream()
    assert s.handle
    d = dev.empty(4)
    before = records.count
    ops = [s.memset(d, i) for i in range(20)]
    assert records.count - before == 20
    for op in ops:
        await op
    theirs = dev.stream()
    wrapped = dev.wrap_stream(theirs.handle)
    assert wrapped._seq.exported  # shared by both wrappers of the CUstream
    s.close()
    wrapped.close()
    theirs.close()


@pytest.mark.usefixtures("always_batch")
async def test_a_batch_whose_marker_cannot_be_recorded_fails_its_ops(
    dev: gpuaio.Device, stream: gpuaio.Stream, records: _Records
) -> None:
    d = dev.empty(8)
    await _warm(stream, d)
    # Armed before the ops: a batch's marker is recorded when the batch is
    # sealed, which the watcher thread may do at once (on an H100, run DL,
    # it did before the test armed the failure, and both ops completed).
    records.fail = CudaError("cuEventRecord", 1, "CUDA_ERROR_INVALID_VALUE", "injected")
    a = stream.memset(d[:4], 1)
    b = stream.memset(d[4:], 2)
    with anyio.fail_after(10):
        with pytest.raises(CudaError, match="injected"):
            await a
        with pytest.raises(CudaError, match="injected"):
            await b
    # The stream goes on: a later op gets a marker and completes.
    with anyio.fail_after(10):
        await stream.memset(d, 5)


@pytest.mark.usefixtures("always_batch")
@pytest.mark.gpuaio_sim_only  # the DMA is slowed down and a marker fails: simulated
@pytest.mark.gpuaio_sim_config(dma_gbps=0.0001)  # 4 KiB: about 40 ms
async def test_a_staged_copy_whose_batch_marker_failed_keeps_its_block_until_its_dma_ran(
    dev: gpuaio.Device, stream: gpuaio.Stream, records: _Records
) -> None:
    pool = dev._runtime.stager.pool
    n = 4096
    d = dev.empty(n)
    await stream.memset(d, 7)
    host = np.empty(n, np.uint8)
    await stream.copy(host, d)  # leaves a block of its class: the next one is staged here
    host[:] = 0
    op = stream.copy(host, d)  # a short download: it joins the stream's batch
    records.fail = CudaError("cuEventRecord", 1, "CUDA_ERROR_INVALID_VALUE", "injected")
    with anyio.move_on_after(0.01):  # the poll seals the batch: its marker fails
        await op
    assert not op.done(), "resolved while its DMA could still run"
    assert pool.stats().in_use > 0, "its pinned block went back under its DMA"
    with anyio.fail_after(10):
        with pytest.raises(CudaError, match="injected"):
            await op
    assert pool.stats().in_use == 0


def test_batch_bookkeeping_recycles_each_marker_once() -> None:
    # Unit level: an op with a marker of its own between two ops of one
    # batch (another thread marked it alone while the batch was open).
    markers = _FakeMarkers()
    recycled: list[object] = []
    q = _queue.StreamQueue(markers.is_fired, recycled.append, markers.place, markers.write)
    ops = [gpuaio.Operation(f"op{i}", None) for i in range(3)]
    now = time.perf_counter()
    assert q.join(ops[0], "s", now)
    own = markers.place("s")
    q.entries.append((ops[1], own))
    assert q.join(ops[2], "s", now)
    assert q.seal()
    batch_marker = markers.placed[-1]
    markers.fire_all()
    out: list[Any] = []
    q.drain(out)
    assert all(op.done() for op in ops)
    assert recycled == [own, batch_marker]
    assert not q.entries and q.open is None


def test_a_batch_whose_marker_failed_resolves_only_behind_its_work() -> None:
    # Unit level. The batch's work was enqueued before its marker failed to
    # record, and may still run: its ops fail with the error, but only once a
    # marker placed after that work has fired. They used to resolve at the
    # next drain, and their done callbacks gave a staged copy's pinned block
    # back to the pool under its DMA (the storm with transient faults read
    # another copy's bytes).
    markers = _FakeMarkers()
    real_place = markers.place
    failures = [CudaError("cuEventRecord", 1, "CUDA_ERROR_INVALID_VALUE", "injected")] * 2

    def place(native: Any) -> object:
        if failures:
            raise failures.pop()
        return real_place(native)

    q = _queue.StreamQueue(markers.is_fired, lambda ev: None, place, markers.write)
    released: list[str] = []
    ops = [gpuaio.Operation(f"op{i}", None) for i in range(2)]
    for op in ops:
        op._add_done_callback(lambda op=op: released.append(op.label))
    now = time.perf_counter()
    assert q.join(ops[0], "s", now) and q.join(ops[1], "s", now)
    assert q.seal()  # its marker fails to record
    q.drain([])  # the next try fails too: nothing may resolve
    assert not any(op.done() for op in ops) and not released
    q.drain([])  # placed now, behind the batch's work, but not fired
    assert markers.placed, "a failed batch marker is placed again at a later drain"
    assert not any(op.done() for op in ops) and not released
    markers.fire_all()
    q.drain([])
    assert all(op.done() for op in ops) and released == ["op0", "op1"]
    for op in ops:
        assert isinstance(op.exception(), CudaError), "the ops still report the failure"
    assert not q.entries


@pytest.mark.usefixtures("always_batch")
async def test_a_loop_never_waits_for_another_thread_sealing(
    dev: gpuaio.Device, stream: gpuaio.Stream
) -> None:
    # Sealing records an event under seal_lock. With it held elsewhere, a
    # short op gets a marker of its own, and an op that must seal the batch
    # first goes to the stream's host thread, which waits for the lock.
    # (Two-byte memsets: a word's would be deferred, test_deferred_memsets.)
    d = dev.empty(8)
    await _warm(stream, d)
    batched = stream.memset(d[:2], 1)
    q = _queue_of(stream)
    assert q.open is not None and q.open.words is None
    q.seal_lock.acquire()  # as if another thread were sealing (this one would deadlock)
    try:
        alone = stream.memset(d[4:6], 2)
        assert alone._poll is not None and alone._poll[2] is None  # a marker of its own
        sync = stream.synchronize()  # not short: seals first, on the host thread
        assert q.open is batched._poll[2]  # not sealed yet: the lock is held
    finally:
        q.seal_lock.release()
    with anyio.fail_after(10):
        await sync
    assert batched.done() and alone.done()
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    assert out.tolist() == [1, 1, 0, 0, 2, 2, 0, 0]


def test_any_seal_shows_company_only_a_poll_shows_none() -> None:
    # Unit level. Company (other ops in the batch, or other ops of the stream
    # pending) turns batching on whoever seals the batch; only a task polling
    # for a batch without it turns it off. In run AI the watcher sealed the
    # first batch of a stream of 200 tasks early, nothing was learnt, and for
    # BATCH_PROBE_S every op got a marker of its own.
    markers = _FakeMarkers()

    def drain() -> None:
        markers.fire_all()
        q.drain([])
        assert not q.entries

    q = markers.queue()
    ops = [gpuaio.Operation(f"op{i}", None) for i in range(10)]
    now = time.perf_counter()
    # A probe batch of two ops, sealed by the watcher (it learns nothing else).
    assert q.join(ops[0], "s", now) and q.join(ops[1], "s", now)
    assert q.seal()
    assert q.batching
    # A batch sealed early leaves the ops a loop turn enqueues after it alone
    # in the next one: polled for, it holds one op, but four are pending.
    assert q.join(ops[2], "s", now) and q.join(ops[3], "s", now)
    assert q.seal()
    lone = q.join(ops[4], "s", now)
    assert lone is not None and lone.left == 1
    assert q.seal(learn=True)
    assert q.batching
    drain()
    # Polled for alone, nothing else pending: a lone task's op.
    assert q.join(ops[5], "s", now)
    assert q.seal(learn=True)
    assert not q.batching
    drain()
    # The watcher sealing a lone batch shows nothing either way...
    assert q.join(ops[6], "s", now)
    assert q.seal()
    assert not q.batching
    drain()
    # ...unless the stream has other ops pending (here one with its own marker).
    q.entries.append((ops[7], markers.place("s")))
    assert q.join(ops[8], "s", now)
    assert q.seal()
    assert q.batching
    drain()
    assert all(op.done() for op in ops[:9])


@pytest.mark.usefixtures("keep_queues")
async def test_a_short_op_behind_pending_ops_joins_a_batch(
    dev: gpuaio.Device, stream: gpuaio.Stream
) -> None:
    # Other ops pending on the stream are company, learnt or not: in run AK
    # the watcher sealed a stream's first batch while it held one op, and the
    # 99 ops after it would have had markers of their own for BATCH_PROBE_S.
    d = dev.empty(8)
    await _warm(stream, d)
    q = _queue_of(stream)
    q.next_probe = float("inf")  # no probe due, nothing learnt
    assert not q.batching
    alone = stream.memset(d[:4], 1)
    assert alone._poll is not None and alone._poll[2] is None  # nothing pending: its own
    await alone
    release = _hold_by_launch(dev, stream)
    try:
        behind = stream.memset(d[4:], 2)
        assert behind._poll is not None and behind._poll[2] is not None  # joined a batch
    finally:
        release()
    with anyio.fail_after(10):
        await behind
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    assert (out[:4] == 1).all() and (out[4:] == 2).all()


@pytest.mark.usefixtures("keep_queues")
async def test_a_destroyed_streams_queue_leaves_with_it(dev: gpuaio.Device) -> None:
    # The driver may hand its CUstream address to the next stream created:
    # that one must not inherit a queue that learnt the old one's batching
    # (GPU run AT: a sweep test's lone memset joined such a batch).
    s = dev.stream()
    d = dev.empty(64)
    ops = [s.memset(d[i : i + 4], i) for i in range(0, 64, 4)]
    for op in ops:
        await op
    key = s._key
    engine: Any = dev._runtime.engine(dev.ordinal)
    assert key in engine._queues  # kept while the stream lives (RETIRE_S is 60 s here)
    await s.aclose()  # the release runs on the stream's host thread, after it returns
    with anyio.fail_after(10):
        while key in engine._queues:  # noqa: ASYNC110
            await anyio.sleep(0.001)
