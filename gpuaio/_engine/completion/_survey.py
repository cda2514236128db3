"""What the watcher reads of each stream's oldest pending op, between its passes.

It sleeps until the earliest of them is due, and pre-wakes the tasks asleep
on one due soon, so that they poll while the GPU finishes (``_events``).
"""

from __future__ import annotations

import contextlib

from ..._core.operation import Operation
from ._queue import StreamQueue
from ._tuning import PREWAKE_S

__all__ = ["oldest", "prewake_oldest", "survey"]


# Both read each stream's oldest op without the queue's lock (a resolver may
# pop it meanwhile), and hold no op once they return: the watcher must not
# keep a finished op, its stream and its buffers alive while it sleeps.
def oldest(queues: list[tuple[int, StreamQueue]]) -> list[Operation]:
    ops = []
    for _key, q in queues:
        with contextlib.suppress(IndexError):  # empty, or emptied just now
            ops.append(q.entries[0][0])
    return ops


def survey(queues: list[tuple[int, StreamQueue]], now: float) -> tuple[float, float]:
    """Pre-wake the tasks asleep on an oldest op due within ``PREWAKE_S`` but not
    yet (one past its time was polled for through its window already); return
    (when the earliest oldest op is due, 0 if any is of unknown duration; when
    the earliest one a task sleeps on is due, past ``PREWAKE_S`` from now, or 0)."""
    ops = oldest(queues)
    awaited: list[float] = []
    for op in ops:
        if op._waiters:
            if now < op._eta <= now + PREWAKE_S:
                op._prewake()
            elif op._eta - now > PREWAKE_S:
                awaited.append(op._eta)
    etas = [op._eta for op in ops]
    next_eta = min(etas) if etas and all(etas) else 0.0
    return next_eta, min(awaited, default=0.0)


def prewake_oldest(queues: list[tuple[int, StreamQueue]], by: float) -> None:
    """Pre-wake the tasks asleep on each stream's oldest op if it is due by ``by``."""
    for op in oldest(queues):
        if op._waiters and 0.0 < op._eta <= by:
            op._prewake()
