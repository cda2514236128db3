"""Polling for a lone short op without yielding (``_firstpoll``): first polls,
before the awaiting task first yields, and tail spins, after it."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine.completion import _firstpoll
from gpuaio._engine.completion._firstpoll import EXPLORE, WINDOW, FirstPolls, TailSpins
from tests.conftest import latch

# Every test here sets the first poll's state or tuning in its module.
pytestmark = [pytest.mark.anyio, pytest.mark.patches_compiled]

asyncio_only = pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])


class _Queue:
    def __init__(self, entries: int) -> None:
        self.entries = [None] * entries


class _Op:
    """What FirstPolls and TailSpins read of an op: ``_poll`` (engine, queue,
    batch), ``_eta`` and ``_est``."""

    def __init__(
        self, queue: _Queue, batch: object = None, eta: float = 1.0, est: float = 1e-7
    ) -> None:
        self._poll = (None, queue, batch)
        self._eta = eta
        self._est = est


class _Polls:
    """A poll that answers from a script, and counts the calls."""

    def __init__(self) -> None:
        self.answer = True
        self.calls = 0

    def __call__(self, op: Any, gap: float = 1.0) -> bool:
        self.calls += 1
        return self.answer


@pytest.fixture
def recent_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this thread's loop had just yielded (and a long run were allowed)."""
    monkeypatch.setattr(_firstpoll, "FIRST_POLL_RUN_S", 60.0)
    monkeypatch.setattr(_firstpoll._turn, "at", time.perf_counter())


@pytest.mark.usefixtures("recent_turn")
def test_only_a_lone_due_op_of_a_lone_stream_is_polled_first() -> None:
    polls = _Polls()
    q = _Queue(1)
    queues = {1: q}
    first = FirstPolls(polls, queues)
    now = time.perf_counter()
    assert first(_Op(q), now) and polls.calls == 1
    # Each of these would take a poll from other tasks' work, or find nothing:
    assert not first(_Op(q, batch=object()), now)  # batched: a poll would seal the batch
    assert not first(_Op(q, eta=now + 1.0), now)  # not due by its estimate
    assert not first(_Op(q, eta=0.0), now)  # of unknown length (a kernel: no estimate)
    assert not first(_Op(_Queue(2)), now)  # its stream has other work pending
    queues[2] = _Queue(0)
    assert not first(_Op(q), now)  # another stream is in use
    assert polls.calls == 1


def test_a_loop_that_has_not_yielded_for_a_while_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each await that finds its op done at the first poll returns without
    # yielding; the loop's other tasks must still run every FIRST_POLL_RUN_S.
    run_s = 0.5
    monkeypatch.setattr(_firstpoll, "FIRST_POLL_RUN_S", run_s)
    polls = _Polls()
    q = _Queue(1)
    first = FirstPolls(polls, {1: q})
    t = 1000.0
    monkeypatch.setattr(_firstpoll._turn, "at", 0.0)
    assert not first(_Op(q), t)  # never yielded: yield now (and that counts as one)
    assert first(_Op(q), t + 0.1)
    assert first(_Op(q), t + 0.4)
    assert not first(_Op(q), t + run_s)  # 0.5 s since the last yield
    assert first(_Op(q), t + run_s + 0.1)
    assert polls.calls == 3


@pytest.mark.usefixtures("recent_turn")
def test_first_polls_stop_when_they_miss_and_come_back_when_they_find(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_firstpoll, "FIRST_SPIN_S", 0.0)  # one query per first poll
    polls = _Polls()
    q = _Queue(1)
    first = FirstPolls(polls, {1: q})
    now = time.perf_counter()
    polls.answer = False
    for _ in range(WINDOW):  # a whole window of misses
        assert not first(_Op(q), now)
    assert polls.calls == WINDOW
    for _ in range(10 * EXPLORE):  # off: one eligible await in EXPLORE still polls
        first(_Op(q), now)
    assert polls.calls == WINDOW + 10
    # A third of a window finding ops done is enough to poll first again.
    polls.answer = True
    for _ in range(2 * WINDOW * EXPLORE):
        first(_Op(q), now)
        if first.window.on:
            break
    assert first.window.on
    calls = polls.calls
    for _ in range(5):
        assert first(_Op(q), now)
    assert polls.calls == calls + 5


