"""The completion watcher rests without waking while no op is pending.

Every pass of the watcher thread takes the GIL, which an event loop busy on
other work then waits for. After it resolved an op, the watcher used to spin
(a pass every 10 us for ``SPIN_S``) and back off (a pass every 20-250 us)
until its stream's queue retired, ``RETIRE_S`` after the last op: about a
hundred passes with nothing to find (issue 13, round forty-six). Now it
sleeps until the queue may retire, or a new op wakes it.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from gpuaio._api.device import device_of
from gpuaio._engine import completion as _completion
from gpuaio._engine.completion import _queue
from gpuaio._engine.completion._events import EventEngine, _Pace
from gpuaio._engine.completion._queue import StreamQueue
from gpuaio._engine.completion._tuning import RETIRE_S


class _CountedPasses(EventEngine):
    """The events engine with no polling window (an await sleeps at once and
    the watcher resolves its op), counting the watcher's passes.

    A subclass, not a method replaced on an engine: a compiled engine is a
    native class, whose compiled ``_run`` still calls this ``_pass``."""

    strategy = "counted-passes"
    loop_spin_s = 0.0
    passes = 0

    def _pass(self, queues: list[tuple[int, StreamQueue]], pace: _Pace) -> bool:
        type(self).passes += 1
        return super()._pass(queues, pace)


@pytest.fixture
def counted(gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    rt = gpuaio_runtime
    monkeypatch.setattr(_completion, "_registered", {})
    monkeypatch.setattr(_CountedPasses, "passes", 0)
    _completion.register_strategy(_CountedPasses.strategy, _CountedPasses)
    rt.set_completion(_CountedPasses.strategy)
    return rt


@pytest.mark.parametrize("retire_s", [None, 60.0])
def test_the_watcher_makes_no_pass_while_nothing_is_pending(
    counted: Any, retire_s: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ops the watcher resolved, then a pause before the stream's queue may
    retire: the watcher passes at most once in it (it made dozens of passes
    before); then a new op still completes at once.

    Also where queues are kept longer (``_queue.RETIRE_S`` patched, as some
    tests do) and the pause outlasts the default: the rest lasts until the
    queue's own retire time, not a spin past a deadline the queue does not keep."""
    pause = RETIRE_S * 0.6
    if retire_s is not None:
        monkeypatch.setattr(_queue, "RETIRE_S", retire_s)
        pause = RETIRE_S * 1.5  # past the default's retire time
    dev = device_of(counted, 0)
    s = dev.stream()
    d = dev.empty(1 << 16)
    engine: Any = counted.engine(0)
    assert isinstance(engine, _CountedPasses)

    async def main() -> tuple[int, int]:
        for i in range(5):
            with anyio.fail_after(10):
                await s.memset(d, i)
        assert _CountedPasses.passes > 0, "the watcher resolved none of the ops"
        before = _CountedPasses.passes
        await anyio.sleep(pause)
        during = _CountedPasses.passes - before
        t0 = time.perf_counter()
        with anyio.fail_after(10):
            await s.memset(d, 7)  # the resting watcher is woken for it
        return during, int((time.perf_counter() - t0) * 1e3)

    during, ms = anyio.run(main)
    assert during <= 1, f"{during} passes with nothing pending"
    assert ms < 5_000
    assert len(engine._queues) == 1  # not retired: the rest was the idle one
