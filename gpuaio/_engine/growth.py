"""Growing the pinned pool's small size classes ahead of need, off the event loop.

A small copy takes its pinned block from the pool's cache on the calling
thread (the event loop), which never allocates: pinning memory is a slow
driver call. On a miss the copy goes to its stream's host thread, which
takes a cached block or pins one. That thread, though, takes the blocks
other copies hand back as readily as it pins new ones, so a class grew by
one block only where a host job found the cache empty: with 1,000 tasks
downloading 4 KiB each on an H100, 15-17k of the first 20,800 copies took
the host thread's path, at 6k copies/s, and bursts of thousands of misses
came back later (issue 13, thirty-fifth round, run DZ; with the batches,
4-5k misses at 10-12k copies/s, then none). A miss now also asks the
reaper thread to pin a block of the class for each copy that missed it
since the last batch: the class grows with the demand it failed to meet,
fast under many concurrent copies and by a block or two under a few.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

from .pool import PinnedPool, size_class

__all__ = ["ClassGrowth"]

CLASS_SHARE = 8
"""A batch is at most 1/``CLASS_SHARE`` of the pinned budget."""


class ClassGrowth:
    """Pins blocks of a size class on the reaper thread for the copies that missed it.

    A class grows only while its copies miss the cache, that is while every
    cached block of it is in use, by one block per miss (the missing copy
    also pins or takes one on its host thread): to at most twice the copies
    of it in flight, within the budget (:meth:`PinnedPool.reserve` never
    evicts); :meth:`PinnedPool.trim` frees what later stays idle.
    """

    def __init__(self, pool: PinnedPool, submit: Callable[[Callable[[], None]], None]) -> None:
        self._pool: PinnedPool = pool
        self._submit: Callable[[Callable[[], None]], None] = submit
        self._lock: threading.Lock = threading.Lock()
        self._owed: dict[int, int] = {}
        """Per class, the misses no batch has pinned a block for yet."""
        self._pending: set[int] = set()
        """Classes a batch is queued or being pinned for: one per class at a time."""
        self.batches: int = 0
        """Batches run (for tests and probes)."""

    def missed(self, nbytes: int) -> None:
        """A copy of ``nbytes`` found no cached block of its class (none at all,
        or only a larger class's, lent to it): owe its class a block. Lent
        larger blocks alone, a class never grew, and a small download, whose
        DMA is issued early from its own class's blocks only
        (``gpuaio._engine.early``), never took that path (issue 13).

        Never calls the driver and never waits on one: a lock held for a few
        dictionary operations, and a queue put to the reaper thread unless a
        batch of the class is already queued or running (it picks this miss
        up when it ends).
        """
        size = size_class(nbytes)
        with self._lock:
            self._owed[size] = self._owed.get(size, 0) + 1
            if size in self._pending:
                return
            self._pending.add(size)
        self._submit(functools.partial(self._pin, size))

    def _pin(self, size: int) -> None:
        """On the reaper thread: a block of ``size`` for each miss owed, then
        again for the misses that came meanwhile."""
        share = max(1, self._pool.budget // CLASS_SHARE // size)
        while True:
            with self._lock:
                owed = self._owed.pop(size, 0)
                count = min(owed, share)
                if owed > count:  # the rest in the next batch
                    self._owed[size] = owed - count
                if not count:
                    self._pending.discard(size)
                    return
            pinned = 0
            # The pool closed, or a driver error: the copies keep their own
            # path (the host thread pins a block or fails the copy), so
            # nothing is lost by dropping the batch.
            with contextlib.suppress(Exception):
                pinned = self._pool.reserve(size, count, more=True)
            self.batches += 1
            if not pinned:  # at the budget, or failed: owe nothing more for now
                with self._lock:
                    self._owed.pop(size, None)
                    self._pending.discard(size)
                return
