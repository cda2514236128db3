"""Stream order holds for host-side effects: one test per defect found in review.

Each test is a repro script of ``shared/repros`` (named in its docstring)
turned into assertions; each failed before the stream sequencer. Ops are
started without awaiting in between, as "start many, await later" invites.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._core.errors import DeviceFatalError
from gpuaio._engine import completion as _completion
from gpuaio._engine.completion._events import EventEngine
from gpuaio._engine.staging import Stager
from tests.conftest import add_one_kernel, fresh_stager, latch
from tests.test_copy import pattern

pytestmark = pytest.mark.anyio

SMALL = 64 << 10  # <= inline_max: the cached-block paths
SIZES = [4096, SMALL, 8 << 20]  # small, small, staged


async def _warm(s: gpuaio.Stream, dev: gpuaio.Device, n: int) -> None:
    """Leave cached pinned blocks, so small copies take the inline paths.

    Pinned ahead: a small upload on an idle stream may be the driver's
    (``GPUAIO_DIRECT_UP_MAX``) and leave no block, and a download that found
    none goes through the host thread, whose block comes back only once its
    event has fired."""
    stager = dev._runtime.stager
    await anyio.to_thread.run_sync(stager.pool.reserve, n, 2)
    d = dev.empty(n)
    host = np.zeros(n, np.uint8)
    await s.copy(d, host)
    await s.copy(host, d)


async def test_d2h_then_h2d_from_the_same_buffer(strategy_dev: gpuaio.Device) -> None:
    """r01: a small pageable D2H, then an H2D from that buffer on the same stream."""
    dev = strategy_dev
    s = dev.stream()
    d_a, d_b = dev.empty(SMALL), dev.empty(SMALL)
    host = np.zeros(SMALL, np.uint8)
    await _warm(s, dev, SMALL)
    out = np.empty(SMALL, np.uint8)
    stale = 0
    for i in range(25):
        v = i + 1
        await s.memset(d_a, v)
        host[:] = 0
        s.copy(host, d_a)  # its copy-out writes host when the op completes
        await s.copy(d_b, host)  # must read what the D2H wrote
        await s.copy(out, d_b)
        stale += not (out == v).all()
    assert stale == 0, f"{stale}/25 H2D copies read the host buffer before the D2H wrote it"
    await s.aclose()


@pytest.mark.parametrize("n", SIZES, ids=["4KiB", "64KiB", "8MiB"])
async def test_wait_orders_host_reads(dev: gpuaio.Device, n: int) -> None:
    """r02: ``s1.wait(s2.record())`` orders s1's pageable read after s2's D2H."""
    s1, s2 = dev.stream(), dev.stream()
    await _warm(s1, dev, n)
    await _warm(s2, dev, n)
    d_a, d_b = dev.empty(n), dev.empty(n)
    host = np.zeros(n, np.uint8)
    await s2.memset(d_a, 7)
    release = latch(dev, s2)
    s2.copy(host, d_a)  # held behind the latch
    s1.wait(s2.record())
    h2d = s1.copy(d_b, host)
    await anyio.sleep(0.02)
    assert not h2d.done()
    release()
    await h2d
    out = np.empty(n, np.uint8)
    await s1.copy(out, d_b)
    assert np.unique(out).tolist() == [7]
    await s1.aclose()
    await s2.aclose()


async def test_synchronize_after_wait_covers_the_other_streams_copy_out(
    dev: gpuaio.Device,
) -> None:
    """``await s1.synchronize()`` after ``s1.wait(ev)``: the host buffer s2 wrote is final."""
    s1, s2 = dev.stream(), dev.stream()
    await _warm(s2, dev, SMALL)
    d = dev.empty(SMALL)
    await s2.memset(d, 9)
    host = np.zeros(SMALL, np.uint8)
    release = latch(dev, s2)
    s2.copy(host, d)
    s1.wait(s2.record())
    sync = s1.synchronize()
    await anyio.sleep(0.02)
    assert not sync.done()
    release()
    await sync
    assert (host == 9).all()
    await s1.aclose()
    await s2.aclose()


async def test_copy_out_lands_before_a_later_host_memset(strategy_dev: gpuaio.Device) -> None:
    """r03, first case: the D2H's copy-out must not overwrite a later host memset."""
    dev = strategy_dev
    s = dev.stream()
    d = dev.empty(SMALL)
    host = np.zeros(SMALL, np.uint8)
    await _warm(s, dev, SMALL)
    await s.memset(d, 1)
    overwritten = 0
    for _ in range(25):
        s.copy(host, d)  # writes 1s
        await s.memset(host, 9)  # later in stream order
        await s.synchronize()
        overwritten += not (host == 9).all()
    assert overwritten == 0, f"{overwritten}/25 host memsets were overwritten by an earlier D2H"
    await s.aclose()


