"""Kernels compiled for a device, launchable with :meth:`gpuaio.Stream.launch`."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["Kernel", "normalize_dim3"]


class Kernel:
    """A compiled kernel bound to one device.

    Made by :meth:`gpuaio.Device.compile` (NVRTC through cuda.core on the
    ``cuda`` backend; the Python ``sim=`` body on the simulated backend), or
    wrapping a kernel another library compiled with :meth:`Kernel.wrap`.
    """

    __slots__ = ("device", "name", "native")

    def __init__(self, native: Any, device: int, name: str) -> None:
        self.native: Any = native
        self.device: int = device
        self.name: str = name

    @classmethod
    def wrap(cls, native: Any, device: int = 0, name: str | None = None) -> Kernel:
        """Wrap a backend-native kernel (a cuda.core ``Kernel`` on the cuda backend)."""
        return cls(native, device, name or getattr(native, "name", None) or type(native).__name__)

    def __repr__(self) -> str:
        return f"<gpuaio.Kernel {self.name} device={self.device}>"


_GRID_MAX = (2**31 - 1, 65535, 65535)
_BLOCK_MAX = (1024, 1024, 64)


def normalize_dim3(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    """``8`` → ``(8, 1, 1)``; checks every extent against CUDA's limits.

    ``what`` is ``"grid"`` or ``"block"``. Python and numpy integers are
    accepted; bools and floats are not.
    """
    items: tuple[object, ...]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = tuple(value)
    else:
        items = (value,)
    if not 1 <= len(items) <= 3:
        raise InvalidArgumentError(f"{what} must be an int or a tuple of 1-3 ints, not {value!r}")
    dims: list[int] = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise InvalidArgumentError(f"{what} extents must be integers, not bool ({value!r})")
        try:
            dims.append(operator.index(item))  # type: ignore[arg-type]
        except TypeError:
            raise InvalidArgumentError(
                f"{what} must be an int or a tuple of 1-3 ints, not {value!r}"
            ) from None
    if any(d < 1 for d in dims):
        raise InvalidArgumentError(f"every {what} extent must be >= 1, not {value!r}")
    x, y, z = (*dims, 1, 1)[:3]
    limits = _GRID_MAX if what == "grid" else _BLOCK_MAX
    for axis, (extent, limit) in enumerate(zip((x, y, z), limits, strict=True)):
        if extent > limit:
            raise InvalidArgumentError(
                f"{what} extent {'xyz'[axis]}={extent} exceeds CUDA's limit of {limit}"
            )
    return (x, y, z)
