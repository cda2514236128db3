"""Polling for a lone short op before the awaiting task first yields (``_firstpoll``)."""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine.completion import _events, _firstpoll
from gpuaio._engine.completion._firstpoll import EXPLORE, WINDOW, FirstPolls

# Every test here sets the first poll's state or tuning in its module.
pytestmark = [pytest.mark.anyio, pytest.mark.patches_compiled]

asyncio_only = pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])


class _Queue:
    def __init__(self, entries: int) -> None:
        self.entries = [None] * entries


class _Op:
    """What FirstPolls reads of an op: ``_poll`` (engine, queue, batch) and ``_eta``."""

    def __init__(self, queue: _Queue, batch: object = None, eta: float = 1.0) -> None:
        self._poll = (None, queue, batch)
        self._eta = eta


class _Polls:
    """A poll that answers from a script, and counts the calls."""

    def __init__(self) -> None:
        self.answer = True
        self.calls = 0

    def __call__(self, op: Any) -> bool:
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
def test_first_polls_stop_when_they_miss_and_come_back_when_they_find() -> None:
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
        if first._on:
            break
    assert first._on
    calls = polls.calls
    for _ in range(5):
        assert first(_Op(q), now)
    assert polls.calls == calls + 5


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
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, turn: str
) -> None:
    # The watcher stands down (as while loops poll), so the op stays pending
    # after its marker fired, until someone polls for it.
    monkeypatch.setattr(_events, "STAND_DOWN_S", 60.0)
    monkeypatch.setattr(_firstpoll, "FIRST_POLL_RUN_S", 60.0)
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s = dev.stream()
    d = dev.empty(4)
    engine = rt.engine(0)
    engine._loop_polling_until = time.perf_counter() + 60
    await anyio.sleep(0.05)  # the watcher has stood down by now, for 60 s
    op = s.memset(d, 7)
    rt.backend.stream_synchronize(s._native)  # its marker has fired
    assert not op.done()
    # The conditions of a first poll, so that the test cannot pass without one:
    assert op._poll is not None and op._poll[2] is None, "the memset was batched"
    assert list(engine._queues.values()) == [op._poll[1]]
    assert op._eta <= time.perf_counter()
    engine.first_poll._on = True
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
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, direction: str, kib: int
) -> None:
    """A copy staged on the calling thread up to ``POLL_FIRST_MAX`` (16 KiB) has
    a pinned copy's expected duration: awaited once its DMA has run, a 4 KiB
    one returns without yielding, the bytes where they belong (a download's
    copy-out included). A 256 KiB one has none and takes a turn of the loop."""
    from gpuaio._engine import staging

    monkeypatch.setattr(_events, "STAND_DOWN_S", 60.0)
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
    engine = rt.engine(0)
    engine._loop_polling_until = time.perf_counter() + 60
    await anyio.sleep(0.05)  # the watcher has stood down by now, for 60 s
    for q in engine._queues.values():  # no batch probe due: the op gets its own marker
        q.next_probe = time.perf_counter() + 60
    d2 = dev.empty(n)
    op = s.copy(d2, src) if direction == "h2d" else s.copy(out, d)
    rt.backend.stream_synchronize(s._native)  # its DMA has run
    assert not op.done()
    assert op._poll is not None and op._poll[2] is None, "the copy was batched"
    engine.first_poll._on = True
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
