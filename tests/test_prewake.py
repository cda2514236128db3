"""The watcher wakes a task's loop just before its op is due (``Operation._prewake``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._core.loopport import THREAD_PORT
from gpuaio._core.operation import Operation
from gpuaio._engine.hostwork import byte_view
from tests.conftest import latch
from tests.test_copy import pattern

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class _Port:
    def __init__(self) -> None:
        self.posted: list[Callable[[], None]] = []

    def post(self, cbs: list[Callable[[], None]]) -> None:
        self.posted.extend(cbs)


def test_prewake_wakes_loops_not_threads() -> None:
    """Loop waiters are woken early and taken off the op; a blocked thread's
    waiter stays until completion (it would take the wake for completion)."""
    op = Operation("test", None)
    port = _Port()
    woken: list[str] = []
    loop_cb = lambda: woken.append("loop")  # noqa: E731
    thread_cb = lambda: woken.append("thread")  # noqa: E731
    op._add_waiter((port, loop_cb))  # type: ignore[arg-type]
    op._add_waiter((THREAD_PORT, thread_cb))
    op._prewake()
    assert port.posted == [loop_cb]
    assert op._waiters == [(THREAD_PORT, thread_cb)]
    assert not op.done()
    op._resolve(None)
    assert woken == ["thread"], "the thread waiter was not woken exactly once at completion"


async def test_a_prewoken_await_returns_only_once_the_copy_is_done(
    dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long pinned copy: the watcher wakes the awaiting task ahead of the
    expected time; the task polls, and its await still returns only when the
    copy has completed and the data is there."""
    prewoken: list[Operation] = []
    real = Operation._prewake

    def spy(self: Operation) -> None:
        prewoken.append(self)
        real(self)

    monkeypatch.setattr(Operation, "_prewake", spy)
    n = 64 * MiB  # expected ~1.3 ms at the rates gpuaio assumes
    src = gpuaio.pinned_empty(n)
    src[:] = pattern(n, 3)
    d = dev.empty(n)
    s = dev.stream()
    sim = dev._runtime.backend.name == "sim"
    for i in range(5):
        src[:] = pattern(n, 10 + i)
        op = s.copy(d, src)
        await op
        assert op.done()
        if sim:  # device memory is host memory there: read it the moment await returns
            assert np.array_equal(byte_view(d.ptr, n), src), "await returned before the copy"
    back = gpuaio.pinned_empty(n)
    await s.copy(back, d)
    assert np.array_equal(back, src)
    assert prewoken, "the watcher never woke the awaiting loop ahead of a long copy"
    await s.aclose()


async def test_a_prewoken_task_polls_even_if_the_op_is_not_due_yet(dev: gpuaio.Device) -> None:
    """A task woken early polls from then on, even when its loop woke faster
    than expected and the op is still further off than the polling window:
    going back to sleep would waste the early wake-up (and add another)."""
    s = dev.stream()
    d = dev.empty(4096)
    release = latch(dev, s)
    op = s.memset(d, 1)  # pending behind the latch, watched at once
    assert op._poll is not None
    # Whether the task polled: only a loop's poll (``EventEngine.poll_for``, or
    # its sweep) stamps the op's stream queue, not the watcher's drains, and no
    # other task polls here. Read rather than a spy on ``poll_for``: a compiled
    # engine's methods cannot be replaced on the instance.
    q = op._poll[1]
    polled = q.last_poll
    op._eta = time.perf_counter() + 0.5  # expected far off: the task sleeps
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(op.wait)
            await anyio.sleep(0.05)
            assert q.last_poll == polled, "the task polled for an op due half a second later"
            assert op._waiters, "the task is not asleep on the op"
            op._prewake()
            for _ in range(200):
                await anyio.sleep(0.005)
                if q.last_poll != polled:
                    break
            assert q.last_poll != polled, "the pre-woken task went back to sleep"
            release()
    finally:
        release()
    assert op.done()
    await s.aclose()
