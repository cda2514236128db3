"""Registering host memory: page-locking a user's pageable buffer in place.

A registered buffer is pinned memory for as long as it is registered, so
copies from and to it skip staging. The ranges are recorded in the registry
of ``gpuaio._api.describe`` so that classifying them needs no driver call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._core.errors import InvalidArgumentError
from ..backends import MemoryKind
from .memory import Allocation

if TYPE_CHECKING:
    from .runtime import Runtime
from .describe import _registry, describe, forget

__all__ = ["HostRegistration", "register_host", "register_host_async"]


class HostRegistration:
    """A pageable host buffer page-locked in place (``cuMemHostRegister``).

    While registered, transfers from and to the buffer run at pinned speed
    without staging. :meth:`unregister` (or leaving the ``with`` block) waits
    for the gpuaio operations in flight on it before unlocking. Registering
    costs milliseconds (about 9 ms for 256 MiB on an H100 host): worth it for
    long-lived buffers used many times. Use :func:`register_host_async` on an
    event loop.

    Any C-contiguous host buffer can be registered: a numpy array, a
    ``bytearray``, read-only memory such as ``bytes`` (gpuaio then only reads
    it). The buffer is kept alive while registered, and a ``bytearray``
    cannot be resized then. A call that raises leaves the buffer pageable.
    """

    def __init__(self, runtime: Runtime, array: Any) -> None:
        # Every check first: nothing may be left page-locked by a rejected call.
        info = describe(array, runtime, "array")
        if info.kind is not MemoryKind.PAGEABLE:
            raise InvalidArgumentError(
                "register_host: only pageable host memory can be registered, `array` is "
                f"{info.kind.value} memory"
            )
        if info.nbytes == 0:
            raise InvalidArgumentError("register_host: `array` is empty")
        if not info.contiguous:
            raise InvalidArgumentError(
                "register_host: `array` is not C-contiguous (its bytes are not one range)"
            )
        registry = _registry(runtime)
        registry.wait_unregistered(info.ptr, info.nbytes)
        runtime.backend.host_register(info.ptr, info.nbytes)
        try:
            self._runtime = runtime
            self.array = array
            # The allocation keeps the buffer (and, for a bytearray, the buffer
            # export that stops it from being resized) until it is unlocked:
            # memory freed or moved while page-locked would stay locked, and
            # whatever is allocated there next would be taken for pinned.
            self.alloc: _RegisteredAllocation = _RegisteredAllocation(
                runtime, info.ptr, info.nbytes, info.owner
            )
            registry.add(self.alloc)
            forget(array)
        except BaseException:
            alloc = getattr(self, "alloc", None)
            if alloc is not None:
                alloc._freed = True  # unregistered here, not by its finalizer
                alloc._keep = None
                registry.remove(alloc)
            runtime.backend.host_unregister(info.ptr)
            raise

    def unregister(self) -> None:
        """Unlock the buffer once operations in flight on it complete."""
        self.alloc.free()
        forget(self.array)

    def __enter__(self) -> HostRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()


class _RegisteredAllocation(Allocation):
    """Host memory the user owns, page-locked in place; freeing it unregisters."""

    __slots__ = ("_keep",)

    def __init__(self, runtime: Runtime, ptr: int, nbytes: int, keep: Any = None) -> None:
        super().__init__(runtime, ptr, nbytes, MemoryKind.PINNED, None)
        self._keep = keep
        """The user's buffer (and its export), alive while page-locked."""

    def _free_now(self) -> None:
        try:
            if not self._runtime.released:
                self._runtime.backend.host_unregister(self.ptr)
        finally:
            # Only now: a new registration of the range waits for this removal.
            _registry(self._runtime).remove(self)
            self._keep = None

    def __del__(self) -> None:
        # The user's array outlives the registration object only if they
        # dropped the handle: unlock it then.
        if not self._freed and not getattr(self._runtime, "closed", True):
            self.free()


def register_host(array: Any) -> HostRegistration:
    """Page-lock ``array`` in place; see :class:`HostRegistration` (blocks for ms)."""
    from .runtime import current_runtime

    return HostRegistration(current_runtime(), array)


async def register_host_async(array: Any) -> HostRegistration:
    """:func:`register_host` on a worker thread, so the event loop keeps running."""
    import anyio.to_thread

    return await anyio.to_thread.run_sync(register_host, array)
