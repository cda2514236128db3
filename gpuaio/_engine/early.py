"""A small download's DMA, issued before its destination is checked.

A download of up to ``inline_max`` bytes into pageable memory goes through a
pinned block: the DMA fills the block, and the copy-out into the caller's
array is the op's completion step (``Stager._small_d2h``). The DMA touches
the device source and the block only, never the destination. So
``Transfers.copy`` issues it (:func:`issue`) once the source is checked, a
block is taken and the stream allows it, and only then checks the
destination, makes the op and registers it (:func:`adopt`), while the GPU
starts the copy: that work no longer delays the DMA's start. On a CPU
machine's timelines it was about half of what a 4 KiB download ran before
its driver call, and on GPU hosts gpuaio's call reached the driver 3-5 us
later than a hand-written download, more after a large copy-out had emptied
the caches (issue 13, run FB).

The destination's size, dtype and shape are checked against the source
before the DMA, from the array itself (``transfers._fits``): a call rejected
for its arguments enqueues nothing. The rest of its checks (``describe``: the
registry, the memory kind) come after and are as full as before, before the
call returns: should one fail now (another thread registered the array
meanwhile), the call raises or goes the usual way as before, nothing has been
written to the caller's memory, and the DMA completes as an op nobody awaits,
which releases the block and the source's allocation once it has run
(``adopt`` with no destination).

From ``DOWN_PIECE_MIN`` bytes :func:`issue` enqueues the DMA in two pieces
with an op of its own between them, whose completion step copies the first
piece out (``lent.FirstPiece``) while the second's DMA runs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from .._core.operation import Operation
from .buffers import BufferInfo, InUse
from .lent import FirstPiece, Lent, staged_at
from .pool import MIN_CLASS, PinnedBlock, PinnedPool, release_after_drain
from .stagingconfig import DOWN_FIRST_PCT, PCIE_BPS, POLL_FIRST_MAX

if TYPE_CHECKING:
    from .completion import CompletionEngine
    from .sequencer import Sequencer
    from .staging import Stager

__all__ = ["Early", "adopt", "issue"]

issued = 0
"""Downloads whose DMA :func:`issue` enqueued (for tests and probes)."""
pieced = 0
"""Those of them enqueued in two pieces (for tests and probes)."""
PAGE = 4096
_PIECE_LABEL = "copy D2H (first piece)"


class Early:
    """A download's DMA issued by :func:`issue`, not yet watched."""

    __slots__ = ("alloc", "engine", "est", "lent", "native", "short")

    def __init__(
        self,
        engine: CompletionEngine,
        lent: Lent,
        native: Any,
        short: bool,
        est: float,
        alloc: InUse | None,
    ) -> None:
        self.engine = engine
        self.lent = lent
        """The block the DMA fills, and the copy-out from it, its destination unset."""
        self.native = native
        self.short = short
        self.est = est
        self.alloc = alloc


def issue(stager: Stager, seq: Sequencer, src: BufferInfo, host: int) -> Early | None:
    """Enqueue the DMA of device buffer ``src`` into a pinned block now, where
    the usual path would take the small-copy way and enqueue it from this
    thread, placed for a copy-out to host address ``host``; else None, with
    nothing done. The source's allocation is held from before the DMA (it
    raises if freed). What is returned must go to :func:`adopt`."""
    n = src.nbytes
    if n > stager.config.inline_max or not stager._small_fit:
        return None
    gated = stager.gated
    if gated is not None and n >= gated.least and gated.covers(n, False):
        return None
    engine = seq._engine
    if engine is None or engine.closed or not seq.deps_clear():
        return None
    # As Stager.copy: a copy polled first has its DMA's expected duration.
    est = n / PCIE_BPS if n <= POLL_FIRST_MAX else 0.0
    short = 0.0 < est <= engine.short_op_s and not seq.exported
    pool = stager.pool
    # Cached blocks only, as Stager.copy: allocating is a slow driver call.
    # On a miss the usual path asks the pool again (``acquire``, which reclaims
    # blocks whose events have fired) and counts the miss: not twice per copy.
    block = pool.take_small() if n <= MIN_CLASS else pool.take_cached(n)
    if block is None:
        return None
    alloc = src.alloc
    try:
        if alloc is not None:
            alloc.acquire()  # raises if the source was freed
    except BaseException:
        pool.release_small(block)
        raise
    if not seq.may_enqueue(engine, short):
        pool.release_small(block)
        if alloc is not None:
            alloc.release()
        return None
    native = seq.native
    at = staged_at(block, host)
    lent = Lent(pool, block, 0, n, at)
    least = stager.down_piece_min
    first = _first_piece(n) if least and n >= least else 0  # no call for most downloads
    memcpy = stager.runtime.backend.memcpy_async
    try:
        memcpy(at, src.ptr, first or n, native)
    except BaseException:
        pool.release_small(block)  # nothing was enqueued
        if alloc is not None:
            alloc.release()
        raise
    if first:
        try:
            piece = Operation(_PIECE_LABEL, None, (), first)
            piece._tracer = None  # not one of the user's ops: untraced, never awaited
            piece._retrieved = True
            piece._complete = FirstPiece(lent, first)
            seq.watch(engine, piece, native, False)
            memcpy(at + first, src.ptr + first, n - first, native)
        except BaseException:
            # The first DMA may still write the block and read the source.
            drained = functools.partial(_release_after_drain, stager, native, pool, block, alloc)
            stager.runtime.reaper.submit(drained)
            raise
        global pieced
        pieced += 1
    global issued
    issued += 1
    return Early(engine, lent, native, short, est, alloc)


def _first_piece(n: int) -> int:
    """Bytes of the first DMA of an ``n``-byte download that goes in two:
    ``DOWN_FIRST_PCT`` of it, in whole pages (0: too small to split)."""
    first = n * DOWN_FIRST_PCT // 100 // PAGE * PAGE
    return first if 0 < first < n else 0


def _release_after_drain(
    stager: Stager, native: Any, pool: PinnedPool, block: PinnedBlock, alloc: InUse | None
) -> None:
    """A download failed between its two DMAs (reaper thread): hand its block
    and its source back once the stream has drained."""
    release_after_drain(stager.runtime.backend, native, pool, block)
    if alloc is not None:
        alloc.release()


def adopt(stager: Stager, seq: Sequencer, early: Early, op: Operation, dst: int) -> Operation:
    """Make ``op`` (``op.nbytes`` bytes) the op of ``early``'s DMA and watch
    it: its completion step copies the block out to address ``dst``, then it
    releases the block and the source's allocation. ``dst`` 0: no copy-out
    (the destination failed its checks; nobody awaits ``op``)."""
    op._est = early.est
    alloc = early.alloc
    if alloc is not None:
        op._allocs = (alloc,)
    lent = early.lent
    if dst:
        lent.dst = dst
        op._complete = lent
    op._add_done_callback(lent.release)
    seq.watch(early.engine, op, early.native, early.short)
    if dst:
        seq.note_copy_out(op)
    return op
