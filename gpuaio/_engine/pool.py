"""The pinned host memory pool behind staging.

Blocks come in power-of-two size classes. A block handed back with
:meth:`PinnedPool.release` carries the CUDA events of every GPU operation
that used it and becomes reusable only once all of them have completed, so a
block is never handed out while a DMA may still read or write it (the
early-reuse bugs of PyTorch's CachingHostAllocator, PR 68749 and issue
140296, come from returning blocks without such a guard).

The pool never holds more than its budget (each block's ``LINE`` bytes of
slack aside): when it is spent, :meth:`PinnedPool.acquire` waits for a block
to come back (backpressure) instead of growing. Every method is thread-safe;
``acquire`` may block and is only called off the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._core.errors import DeviceFatalError, InvalidArgumentError

if TYPE_CHECKING:
    from ..backends import Backend

__all__ = ["PinnedBlock", "PinnedPool", "PoolStats", "default_budget", "release_after_drain"]

MIN_CLASS = 64 << 10
SPARE_MAX = 8
"""The most smallest-class blocks kept on the pool's spare stack (:meth:`PinnedPool.take_small`)."""
LINE = 64
"""Bytes each block is pinned beyond its class, for staging's alignment (``lent.staged_at``)."""


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
    evictions: int = 0
    """Cached blocks freed to make room for a larger one (count): each a pinned
    free and, later, a new pinned allocation."""


class PinnedBlock:
    """One pinned allocation of ``size`` bytes (and ``LINE`` more) at host address ``ptr``."""

    __slots__ = ("events", "guard", "ptr", "retired", "size", "waiters")

    def __init__(self, ptr: int, size: int) -> None:
        self.ptr: int = ptr
        self.size: int = size
        self.events: list[Any] = []
        self.guard: int = 0
        """How many times it was released guarded: tells one guard from the next."""
        self.waiters: int = 0
        """Threads synchronizing on ``events`` outside the pool's lock."""
        self.retired: list[Any] = []
        """Fired events that waiters still use: destroyed when the last one is done."""