async def test_copy_out_lands_before_a_later_staged_d2h(strategy_dev: gpuaio.Device) -> None:
    """r03, second case: a small D2H, then a host job, then a D2H into the same buffer."""
    dev = strategy_dev
    s = dev.stream()
    d_a, d_big = dev.empty(SMALL), dev.empty(SMALL)
    host = np.zeros(SMALL, np.uint8)
    scratch = np.empty(16, np.uint8)
    await _warm(s, dev, SMALL)
    await s.memset(d_a, 1)
    overwritten = 0
    for _ in range(25):
        await s.memset(d_big, 5)
        s.copy(host, d_a)  # 1s; small, copy-out on completion
        s.memset(scratch, 0)  # a host job: later ops go through the host thread
        await s.copy(host, d_big)  # 5s, later in stream order
        await s.synchronize()
        overwritten += not (host == 5).all()
    assert overwritten == 0, f"{overwritten}/25 later D2H copies were overwritten"
    await s.aclose()


async def test_host_to_host_reads_after_copy_out(dev: gpuaio.Device) -> None:
    """A host-to-host copy from a buffer an earlier small D2H writes sees its data."""
    s = dev.stream()
    await _warm(s, dev, SMALL)
    d = dev.empty(SMALL)
    host, out = np.zeros(SMALL, np.uint8), np.zeros(SMALL, np.uint8)
    stale = 0
    for i in range(25):
        data = pattern(SMALL, i)
        await s.copy(d, data)
        host[:] = 0
        s.copy(host, d)
        await s.copy(out, host)
        stale += not np.array_equal(out, data)
    assert stale == 0, f"{stale}/25 host-to-host copies read before the D2H's copy-out"
    await s.aclose()


async def test_wrappers_of_one_stream_share_its_order(dev: gpuaio.Device) -> None:
    """Two wrappers of one CUstream: a DMA through one waits for a host step of the other."""
    own = dev.stream()
    w1, w2 = dev.wrap_stream(own.handle), dev.wrap_stream(own.handle)
    assert w1._seq is w2._seq is own._seq
    n = 8 << 20
    staged = gpuaio.pinned_empty(n)
    staged[:] = 0
    d = dev.empty(n)
    data = pattern(n, 5)
    release = latch(dev, own)
    w1.copy(staged, data)  # a host step: waits for the latch (after_gpu)
    up = w2.copy(d, staged)  # pinned -> device: must see the host step's data
    await anyio.sleep(0.02)
    release()
    await up
    out = np.empty(n, np.uint8)
    await own.copy(out, d)
    np.testing.assert_array_equal(out, data)
    await own.aclose()


