"""Chunked staging of pageable transfers through the pinned pool.

The driver copies pageable memory synchronously and slowly (one thread,
7-12 GB/s on an H100 host against 55 GB/s DMA). gpuaio instead:

* **H2D from pageable**: splits the copy into chunks; for each, takes a pinned
  block, copies the chunk into it with several threads (chunks of up to
  ``SOLO_CHUNK``: on the stream's host thread itself), DMAs its slices as
  they are copied, and hands the block back guarded by an event, reused once
  it fired. The DMA of chunk *i* runs while chunk *i+1* is copied; at most
  ``depth`` chunks are in DMA per transfer. The op completes when the last
  DMA has.
* **D2H into pageable** (:mod:`gpuaio._engine.download`): the reverse: up to
  ``depth`` DMAs into pinned blocks run ahead while finished chunks are
  copied out. The op completes when the last byte is in the user's buffer.
* **Small transfers** (``inline_max`` bytes or less) skip the thread hop where
  stream order allows: the host copy of an H2D runs on the calling thread
  when no host action of the stream that may write host memory is pending
  (its DMA still queues behind the stream's host jobs); the copy-out of a
  D2H is the op's completion step, which the stream's completion queue runs
  in stream order (see :mod:`gpuaio._engine.sequencer`).

Everything else runs as host steps on the stream's host thread, which settle
on the host actions before them, so stream order holds. Every path puts a
chunk's bytes in its block as ``lent.staged_at`` says, through the steps
of :mod:`gpuaio._engine.chunks`.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core import trace as _trace
from .._core.errors import InvalidArgumentError, OperationAbortedError
from .._core.operation import Operation
from .._core.progress import report_progress
from .buffers import BufferInfo
from .chunks import D2H_CHUNK, H2D_CHUNK, chunk_block, drop, guarded_dma, stage
from .download import download
from .eventcache import EventCache
from .gated import GatedCopies
from .growth import ClassGrowth
from .lent import Lent, copy_small, staged_at
from .nativecopy import nt_copier
from .pieces import upload_in_pieces
from .pool import LINE, MIN_CLASS, PinnedBlock, PinnedPool, size_class
from .stagingconfig import (
    D2H_NT_MIN,
    D2H_PIECE_MIN,
    D2H_PIECES,
    DIRECT_UP_MAX,
    DMA_STEP,
    DOWN_PIECE_MIN,
    GATED_DOWN_MAX,
    GATED_UP_MAX,
    INLINE_PIECE_MIN,
    INLINE_PIECES,
    LOOKAHEAD,
    NT_MIN,
    PCIE_BPS,
    POLL_FIRST_MAX,
    SOLO_CHUNK,
    StagingConfig,
)

if TYPE_CHECKING:
    from .sequencer import Sequencer
    from .services import Services

__all__ = ["Stager", "StagingConfig"]


class Stager:
    """Runs pageable transfers of one runtime through its pinned pool."""

    def __init__(
        self, runtime: Services, config: StagingConfig | None = None, budget: int | None = None
    ) -> None:
        self.runtime = runtime
        self.config: StagingConfig = config or StagingConfig()
        self.events: EventCache = EventCache(runtime.backend, runtime.reaper.submit)
        self.pool: PinnedPool = PinnedPool(
            runtime.backend, budget, defer=runtime.reaper.submit, recycle=self.events.put
        )
        self.growth: ClassGrowth = ClassGrowth(self.pool, runtime.reaper.submit)
        # Whether every small copy's block fits the budget (its check then costs nothing per copy).
        self._small_fit = size_class(self.config.inline_max) <= self.pool.budget
        # Uploads of NT_MIN bytes or more write their blocks with non-temporal stores
        # where this install can (stagingconfig.NT_MIN); downloads from D2H_NT_MIN copy out so.
        nt = nt_copier()
        self.direct_up_max: int = DIRECT_UP_MAX
        """Pageable uploads up to this size go to the driver on an idle stream
        (:data:`~gpuaio._engine.stagingconfig.DIRECT_UP_MAX`); 0: none."""
        self.direct_uploads: int = 0
        """Uploads handed to the driver so (for tests and probes)."""
        self.inline_pieces: int = INLINE_PIECES
        """Uploads staged on the calling thread go in up to this many pieces (``INLINE_PIECES``)."""
        self.down_piece_min: int = DOWN_PIECE_MIN
        """Early downloads from this size go in two pieces (``DOWN_PIECE_MIN``); 0: none."""
        self._nt: Callable[[int, int, int], None] | None = nt if NT_MIN else None
        self.nt_out: Callable[[int, int, int], None] | None = nt if D2H_NT_MIN else None
        """How downloads from ``D2H_NT_MIN`` bytes copy out (non-temporal stores), or None."""
        self.d2h_pieces: int = D2H_PIECES if runtime.host.native else 1
        """A staged download's chunks are DMAed in up to this many pieces
        (``D2H_PIECES``, on the native copy threads only, as measured)."""
        self.d2h_piece_min: int = D2H_PIECE_MIN
        """None of them smaller than this (``D2H_PIECE_MIN``)."""
        # Mid-size copies gated on the native copy threads (gated.py); both ranges off: no path.
        self.gated: GatedCopies | None = None
        if GATED_UP_MAX or GATED_DOWN_MAX:
            self.make_gated()

    def make_gated(self) -> GatedCopies | None:
        """The gated path, made now if there is none and the install has the
        native copy threads (else None): at start-up where ``GATED_UP_MAX``
        or ``GATED_DOWN_MAX`` is set, later where a test or probe turns the path on."""
        if self.gated is None and self.runtime.host.native:
            nt = nt_copier() is not None
            self.gated = GatedCopies(self.runtime, self.pool, nt, self.chunk_for)
        return self.gated

    def close(self) -> None:
        """Close the pinned pool (waits, bounded, for blocks still in use), drop cached events."""
        if self.gated is not None:
            self.gated.close()
        self.pool.close()
        self.events.close()

    def blocks_for(self, transfer_bytes: int, concurrent: int = 1) -> tuple[int, int]:
        """(block size, count) that ``concurrent`` transfers of this size hold at most."""
        if transfer_bytes <= self.config.inline_max:
            return transfer_bytes, concurrent  # one block per small transfer in flight
        per_transfer = self.config.depth + LOOKAHEAD  # in DMA + being copied
        return self.chunk_for(transfer_bytes), per_transfer * concurrent

    def chunk_for(self, transfer_bytes: int) -> int:
        """The chunk size of a staged transfer of this size under this pool's budget."""
        return self.config.chunk_for(transfer_bytes, self.pool.budget)

    def check_budget(self, nbytes: int) -> None:
        """Raise, before anything is enqueued, if no block for this copy fits the budget."""
        budget = self.pool.budget
        small = nbytes <= self.config.inline_max
        need = size_class(nbytes) if small else size_class(self.config.min_chunk)
        if need > budget:
            what = "block" if small else "chunk (the smallest staging chunk)"
            raise InvalidArgumentError(
                f"a {nbytes}-byte pageable copy needs a {need}-byte pinned {what}, more "
                f"than the pinned budget of {budget} bytes (GPUAIO_PINNED_BUDGET): raise "
                f"the budget to at least {need} bytes, or copy from pinned memory"
            )

    # -- entry ---------------------------------------------------------
    def copy(self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo) -> Operation:
        """Schedule ``op`` (a copy with a pageable side) on ``stream``."""
        h2d = s.kind.is_host
        n = d.nbytes
        if h2d and n <= self.direct_up_max and self._small_fit and _idle(seq):
            # The driver stages the source before the call returns; with the
            # stream idle it has no earlier work to wait for first. Not where
            # the budget is below a small copy's block: whether a copy is
            # rejected at the call must not depend on the stream's state.
            op._est = n / PCIE_BPS
            self.direct_uploads += 1
            return seq.gpu(op, self.runtime.backend.memcpy_async, d.ptr, s.ptr, n)
        gated = self.gated
        if (
            gated is not None
            and n >= gated.least  # (covers() is a call: none for smaller copies)
            and gated.covers(n, h2d)
            and gated.copy(seq, op, d, s)
        ):
            return op
        small = n <= self.config.inline_max
        if not (small and self._small_fit):
            try:
                self.check_budget(n)
            except BaseException as exc:  # nothing was enqueued
                op._resolve(exc)
                raise
        if small and (seq.reads_clear() if h2d else seq.deps_clear()):
            # Cached blocks only: allocating pinned memory is a slow driver
            # call that must not run on the caller's (event-loop) thread.
            block = self.pool.take_small() if n <= MIN_CLASS else self.pool.take_cached(n)
            if block is None:
                try:
                    block = self.pool.acquire(n, wait=False, allocate=False)
                except BaseException as exc:  # over the budget, or closed: nothing was enqueued
                    op._resolve(exc)
                    raise
                if block is None or block.size > size_class(n):
                    self.growth.missed(n)  # the host thread's path, or a larger class's block
            if block is not None:
                if n <= POLL_FIRST_MAX:
                    # Its DMA is a pinned copy: so is its expected duration.
                    op._est = n / PCIE_BPS
                if h2d:
                    return self._small_h2d(seq, op, d, s, block)
                return self._small_d2h(seq, op, d, s, block)
        # An upload's host job only reads host memory: later small uploads need not wait.
        if self.config.inline_max < n <= self.config.driver_max:
            step = self._driver_or_staged
        elif h2d:
            step = self._h2d
        else:
            step = self._d2h
        work = functools.partial(step, seq, op, d, s)
        return seq.host(op, work, after_gpu=False, writes_host=not h2d)

    def _driver_or_staged(
        self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo
    ) -> bool:
        """Host job: the driver's own pageable copy when the stream is idle, else staging.

        The driver copies pageable memory on the calling thread, pipelined
        with its DMA and with no hand-off between threads, but only after the
        stream's earlier work has finished; staging overlaps that work.
        """
        h2d = s.kind.is_host
        if self.runtime.engine(seq.ordinal).pending_on(seq.key):
            return self._h2d(seq, op, d, s) if h2d else self._d2h(seq, op, d, s)
        if op._abort:
            raise OperationAbortedError(f"{op.label}: aborted after 0 of {d.nbytes} bytes")
        # Traced like a staged chunk: one chunk, copied by the driver.
        name = H2D_CHUNK if h2d else D2H_CHUNK
        args = {"chunk": 0, "offset": 0, "bytes": d.nbytes, "driver": True}
        backend = self.runtime.backend
        _trace.traced_call(
            name, op._tracer, args, backend.memcpy_async, d.ptr, s.ptr, d.nbytes, seq.native
        )
        # Into pageable memory the call returns once the copy has completed.
        # From pageable memory it returns once the source is staged, with the
        # DMA of the driver's last staging buffer still running: microseconds.
        # Waiting for it here and resolving the op from this thread, as a
        # download does, beats a marker, the watcher and a woken loop: those
        # took 130-280 us after the call for 2-4 MiB on an H200 (issue 13,
        # run Z, ``tools/hop_probe.py``).
        if h2d:
            seq.wait_tail()
        return False

    # -- small ---------------------------------------------------------
    def _small_h2d(
        self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo, block: PinnedBlock
    ) -> Operation:
        """The source is read now: no earlier host action of the stream is pending."""
        n = d.nbytes
        nt = self._nt
        if n >= 2 * INLINE_PIECE_MIN and self.inline_pieces > 1:  # else one piece
            piece = -(-n // min(self.inline_pieces, n // INLINE_PIECE_MIN))
            copy = nt if nt is not None and piece >= NT_MIN else copy_small
            backend, defer = self.runtime.backend, self.runtime.reaper.submit
            args = (seq, op, d.ptr, s.ptr, n, piece, block, self.pool, backend, defer)
            return upload_in_pieces(*args, copy)
        at = staged_at(block, s.ptr)
        try:
            # Small: cheaper than a thread hop (and memmove than numpy views).
            if nt is not None and n >= NT_MIN:
                nt(at, s.ptr, n)
            else:
                copy_small(at, s.ptr, n)
        except BaseException as exc:
            self.pool.release_small(block)
            op._resolve(exc)
            raise
        # Not a closure, here and below: see Sequencer._gpu_job.
        op._add_done_callback(Lent(self.pool, block).release)
        return seq.gpu(op, self.runtime.backend.memcpy_async, d.ptr, at, n)

    def _small_d2h(
        self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo, block: PinnedBlock
    ) -> Operation:
        """DMA into a pinned block; the copy-out is the op's completion step."""
        n = d.nbytes
        # The op keeps the destination alive. The copy-out: block -> destination.
        at = staged_at(block, d.ptr)
        lent = Lent(self.pool, block, d.ptr, n, at)
        op._complete = lent
        op._add_done_callback(lent.release)
        seq.gpu(op, self.runtime.backend.memcpy_async, at, s.ptr, n)
        seq.note_copy_out(op)
        return op

    # -- large ---------------------------------------------------------
    def _h2d(self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo) -> bool:
        """Host job: chunks of ``s`` -> pinned blocks -> DMA into ``d``.

        Up to ``LOOKAHEAD`` chunks are being copied by the host threads while
        this thread DMAs the oldest's slices as they are copied, in any
        order, at least ``DMA_STEP`` bytes at once, so the DMA trails the
        host copy by about a step and the copy threads never idle at a chunk
        boundary; a ring of ``depth`` events bounds the chunks in DMA.
        """
        backend, pool, host = self.runtime.backend, self.pool, self.runtime.host
        native = seq.native
        nt = self._nt
        src_ptr = s.ptr
        sh = src_ptr & (LINE - 1)  # each chunk's bytes sit as lent.staged_at says
        n = d.nbytes
        chunk = self.chunk_for(n)
        floor = self.config.min_chunk
        own = n <= self.config.inline_max  # see chunk_block
        depth = self.config.depth
        device = seq.ordinal
        solo = chunk <= SOLO_CHUNK
        # Chunks this thread copies itself are copied one ahead: the DMA of
        # one then runs while the next is copied (with two ahead, a transfer
        # of two chunks would copy both before its first DMA).
        lookahead = 1 if solo else LOOKAHEAD
        events = self.events
        ring = [events.get(device) for _ in range(depth)]
        # (offset, bytes, block, its copy or None when copied, bytes DMAed)
        copying: deque[list[Any]] = deque()
        # Chunk copies are traced on the host threads that run them, into
        # the tracer the op captured when its task enqueued it.
        tracer = op._tracer
        guards: list[tuple[PinnedBlock, int]] = []
        k = 0
        off = 0
        enqueued = 0
        last = 0
        j = 0
        try:
            while off < n or copying:
                while off < n and len(copying) < lookahead and not op._abort:
                    ln = min(chunk, n - off)
                    # Wait for a block only while holding none being copied:
                    # waiting while holding could deadlock transfers.
                    # A cached block first: acquire() reclaims (queries every
                    # guarded block's events) before it looks.
                    block = chunk_block(pool, ln, not copying, min(ln, floor), own)
                    if block is None:
                        break
                    # A smaller cached block shortens the chunk; a larger one
                    # holds the chunk planned (one chunk in a block that size
                    # would lose the overlap of host copy and DMA).
                    ln = min(ln, block.size)
                    cp = stage(
                        host, H2D_CHUNK, tracer, k, off, block.ptr + sh, src_ptr + off, ln, solo,
                        nt if ln >= NT_MIN else None,
                    )  # fmt: skip
                    copying.append([off, ln, block, cp, 0])
                    k += 1
                    off += ln
                if not copying:
                    break
                entry = copying[0]
                o, ln, block, cp, sent = entry
                # Slices as they are copied, in any order: one that a late
                # thread still copies holds none of the others back.
                parts = [(0, ln)] if cp is None else cp.take_copied(DMA_STEP)
                if sent == 0 and j >= depth:
                    # The first DMA of this chunk: wait until the chunk
                    # ``depth`` before it is out of DMA.
                    backend.event_synchronize(ring[j % depth])
                final = sent + sum(b for _, b in parts) == ln
                for fo, fl in parts[:-1] if final else parts:
                    # Its block stays guarded by the chunk's last DMA.
                    backend.memcpy_async(d.ptr + o + fo, block.ptr + sh + fo, fl, native)
                    entry[4] += fl
                if not final:
                    continue
                po, pl = parts[-1]
                copying.popleft()
                guard = guarded_dma(
                    backend, native, events, device, pool, block,
                    d.ptr + o + po, block.ptr + sh + po, pl, drain=entry[4] > 0,
                )  # fmt: skip
                guards.append((block, pool.release(block, [guard])))
                backend.event_record(ring[j % depth], native)
                j += 1
                enqueued += ln
                last = pl
                if op._progress is not None and enqueued < n:
                    report_progress(op._progress, enqueued, n)
        finally:
            drop(backend, native, pool, copying)
            # Pending or not: every user records an event before it waits on
            # it, and a record replaces the one before.
            events.put(ring)
        if enqueued < n:
            seq.wait_prior()
            raise OperationAbortedError(f"{op.label}: aborted after {enqueued} of {n} bytes")
        # What is left is about the last DMA: with an expected time, the
        # watcher sleeps until just before it and wakes the awaiting loop in time.
        op._est = last / PCIE_BPS
        op._add_done_callback(functools.partial(_settle, op, pool, guards))
        return True

    def _d2h(self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo) -> bool:
        """Host job: a staged download (:func:`gpuaio._engine.download.download`)."""
        return download(self, seq, op, d, s)


def _idle(seq: Sequencer) -> bool:
    """Whether ``seq``'s stream has nothing the driver could wait for: no
    pending gpuaio work (waits on other streams' events included), no host
    job queued or running, no pending write of host memory, and no other
    library that may have enqueued on it."""
    return (
        not seq.exported and seq.idle and seq.reads_clear() and not seq.engine().pending_on(seq.key)
    )


def _settle(op: Operation, pool: PinnedPool, guards: list[tuple[PinnedBlock, int]]) -> None:
    """A staged upload is done: the op's marker fired behind every DMA, so its
    blocks are free for the next transfer with no event queried (a reclaim
    pass took 35-90 us before a copy's first host copy, issue 13's timelines)."""
    if op._exc is None:
        pool.settled(guards)
