"""The pinned host memory pool behind staging.

Blocks come in power-of-two size classes. A block handed back with
:meth:`PinnedPool.release` carries the CUDA events of every GPU operation
that used it and becomes reusable only once all of them have completed, so a
block is never handed out while a DMA may still read or write it (the
early-reuse bugs of PyTorch's CachingHostAllocator, PR 68749 and issue
140296, come from returning blocks without such a guard).

The pool never holds more than its budget: when the budget is spent,
:meth:`PinnedPool.acquire` waits for a block to come back (backpressure)
instead of growing. Every method is thread-safe; ``acquire`` may block and
is only called off the event loop.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import DeviceFatalError, InvalidArgumentError

if TYPE_CHECKING:
    from .backends import Backend

__all__ = ["PinnedBlock", "PinnedPool", "PoolStats", "default_budget"]

MIN_CLASS = 64 << 10


def default_budget() -> int:
    """``GPUAIO_PINNED_BUDGET`` (bytes, or with a K/M/G suffix), else 1 GiB."""
    raw = os.environ.get("GPUAIO_PINNED_BUDGET")
    if not raw:
        return 1 << 30
    return parse_size(raw)


def parse_size(raw: str) -> int:
    raw = raw.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:], 1)
    digits = raw[:-1] if raw[-1:] in "KMG" else raw
    try:
        return int(float(digits) * mult)
    except ValueError:
        raise InvalidArgumentError(f"cannot read a size from {raw!r}") from None


def size_class(nbytes: int) -> int:
    """The block size serving a request of ``nbytes`` (a power of two)."""
    return max(MIN_CLASS, 1 << (max(nbytes, 1) - 1).bit_length())


@dataclass(slots=True)
class PoolStats:
    """A snapshot of the pool's counters (bytes unless noted)."""

    budget: int
    reserved: int
    """Pinned bytes allocated from the driver and held by the pool."""
    in_use: int
    """Bytes of blocks handed out or waiting for their GPU work."""
    peak_reserved: int
    hits: int
    """Acquisitions served by a cached block (count)."""
    misses: int
    """Acquisitions that allocated from the driver (count)."""
    waits: int
    """Acquisitions that had to wait for a block to come back (count)."""


class PinnedBlock:
    """One pinned allocation of ``size`` bytes at host address ``ptr``."""

    __slots__ = ("events", "ptr", "retired", "size", "waiters")

    def __init__(self, ptr: int, size: int) -> None:
        self.ptr: int = ptr
        self.size: int = size
        self.events: list[Any] = []
        self.waiters: int = 0
        """Threads synchronizing on ``events`` outside the pool's lock."""
        self.retired: list[Any] = []
        """Fired events that waiters still use: destroyed when the last one is done."""