def test_per_thread_default_stream_is_refused(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """g5: gpuaio enqueues from two threads, so it cannot keep a per-thread stream's order."""
    with pytest.raises(gpuaio.InvalidArgumentError, match="per-thread default stream"):
        dev.wrap_stream(2)  # CU_STREAM_PER_THREAD
    monkeypatch.setenv("CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM", "1")
    with pytest.raises(gpuaio.InvalidArgumentError, match="per-thread default stream"):
        dev.wrap_stream(0)  # the null stream is per-thread in this process


@pytest.mark.gpuaio_gpu
@pytest.mark.parametrize("handle", [0, 1], ids=["null", "CU_STREAM_LEGACY"])
async def test_legacy_default_stream_keeps_order(dev: gpuaio.Device, handle: int) -> None:
    """g5 with the legacy default stream: one stream whichever thread enqueues."""
    s = dev.wrap_stream(handle)
    k = add_one_kernel(dev)
    n = 8 << 20
    d = dev.empty(n)
    await s.memset(d, 6)
    release = latch(dev, s)
    s.launch(k, (n + 255) // 256, 256, d, np.uint64(n))  # 7s, behind the latch
    out = np.zeros(n, np.uint8)
    op = s.copy(out, d)  # staged: DMAs enqueued from the host thread
    await anyio.sleep(0.02)
    release()
    await op
    assert np.unique(out).tolist() == [7]


@pytest.mark.gpuaio_sim_only
async def test_failed_marker_on_the_host_thread_keeps_the_buffer(dev: gpuaio.Device) -> None:
    """r21: a marker that fails on the host thread fails the op only after its DMA ran."""
    be = dev._runtime.backend
    s = dev.stream()
    n = 1 << 20
    d = dev.empty(n)
    await s.memset(d, 7)
    dst = gpuaio.pinned_empty(n)
    dst[:] = 0
    release1 = latch(dev, s)
    s.memset(gpuaio.pinned_empty(16), 0)  # a host job: later ops go through the host thread
    await anyio.sleep(0.05)
    release2 = latch(dev, s)  # more GPU work ahead of the copy
    be.fail_next("cuEventRecord")
    op = s.copy(dst, d)  # D2H into pinned memory, enqueued by the host thread
    release1()
    await anyio.sleep(0.1)
    assert not op.done(), "the op failed while its DMA was still queued"
    release2()
    with pytest.raises(gpuaio.CudaError, match="cuEventRecord"):
        await op
    assert (dst == 7).all()  # the DMA ran before the await raised
    dst[:] = 42  # the caller reuses its buffer
    await s.synchronize()
    assert (dst == 42).all()
    await s.aclose()


@pytest.mark.parametrize(
    "settings",
    [
        {"GPUAIO_PINNED_BUDGET": "128K"},
        {"GPUAIO_PINNED_BUDGET": "lots"},
        {"GPUAIO_STAGING_DEPTH": "0"},
    ],
    ids=["budget-below-block", "bad-budget", "depth-0"],
)
async def test_stager_error_releases_the_allocation(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]
) -> None:
    """r15: a copy the stager rejects at the call leaves nothing held: free() frees."""
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    with fresh_stager(dev._runtime):
        s = dev.stream()
        d = dev.empty(200 << 10)
        with pytest.raises(gpuaio.InvalidArgumentError):
            s.copy(d, np.ones(200 << 10, np.uint8))
        alloc = d._alloc
        assert alloc._users == 0
        d.free()
        assert alloc._freed
        await s.aclose()


async def test_cancelled_awaits_leave_no_waiters(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    """r19: an await cancelled while sleeping on its op takes its waiter back."""
    release = latch(dev, stream)
    op = stream.memset(dev.empty(16), 1)
    for _ in range(200):
        with anyio.move_on_after(0.001):
            await op
    assert len(op._waiters or []) == 0
    release()
    await op


def test_waiter_of_a_closed_loop_is_not_woken_by_the_next(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """r17: a loop closed with a task asleep on an op; the next loop on the thread
    resolves that op while awaiting another: its await must not fail."""
    s = dev.stream()
    d = dev.empty(1 << 20)
    release = latch(dev, s)
    op_old = s.memset(d, 1)
    loop1 = asyncio.new_event_loop()
    task = loop1.create_task(op_old.wait())
    loop1.run_until_complete(asyncio.sleep(0.05))  # the task sleeps on op_old
    loop1.close()  # without cancelling it
    # The new loop polls for long, so its poll (not the watcher) resolves op_old.
    monkeypatch.setattr(dev._runtime.engine(0), "loop_spin_s", 2.0)
    outcome: list[object] = []

    async def main() -> None:
        op_new = s.memset(d, 2)  # behind op_old
        threading.Timer(0.1, release).start()
        try:
            await op_new
            outcome.append("ok")
        except Exception as exc:
            outcome.append(exc)
        outcome.append(op_new.done())

    asyncio.run(main())
    assert outcome == ["ok", True]
    del task


class _NoHandOff(EventEngine):
    """The events engine, but an await sleeps at once (no polling window) and
    leaves the watcher standing down (its hand-off is a no-op).

    A subclass, not methods replaced on an engine: where the engine is
    compiled (a native class) they cannot be; the compiled ``Operation.__await__``
    looks ``hand_off`` up on the engine, so it calls this one."""

    strategy = "no-hand-off"
    loop_spin_s = 0.0
    hand_offs = 0

    def hand_off(self) -> None:
        type(self).hand_offs += 1


@pytest.mark.gpuaio_sim_only
@pytest.mark.parametrize("path", ["poll", "watcher"])
def test_no_waiter_is_lost_when_a_sticky_error_follows_a_completion(
    gpuaio_runtime: Any, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op completes just before a sticky fault, and the pass that resolves it
    then finds the fault: its sleeping await must still end (the watcher's
    fault probe runs in the same pass as the drains)."""
    rt = gpuaio_runtime
    monkeypatch.setattr(_completion, "_registered", {})
    monkeypatch.setattr(_NoHandOff, "hand_offs", 0)
    _completion.register_strategy(_NoHandOff.strategy, _NoHandOff)
    rt.set_completion(_NoHandOff.strategy)
    dev = device_of(rt, 0)
    engine: Any = rt.engine(0)
    assert isinstance(engine, _NoHandOff)
    s, other = dev.stream(), dev.stream()
    d = dev.empty(64)
    release = latch(dev, s)
    op = s.memset(d, 1)
    poller = other.memset(dev.empty(64), 2)
    engine._loop_polling_until = time.perf_counter() + 60
    time.sleep(0.05)  # the watcher stands down
    result: list[object] = []

    def await_op() -> None:
        async def main() -> None:
            with anyio.fail_after(5):
                await op
            result.append("returned")

        try:
            anyio.run(main)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=await_op)
    t.start()
    deadline = time.monotonic() + 5
    while not _NoHandOff.hand_offs and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _NoHandOff.hand_offs == 1, "the await did not go to sleep on op"
    release()
    rt.backend.stream_synchronize(s._native)  # op ran: its flag is written
    assert not op.done()
    rt.backend.inject_fault(0, after_ops=0, code=700)
    with contextlib.suppress(DeviceFatalError):
        other.memset(dev.empty(64), 3)  # faults the device
    deadline = time.monotonic() + 5
    while rt.backend._devices[0].fault is None and time.monotonic() < deadline:
        time.sleep(0.001)
    engine._next_probe = 0.0  # the next pass probes after draining
    if path == "poll":
        engine._next_sweep = 0.0
        engine.poll_for(poller)  # a poll from some loop, for another op
    else:
        engine._loop_polling_until = 0.0
        with engine._cv:
            engine._cv.notify()
    t.join(10)
    # Not lost: the await ended. An event marker queried after the fault
    # reports it even though its op ran first (CUDA's sticky errors), so
    # DeviceFatalError is as good an ending as a return.
    assert len(result) == 1, result
    assert result[0] == "returned" or isinstance(result[0], DeviceFatalError), result


MID = 4 << 20  # above inline_max: a host job (the driver's path, or staged)


async def _pending_host_job(s: gpuaio.Stream, op: gpuaio.Operation) -> None:
    """Until ``op``'s host job is stuck on the stream's thread behind held GPU work."""
    deadline = time.perf_counter() + 10
    while not s._seq.executor.busy or op.done():
        assert time.perf_counter() < deadline, "the held copy never occupied the host thread"
        await anyio.sleep(0.005)


@pytest.mark.patches_compiled
async def test_a_small_upload_behind_pending_uploads_reads_on_the_calling_thread(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream kept busy by uploads: a small upload still takes the inline path
    (its source read at the call), and its bytes land after the earlier upload's."""
    s = dev.stream()
    await _warm(s, dev, 4096)
    d = dev.empty(MID)
    big = np.full(MID, 0x11, np.uint8)
    small = np.full(4096, 0x22, np.uint8)
    inline: list[int] = []
    real = Stager._small_h2d

    def spy(self: Stager, seq: Any, op: Any, dd: Any, ss: Any, block: Any) -> Any:
        inline.append(dd.nbytes)
        return real(self, seq, op, dd, ss, block)

    monkeypatch.setattr(Stager, "_small_h2d", spy)
    release = latch(dev, s)
    try:
        first = s.copy(d, big)  # a host job, stuck behind the held GPU work
        await _pending_host_job(s, first)
        second = s.copy(d[:4096], small)
        assert inline == [4096], "a small upload behind a pending upload went to the host thread"
        small[:] = 0x33  # read at the call: this write is not what lands
        await anyio.sleep(0.02)
        assert not second.done(), "the small upload finished before the upload ahead of it"
    finally:
        release()
    await second
    await first
    out = np.empty(MID, np.uint8)
    await s.copy(out, d)
    assert (out[:4096] == 0x22).all(), "the small upload landed before the upload ahead of it"
    assert (out[4096:] == 0x11).all()
    await s.aclose()


async def test_a_small_upload_behind_a_pending_download_reads_what_it_wrote(
    dev: gpuaio.Device,
) -> None:
    """A download into pageable memory is a host action that writes: a small
    upload from that memory behind it must wait for it, as before. So must
    one behind a gated download (``GPUAIO_GATED_MAX``, once its path is
    primed), whose copy-out the copy threads make."""
    s = dev.stream()
    await _warm(s, dev, 4096)
    d_src, d_dst = dev.empty(MID), dev.empty(4096)
    await s.memset(d_src, 0x44)
    host = np.zeros(MID, np.uint8)
    path = dev._runtime.stager.gated
    gated_before = path.downloads if path is not None else 0
    release = latch(dev, s)
    try:
        down = s.copy(host, d_src)  # a host job that writes host, stuck behind the hold
        if path is not None and path.downloads > gated_before:
            assert not down.done()  # gated: no host job, its copy-out waits in the stream
        else:
            await _pending_host_job(s, down)
        up = s.copy(d_dst, host[:4096])  # must read the 0x44s the download writes
        await anyio.sleep(0.02)
        assert not up.done()
    finally:
        release()
    await up
    out = np.zeros(4096, np.uint8)
    await s.copy(out, d_dst)
    assert (out == 0x44).all(), "the small upload read its source before the download wrote it"
    await down
    await s.aclose()
