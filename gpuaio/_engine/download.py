"""A staged download into pageable memory, on the stream's host thread.

DMAs of chunks of the device source into pinned blocks run ahead (up to the
config's ``depth`` chunks) while the copy threads copy the finished ones out
into the destination (up to ``LOOKAHEAD`` chunks at once). The op completes
when the last byte is in the caller's memory.

A chunk's DMA may go in pieces (``D2H_PIECES``), an event behind each: the
copy-out of a piece starts once its own DMA has landed instead of once the
whole chunk's has. The copy threads idle until the first copy-out starts
(a whole 8 MiB chunk of a 64 MiB download took about 155 us at 54 GB/s), and
at each chunk whose DMA the copy-out caught up with. The pieces share their
chunk's block, which the chunk's last piece holds: it goes back to the pool
once every piece has been copied out (copy-outs end in order here).

``D2H_WARM_US`` (100 us by default) wakes the idle copy threads as the first
DMA starts, to be polling when its copy-out comes rather than asleep.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .._core.errors import OperationAbortedError
from .._core.operation import Operation
from .._core.progress import report_progress
from .buffers import BufferInfo
from .chunks import D2H_CHUNK, chunk_block, drop, guarded_dma, stage
from .eventcache import EventCache
from .pool import LINE, PinnedBlock, PinnedPool
from .stagingconfig import D2H_NT_MIN, D2H_SPLIT, D2H_WARM_US, LOOKAHEAD, PCIE_BPS, SOLO_CHUNK

if TYPE_CHECKING:
    from .sequencer import Sequencer
    from .services import Services
    from .stagingconfig import StagingConfig

__all__ = ["PIECE_ALIGN", "Staging", "download", "piece_lengths"]


PIECE_ALIGN = 64 << 10
"""Pieces start at offsets of the chunk that are multiples of this."""


class Staging(Protocol):
    """What a download needs of the stager that runs it (``staging.Stager``)."""

    runtime: Services
    pool: PinnedPool
    config: StagingConfig
    events: EventCache
    d2h_pieces: int
    """Pieces per chunk's DMA (``D2H_PIECES``)."""
    d2h_piece_min: int
    """The least bytes of such a piece (``D2H_PIECE_MIN``)."""
    nt_out: Callable[[int, int, int], None] | None
    """The copy-out from ``D2H_NT_MIN`` bytes (non-temporal stores), or None."""

    def chunk_for(self, transfer_bytes: int) -> int: ...


class _Piece(NamedTuple):
    """A piece of a chunk whose DMA was enqueued."""

    offset: int
    """Where it starts in the transfer."""
    nbytes: int
    at: int
    """Where its bytes sit in the chunk's block."""
    block: PinnedBlock | None
    """The chunk's block, on the chunk's last piece only."""
    event: Any
    """Recorded behind the piece's DMA."""
    first: bool
    """Whether it is its chunk's first piece."""