def _spin_of(
    kind: type[FirstPolls] | type[TailSpins], setting: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[_Polls, Any, _Queue]:
    """One spin of a ``kind`` (its length, module constant ``setting``, set to
    20 ms) for a short op that is never done: it polls on (many polls) until
    the spin ends, then gives up; a slow machine may overrun it by a
    scheduler slice, never stop short. Returns the polls, spinner and queue."""
    spin_s = 0.02
    monkeypatch.setattr(_firstpoll, setting, spin_s)
    polls = _Polls()
    polls.answer = False
    q = _Queue(1)
    spinner = kind(polls, {1: q})
    t0 = time.perf_counter()
    assert not spinner(_Op(q), t0)
    took = time.perf_counter() - t0
    assert polls.calls > 1
    assert spin_s <= took < spin_s + 0.5
    return polls, spinner, q


@pytest.mark.usefixtures("recent_turn")
def test_a_short_op_not_done_at_its_first_poll_is_polled_on_for_first_spin_s_at_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    polls, first, q = _spin_of(FirstPolls, "FIRST_SPIN_S", monkeypatch)
    # Not a short op: its first poll is one query, as is any with no spin set.
    polls.calls = 0
    assert not first(_Op(q, est=2 * _firstpoll.SHORT_OP_S), time.perf_counter())
    assert polls.calls == 1
    monkeypatch.setattr(_firstpoll, "FIRST_SPIN_S", 0.0)  # GPUAIO_FIRST_SPIN_US=0
    assert not first(_Op(q), time.perf_counter())
    assert polls.calls == 2


@pytest.mark.usefixtures("recent_turn")
def test_a_first_spin_ends_when_the_op_is_found_and_counts_as_a_find(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_firstpoll, "FIRST_SPIN_S", 60.0)  # only a find ends it

    class DoneAtFifth(_Polls):
        def __call__(self, op: Any, gap: float = 1.0) -> bool:
            self.calls += 1
            return self.calls % 5 == 0

    polls = DoneAtFifth()
    q = _Queue(1)
    first = FirstPolls(polls, {1: q})
    for i in range(2 * WINDOW):  # two windows of ops found by their spins
        assert first(_Op(q), time.perf_counter())
        assert polls.calls == 5 * (i + 1)
    assert first.window.on, "spins that found every op turned first polls off"


def _step(gen: Generator[Any, None, None]) -> bool:
    """Run an await's generator one step: True if it yielded, False if it returned."""
    try:
        gen.send(None)
    except StopIteration:
        return False
    return True


@asyncio_only
@pytest.mark.parametrize("turn", ["recent", "long ago"])
async def test_an_await_of_a_lone_op_already_done_yields_only_when_the_loop_is_due_a_turn(
    gpuaio_runtime: Any, long_stand_down: Any, monkeypatch: pytest.MonkeyPatch, turn: str
) -> None:
    # The watcher stands down (as while loops poll), so the op stays pending
    # after its marker fired, until someone polls for it.
    monkeypatch.setattr(_firstpoll, "FIRST_POLL_RUN_S", 60.0)
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s = dev.stream()
    d = dev.empty(4)
    engine = long_stand_down
    engine._loop_polling_until = time.perf_counter() + 60
    await anyio.sleep(0.05)  # the watcher has stood down by now, for 60 s
    op = s.memset(d, 7)
    rt.backend.stream_synchronize(s._native)  # its marker has fired
    assert not op.done()
    # The conditions of a first poll, so that the test cannot pass without one:
    assert op._poll is not None and op._poll[2] is None, "the memset was batched"
    assert list(engine._queues.values()) == [op._poll[1]]
    assert op._eta <= time.perf_counter()
    engine.first_poll.window.on = True
    # "Long ago" is minus infinity, not 0.0: perf_counter() counts from the
    # machine's boot, and a GPU machine may run this test less than
    # FIRST_POLL_RUN_S (60 s here) after it (run BQ failed so).
    _firstpoll._turn.at = time.perf_counter() if turn == "recent" else -math.inf
    gen = op.__await__()
    if turn == "recent":
        assert not _step(gen), "the await yielded for an op found done at its first poll"
    else:
        assert _step(gen), "the await did not yield, and the loop had not had a turn"
        assert not _step(gen)
    assert op.done()
    out = np.zeros(4, np.uint8)
    await s.copy(out, d)
    assert out.tobytes() == b"\x07" * 4
    s.close()


@asyncio_only
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.parametrize("kib", [4, 256])
async def test_a_small_staged_copy_already_done_is_found_at_its_first_poll(
    gpuaio_runtime: Any,
    long_stand_down: Any,
    monkeypatch: pytest.MonkeyPatch,
    direction: str,
    kib: int,
) -> None:
    """A copy staged on the calling thread up to ``POLL_FIRST_MAX`` (16 KiB) has
    a pinned copy's expected duration: awaited once its DMA has run, a 4 KiB
    one returns without yielding, the bytes where they belong (a download's
    copy-out included). A 256 KiB one has none and takes a turn of the loop."""
    from gpuaio._engine import staging

    monkeypatch.setattr(_firstpoll, "FIRST_POLL_RUN_S", 60.0)
    assert 4096 <= staging.POLL_FIRST_MAX < 256 * 1024 <= gpuaio_runtime.stager.config.inline_max
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s = dev.stream()
    n = kib * 1024
    d = dev.empty(n)
    src = np.frombuffer(np.random.default_rng(kib).bytes(n), np.uint8).copy()
    out = np.zeros(n, np.uint8)
    await gpuaio.reserve_pinned(n)  # a block of this size is cached now
    await s.copy(d, src)
    engine = long_stand_down
    engine._loop_polling_until = time.perf_counter() + 60
    await anyio.sleep(0.05)  # the watcher has stood down by now, for 60 s
    for q in engine._queues.values():  # no batch probe due: the op gets its own marker
        q.next_probe = time.perf_counter() + 60
    d2 = dev.empty(n)
    op = s.copy(d2, src) if direction == "h2d" else s.copy(out, d)
    rt.backend.stream_synchronize(s._native)  # its DMA has run
    assert not op.done()
    assert op._poll is not None and op._poll[2] is None, "the copy was batched"
    engine.first_poll.window.on = True
    _firstpoll._turn.at = time.perf_counter()
    gen = op.__await__()
    if kib == 4:
        assert not _step(gen), "the await yielded for a copy found done at its first poll"
    else:
        assert _step(gen), "a 256 KiB staged copy was polled for before a turn of the loop"
        assert not _step(gen)
    assert op.done()
    if direction == "d2h":
        assert np.array_equal(out, src), "the copy-out did not run when the copy was found done"
    else:
        await s.copy(out, d2)
        assert np.array_equal(out, src)
    s.close()


# -- tail spins ---------------------------------------------------------


def test_only_a_lone_short_due_op_is_spun_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_firstpoll, "TAIL_SPIN_S", 60.0)  # a spin that starts finds it
    polls = _Polls()
    q = _Queue(1)
    queues = {1: q}
    spins = TailSpins(polls, queues)
    now = time.perf_counter()
    assert spins(_Op(q), now) and polls.calls == 1
    assert not spins(_Op(q, batch=object()), now)  # batched
    assert not spins(_Op(q, eta=now + 1.0), now)  # not due by its estimate
    assert not spins(_Op(q, est=0.0), now)  # of unknown length (a kernel)
    assert not spins(_Op(q, est=2 * _firstpoll.SHORT_OP_S), now)  # not a short op
    assert not spins(_Op(_Queue(2)), now)  # its stream has other work pending
    queues[2] = _Queue(0)
    assert not spins(_Op(q), now)  # another stream is in use
    del queues[2]
    monkeypatch.setattr(_firstpoll, "TAIL_SPIN_S", 0.0)  # GPUAIO_TAIL_SPIN_US=0
    assert not spins(_Op(q), now)
    assert polls.calls == 1


