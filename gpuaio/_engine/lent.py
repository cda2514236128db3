"""A pinned block of the pool's spare stack lent to one small pageable copy.

A copy of up to ``inline_max`` bytes between pageable memory and the GPU
goes through one pinned block taken on the calling thread
(:meth:`PinnedPool.take_small`): an upload copies into it there, a download
copies out of it as the op's completion step. What the op holds of it, made
once per copy on that thread, is here, in the compiled hot path
(``hatch_build.COMPILED``).

Where in its block a staged copy's bytes sit (:func:`staged_at`): at the
host address's offset within a 64-byte line (the pool pins ``LINE`` bytes
more than each block's class for it), so a host copy between the block and
the caller's memory has both sides aligned alike. numpy puts a large array
16 bytes past a page (glibc's ``mmap``), and from a page-aligned block a
``memmove`` into it is slower: on an H100 host 84-98 us for 1 MiB against
63-78 us into page + 64 or a page, and an awaited 1 MiB download took
172-208 us against 129-155, an awaited 4 MiB one 502-515 against 355-397
(issue 13, round forty-eight, ``tools/dest_probe.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from .nativecopy import host_copier
from .pool import LINE, PinnedBlock, PinnedPool

__all__ = ["FirstPiece", "Lent", "copy_small", "staged_at"]

copy_small: Callable[[int, int, int], object] = host_copier()
"""A small copy between host addresses on the calling thread (no ctypes call
where the install has the native extension: ``host_copier``)."""


def staged_at(block: PinnedBlock, host: int) -> int:
    """The address in ``block`` for the bytes of a copy to or from host address
    ``host``: as far into the block as ``host`` is into its 64-byte line."""
    return block.ptr + (host & (LINE - 1))


class Lent:
    """A small copy's pinned block, lent to one op.

    ``release``, the op's done callback, hands it back; calling the object is
    a download's copy-out from it into ``dst`` (the op's completion step), of
    the bytes a :class:`FirstPiece` has not copied out before.
    One object where two ``functools.partial`` and a bound method of the pool
    were made per copy: about 0.3 us of a 4 KiB download's 3 us before its
    driver call in a compiled build (issue 13).
    """

    __slots__ = ("_block", "_n", "_pool", "_src", "copied", "dst")

    def __init__(
        self, pool: PinnedPool, block: PinnedBlock, dst: int = 0, n: int = 0, src: int = 0
    ) -> None:
        self._pool = pool
        self._block = block
        self.dst = dst
        """Where the copy-out goes; 0: nowhere (yet: see :class:`FirstPiece`)."""
        self._n = n
        self._src = src
        """Where in the block the DMA put the bytes (:func:`staged_at` ``dst``), for
        the copy-out; an upload's, which has none, leaves it 0."""
        self.copied = 0
        """Bytes at the front already copied out (by a :class:`FirstPiece`)."""

    def __call__(self) -> None:
        done = self.copied
        copy_small(self.dst + done, self._src + done, self._n - done)

    def release(self) -> None:
        self._pool.release_small(self._block)


class FirstPiece:
    """The copy-out of the first ``n`` bytes of a download DMAed in two pieces:
    the completion step of an op of its own, queued on the stream between the
    two DMAs, so that it runs once the first has completed, while the second
    may still run (``stagingconfig.DOWN_PIECE_MIN``).

    It copies only if the download's destination is known by then
    (``lent.dst``; the early path learns it after issuing the DMAs), and says
    so in ``lent.copied``; the download's own completion step, which runs
    after it in stream order, copies out the rest. So a piece op that failed
    (its step skipped) or ran early loses nothing: the rest is then all.
    """

    __slots__ = ("_lent", "_n")

    def __init__(self, lent: Lent, n: int) -> None:
        self._lent = lent
        self._n = n

    def __call__(self) -> None:
        lent = self._lent
        dst = lent.dst  # read once: the enqueuing thread may set it meanwhile
        if dst:
            copy_small(dst, lent._src, self._n)
            lent.copied = self._n
