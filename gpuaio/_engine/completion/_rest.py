"""How the completion watcher rests: its pace between passes, and where it parks.

Between passes that resolved nothing while ops pend, the watcher spins and
backs off (:class:`Pace`). While loops poll for their own ops, or while no
op pends, it *parks* (:class:`Parker`): it looks now and then at two words
the engine keeps in :attr:`Parker.cell`,

* ``cell[UNTIL]``: until when loops are taken to poll (and sweep), pushed on
  by every poll and reset by a task that stops polling;
* ``cell[NEED]``: non-zero while an op may pend that the watcher may have to
  resolve (set as ops are watched, cleared once none pends);
* ``cell[LAST]``: when an op was last watched,

and returns once ``NEED`` is set and ``UNTIL`` has passed, once unparked
(:meth:`Parker.unpark`: a task went to sleep on an op, or the engine
closes), once, with ``NEED`` clear, no op has been watched for the idle
time it was given (the watcher then retires its streams' queues), or at its
deadline. While ``NEED`` is clear the native parker's looks back off to
``PARK_IDLE_CHECK_S``, and with no queue left it parks on; the Python one
has the watcher sleep until an op is watched, which then wakes it
(``Parker.parks_idle``).

Who writes the words (``_events.EventEngine``). Every poll pushes ``UNTIL``
to ``now + LOOP_COVER_S``; a task that stops polling (``hand_off``), or an
op watched with a task already asleep on it, resets it to 0 and unparks the
watcher. An op watched while ``NEED`` is clear sets it (:meth:`Parker.need`)
and gives loops ``LOOP_COVER_S`` to poll for it: an op nobody awaits is the
watcher's once that has passed. A poll that finds its op done and nothing
else pending clears it (:meth:`Parker.settle`), and so does the watcher.
The watcher reads both words, and decides to park, under the engine's lock;
``hand_off`` and ``watch`` write them under that lock too, so a reset can
never slip between the watcher's decision and its parking (an unpark before
the park makes the park return at once). Polls push ``UNTIL`` without the
lock: they run on the loop for every poll, and their write is true whenever
it lands (a loop polled just now), so a poll racing a reset is the same as
a poll just after it. :meth:`Parker.settle` takes no lock either (it runs
once an op): it clears ``NEED`` first and then looks at a snapshot of the
queues taken after the clear. An op queued meanwhile (its entry is queued
before it sets ``NEED``, and only if ``NEED`` reads clear; an op that joins
a batch reads it without the lock) is in the snapshot, or reads ``NEED``
after the clear and sets it: either way ``NEED`` ends set. Every step is
one operation under the GIL.

Why it parks rather than sleeps on a condition: a Python thread that wakes
from a timed wait needs the GIL back, and beside a busy event loop it gets
it late and costs the loop dearly meanwhile. Each brief release of the
loop's (a driver call, its I/O poll) wakes the waiting thread, which loses
the GIL to the loop again; CPython restarts its 5 ms switch interval at each
such wake, so the wait lasts as long as the loop stays busy. On the CPU
machine every such release cost 15-20 us instead of 0.6 us
(``tools/gil_tax_probe.py``, issue 13, rounds twenty-six and twenty-seven).
The native parker (``_parker.c``, built by a compiled install) looks at the
words without the GIL, every ``PARK_CHECK_S``; the Python one, everywhere
else, every ``STAND_DOWN_S``, paying for the GIL at each look.
"""

from __future__ import annotations

import ctypes
import threading
import time
from array import array
from collections.abc import Mapping
from typing import Any

from ..._core.compiled import c_function, native_library
from ._queue import StreamQueue
from ._tuning import (
    LOOP_COVER_S,
    MAX_SLEEP_S,
    MIN_SLEEP_S,
    PARK_CHECK_S,
    PARK_IDLE_CHECK_S,
    PARK_RETIRE_S,
    RETIRE_S,
    SPIN_S,
    STAND_DOWN_S,
)

__all__ = [
    "DEADLINE",
    "LAST",
    "NEED",
    "NEEDED",
    "UNPARKED",
    "UNTIL",
    "NativeParker",
    "Pace",
    "Parker",
    "make_parker",
    "native_available",
]

