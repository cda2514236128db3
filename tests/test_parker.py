"""Where the completion watcher parks (``gpuaio._engine.completion._rest``), and
the engine's side of it: ``NEED`` set while an op may pend, cleared by the loop
that resolves the last one, and the watcher parked meanwhile.

The native parker (``_parker.c``) exists only in a compiled install (CI's
``compiled`` session builds it); its tests skip elsewhere, and the Python
parker, with the same semantics, is tested everywhere.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._api.runtime import _drop_current
from gpuaio._engine.completion import _rest
from gpuaio._engine.completion._rest import (
    DEADLINE,
    LAST,
    NEED,
    NEEDED,
    UNPARKED,
    UNTIL,
    NativeParker,
    Parker,
)
from tests.conftest import latch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import overhead_probe

_native = pytest.param(
    "native",
    marks=pytest.mark.skipif(
        _rest._LIB is None,
        reason="no native parker: it is built by a compiled install (hatch_build.py)",
    ),
)


@pytest.fixture(params=["python", _native])
def parker(request: pytest.FixtureRequest) -> Iterator[Parker]:
    lib = _rest._LIB
    p = NativeParker(lib) if request.param == "native" and lib is not None else Parker()
    yield p
    p.close()


def _park_in_thread(p: Parker, deadline: float, idle_s: float) -> Callable[[], tuple[int, float]]:
    """Park on another thread; returns a join that gives (result, seconds parked)."""
    out: list[tuple[int, float]] = []

    def run() -> None:
        start = time.perf_counter()
        result = p.park(deadline, idle_s)
        out.append((result, time.perf_counter() - start))

    t = threading.Thread(target=run)
    t.start()

    def join() -> tuple[int, float]:
        t.join(20)
        assert not t.is_alive(), "the park never returned"
        return out[0]

    return join


def test_needed_once_need_is_set_and_loops_stopped_polling(parker: Parker) -> None:
    now = time.perf_counter()
    parker.cell[UNTIL], parker.cell[NEED], parker.cell[LAST] = now - 1, 1.0, now
    assert parker.park(now + 30, 30.0) == NEEDED


def test_an_unpark_before_the_park_is_kept(parker: Parker) -> None:
    now = time.perf_counter()
    parker.cell[UNTIL], parker.cell[NEED], parker.cell[LAST] = now + 60, 1.0, now
    parker.unpark()
    start = time.perf_counter()
    assert parker.park(start + 30, 30.0) == UNPARKED
    assert time.perf_counter() - start < 10
    # Consumed: the next park waits again, here until its deadline.
    assert parker.park(time.perf_counter() + 0.05, 30.0) == DEADLINE


def test_with_nothing_pending_it_parks_until_idle(parker: Parker) -> None:
    now = time.perf_counter()
    parker.cell[UNTIL], parker.cell[NEED], parker.cell[LAST] = 0.0, 0.0, now
    result, took = parker.park(now + 30, 0.2), time.perf_counter() - now
    assert result == DEADLINE
    assert 0.19 <= took < 10, f"parked {took:.3f} s, idle was 0.2 s"


def test_need_set_later_ends_the_park_without_an_unpark(parker: Parker) -> None:
    """An op nobody polls for is watched while the watcher parks: ``NEED`` set
    alone (no wake-up call) brings it back, within its look period."""
    now = time.perf_counter()
    parker.cell[UNTIL], parker.cell[NEED], parker.cell[LAST] = 0.0, 0.0, now
    join = _park_in_thread(parker, now + 30, 30.0)
    time.sleep(0.05)
    parker.cell[NEED] = 1.0
    result, took = join()
    assert result == NEEDED
    assert took < 10


def test_it_stays_parked_while_loops_push_until_on(parker: Parker) -> None:
    """Pending ops, but loops poll: the park lasts until they stop, however
    often they push ``UNTIL`` on."""
    now = time.perf_counter()
    # Each push covers 0.1 s: a loaded machine may keep this thread off the
    # CPU for milliseconds, and the parker rightly takes that for a stop.
    cover = 0.1
    parker.cell[UNTIL], parker.cell[NEED], parker.cell[LAST] = now + cover, 1.0, now
    join = _park_in_thread(parker, now + 30, 30.0)
    polled_for = 0.3
    end = now + polled_for
    while (t := time.perf_counter()) < end:
        parker.cell[UNTIL] = t + cover
        time.sleep(0.001)
    result, took = join()
    assert result == NEEDED
    assert took >= polled_for - 0.01, f"it came back after {took:.3f} s, while loops polled"


def test_a_deadline_ends_a_park_while_loops_poll(parker: Parker) -> None:
    now = time.perf_counter()
    parker.cell[UNTIL], parker.cell[NEED], parker.cell[LAST] = now + 60, 1.0, now - 60
    # NEED is set: the idle time (long past) does not end this park.
    assert parker.park(now + 0.1, 0.0) == DEADLINE
    assert time.perf_counter() - now >= 0.09


@pytest.mark.skipif(_rest._LIB is None, reason="no native parker (a compiled install builds it)")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform has no fork")
def test_a_native_parker_inherited_by_a_forked_child_does_nothing() -> None:
    lib = _rest._LIB
    assert lib is not None
    p = NativeParker(lib)
    now = time.perf_counter()
    p.cell[UNTIL], p.cell[NEED], p.cell[LAST] = now + 60, 1.0, now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            start = time.perf_counter()
            ok = p.park(start + 30, 30.0) == DEADLINE and time.perf_counter() - start < 5
            p.unpark()
            p.close()
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    p.close()


# -- the engine's side ----------------------------------------------------


def test_an_engine_parks_natively_where_the_install_has_the_parker(gpuaio_runtime: Any) -> None:
    engine: Any = gpuaio_runtime.engine(0)
    assert isinstance(engine._parker, NativeParker) == (_rest._LIB is not None)


def _resolved_on(ops: list[gpuaio.Operation]) -> list[int]:
    threads: list[int] = []
    for op in ops:
        op._add_done_callback(lambda: threads.append(threading.get_ident()))
    return threads


@pytest.mark.anyio
async def test_a_loop_that_resolves_the_last_op_clears_need(gpuaio_runtime: Any) -> None:
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s, other = dev.stream(), dev.stream()
    d = dev.empty(64)
    engine: Any = rt.engine(0)
    release = latch(dev, other)
    try:
        orphan = other.memset(d[32:], 5)  # pending, and nobody awaits it
        await s.memset(d[:32], 1)
        assert engine._cell[NEED], "NEED cleared while an op nobody awaits pends"
    finally:
        release()
    with anyio.fail_after(10):
        await orphan
    await s.memset(d[:32], 2)
    # Cleared by this loop's poll, or (had the await slept) by the watcher's
    # next pass, which may come just after this task wakes.
    deadline = time.perf_counter() + 10
    while engine._cell[NEED]:
        assert time.perf_counter() < deadline, "the last op resolved, and NEED stayed set"
        await anyio.sleep(0.001)
    out = np.empty(64, np.uint8)
    await s.copy(out, d)
    assert (out[:32] == 2).all() and (out[32:] == 5).all()
    s.close()
    other.close()


def _await_with_gaps(
    loop: str, gap_s: float, seconds: float, retire_s: float | None = None
) -> tuple[list[int], list[gpuaio.Operation], list[int], int]:
    """On the fake GPU of ``tools/overhead_probe.py`` (ops done 7 us after they
    are enqueued): await one memset after another, each after ``gap_s`` of
    Python holding the GIL, for ``seconds``. Returns what each of the
    watcher's parks returned meanwhile, the ops, the threads that resolved
    them, and the loop's thread. With ``retire_s``, the watcher retires the
    stream's queue first (it parks on with none left)."""
    fake = overhead_probe.fake_gpu(gpuaio, 5e-6, 2e-6)
    rt = gpuaio.use_backend(fake)
    returns: list[int] = []
    ops: list[gpuaio.Operation] = []
    resolved_on: list[int] = []

    async def main() -> None:
        dev = gpuaio.Device(0)
        async with dev.stream() as s:
            d = dev.empty(4)
            await s.memset(d, 0)  # the watcher exists, and parks
            parker = rt.engine(0)._parker
            real_park = parker.park

            def counting_park(deadline: float, idle_s: float) -> int:
                result = int(real_park(deadline, idle_s))
                returns.append(result)
                return result

            parker.park = counting_park
            if retire_s is not None:
                parker.retire_s = retire_s
            parker.unpark()  # it parks again now, counted
            await anyio.sleep(0.05)
            if retire_s is not None:
                engine = rt.engine(0)
                deadline = time.perf_counter() + 10
                while engine._queues or not engine._parked:
                    assert time.perf_counter() < deadline, "the queue never retired"
                    await anyio.sleep(0.005)
            returns.clear()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                busy_until = time.perf_counter() + gap_s  # other Python, holding the GIL
                while time.perf_counter() < busy_until:
                    pass
                op = s.memset(d, len(ops) % 256)
                op._add_done_callback(lambda: resolved_on.append(threading.get_ident()))
                ops.append(op)
                await op

    try:
        anyio.run(main, backend_options={"use_uvloop": loop == "uvloop"})
    finally:
        rt.close()
        _drop_current(rt)
    assert ops and all(op.done() for op in ops)
    return returns, ops, resolved_on, threading.get_ident()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_watcher_stays_parked_while_a_loop_awaits_op_after_op(loop: str) -> None:
    """A loop awaiting one op after another, with other Python between them,
    resolves each itself and clears ``NEED`` each time: the watcher stays
    parked. It used to make passes and nap in short timed waits until the
    stream's queue retired, and each of its returns to Python costs a busy
    loop a wake-up at every GIL release (``_rest``). A hand-off, should a
    poll miss, is a wake-up the loop asked for and is not counted."""
    returns, ops, _, _ = _await_with_gaps(loop, 0.002, 0.4)
    on_its_own = [r for r in returns if r != UNPARKED]
    assert len(ops) > 20
    # Not once per op; a few where this machine kept the loop off the CPU
    # for longer than LOOP_COVER_S between an op's watch and its first poll.
    assert len(on_its_own) <= len(ops) // 5, (
        f"the watcher came back on its own {len(on_its_own)} times in {len(ops)} awaits"
    )


