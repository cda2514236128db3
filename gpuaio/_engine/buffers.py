"""Buffer descriptions: what the engine knows of any buffer it moves.

:func:`gpuaio._api.describe.describe` classifies an object (a NumPy array, a
gpuaio array, anything with ``__cuda_array_interface__`` or DLPack) once, into
a :class:`BufferInfo`; everything below works on those.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._core.operation import InUse
from ..backends import MemoryKind
from .hostwork import byte_view

__all__ = ["BufferInfo", "InUse"]


class BufferInfo(NamedTuple):
    """A buffer's address, layout and kind, as gpuaio sees it (cheap to build)."""

    ptr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    kind: MemoryKind
    device: int | None
    readonly: bool
    contiguous: bool
    owner: Any
    """What keeps the memory alive while an operation uses it (for a gpuaio
    device array, its allocation; the array itself is kept by the caller)."""
    alloc: InUse | None
    """gpuaio's allocation behind the buffer, if any."""

    def host_array(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Flat uint8 view of host memory (only for host kinds)."""
        return byte_view(self.ptr, self.nbytes)
