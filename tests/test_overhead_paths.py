"""The per-op fast paths: polling from the loop, the watcher as its backstop, memset checks."""

from __future__ import annotations

import enum
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine.completion import _events, _tuning
from tests.conftest import latch

pytestmark = pytest.mark.anyio


@pytest.mark.usefixtures("long_stand_down")
def test_polls_sweep_the_other_streams(gpuaio_runtime: Any) -> None:
    # While loops poll, the watcher stands down: a poll for one op now and
    # then drains the device's other streams too (ops nobody polls for).
    # It still looks every STAND_DOWN_S; make that long (long_stand_down),
    # or it may resolve the op first (seen on an H200, where synchronizing
    # took that long).
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    busy, slow = dev.stream(), dev.stream()
    d = dev.empty(8)
    # slow's work is enqueued before busy's. CUDA maps streams onto a few
    # hardware queues, and two streams may share one; a queue runs its work
    # in the order it was enqueued. Had busy's memset (held by busy's latch)
    # been queued first, slow's memset could wait behind it and never run.
    hold_slow = latch(dev, slow)
    other = slow.memset(d[4:], 3)
    hold_busy = latch(dev, busy)
    busy_op = busy.memset(d[:4], 1)
    resolved_on: list[int] = []
    other._add_done_callback(lambda: resolved_on.append(threading.get_ident()))
    engine = rt.engine(0)
    engine._loop_polling_until = time.perf_counter() + 60  # as if loops polled
    time.sleep(0.05)  # the watcher has stood down by now, for 60 s
    hold_slow()
    rt.backend.stream_synchronize(slow._native)  # the op has run
    assert not other.done()
    # On a GPU the latch is a launch, and the memset after it shares a marker
    # with the short ops that may follow (gpuaio._engine.completion._queue):
    # with nobody polling for it, a sweep places that marker once the batch
    # is BATCH_AGE_S old, and the next sweep finds it fired.
    time.sleep(_tuning.BATCH_AGE_S)
    for _ in range(2):
        engine._next_sweep = 0.0
        assert not engine.poll_for(busy_op)
        time.sleep(2 * _tuning.LOOP_SWEEP_S)  # a sweep drains each stream once per LOOP_SWEEP_S
    assert other.done() and resolved_on == [threading.get_ident()]
    resolved = threading.Event()
    busy_op._add_done_callback(resolved.set)
    hold_busy()
    engine.hand_off()  # nobody polls any more: the watcher takes over
    assert resolved.wait(10)
    busy.close()
    slow.close()