UNTIL = 0
"""Index in :attr:`Parker.cell`: until when loops are taken to poll."""
NEED = 1
"""Index in :attr:`Parker.cell`: non-zero while an op may pend that no loop polls for."""
LAST = 2
"""Index in :attr:`Parker.cell`: when an op was last watched."""

DEADLINE, UNPARKED, NEEDED = 0, 1, 2
"""What :meth:`Parker.park` returns: its deadline or idle time passed, it was
unparked, or ``NEED`` is set and ``UNTIL`` has passed."""


class Pace:
    """How the watcher rests between passes that resolved nothing.

    It spins (yielding the GIL) for ``SPIN_S`` after new work or a
    completion, then sleeps between passes, ``MIN_SLEEP_S`` at first and
    twice as long each time up to ``MAX_SLEEP_S``.
    """

    __slots__ = ("sleep_s", "spin_until")

    def __init__(self, now: float) -> None:
        self.spin_until = now + SPIN_S
        self.sleep_s = MIN_SLEEP_S

    def spin_again(self) -> None:
        """Spin again from now (the back-off continues where it was)."""
        self.spin_until = time.perf_counter() + SPIN_S

    def restart(self, now: float) -> None:
        """Spin again from ``now``, then back off from the shortest sleep."""
        self.spin_until = now + SPIN_S
        self.sleep_s = MIN_SLEEP_S

    def back_off(self) -> None:
        self.sleep_s = min(self.sleep_s * 2, MAX_SLEEP_S)


class Parker:
    """Where one watcher parks; this one in Python, looking every ``STAND_DOWN_S``.

    :meth:`park` is called by the watcher alone; :meth:`unpark` by any
    thread. An unpark before the park makes that park return at once, so
    the watcher may decide to park under its engine's lock and park after
    letting go of it: a task that hands off in between is not missed.
    """

    parks_idle = False
    """Whether the watcher parks with no stream queue at all, or sleeps until
    an op is watched (``watch`` then wakes it: a look in Python needs the GIL)."""
    stand_down_s = STAND_DOWN_S
    """The longest one park lasts (then the watcher probes for sticky errors)."""
    retire_s = RETIRE_S
    """After how long with no op watched a park ends, for the watcher to retire
    its idle queues (and then sleep, or park idle)."""
    check_s = STAND_DOWN_S
    """How often it looks at ``NEED`` while it is clear."""
    min_s = STAND_DOWN_S
    """How soon at the earliest it looks again while ``NEED`` is set (loops
    push ``UNTIL`` on as they poll: looking each time would wake it every
    ``LOOP_COVER_S``, and a Python thread pays for the GIL at each look)."""

    def __init__(self) -> None:
        self.cell = array("d", [0.0, 0.0, 0.0])
        self._cv = threading.Condition(threading.Lock())
        self._flag = False

    def park(self, deadline: float, idle_s: float) -> int:
        """Wait as the module docstring says, until ``deadline`` at the latest
        or, with ``NEED`` clear, until ``idle_s`` after ``cell[LAST]``; returns ``DEADLINE``,
        ``UNPARKED`` or ``NEEDED``."""
        cell = self.cell
        with self._cv:
            while True:
                if self._flag:
                    self._flag = False
                    return UNPARKED
                now = time.perf_counter()
                until = cell[UNTIL]
                need = cell[NEED] != 0.0
                if need and now >= until:
                    return NEEDED
                end = deadline if need else min(deadline, cell[LAST] + idle_s)
                if now >= end:
                    return DEADLINE
                target = max(until, now + self.min_s) if need else now + self.check_s
                self._cv.wait(min(target, end) - now)

    def need(self, now: float) -> None:
        """An op was watched at ``now`` (the engine's lock held): set ``NEED``."""
        cell = self.cell
        cell[LAST] = now
        if not cell[NEED]:
            # Nothing pended: give loops LOOP_COVER_S to poll for this op
            # before the watcher takes it for one nobody awaits.
            if cell[UNTIL] < now + LOOP_COVER_S:
                cell[UNTIL] = now + LOOP_COVER_S
            cell[NEED] = 1.0

    def settle(self, queues: Mapping[int, StreamQueue]) -> None:
        """Clear ``NEED`` unless one of ``queues`` has an op pending; needs no
        lock (see the module docstring)."""
        cell = self.cell
        cell[NEED] = 0.0  # first, then the snapshot
        for q in list(queues.values()):
            if q.entries:
                cell[NEED] = 1.0
                return

    def idle_over(self, now: float, idle_s: float) -> bool:
        """Whether nothing pends and no op was watched for ``idle_s``; then the
        idle time starts again from ``now`` (the watcher retires queues now,
        and one that cannot retire yet is tried again ``idle_s`` later, not
        at once)."""
        cell = self.cell
        if cell[NEED] or now < cell[LAST] + idle_s:
            return False
        cell[LAST] = now
        return True

    def unpark(self) -> None:
        """Make the watcher's current or next :meth:`park` return."""
        with self._cv:
            self._flag = True
            self._cv.notify()

    def close(self) -> None:
        """Its watcher has returned for good."""


