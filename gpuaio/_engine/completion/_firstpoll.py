"""Polling for a lone short op before the awaiting task first yields.

An awaiting task normally yields to its loop once before it polls
(``Operation.__await__``): just after the call a GPU has rarely finished.
But a lone tiny op (a memset, a few-byte copy between device and pinned
memory) often has by the time its call returns, and with one task on the
loop that yield is a whole turn of the loop spent on nothing. So
:class:`FirstPolls` decides, per engine, whether such an op is polled for at
once, learning from the polls themselves whether that pays.

Only ops with a marker of their own (not batched: a poll seals the open
batch, which would take batching away from the many-task case) that are due
by their estimate are polled for first; not kernels, whose length is
unknown. Two limits keep it honest:

- *Fairness.* A task that finds its op done returns without yielding, like
  an await of a done future. A loop that went on that way would starve its
  other tasks, so a first poll is made only if the loop's thread yielded
  through an await of gpuaio's less than ``FIRST_POLL_RUN_S`` ago.
- *Cost.* A missed first poll costs a query (about 1 us) and the task still
  yields. Out of every ``WINDOW`` first polls at least ``WINDOW // 3`` must
  find the op done (a turn of the loop costs several queries), or first
  polls stop; while stopped, one eligible await in ``EXPLORE`` still polls
  first, so a change of workload is noticed.

The counters are updated without a lock: loops of several threads that share
an engine may lose an update now and then, which only shifts a decision by a
window.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sized

from ..._core.operation import Operation
from ._tuning import FIRST_POLL_RUN_S

__all__ = ["FirstPolls"]

WINDOW = 32
"""First polls per decision."""
EXPLORE = 16
"""While first polls are off, one eligible await in this many makes one anyway."""


class _Turn(threading.local):
    at = 0.0
    """When this thread's loop last yielded in an await of gpuaio's (perf_counter())."""


_turn = _Turn()


class FirstPolls:
    """``first_polls(op, now)``: whether ``op`` was polled for and found done at once.

    Called by ``Operation.__await__`` on an asyncio loop (uvloop included),
    as its first step of polling, at ``now``. Returns False when the task
    should yield as usual, and then assumes that it does.
    """

    __slots__ = ("_hits", "_on", "_poll", "_queues", "_skipped", "_tries")

    def __init__(self, poll: Callable[[Operation], bool], queues: Sized) -> None:
        self._poll = poll
        self._queues = queues
        self._on = True
        self._skipped = 0
        self._tries = 0
        self._hits = 0

    def __call__(self, op: Operation, now: float) -> bool:
        poll = op._poll
        turn = _turn
        if (
            poll is None
            or poll[2] is not None  # batched (the caller checks too): a poll would seal it
            or len(self._queues) != 1  # other streams have work: others' tasks run
            or len(poll[1].entries) != 1  # its stream has other work: so may others
            or not 0.0 < op._eta <= now  # not due yet by its estimate, or of unknown length
            or now - turn.at >= FIRST_POLL_RUN_S
        ):
            turn.at = now
            return False
        if not self._on:
            self._skipped += 1
            if self._skipped % EXPLORE:
                turn.at = now
                return False
        done = self._poll(op)
        self._tries += 1
        if done:
            self._hits += 1
        else:
            turn.at = now
        if self._tries >= WINDOW:
            self._on = 3 * self._hits >= self._tries
            self._tries = self._hits = 0
        return done