@pytest.mark.skipif(
    not _rest.native_available(),
    reason="no native parker (a compiled install builds it): the Python one sleeps "
    "with no queue left, and the next op's watch wakes it",
)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_op_after_the_queues_retired_does_not_wake_the_watcher(loop: str) -> None:
    """The watcher retired the stream's queue and parks on with none left
    (``Parker.parks_idle``); ops come 30 ms apart, each awaited and so polled
    and resolved by its loop, and the watcher stays parked through them.
    Before, it slept with no queue left, and each op's watch woke it into the
    busy loop: on the CPU machine an awaited memset 30 ms after the last took
    143 us, 53 us parked."""
    returns, ops, resolved_on, loop_thread = _await_with_gaps(loop, 0.03, 0.3, retire_s=0.05)
    assert len(ops) >= 6
    # A few missed polls (a loaded machine) may leave an op to the watcher.
    by_watcher = [t for t in resolved_on if t != loop_thread]
    on_its_own = [r for r in returns if r != UNPARKED]
    assert len(on_its_own) <= len(ops) // 4 and len(by_watcher) <= len(ops) // 4, (
        f"in {len(ops)} awaits the watcher came back {len(on_its_own)} times "
        f"and resolved {len(by_watcher)} ops"
    )


@pytest.mark.anyio
async def test_an_op_nobody_awaits_is_resolved_after_the_loops_stop_polling(
    gpuaio_runtime: Any,
) -> None:
    """No hand-off: a loop polls for its own ops while an op nobody awaits
    completes, then stops awaiting. The parked watcher takes that op up once
    no loop has polled for ``LOOP_COVER_S`` (within its look period)."""
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s, other = dev.stream(), dev.stream()
    d = dev.empty(8)
    release = latch(dev, other)
    orphan = other.memset(d[4:], 9)
    on = _resolved_on([orphan])
    for i in range(20):
        await s.memset(d[:4], i)
    release()
    rt.backend.stream_synchronize(other._native)
    deadline = time.perf_counter() + 10
    while not orphan.done():
        assert time.perf_counter() < deadline, "an op nobody awaits was never resolved"
        time.sleep(0.001)  # noqa: ASYNC251 - blocks this loop: no poll, no sweep
    assert on and on[0] != threading.get_ident(), "resolved by the loop, not the watcher"
    out = np.empty(8, np.uint8)
    await s.copy(out, d)
    assert (out[4:] == 9).all() and (out[:4] == 19).all()
    s.close()
    other.close()


def test_closing_the_engine_frees_the_native_parker(gpuaio_runtime: Any) -> None:
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    s = dev.stream()

    async def main() -> None:
        await s.memset(dev.empty(4), 1)

    anyio.run(main)
    engine: Any = rt.engine(0)
    parker = engine._parker
    s.close()
    engine.close()
    assert engine._watcher is None or not engine._watcher.is_alive()
    if isinstance(parker, NativeParker):
        assert parker._handle is None