class NativeParker(Parker):
    """The same, in C (``_parker.c``): it looks every ``PARK_CHECK_S``, without the GIL."""

    parks_idle = True
    stand_down_s = 1.0  # loops probe while they poll; this is a safety net
    check_s = PARK_CHECK_S
    check_max_s = PARK_IDLE_CHECK_S
    """While ``NEED`` is clear its looks back off from ``check_s`` to this."""
    retire_s = PARK_RETIRE_S
    min_s = 100e-6  # a look in C costs the loops nothing

    def __init__(self, lib: _Lib) -> None:
        super().__init__()
        self._lib = lib
        handle = lib.new()
        if not handle:
            raise MemoryError("gpuaio: could not create a native parker")
        self._handle: int | None = handle
        self._addr = self.cell.buffer_info()[0]  # the array is never resized

    def park(self, deadline: float, idle_s: float) -> int:
        handle = self._handle
        if handle is None:
            return DEADLINE
        result: int = self._lib.park(
            handle, self._addr, deadline, idle_s, self.check_s, self.check_max_s, self.min_s
        )
        return DEADLINE if result < 0 else result  # < 0: a forked child's

    def unpark(self) -> None:
        handle = self._handle
        if handle is not None:
            self._lib.unpark(handle)

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.free(handle)


class _Lib:
    """``_parker.c``'s functions: ``park`` releases the GIL (a ``CDLL``), the
    others keep it (a ``PyDLL``: they take microseconds)."""

    def __init__(self, path: str) -> None:
        free, held = ctypes.CDLL(path), ctypes.PyDLL(path)
        ptr, dbl = ctypes.c_void_p, ctypes.c_double
        self.new: Any = c_function(held, "gpk_new", [], ptr)
        self.free: Any = c_function(held, "gpk_free", [ptr], None)
        self.unpark: Any = c_function(held, "gpk_unpark", [ptr], None)
        self.now: Any = c_function(held, "gpk_now", [], dbl)
        self.park: Any = c_function(
            free, "gpk_park", [ptr, ptr, dbl, dbl, dbl, dbl, dbl], ctypes.c_int
        )


def _load() -> _Lib | None:
    """The native parker's library, where this install built it and its clock
    is ``time.perf_counter``'s."""
    path = native_library("gpuaio._engine.completion._parker")
    if path is None:
        return None
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        return None  # its stamps would not compare with the C clock
    try:
        lib = _Lib(path)
    except (OSError, AttributeError):
        return None
    if abs(lib.now() - time.perf_counter()) > 0.5:
        return None
    return lib


_LIB = _load()


def native_available() -> bool:
    """Whether this install has the native parker (a compiled install builds it)."""
    return _LIB is not None


def make_parker(native: bool = True) -> Parker:
    """A native parker where this install has one (and ``native``), else a Python one."""
    if native and _LIB is not None:
        return NativeParker(_LIB)
    return Parker()
