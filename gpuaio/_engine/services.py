"""What the engine needs of the runtime that owns it: one small protocol.

Sequencers and the stager run inside a runtime (``gpuaio._api.runtime``),
which sits above the engine and composes it. They are handed the runtime as
:class:`Services` rather than importing it, so imports only go down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from ..backends import Backend
    from .completion import CompletionEngine
    from .hostwork import HostPool, SerialExecutor
    from .reaper import Reaper

__all__ = ["Services"]


class Services(Protocol):
    """The runtime, as the engine's parts see it."""

    @property
    def backend(self) -> Backend:
        """The driver (or the simulator) every call goes to."""
        ...

    @property
    def host(self) -> HostPool:
        """The host threads that run staging copies and host steps."""
        ...

    @property
    def reaper(self) -> Reaper:
        """Where frees and destroys go, off the caller's thread."""
        ...

    def engine(self, device: int) -> CompletionEngine:
        """The completion engine of ``device``, started on first use."""
        ...

    def log_failure(self, what: str, exc: BaseException, device: int | None = None) -> None:
        """Report a failure nobody awaits (a background free, a destroy)."""
        ...

    def backend_held(self) -> AbstractContextManager[bool]:
        """Hold off the backend's release; the value is False once it was released
        (no driver call may be made any more)."""
        ...

    def expect_release(self, executor: SerialExecutor, job: int) -> None:
        """Job ``job`` of ``executor`` releases driver objects: closing the
        runtime lets it run (for a while) before it releases the backend."""
        ...
