"""Uploads staged on the calling thread in pieces, each DMAed once copied.

The driver's own pageable copy, which a staged upload replaces, pipelines
its staging with its DMA; an upload staged in one piece copies all of its
source, then DMAs all of it. In pieces (``GPUAIO_INLINE_PIECES``, at least
``INLINE_PIECE_MIN`` bytes each) the DMA of one piece runs while the next
is copied, at the price of one more driver call per piece.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core.errors import DeviceFatalError
from .._core.operation import Operation
from .lent import staged_at
from .pool import PinnedBlock, PinnedPool, release_after_drain

if TYPE_CHECKING:
    from .sequencer import Sequencer

__all__ = ["upload_in_pieces"]


def upload_in_pieces(
    seq: Sequencer,
    op: Operation,
    dst: int,
    src: int,
    nbytes: int,
    piece: int,
    block: PinnedBlock,
    pool: PinnedPool,
    backend: Any,
    defer: Callable[[Callable[[], None]], object],
    copy: Callable[[int, int, int], object],
) -> Operation:
    """Enqueue ``op``, the upload of ``nbytes`` from pageable ``src`` to ``dst``
    through ``block``, in pieces of ``piece`` bytes (``copy`` copies one into
    the block).

    The source is read as the sequencer enqueues: at once, on the calling
    thread, unless the stream has host jobs queued. The block goes back to
    ``pool`` as the op completes.
    """
    held = [block]
    op._add_done_callback(functools.partial(_release_held, pool, held))
    args = (backend, defer, pool, copy, held, dst, src, nbytes, piece)
    return seq.gpu(op, _enqueue, *args)


def _enqueue(
    backend: Any,
    defer: Callable[[Callable[[], None]], object],
    pool: PinnedPool,
    copy: Callable[[int, int, int], object],
    held: list[PinnedBlock],
    dst: int,
    src: int,
    nbytes: int,
    piece: int,
    native: Any,
) -> None:
    """The sequencer's enqueue: copy a piece, enqueue its DMA, and on.

    If a piece fails after others were enqueued, their DMAs may still read
    the block when the op fails: the block leaves ``held`` and goes back to
    the pool only once the stream has drained, through ``defer`` (off the
    calling thread), unless the device is dead, when no DMA runs any more.
    """
    block = held[0]
    at = staged_at(block, src)
    off = 0
    try:
        while off < nbytes:
            ln = min(piece, nbytes - off)
            copy(at + off, src + off, ln)
            backend.memcpy_async(dst + off, at + off, ln, native)
            off += ln
    except DeviceFatalError:
        raise
    except BaseException:
        if off:
            held.clear()
            defer(functools.partial(release_after_drain, backend, native, pool, block))
        raise


def _release_held(pool: PinnedPool, held: list[PinnedBlock]) -> None:
    """The upload completed (or failed): hand back its block, if still held."""
    for block in held:
        pool.release(block)  # at least 2 * INLINE_PIECE_MIN: never a spare-stack block
