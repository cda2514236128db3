"""Growing the pinned pool's small size classes ahead of need, off the event loop.

A small copy takes its pinned block from the pool's cache on the calling
thread (the event loop), which never allocates: pinning memory is a slow
driver call. On a miss the copy goes to its stream's host thread, which
takes a cached block or pins one. That thread, though, takes the blocks
other copies hand back as readily as it pins new ones, so a class grew by
one block only where a host job found the cache empty: with 1,000 tasks
downloading 4 KiB each on the fake GPU, 14,811 of the first 20,800 copies
took the host thread's path, at 11k copies/s against 42k once the class
had grown (issue 13, thirty-fifth round). A miss now also asks the
reaper thread to pin a batch of blocks of the class, doubling with each
miss, so the class reaches the number of copies in flight after a few
misses.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from .pool import PinnedPool, size_class

__all__ = ["ClassGrowth"]

FIRST_STEP = 16
"""Blocks a class's first batch leaves cached; each batch that pinned any doubles the next."""
CLASS_SHARE = 8
"""A batch is at most 1/``CLASS_SHARE`` of the pinned budget."""


class ClassGrowth:
    """Pins blocks of a size class in batches on the reaper thread after a cache miss.

    A class grows only while its copies miss the cache, that is while every
    cached block of it is in use: to the copies in flight plus at most one
    batch, within the budget (:meth:`PinnedPool.reserve` never evicts), and
    :meth:`PinnedPool.trim` frees what later stays idle.
    """

    def __init__(self, pool: PinnedPool, submit: Callable[[Callable[[], None]], None]) -> None:
        self._pool = pool
        self._submit = submit
        self._lock = threading.Lock()
        self._pending: set[int] = set()
        """Classes a batch is being pinned for: one batch per class at a time."""
        self._step: dict[int, int] = {}
        """The next batch's size per class, in blocks."""
        self.batches = 0
        """Batches run (for tests and probes)."""

    def missed(self, nbytes: int) -> None:
        """A copy of ``nbytes`` found no cached block: pin a batch of its class.

        Never calls the driver and never waits: a set lookup when a batch is
        already under way; else a queue put to the reaper thread.
        """
        size = size_class(nbytes)
        if size in self._pending:
            return
        with self._lock:
            if size in self._pending:
                return
            self._pending.add(size)
        self._submit(functools.partial(self._pin, size))

    def _pin(self, size: int) -> None:
        """On the reaper thread: a batch of cached blocks of ``size``."""
        share = max(1, self._pool.budget // CLASS_SHARE // size)
        step = min(self._step.get(size, FIRST_STEP), share)
        try:
            if self._pool.reserve(size, step, more=True):
                self._step[size] = min(2 * step, share)
        except Exception:
            # The pool closed, or a driver error: the copies keep their own
            # path (the host thread pins a block or fails the copy), so
            # nothing is lost by dropping the batch.
            pass
        finally:
            self.batches += 1
            with self._lock:
                self._pending.discard(size)
