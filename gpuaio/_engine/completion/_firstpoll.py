"""Polling for a lone short op without yielding, where a turn of the loop would be wasted.

An awaiting task normally yields to its loop between polls
(``Operation.__await__``), so that the loop's other tasks run. But for a
lone tiny op (a memset, a few-kilobyte copy between device and pinned
memory) with one task on the loop, a turn of the loop is time spent on
nothing, twice over:

- *First polls* (:class:`FirstPolls`). Such an op has often completed by
  the time its call returns; then the task's yield before its first poll
  costs a whole turn. So a due op is polled for at once, and, with
  ``FIRST_SPIN_S`` set (off by default until a GPU run measures it), a
  short one that is not done yet is polled on for that long: on a GPU a
  small copy is done a few microseconds after its call returns, a first
  poll alone never found it done there, and the task's first query came a
  whole turn later.
- *Spins* (:class:`TailSpins`). One that the first poll after the task's
  yield finds not done completes, as a rule, within microseconds, and the
  next turn of the loop (about 3 us on asyncio) finds it that much late,
  half a turn on average. So the task polls on, without yielding, for up to
  ``TAIL_SPIN_S``, once per await: it has yielded once already, so the
  loop's other tasks ran.

Only lone ops are polled for so: one stream of the device has work, the op is
alone on it, and it has a marker of its own (a poll seals an open batch,
which would take batching away from the many-task case); and only ops due by
their estimate (not kernels, whose length is unknown). Two limits keep it
honest:

- *Fairness.* A task that finds its op done at a first poll returns without
  yielding, like an await of a done future. A loop that went on that way would
  starve its other tasks, so a first poll is made only if the loop's thread
  yielded through an await of gpuaio's less than ``FIRST_POLL_RUN_S`` ago.
- *Cost.* A missed first poll costs a query (about 1 us), or
  ``FIRST_SPIN_S`` with its spin, and the task still yields; a missed
  spin, ``TAIL_SPIN_S``. Out of every ``WINDOW`` tries of
  each kind at least ``WINDOW // 3`` must find the op done (a turn of the
  loop costs several queries), or that kind stops; while stopped, one
  eligible await in ``EXPLORE`` still tries, so a change of workload is
  noticed.

The counters are updated without a lock: loops of several threads that share
an engine may lose an update now and then, which only shifts a decision by a
window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sized

from ..._core.operation import Operation
from ._tuning import (
    FIRST_POLL_RUN_S,
    FIRST_SPIN_S,
    SHORT_OP_S,
    STREAM_POLL_GAP_S,
    TAIL_SPIN_S,
)

__all__ = ["FirstPolls", "TailSpins"]

WINDOW = 32
"""Tries (first polls, or spins) per decision."""
EXPLORE = 16
"""While a kind of try is off, one eligible await in this many makes one anyway."""


class _Turn(threading.local):
    at = 0.0
    """When this thread's loop last yielded in an await of gpuaio's (perf_counter())."""


_turn = _Turn()


def _lone(op: Operation, queues: Sized) -> bool:
    """Whether ``op`` is watched alone: one stream of the device in use, ``op``
    the only work pending on it, with a marker of its own (not batched)."""
    poll = op._poll
    return (
        poll is not None
        and poll[2] is None  # batched (the caller checks too): a poll would seal it
        and len(queues) == 1  # other streams have work: others' tasks run
        and len(poll[1].entries) == 1  # its stream has other work: so may others
    )


class _Window:
    """Whether a kind of poll pays: out of every ``WINDOW`` tries at least a
    third must find the op done, else it stops but for one eligible await in
    ``EXPLORE``."""

    __slots__ = ("_hits", "_skipped", "_tries", "on")

    def __init__(self) -> None:
        self.on = True
        self._skipped = 0
        self._tries = 0
        self._hits = 0

    def allows(self) -> bool:
        """Whether to try now (while off: one call in ``EXPLORE``)."""
        if self.on:
            return True
        self._skipped += 1
        return self._skipped % EXPLORE == 0

    def tried(self, found: bool) -> None:
        """Count a try, and decide at the end of a window."""
        self._tries += 1
        if found:
            self._hits += 1
        if self._tries >= WINDOW:
            self.on = 3 * self._hits >= self._tries
            self._tries = self._hits = 0


class FirstPolls:
    """``first_polls(op, now)``: whether ``op`` was polled for and found done at
    once, or within ``FIRST_SPIN_S`` of polling on if it is short.

    Called by ``Operation.__await__`` on an asyncio loop (uvloop included),
    as its first step of polling, at ``now``. Returns False when the task
    should yield as usual, and then assumes that it does.
    """

    __slots__ = ("_poll", "_queues", "window")

    def __init__(self, poll: Callable[[Operation, float], bool], queues: Sized) -> None:
        self._poll = poll
        self._queues = queues
        self.window = _Window()

    def __call__(self, op: Operation, now: float) -> bool:
        turn = _turn
        if (
            not _lone(op, self._queues)
            or not 0.0 < op._eta <= now  # not due yet by its estimate, or of unknown length
            or now - turn.at >= FIRST_POLL_RUN_S
            or not self.window.allows()
        ):
            turn.at = now
            return False
        poll = self._poll
        done = poll(op, STREAM_POLL_GAP_S)
        if not done and FIRST_SPIN_S and op._est <= SHORT_OP_S:
            done = _spin(poll, op, now + FIRST_SPIN_S)
        self.window.tried(done)
        if not done:
            turn.at = now
        return done


class TailSpins:
    """``spins(op, now)``: whether ``op``, which a poll after its task's yield
    found not done at ``now``, was found done by polling on for up to
    ``TAIL_SPIN_S`` without yielding.

    Called by ``Operation.__await__`` on an asyncio loop, at most once per
    await. Only a lone op (as for first polls) that is short (expected to
    take ``SHORT_OP_S`` or less) and due by its estimate. ``poll(op, gap)``
    is the engine's poll, asked here for no gap between polls of a stream.
    """

    __slots__ = ("_poll", "_queues", "window")

    def __init__(self, poll: Callable[[Operation, float], bool], queues: Sized) -> None:
        self._poll = poll
        self._queues = queues
        self.window = _Window()

    def __call__(self, op: Operation, now: float) -> bool:
        if (
            not TAIL_SPIN_S
            or not 0.0 < op._est <= SHORT_OP_S
            or op._eta > now
            or not _lone(op, self._queues)
            or not self.window.allows()
        ):
            return False
        done = _spin(self._poll, op, now + TAIL_SPIN_S)
        self.window.tried(done)
        return done


def _spin(poll: Callable[[Operation, float], bool], op: Operation, end: float) -> bool:
    """Poll for ``op`` without yielding (no gap between polls of its stream)
    until it is done (True) or ``perf_counter()`` reaches ``end`` (False)."""
    clock = time.perf_counter
    while True:
        if poll(op, 0.0):
            return True
        if clock() >= end:
            return False