def test_a_spin_polls_on_for_tail_spin_s_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    _spin_of(TailSpins, "TAIL_SPIN_S", monkeypatch)


def test_spins_stop_when_they_miss_and_come_back_when_they_find(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_firstpoll, "TAIL_SPIN_S", 1e-4)
    polls = _Polls()
    q = _Queue(1)
    spins = TailSpins(polls, {1: q})
    polls.answer = False
    for _ in range(WINDOW):  # a whole window of missed spins
        assert not spins(_Op(q), time.perf_counter())
    assert not spins.window.on
    calls = polls.calls
    for _ in range(EXPLORE - 1):  # off: only one eligible await in EXPLORE spins
        assert not spins(_Op(q), time.perf_counter())
    assert polls.calls == calls
    polls.answer = True
    for _ in range(2 * WINDOW * EXPLORE):
        spins(_Op(q), time.perf_counter())
        if spins.window.on:
            break
    assert spins.window.on


class _Resume:
    """Awaits the rest of an await's generator already stepped into."""

    def __init__(self, gen: Generator[Any, None, None]) -> None:
        self._gen = gen

    def __await__(self) -> Generator[Any, None, None]:
        return self._gen


async def _copies_of_4k(rt: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Device 0, a new stream, 4 KiB of random pinned bytes and a device
    buffer they were copied to once (the engine is up): the lone copies the
    integration tests below await; and the device's engine."""
    dev = device_of(rt, 0)
    s = dev.stream()
    src = gpuaio.pinned_empty(4096)
    src[:] = np.random.default_rng(5).integers(0, 256, src.nbytes, dtype=np.uint8)
    d = dev.empty(src.nbytes)
    await s.copy(d, src)
    return dev, s, src, d, rt.engine(0)


@asyncio_only
@pytest.mark.parametrize("completes", ["during the spin", "after it"])
async def test_a_lone_op_completing_after_the_poll_past_a_yield_is_found_by_a_spin(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, completes: str
) -> None:
    """A lone short op that the first poll after its task's yield finds not
    done is polled on for, once per await, without yielding: found done within
    the spin, the await returns without a second turn of the loop; not done
    by its end, the await goes on as before, and does not spin again."""
    spin_s = 0.3
    monkeypatch.setattr(_firstpoll, "TAIL_SPIN_S", spin_s)
    dev, s, src, d, engine = await _copies_of_4k(gpuaio_runtime)
    n = src.nbytes
    spins = engine.tail_spin
    spins.window.on = True
    calls: list[bool] = []

    def counted(op: Any, now: float) -> bool:
        calls.append(spins(op, now))
        return calls[-1]

    monkeypatch.setattr(engine, "tail_spin", counted)
    # The await polls on, yielding, however long the spin and the test take
    # (past the polling window it would sleep until woken).
    monkeypatch.setattr(engine, "loop_spin_s", 60.0)
    release = latch(dev, s)
    op = s.copy(d, src)
    assert op._poll is not None and op._poll[2] is None, "the copy was batched"
    assert list(engine._queues.values()) == [op._poll[1]]
    assert 0.0 < op._est <= _firstpoll.SHORT_OP_S
    gen = op.__await__()
    assert _step(gen), "the await of an op on a held stream did not yield"
    assert not calls, "a spin before the task's first yield"
    opened = threading.Timer(0.05, release) if completes == "during the spin" else None
    t0 = time.perf_counter()
    if opened is not None:
        opened.start()
    yielded = _step(gen)
    took = time.perf_counter() - t0
    if opened is not None:
        opened.join()
        assert not yielded, "the await yielded for an op that completed during its spin"
        assert took < spin_s, "the spin did not end when the op was found done"
        assert op.done() and calls == [True]
    else:
        assert yielded, "the await returned for an op still held"
        assert took >= spin_s and calls == [False], "no spin, or one cut short"
        release()
        await _Resume(gen)
        assert calls == [False], "a second spin in one await"
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    assert np.array_equal(out, src)
    s.close()


@asyncio_only
async def test_a_lone_op_completing_just_after_its_call_is_found_before_the_task_yields(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone short op not yet done at its first poll, as a small copy on a GPU
    never is, is polled on for (``FIRST_SPIN_S``) before the task's first
    yield: found done within the spin, the await returns without a turn of
    the loop (before, it yielded and the first query came a turn later)."""
    spin_s = 0.3
    monkeypatch.setattr(_firstpoll, "FIRST_SPIN_S", spin_s)
    monkeypatch.setattr(_firstpoll, "FIRST_POLL_RUN_S", 60.0)
    dev, s, src, d, engine = await _copies_of_4k(gpuaio_runtime)
    n = src.nbytes
    engine.first_poll.window.on = True
    monkeypatch.setattr(engine, "loop_spin_s", 60.0)  # polls, however slow the test
    release = latch(dev, s)
    op = s.copy(d, src)
    assert op._poll is not None and op._poll[2] is None, "the copy was batched"
    assert list(engine._queues.values()) == [op._poll[1]]
    assert 0.0 < op._est <= _firstpoll.SHORT_OP_S
    monkeypatch.setattr(_firstpoll._turn, "at", time.perf_counter())  # the loop just yielded
    opened = threading.Timer(0.05, release)
    gen = op.__await__()
    t0 = time.perf_counter()
    opened.start()
    yielded = _step(gen)
    took = time.perf_counter() - t0
    opened.join()
    assert not yielded, "the await yielded for an op that completed during its first spin"
    assert took < spin_s, "the spin did not end when the op was found done"
    assert op.done()
    out = np.zeros(n, np.uint8)
    await s.copy(out, d)
    assert np.array_equal(out, src)
    s.close()