@pytest.mark.patches_compiled
@pytest.mark.usefixtures("keep_queues")  # the stream's queue stays the one its ops are in
@pytest.mark.usefixtures("long_stand_down")
def test_a_poll_that_finds_its_op_done_keeps_sweeps_off_its_stream(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that finds its op resolved (by a drain of its stream since its await
    began) counts as polling that stream: sweeps leave it alone for
    ``LOOP_SWEEP_S``. With 1,000 tasks, nine in ten sweep drains found nothing
    new, because the streams' polls found their ops done and said nothing."""
    # A long sweep period: between the two polls below this thread may lose
    # the CPU for a while on a loaded machine, and must not outlast it.
    sweep_s = 0.1
    monkeypatch.setattr(_events, "LOOP_SWEEP_S", sweep_s)
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s, t = dev.stream(), dev.stream()
    d = dev.empty(64)
    first, elsewhere = s.memset(d, 1), t.memset(d, 1)
    engine = rt.engine(0)
    for stream, op in ((s, first), (t, elsewhere)):
        rt.backend.stream_synchronize(stream._native)
        engine.drain_for(op)
        assert op.done()
    hold = latch(dev, s)
    pending = s.memset(d, 2)  # keeps the stream's queue non-empty: sweeps look at it
    engine._loop_polling_until = time.perf_counter() + 60  # as if loops polled
    time.sleep(0.05)  # the watcher has stood down by now, for 60 s
    deadline = time.monotonic() + 10
    while pending._poll is None and time.monotonic() < deadline:
        time.sleep(0.001)  # queued on the stream's host thread, behind the latch's launch
    q = first._poll[1]
    # Not retired while empty (on a GPU the latch took longer than RETIRE_S):
    # the sweeps must look at this queue, or the test proves nothing.
    assert engine._queues.get(s._key) is q and pending._poll is not None
    loop = threading.get_ident()
    drains: list[object] = []
    drain = type(q).drain

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        if self is q and threading.get_ident() == loop:
            drains.append(self)
        drain(self, *args, **kwargs)

    monkeypatch.setattr(type(q), "drain", counted)
    time.sleep(2 * sweep_s)  # the stream was last drained long ago
    engine._next_sweep = time.perf_counter() + 60
    assert engine.poll_for(first)  # found done: no sweep due
    engine._next_sweep = 0.0
    assert engine.poll_for(elsewhere)  # a sweep, just after that poll
    assert drains == [], "a sweep drained a stream a task had just found drained"
    time.sleep(2 * sweep_s)
    engine._next_sweep = 0.0
    assert engine.poll_for(elsewhere)  # a sweep by a poll for another stream's op
    assert drains == [q], "no poll lately: the sweep drains the stream"
    hold()
    engine.hand_off()
    # On a GPU the memset waits in the open batch: the first drain places its
    # marker, a later one finds it fired.
    deadline = time.monotonic() + 10
    while not pending.done() and time.monotonic() < deadline:
        engine.drain_for(pending)
        time.sleep(0.001)
    assert pending.done()
    s.close()
    t.close()


@pytest.mark.parametrize("after", [0.0, 0.005], ids=["while-polling", "while-sleeping"])
async def test_cancelled_await_hands_the_op_back(
    stream: gpuaio.Stream, dev: gpuaio.Device, after: float
) -> None:
    release = latch(dev, stream)
    d = dev.empty(16)
    op = stream.memset(d, 7)
    with anyio.move_on_after(after) as scope:
        await op
    assert scope.cancelled_caught and not op.done()
    resolved = threading.Event()
    op._add_done_callback(resolved.set)
    release()
    # Nobody awaits it now: the watcher resolves it (and releases d).
    assert await anyio.to_thread.run_sync(resolved.wait, 10)
    out = np.empty(16, np.uint8)
    await stream.copy(out, d)
    assert (out == 7).all()


async def test_unawaited_op_completes_while_a_loop_polls(dev: gpuaio.Device) -> None:
    # While loops poll, new ops do not wake the watcher: the sweeps find them.
    busy, other = dev.stream(), dev.stream()
    d = dev.empty(8)
    done: list[float] = []
    orphan = other.memset(d[4:], 3)
    orphan._add_done_callback(lambda: done.append(time.perf_counter()))
    with anyio.fail_after(10):
        while not done:
            await busy.memset(d[:4], 1)  # keeps this loop polling
    assert orphan.exception() is None
    busy.close()
    other.close()


async def test_many_tasks_resolve_every_op(dev: gpuaio.Device) -> None:
    streams = [dev.stream() for _ in range(4)]
    d = dev.empty(4 * 200)
    seen: list[int] = []

    async def worker(i: int) -> None:
        part = d[4 * i : 4 * i + 4]
        for j in range(5):
            await streams[i % 4].memset(part, j)
        seen.append(i)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(worker, i)
    assert sorted(seen) == list(range(200))
    out = np.empty(4 * 200, np.uint8)
    await streams[0].synchronize()
    for s in streams[1:]:
        await s.synchronize()
    await streams[0].copy(out, d)
    assert (out == 4).all()
    assert dev._runtime.engine(0).pending() == 0
    for s in streams:
        s.close()


class _Small(enum.IntEnum):
    SEVEN = 7


@pytest.mark.parametrize(
    ("value", "width", "expected"),
    [
        (np.uint8(7), None, 7),
        (_Small.SEVEN, 1, 7),
        (-1, np.int64(4), 0xFFFFFFFF),
        (0x1234, np.int32(2), 0x1234),
        (-128, 1, 0x80),
    ],
)
async def test_memset_accepts_int_like_values_and_widths(
    stream: gpuaio.Stream, dev: gpuaio.Device, value: Any, width: Any, expected: int
) -> None:
    w = 1 if width is None else int(width)
    d = dev.empty(16)
    await stream.memset(d, value, width=width)
    out = np.empty(16, np.uint8)
    await stream.copy(out, d)
    assert (out.view(f"<u{w}") == expected).all()


@pytest.mark.parametrize(
    ("value", "width", "match"),
    [
        (True, None, "must be an int"),
        (np.bool_(False), 1, "must be an int"),
        (1.0, None, "must be an int"),
        (1, True, "width must be 1, 2 or 4"),
        (1, np.float32(2), "width must be 1, 2 or 4"),
        (1, 3, "width must be 1, 2 or 4"),
        (256, 1, "does not fit"),
        (-129, 1, "does not fit"),
        (1 << 32, 4, "does not fit"),
    ],
)
def test_memset_rejects_before_enqueueing(
    gpuaio_stream: gpuaio.Stream, gpuaio_device: gpuaio.Device, value: Any, width: Any, match: str
) -> None:
    d = gpuaio_device.empty(16)
    engine = gpuaio_device._runtime.engine(0)
    with pytest.raises(gpuaio.InvalidArgumentError, match=match):
        gpuaio_stream.memset(d, value, width=width)
    assert engine.pending() == 0


async def test_op_watched_after_its_await_slept_is_not_left_to_a_standing_down_watcher(
    gpuaio_runtime: Any,
) -> None:
    """An op queued behind a host step is watched only once the step ran; a task
    that awaited it sleeps with nobody to hand it to. While loops elsewhere poll,
    the watcher stands down (20 ms at a time); when the op is watched it must take
    it up at once, not leave it to sweeps that stop when those loops stop polling
    (awaits of host-step ops took 13-19 ms on an H200)."""
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s = dev.stream()
    release = latch(dev, s)
    s.memset(np.empty(16, np.uint8), 0)  # a host step: waits for the latch
    op = s.memset(dev.empty(16), 1)  # queued behind it on the host thread
    engine = rt.engine(0)
    assert op._poll is None  # not watched yet
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(op.wait)
            await anyio.sleep(0.05)  # the await sleeps, handed to nobody
            engine._loop_polling_until = time.perf_counter() + 60  # as if loops polled
            release()
    assert op.done()
    s.close()


def test_a_hand_off_while_the_watcher_decides_to_stand_down_wakes_it(
    gpuaio_runtime: Any,
) -> None:
    """The watcher decides to stand down (loops poll) and goes to sleep, both
    under the engine's lock. A task that stops polling in between resets the
    stand-down and must wake it. Before the fix ``hand_off`` looked for a
    sleeping watcher without the lock, found none (it was not asleep yet) and
    woke nobody: the watcher slept on, up to FAULT_PROBE_S, with nobody
    sweeping for the task's op."""
    rt = gpuaio_runtime
    rt.set_completion("events")
    engine: Any = rt.engine(0)
    assert engine._watcher is None  # no op watched yet: this test plays the watcher
    with engine._cv:
        engine._loop_polling_until = time.perf_counter() + 60
        assert time.perf_counter() < engine._loop_polling_until  # loops poll: stand down
        t = threading.Thread(target=engine.hand_off)  # a task stops polling, now
        t.start()
        t.join(0.2)
        engine._sleeping = True
        try:
            woken = engine._cv.wait(10)
        finally:
            engine._sleeping = False
    t.join(10)
    assert woken
    assert engine._loop_polling_until == 0.0


def _count_waits_and_stand_down(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Record the timeout of each sleep of ``engine``'s watcher from now (until
    the test ends), and have it decide again as if loops polled: it stands down."""
    waits: list[float | None] = []
    real_wait = engine._wait

    def counting_wait(timeout: float | None) -> bool:
        waits.append(timeout)
        return bool(real_wait(timeout))

    monkeypatch.setattr(engine, "_wait", counting_wait)
    # Both under the lock, under which the watcher decides to stand down and
    # goes to sleep: the notify then wakes only a sleep decided before loops
    # "polled". Set before taking the lock, it could wake the very stand-down
    # it caused (a CI run saw that): the test saw the watcher asleep for 60 s
    # while it was already woken, and about to find the loops gone.
    with engine._cv:
        engine._loop_polling_until = time.perf_counter() + 60  # as if loops polled
        engine._cv.notify()  # whatever the watcher does now, it decides again
    return waits


@pytest.mark.patches_compiled
@pytest.mark.usefixtures("long_stand_down")
def test_the_watcher_sleeps_through_fault_probes_while_loops_poll(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While loops poll, they probe for sticky errors in their sweeps, so the
    standing-down watcher sleeps a whole STAND_DOWN_S. It used to wake for every
    fault probe (each FAULT_PROBE_S, 5 ms). A thread woken while a loop is busy
    then waits for the GIL, and is woken for nothing each time the loop lets go
    of it (every turn): on the CPU machine that cost the loop 3 us a turn, half
    the time, and a lone awaited memset took 16 us instead of 10."""
    rt = gpuaio_runtime
    rt.set_completion("events")
    dev = device_of(rt, 0)
    s = dev.stream()
    release = latch(dev, s)
    op = s.memset(dev.empty(4), 1)  # pending: the watcher has a stream to watch
    engine: Any = rt.engine(0)
    waits = _count_waits_and_stand_down(engine, monkeypatch)
    time.sleep(0.3)  # 60 fault probes' worth
    assert waits, "the watcher never went back to sleep"
    assert len(waits) <= 3, f"the watcher woke {len(waits)} times while loops polled"
    assert waits[-1] == 60.0
    release()
    engine.hand_off()  # nobody polls any more: the watcher takes over
    deadline = time.perf_counter() + 10
    while not op.done():
        assert time.perf_counter() < deadline, "the op was never resolved"
        time.sleep(0.001)
    s.close()


@pytest.mark.patches_compiled
@pytest.mark.usefixtures("long_stand_down")
def test_an_op_started_after_loops_paused_leaves_the_standing_down_watcher_asleep(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op started after the loops stopped polling a while (LOOP_COVER_S)
    used to wake the standing-down watcher: a futex wake-up from the loop, and
    the GIL, which the woken watcher takes at the loop's next I/O poll, for a
    pass that found nothing. On an H100 an awaited 4 KiB or 1 MiB copy after
    1 ms of Python took a median 27 us longer than a hand-written await
    without it, 16 us with the watcher left asleep (run HA). Its sleep ends
    by itself, and the task that awaits the op polls for it (or hands it
    off): the op still lands, byte-exact."""
    rt = gpuaio_runtime
    rt.set_completion("events")
    dev = device_of(rt, 0)
    s = dev.stream()
    release = latch(dev, s)  # hands the handle out: every op has a marker of its own
    s.memset(dev.empty(4), 1)  # pending: the watcher has a stream to watch
    engine: Any = rt.engine(0)
    waits = _count_waits_and_stand_down(engine, monkeypatch)
    deadline = time.perf_counter() + 10
    while not (waits and waits[-1] == 60.0 and engine._sleeping):
        assert time.perf_counter() < deadline, "the watcher never stood down"
        time.sleep(0.001)
    woken = len(waits)
    engine._loop_polling_until = 0.0  # the loops paused: none has polled since
    d = dev.empty(4)
    op = s.memset(d, 7)  # watched now, behind the latch
    assert op._poll is not None and op._poll[2] is None  # watched, not batched
    time.sleep(0.1)
    assert len(waits) == woken and engine._sleeping, "the new op woke the watcher"
    release()

    async def await_it() -> np.ndarray[Any, Any]:
        with anyio.fail_after(10):
            await op  # polled for from this loop: the watcher sleeps on
            out = np.zeros(4, np.uint8)
            await s.copy(out, d)
        return out

    assert anyio.run(await_it).tolist() == [7, 7, 7, 7]
    s.close()
