"""A pinned block of the pool's spare stack lent to one small pageable copy.

A copy of up to ``inline_max`` bytes between pageable memory and the GPU
goes through one pinned block taken on the calling thread
(:meth:`PinnedPool.take_small`): an upload copies into it there, a download
copies out of it as the op's completion step. What the op holds of it, made
once per copy on that thread, is here, in the compiled hot path
(``hatch_build.COMPILED``).
"""

from __future__ import annotations

from collections.abc import Callable

from .nativecopy import host_copier
from .pool import PinnedBlock, PinnedPool

__all__ = ["Lent", "copy_small"]

copy_small: Callable[[int, int, int], object] = host_copier()
"""A small copy between host addresses on the calling thread (no ctypes call
where the install has the native extension: ``host_copier``)."""


class Lent:
    """A small copy's pinned block, lent to one op.

    ``release``, the op's done callback, hands it back; calling the object is
    a download's copy-out from it into ``dst`` (the op's completion step).
    One object where two ``functools.partial`` and a bound method of the pool
    were made per copy: about 0.3 us of a 4 KiB download's 3 us before its
    driver call in a compiled build (issue 13).
    """

    __slots__ = ("_block", "_dst", "_n", "_pool")

    def __init__(self, pool: PinnedPool, block: PinnedBlock, dst: int = 0, n: int = 0) -> None:
        self._pool = pool
        self._block = block
        self._dst = dst
        self._n = n

    def __call__(self) -> None:
        copy_small(self._dst, self._block.ptr, self._n)

    def release(self) -> None:
        self._pool.release_small(self._block)
