"""What the core knows of a stream and its runtime: two small protocols.

Operations and traces sit below the streams and the runtime that make them
(``gpuaio._api``), so they name those through these protocols, which
:class:`gpuaio.Stream` and the runtime satisfy, instead of importing them:
imports only go down.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["RuntimeRef", "StreamRef"]


class RuntimeRef(Protocol):
    """The runtime a stream belongs to, as operations and traces see it."""

    @property
    def strategy(self) -> str:
        """The completion strategy in use (recorded in traces)."""
        ...

    @property
    def forked(self) -> str | None:
        """In a child forked after the runtime was made: why it cannot be used."""
        ...


class StreamRef(Protocol):
    """The :class:`gpuaio.Stream` an operation was enqueued on."""

    @property
    def handle(self) -> int:
        """The ``CUstream`` address."""
        ...

    @property
    def _key(self) -> int:
        """The ``CUstream`` address, read without handing it out (``handle`` does)."""
        ...

    @property
    def _ordinal(self) -> int: ...

    @property
    def _rt(self) -> RuntimeRef: ...