class PinnedPool:
    """Size-classed, budgeted, event-guarded pool of pinned host blocks."""

    def __init__(self, backend: Backend, budget: int | None = None) -> None:
        self.backend = backend
        self.budget: int = default_budget() if budget is None else int(budget)
        if self.budget < MIN_CLASS:
            raise InvalidArgumentError(f"pinned budget must be at least {MIN_CLASS} bytes")
        self._cv = threading.Condition(threading.Lock())
        self._free: dict[int, list[PinnedBlock]] = {}
        self._guarded: deque[PinnedBlock] = deque()
        self._reserved = 0
        self._in_use = 0
        self._peak = 0
        self._hits = self._misses = self._waits = 0
        self._closed = False

    # -- public --------------------------------------------------------
    def stats(self) -> PoolStats:
        """Counters now; guarded blocks whose GPU work has finished count as free."""
        with self._cv:
            self._reclaim_locked()
            return PoolStats(
                self.budget,
                self._reserved,
                self._in_use,
                self._peak,
                self._hits,
                self._misses,
                self._waits,
            )

    def acquire(
        self, nbytes: int, *, wait: bool = True, allocate: bool = True
    ) -> PinnedBlock | None:
        """A block of at least ``nbytes``; waits for one when the budget is spent.

        With ``wait=False`` returns None instead of waiting. With
        ``allocate=False`` only a cached block is handed out (None otherwise):
        no driver call, so it is safe on an event-loop thread.
        """
        size = size_class(nbytes)
        if size > self.budget:
            raise InvalidArgumentError(
                f"a {size}-byte pinned block exceeds the pinned budget of {self.budget} bytes"
            )
        waited = False
        while True:
            with self._cv:
                if self._closed:
                    raise RuntimeError("the pinned pool is closed")
                self._reclaim_locked()
                block = self._take_locked(size)
                if block is not None:
                    if waited:
                        self._waits += 1
                    return block
                if not allocate:
                    return None
                if self._reserved + size <= self.budget:
                    self._reserved += size
                    self._in_use += size
                    self._peak = max(self._peak, self._reserved)
                    self._misses += 1
                    if waited:
                        self._waits += 1
                    break
                if self._evict_locked(size):
                    continue
                if not wait:
                    return None
                oldest = self._guarded[0] if self._guarded else None
                if oldest is None:
                    waited = True
                    self._cv.wait(0.01)
                    continue
                # Another thread may reclaim the block meanwhile: its events
                # must outlive this wait (a destroyed CUevent crashes the wait).
                oldest.waiters += 1
                events = list(oldest.events)
            # Wait, outside the lock, for the oldest guarded block's GPU work.
            waited = True
            self._wait_events(oldest, events)
        try:
            ptr = self.backend.host_alloc(size)
        except BaseException:
            with self._cv:
                self._reserved -= size
                self._in_use -= size
            raise
        return PinnedBlock(ptr, size)

    def reserve(self, nbytes: int, count: int) -> int:
        """Allocate blocks ahead of need until ``count`` cached blocks serve ``nbytes``.

        Stops at the budget (it never evicts). Returns the bytes newly
        allocated. Blocks: calls the driver's allocator, so run it off the
        event loop.
        """
        size = size_class(nbytes)
        if size > self.budget:
            raise InvalidArgumentError(
                f"a {size}-byte pinned block exceeds the pinned budget of {self.budget} bytes"
            )
        added = 0
        while True:
            with self._cv:
                if self._closed:
                    raise RuntimeError("the pinned pool is closed")
                self._reclaim_locked()
                if len(self._free.get(size, ())) >= count:
                    return added
                if self._reserved + size > self.budget:
                    return added
                self._reserved += size
                self._peak = max(self._peak, self._reserved)
            try:
                ptr = self.backend.host_alloc(size)
            except BaseException:
                with self._cv:
                    self._reserved -= size
                raise
            with self._cv:
                self._free.setdefault(size, []).append(PinnedBlock(ptr, size))
                self._cv.notify_all()
            added += size

    def release(self, block: PinnedBlock, events: list[Any] | tuple[Any, ...] = ()) -> None:
        """Hand ``block`` back; reusable once every event in ``events`` has fired.

        The events become the pool's: it destroys them after they fire.
        """
        with self._cv:
            if events:
                block.events = list(events)
                self._guarded.append(block)
            else:
                self._put_free_locked(block)
            self._cv.notify_all()

    def trim(self) -> int:
        """Free cached idle blocks; returns the bytes given back to the driver."""
        with self._cv:
            self._reclaim_locked()
            blocks = [b for lst in self._free.values() for b in lst]
            self._free.clear()
            freed = sum(b.size for b in blocks)
            self._reserved -= freed
        for b in blocks:
            self.backend.host_free(b.ptr)
        return freed

    def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` s) for guarded blocks' GPU work, then free what is idle.

        Blocks whose GPU work has not finished by then are never freed (a
        stuck stream could still write them): a bounded leak, not a hang.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                self._reclaim_locked()
                oldest = self._guarded[0] if self._guarded else None
            if oldest is None:
                break
            time.sleep(0.001)
        self.trim()
        with self._cv:
            self._closed = True

    # -- internal ------------------------------------------------------
    def _wait_events(self, block: PinnedBlock, events: list[Any]) -> None:
        """Synchronize on ``events`` (``block``'s, its ``waiters`` counted up by the caller)."""
        dead: list[Any] = []
        try:
            for ev in events:
                self.backend.event_synchronize(ev)
        finally:
            with self._cv:
                block.waiters -= 1
                if block.waiters == 0:
                    dead, block.retired = block.retired, []
                self._reclaim_locked()
            for ev in dead:
                with contextlib.suppress(Exception):
                    self.backend.event_destroy(ev)

    def _take_locked(self, size: int) -> PinnedBlock | None:
        lst = self._free.get(size)
        if lst:
            block = lst.pop()
            self._in_use += size
            self._hits += 1
            return block
        return None

    def _put_free_locked(self, block: PinnedBlock) -> None:
        self._in_use -= block.size
        self._free.setdefault(block.size, []).append(block)

    def _reclaim_locked(self) -> None:
        """Move guarded blocks whose events have all fired to the free lists."""
        query = self.backend.event_query
        keep: deque[PinnedBlock] = deque()
        changed = False
        while self._guarded:
            block = self._guarded.popleft()
            try:
                done = all(query(ev) for ev in block.events)
            except DeviceFatalError:
                done = True  # a dead context runs no more DMA: the block is safe
            except Exception:
                done = False
            if done:
                if block.waiters:  # a thread still synchronizes on them
                    block.retired.extend(block.events)
                else:
                    for ev in block.events:
                        with contextlib.suppress(Exception):
                            self.backend.event_destroy(ev)
                block.events = []
                self._put_free_locked(block)
                changed = True
            else:
                keep.append(block)
        self._guarded = keep
        if changed:
            self._cv.notify_all()

    def _evict_locked(self, size: int) -> bool:
        """Free cached blocks of other sizes to make room for ``size``; True if it did."""
        victims: list[PinnedBlock] = []
        room = self.budget - self._reserved
        for cls in sorted(self._free, reverse=True):
            lst = self._free[cls]
            while lst and room < size:
                b = lst.pop()
                victims.append(b)
                room += b.size
        if not victims:
            return False
        self._reserved -= sum(b.size for b in victims)
        for b in victims:
            # host_free may synchronize; the pool only runs on worker threads.
            self.backend.host_free(b.ptr)
        return True
