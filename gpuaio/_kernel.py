"""Kernels compiled for a device, launchable with :meth:`gpuaio.Stream.launch`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._errors import InvalidArgumentError

__all__ = ["Kernel", "normalize_dim3"]


class Kernel:
    """A compiled kernel bound to one device.

    Made by :meth:`gpuaio.Device.compile` (NVRTC through cuda.core on the
    ``cuda`` backend; the Python ``sim=`` body on the simulated backend), or
    wrapping a kernel another library compiled with :meth:`Kernel.wrap`.
    """

    __slots__ = ("device", "name", "native")

    def __init__(self, native: Any, device: int, name: str) -> None:
        self.native = native
        self.device = device
        self.name = name

    @classmethod
    def wrap(cls, native: Any, device: int = 0, name: str | None = None) -> Kernel:
        """Wrap a backend-native kernel (a cuda.core ``Kernel`` on the cuda backend)."""
        return cls(native, device, name or getattr(native, "name", None) or type(native).__name__)

    def __repr__(self) -> str:
        return f"<gpuaio.Kernel {self.name} device={self.device}>"


def normalize_dim3(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    """``8`` → ``(8, 1, 1)``; validates that every extent is a positive int."""
    if isinstance(value, int):
        dims: tuple[int, ...] = (value,)
    else:
        try:
            dims = tuple(value)
        except TypeError:
            raise InvalidArgumentError(f"{what} must be an int or a tuple of 1-3 ints") from None
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) for d in dims):
        raise InvalidArgumentError(f"{what} must be an int or a tuple of 1-3 ints, not {value!r}")
    if any(d < 1 for d in dims):
        raise InvalidArgumentError(f"every {what} extent must be >= 1, not {value!r}")
    x, y, z = (*dims, 1, 1)[:3]
    return (x, y, z)