class PinnedPool:
    """Size-classed, budgeted, event-guarded pool of pinned host blocks.

    Locking rule: the pool's lock guards bookkeeping only. No driver call
    (allocation, free, event query or destroy) runs while it is held, because
    the event loop takes it (``take_cached``, ``acquire(allocate=False)``,
    ``release`` from a done-callback) and a driver free can wait for the whole device (an H200's
    ``cuMemFreeHost`` waited 1.47 s for an unrelated kernel). Frees and event
    destroys run through ``defer``: the runtime's reaper thread. Fired guard
    events go to ``recycle`` instead, when given (the stager reuses them).
    """

    def __init__(
        self,
        backend: Backend,
        budget: int | None = None,
        *,
        defer: Callable[[Callable[[], None]], None] | None = None,
        recycle: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.backend = backend
        self._recycle = recycle
        """Takes the fired guard events of reclaimed blocks for reuse (else destroyed)."""
        self.budget: int = default_budget() if budget is None else int(budget)
        if self.budget < MIN_CLASS:
            raise InvalidArgumentError(
                f"the pinned budget must be at least {MIN_CLASS} bytes, not {self.budget}"
            )
        self._defer: Callable[[Callable[[], None]], None] = defer or _run_now
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._free: dict[int, list[PinnedBlock]] = {}
        self._spare: list[PinnedBlock] = []
        """Small copies' blocks, in use to the counts, for :meth:`take_small`;
        folded into ``_free`` by anything that looks at the cache as a whole."""
        self._guarded: deque[PinnedBlock] = deque()
        self._reserved = 0
        self._freeing = 0
        """Bytes of evicted blocks whose free has not run yet (still in ``_reserved``)."""
        self._in_use = 0
        self._peak = 0
        self._hits = self._misses = self._waits = 0
        self._evictions = 0
        self._reclaiming = False
        self._closed = False

    # -- public --------------------------------------------------------
    def stats(self) -> PoolStats:
        """Counters now; guarded blocks whose GPU work has finished count as free."""
        self.reclaim()
        with self._cv:
            self._fold_spare_locked()
            return PoolStats(
                self.budget, self._reserved, self._in_use, self._peak,
                self._hits, self._misses, self._waits, self._evictions,
            )  # fmt: skip

    def acquire(
        self,
        nbytes: int,
        *,
        wait: bool = True,
        allocate: bool = True,
        min_bytes: int | None = None,
    ) -> PinnedBlock | None:
        """A block for ``nbytes``; waits for one when the budget is spent.

        With ``min_bytes``, any block of at least that many bytes will do (a
        chunked transfer adapts its chunk to the block): a cached block of
        another size class is used rather than freed and re-pinned. Without
        it the block holds at least ``nbytes``.

        With ``wait=False`` returns None instead of waiting. With
        ``allocate=False`` only a cached block is handed out (None otherwise)
        and nothing calls the driver, so it is safe on an event-loop thread.
        """
        size = size_class(nbytes)
        floor = size if min_bytes is None else min(size, size_class(min_bytes))
        if floor > self.budget:
            raise InvalidArgumentError(
                f"a {floor}-byte pinned block exceeds the pinned budget of {self.budget} "
                "bytes (GPUAIO_PINNED_BUDGET)"
            )
        size = max(floor, min(size, _pow2_floor(self.budget)))
        ceiling = size * 4 if min_bytes is None else 1 << 62
        waited = False
        while True:
            if allocate:
                self.reclaim()
            victims: list[PinnedBlock] = []
            events: list[Any] = []
            with self._cv:
                if self._closed:
                    raise RuntimeError("the pinned pool is closed")
                self._fold_spare_locked()
                # The size asked for (or larger) first. A smaller cached block
                # only when ``size`` cannot be allocated now: a large transfer
                # chunked into the 1 MiB blocks small ones left behind ran at a
                # fifth of its speed (measured on an H200, issue 13).
                block = self._take_locked(size, size, ceiling)
                can_allocate = allocate and self.budget - self._reserved >= size
                if block is None and floor < size and not can_allocate:
                    block = self._take_locked(size, floor, ceiling)
                if block is not None:
                    if waited:
                        self._waits += 1
                    return block
                if not allocate:
                    return None
                room = self.budget - self._reserved
                if room >= floor:
                    size = min(size, _pow2_floor(room))
                    self._reserved += size
                    self._in_use += size
                    self._peak = max(self._peak, self._reserved)
                    self._misses += 1
                    if waited:
                        self._waits += 1
                    break
                victims = self._evict_locked(floor)
                oldest = None
                if not victims and not self._freeing:
                    if not wait:
                        return None
                    oldest = self._guarded[0] if self._guarded else None
                    if oldest is None:
                        waited = True
                        self._cv.wait(0.01)  # a block in use comes back
                        continue
                    # Another thread may reclaim the block meanwhile: its events
                    # must outlive this wait (a destroyed CUevent crashes the wait).
                    oldest.waiters += 1
                    events = list(oldest.events)
                elif not victims:
                    waited = True
                    self._cv.wait(0.01)  # an eviction's free is running
                    continue
            if victims:
                self._defer(functools.partial(self._free_blocks, victims))
                continue
            # Wait, outside the lock, for the oldest guarded block's GPU work.
            waited = True
            assert oldest is not None
            self._wait_events(oldest, events)
        try:
            ptr = self.backend.host_alloc(size + LINE)
        except BaseException:
            with self._cv:
                self._reserved -= size
                self._in_use -= size
                self._cv.notify_all()
            raise
        return PinnedBlock(ptr, size)

    def reserve(self, nbytes: int, count: int, *, more: bool = False) -> int:
        """Allocate blocks ahead of need until ``count`` cached blocks serve ``nbytes``
        (with ``more``: until ``count`` new blocks do, whatever is cached already).

        Stops at the budget (it never evicts). Returns the bytes newly
        allocated. Blocks: calls the driver's allocator, so run it off the
        event loop.
        """
        size = size_class(nbytes)
        if size > self.budget:
            raise InvalidArgumentError(
                f"a {size}-byte pinned block exceeds the pinned budget of {self.budget} "
                "bytes (GPUAIO_PINNED_BUDGET)"
            )
        added = 0
        while True:
            self.reclaim()
            with self._cv:
                if self._closed:
                    raise RuntimeError("the pinned pool is closed")
                self._fold_spare_locked()
                if (added // size if more else len(self._free.get(size, ()))) >= count:
                    return added
                if self._reserved + size > self.budget:
                    return added
                self._reserved += size
                self._peak = max(self._peak, self._reserved)
            try:
                ptr = self.backend.host_alloc(size + LINE)
            except BaseException:
                with self._cv:
                    self._reserved -= size
                raise
            block = PinnedBlock(ptr, size)
            if not self._cache_new(block):  # closed while it was pinned
                self._free_blocks([block])
                raise RuntimeError("the pinned pool is closed")
            added += size

    def take_cached(self, nbytes: int) -> PinnedBlock | None:
        """A cached block of ``nbytes``' size class, or None: never calls the
        driver, never waits (for event loops; :meth:`acquire` does the rest)."""
        size = size_class(nbytes)
        with self._lock:
            lst = self._free.get(size)
            if not lst or self._closed:
                return None
            block = lst.pop()
            self._in_use += size
            self._hits += 1
        return block

    def release(self, block: PinnedBlock, events: list[Any] | tuple[Any, ...] = ()) -> int:
        """Hand ``block`` back; reusable once every event in ``events`` has fired.

        The events become the pool's: once they fire it hands them to
        ``recycle``, or destroys them. No driver call: safe on the event loop.
        Returns the block's guard number, for :meth:`settled`.
        """
        with self._lock:
            if events:
                block.events = list(events)
                block.guard += 1
                self._guarded.append(block)
            else:
                self._put_free_locked(block)
            # Only a thread waiting in acquire() needs the notification; small
            # copies release a block per op, on the loop, and a notify_all()
            # with nobody waiting still costs a microsecond there.
            if self._cv._waiters:  # type: ignore[attr-defined]
                self._cv.notify_all()
            return block.guard

    def take_small(self) -> PinnedBlock | None:
        """:meth:`take_cached` for copies of up to ``MIN_CLASS`` bytes: off the
        spare stack first, by a list's ``pop`` (atomic under the GIL) instead of
        the lock (with the hand-back, about 1 us of a 16 us 4 KiB download on an
        H100 host, issue 13). Its hit count may lose an update, never a block."""
        try:
            block = self._spare.pop()
        except IndexError:
            return self.take_cached(MIN_CLASS)
        self._hits += 1
        return block

    def release_small(self, block: PinnedBlock) -> None:
        """Hand back, unguarded, a block of :meth:`take_small`'s whose GPU work
        is done: onto the spare stack (still counted as in use) unless it is
        full, the block larger, the pool closed, or a thread waits in
        :meth:`acquire` (which folds the stack in before each wait, <= 10 ms)."""
        waiting = self._cv._waiters or self._closed  # type: ignore[attr-defined]
        if block.size == MIN_CLASS and len(self._spare) < SPARE_MAX and not waiting:
            self._spare.append(block)
        else:
            self.release(block)

    def settled(self, guarded: list[tuple[PinnedBlock, int]]) -> None:
        """The GPU work behind these guards has finished: the blocks are reusable now.

        ``guarded`` holds (block, guard number from :meth:`release`) pairs;
        a block released guarded again since then is left alone. The caller
        knows the work ran (a marker behind it fired), so nothing is queried:
        the next :meth:`take_cached` finds the blocks with no driver call.
        """
        dead: list[Any] = []
        with self._cv:
            if self._reclaiming:
                # A pass is querying guard events outside the lock: retiring
                # now would hand those events on (to be reused or destroyed)
                # under it. Leave the blocks to that pass or the next one;
                # never wait for it, as this may run on an event loop.
                return
            done = [b for b, n in guarded if b.guard == n and b.events]
            if not done:
                return
            self._retire_locked(done, dead)
            if self._cv._waiters:  # type: ignore[attr-defined]
                self._cv.notify_all()
        self._recycle_events(dead)

    def reclaim(self) -> None:
        """Make guarded blocks whose events have all fired reusable.

        The events are queried outside the lock, by one thread at a time
        (another caller waits for that pass rather than querying twice), then
        handed to ``recycle``, or destroyed through ``defer`` without one.
        """
        with self._cv:
            while self._reclaiming:
                self._cv.wait()
            if not self._guarded:
                return
            self._reclaiming = True
            # Each block with the guard it had: settled() may free one meanwhile,
            # and another transfer guard it anew.
            blocks = [(b, b.guard, list(b.events)) for b in self._guarded]
        dead: list[Any] = []
        fired: list[tuple[PinnedBlock, int]] = []
        try:
            fired = [(b, n) for b, n, evs in blocks if self._fired(evs)]
        finally:
            with self._cv:
                self._reclaiming = False
                done = [b for b, n in fired if b.guard == n and b.events]
                if done:
                    self._retire_locked(done, dead)
                self._cv.notify_all()
        self._recycle_events(dead)

    def _retire_locked(self, done: list[PinnedBlock], dead: list[Any]) -> None:
        """Move guarded blocks whose events fired to the free lists; collect the events.

        The caller wakes the threads waiting for a block (``reclaim`` does anyway)."""
        gone = {id(b) for b in done}
        self._guarded = deque(b for b in self._guarded if id(b) not in gone)
        for block in done:
            if block.waiters:  # a thread still synchronizes on them
                block.retired.extend(block.events)
            else:
                dead.extend(block.events)
            block.events = []
            self._put_free_locked(block)

    def _recycle_events(self, dead: list[Any]) -> None:
        if dead:
            if self._recycle is not None:
                self._recycle(dead)
            else:
                self._defer(functools.partial(self._destroy, dead))

    def trim(self) -> int:
        """Free cached idle blocks; returns the bytes given back to the driver.

        Calls the driver's free on the calling thread: run it off the loop.
        """
        self.reclaim()
        with self._cv:
            self._fold_spare_locked()
            blocks = [b for lst in self._free.values() for b in lst]
            self._free.clear()
            freed = sum(b.size for b in blocks)
            self._freeing += freed
        self._free_blocks(blocks)
        return freed

    def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` s) for guarded blocks' GPU work, then free what is idle.

        Blocks whose GPU work has not finished by then are never freed (a
        stuck stream could still write them): a bounded leak, not a hang.
        Idle blocks are freed within the same bound: a free that waits for the
        device (``cuMemFreeHost``: no host pool) stays behind a hung kernel.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.reclaim()
            with self._cv:
                busy = bool(self._guarded) or self._freeing > 0
                if busy:
                    self._cv.wait(0.001)
            if not busy:
                break
        failed: list[BaseException] = []

        def trim() -> None:
            try:
                self.trim()
            except BaseException as exc:  # raised below, if it ends in time
                failed.append(exc)

        t = threading.Thread(target=trim, name="gpuaio-pool-close", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        with self._cv:
            self._closed = True
        if failed and not t.is_alive():
            raise failed[0]

    # -- internal ------------------------------------------------------
    def _fired(self, events: list[Any]) -> bool:
        try:
            return all(self.backend.event_query(ev) for ev in events)
        except DeviceFatalError:
            return True  # a dead context runs no more DMA: the block is safe
        except Exception:
            return False

    def _destroy(self, events: list[Any]) -> None:
        for ev in events:
            with contextlib.suppress(Exception):
                self.backend.event_destroy(ev)

    def _free_blocks(self, blocks: list[PinnedBlock]) -> None:
        """Give evicted or trimmed blocks back to the driver, then their bytes to the budget."""
        error: Exception | None = None
        for b in blocks:
            try:
                # Idle, and only gpuaio ever used it: no wait for the device.
                self.backend.host_free_async(b.ptr)
            except Exception as exc:  # the rest are still freed; the caller reports it
                error = error or exc
            finally:
                with self._cv:
                    self._reserved -= b.size
                    self._freeing -= b.size
                    self._cv.notify_all()
        if error is not None:
            raise error

    def _cache_new(self, block: PinnedBlock) -> bool:
        """Cache a newly pinned block, unless the pool is closed: then count it
        as being freed (for :meth:`_free_blocks`) and return False."""
        with self._cv:
            if self._closed:
                self._freeing += block.size
                return False
            self._free.setdefault(block.size, []).append(block)
            self._cv.notify_all()
            return True

    def _wait_events(self, block: PinnedBlock, events: list[Any]) -> None:
        """Synchronize on ``events`` (``block``'s, its ``waiters`` counted up by the caller)."""
        dead: list[Any] = []
        try:
            for ev in events:
                self.backend.event_synchronize(ev)
        except DeviceFatalError:
            pass  # a dead context runs no more DMA: the block is safe (reclaim agrees)
        finally:
            with self._cv:
                block.waiters -= 1
                if block.waiters == 0:
                    dead, block.retired = block.retired, []
            if dead:
                self._defer(functools.partial(self._destroy, dead))

    def _take_locked(self, size: int, floor: int, ceiling: int) -> PinnedBlock | None:
        """A cached block: ``size`` first, then the smallest larger one up to
        ``ceiling``, then the largest smaller one down to ``floor``."""
        lst = self._free.get(size)
        if not lst:
            larger = [c for c in self._free if size < c <= ceiling and self._free[c]]
            smaller = [c for c in self._free if floor <= c < size and self._free[c]]
            if larger:
                lst = self._free[min(larger)]
            elif smaller:
                lst = self._free[max(smaller)]
            else:
                return None
        block = lst.pop()
        self._in_use += block.size
        self._hits += 1
        return block

    def _fold_spare_locked(self) -> None:
        """Move the spare stack's blocks into the cache (pops: each block once)."""
        with contextlib.suppress(IndexError):  # another thread took the last one
            while self._spare:
                self._put_free_locked(self._spare.pop())

    def _put_free_locked(self, block: PinnedBlock) -> None:
        self._in_use -= block.size
        self._free.setdefault(block.size, []).append(block)

    def _evict_locked(self, floor: int) -> list[PinnedBlock]:
        """Cached blocks too small for a ``floor``-byte request, taken out to be freed
        so one fits; none unless freeing them makes enough room."""
        room = self.budget - self._reserved + self._freeing
        small = sorted(
            (b for c, lst in self._free.items() if c < floor for b in lst), key=lambda b: b.size
        )
        if room + sum(b.size for b in small) < floor:
            return []  # freeing them would not make room: wait for blocks in use
        victims: list[PinnedBlock] = []
        while room < floor:
            b = small.pop()
            self._free[b.size].remove(b)
            victims.append(b)
            room += b.size
        freed = sum(b.size for b in victims)
        self._freeing += freed
        self._evictions += len(victims)
        return victims


def _run_now(fn: Callable[[], None]) -> None:
    fn()


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def release_after_drain(backend: Any, native: Any, pool: PinnedPool, block: PinnedBlock) -> None:
    """A DMA into/from ``block`` is enqueued but unguarded: release it once it ran."""
    try:
        backend.stream_synchronize(native)
    except Exception:
        return  # cannot tell whether the DMA ran: never hand the block out again
    pool.release(block)