def piece_lengths(nbytes: int, pieces: int, least: int) -> list[int]:
    """How a chunk of ``nbytes`` is DMAed in up to ``pieces`` pieces: as many
    as fit ``least`` bytes each (at least ``PIECE_ALIGN``), equal whole
    multiples of ``PIECE_ALIGN`` but the last, which takes the rest (one
    piece: the chunk)."""
    count = min(pieces, nbytes // max(least, PIECE_ALIGN))
    if count < 2:
        return [nbytes]
    step = nbytes // count // PIECE_ALIGN * PIECE_ALIGN
    return [step] * (count - 1) + [nbytes - step * (count - 1)]


def download(stager: Staging, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo) -> bool:
    """Host job: DMA chunks of ``s`` into pinned blocks, copy them out into ``d``.

    Returns False (the op is resolved by its host job's end); raises
    :class:`OperationAbortedError` if the op was aborted short of the end,
    with every block handed back once no DMA or copy can touch it.
    """
    runtime, pool, config = stager.runtime, stager.pool, stager.config
    backend, host = runtime.backend, runtime.host
    native = seq.native
    dst_ptr = d.ptr
    sh = dst_ptr & (LINE - 1)  # where each chunk's bytes sit in its block (lent.staged_at)
    n = d.nbytes
    chunk = stager.chunk_for(n)
    floor = config.min_chunk
    own = n <= config.inline_max  # see chunk_block
    if config.split < D2H_SPLIT and host.native:
        # Smaller chunks: the first copy-out waits for one chunk's DMA.
        # Not down to chunks this thread would copy alone, though; and
        # not on the Python copy threads, where each chunk's hand-offs
        # cost more than the overlap gains (issue 13, run BH).
        small = config.chunk_for(n, pool.budget, D2H_SPLIT)
        if small > SOLO_CHUNK:
            chunk = min(chunk, small)
    depth = config.depth
    device = seq.ordinal
    solo = chunk <= SOLO_CHUNK
    # Pieces only where the copy threads copy out: a chunk this thread
    # copies itself is copied after its whole DMA either way.
    pieces = stager.d2h_pieces if not solo else 1
    warm = D2H_WARM_US > 0 and not solo
    nt = stager.nt_out if n >= D2H_NT_MIN else None
    events = stager.events
    inflight: deque[_Piece] = deque()
    chunks_in_dma = 0  # chunks with pieces in ``inflight`` (their last piece is there)
    # [offset, bytes, block or None, its copy-out or None when copied, 0]
    copying: deque[list[Any]] = deque()
    chunks_out = 0  # chunks with pieces in ``copying`` whose last piece is still there
    # Chunk copies are traced on the host threads that run them, into
    # the tracer the op captured when its task enqueued it.
    tracer = op._tracer
    k = 0
    off = 0
    copied = 0
    try:
        while True:
            while off < n and chunks_in_dma < depth and not op._abort:
                ln = min(chunk, n - off)
                block = chunk_block(pool, ln, not (inflight or copying), min(ln, floor), own)
                if block is None:
                    break
                # A smaller cached block shortens the chunk; a larger one
                # holds the chunk planned (one chunk in a block that size
                # would lose the overlap of host copy and DMA).
                ln = min(ln, block.size)
                lens = piece_lengths(ln, pieces, stager.d2h_piece_min)
                at = 0
                for i, pl in enumerate(lens):
                    last = i == len(lens) - 1
                    to = block.ptr + sh + at
                    # A failed piece after the first hands the block back
                    # only after a drain: the DMAs before it fill it.
                    ev = guarded_dma(
                        backend, native, events, device, pool, block, to, s.ptr + off + at, pl,
                        drain=i > 0,
                    )  # fmt: skip
                    inflight.append(_Piece(off + at, pl, to, block if last else None, ev, i == 0))
                    at += pl
                chunks_in_dma += 1
                off += ln
            if warm and inflight:
                # The first copy-out waits for the first piece's DMA: the copy
                # threads wake during it rather than after it (D2H_WARM_US).
                warm = False
                host.warm(inflight[0].nbytes / PCIE_BPS + D2H_WARM_US * 1e-6)
            if inflight and (not inflight[0].first or chunks_out < LOOKAHEAD):
                piece = inflight[0]
                # Taken off only once its DMA is known to have landed: should
                # the wait fail, the piece (and the block it may hold) is
                # handed back with those still in DMA.
                backend.event_synchronize(piece.event)
                inflight.popleft()
                events.put([piece.event])  # fired
                o, ln = piece.offset, piece.nbytes
                cp = stage(host, D2H_CHUNK, tracer, k, o, dst_ptr + o, piece.at, ln, solo, nt)
                if piece.first:
                    chunks_out += 1
                if piece.block is not None:
                    chunks_in_dma -= 1
                copying.append([o, ln, piece.block, cp, 0])
                k += 1
                continue
            if copying:
                o, ln, block, cp, _ = copying[0]
                if cp is not None:
                    cp.wait_copied(at_least=ln)
                copying.popleft()
                if block is not None:  # its chunk's last piece: every piece is copied out
                    pool.release(block)
                    chunks_out -= 1
                copied += ln
                if op._progress is not None and copied < n:
                    report_progress(op._progress, copied, n)
                continue
            break
    finally:
        # Copies first: one may still read a block that a later piece holds.
        drop(backend, native, pool, copying)
        _drop_inflight(pool, events, inflight)
    if copied < n:
        raise OperationAbortedError(f"{op.label}: aborted after {copied} of {n} bytes")
    return False


def _drop_inflight(pool: PinnedPool, events: EventCache, inflight: deque[_Piece]) -> None:
    """After an error or an abort: hand back the blocks of the chunks still in
    DMA, each reusable once every piece's event behind it has fired.

    A chunk whose last piece never was enqueued (its DMA failed) had its
    block handed back by that failure, after a drain: its pieces' events
    go back to the cache."""
    evs: list[Any] = []
    for piece in inflight:
        evs.append(piece.event)
        if piece.block is not None:
            pool.release(piece.block, evs)
            evs = []
    inflight.clear()
    if evs:
        # Recorded, maybe not fired: a user records an event before it
        # waits on it, and a record replaces the one before.
        events.put(evs)
