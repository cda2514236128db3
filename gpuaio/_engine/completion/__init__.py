"""Completion: learning that the GPU has finished an operation.

One engine per device. After an operation's work is enqueued on a stream,
:meth:`CompletionEngine.watch` places a completion marker behind it and
resolves the :class:`~gpuaio._core.operation.Operation` once the marker fires.

Strategies (selected with ``GPUAIO_COMPLETION`` or :func:`gpuaio.configure`),
one module each:

``"events"`` (default, ``_events``)
    A marker is a pooled CUDA event. An awaiting task polls its stream from
    its own event loop for up to ``GPUAIO_LOOP_SPIN_US`` (150 µs); one
    watcher thread per device catches the rest and wakes each loop once per
    batch. The GPU never waits for Python.

``"hostfunc"`` (``_hostfunc``)
    A marker is a ``cuLaunchHostFunc`` callback that hands the op to a
    resolver thread. It needs the GIL, so the stream stalls while Python is
    busy: never the default.

Every engine also notices a sticky (context-fatal) error and fails every
pending operation of the device with :class:`~gpuaio.DeviceFatalError`
within about ``FAULT_PROBE_S`` of the driver first reporting it (see
``_engine.FaultProbe``). Timing constants live in ``_tuning``.

Benchmarks may add engines of their own with :func:`register_strategy`
(``benchmarks/completion.py`` measures a watcher-only ``"thread"`` engine that
way); such names are accepted by ``configure`` and ``GPUAIO_COMPLETION`` in
that process but are not in ``STRATEGIES``, which lists the library's own.

A ``"flags"`` strategy (markers written into mapped pinned memory with
``cuStreamWriteValue32``) was removed: on an H100 (two runs) and an H200 it
woke tasks later than ``"events"`` and sustained fewer awaits per second
(docs/completion.md, "Removed strategies").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

from ..._core.errors import InvalidArgumentError
from ._engine import CompletionEngine, FaultLog
from ._events import EventEngine
from ._hostfunc import HostFuncEngine

if TYPE_CHECKING:
    from ...backends import Backend

__all__ = [
    "STRATEGIES",
    "CompletionEngine",
    "EngineFactory",
    "FaultLog",
    "Strategy",
    "check_strategy",
    "make_engine",
    "register_strategy",
]

Strategy = Literal["events", "hostfunc"]

EngineFactory = Callable[["Backend", int], CompletionEngine]
"""Builds the engine of one device: ``factory(backend, device)``."""

_ENGINES: dict[str, EngineFactory] = {
    "events": EventEngine,
    "hostfunc": HostFuncEngine,
}
STRATEGIES: tuple[Strategy, ...] = cast("tuple[Strategy, ...]", tuple(_ENGINES))
"""The library's strategies (tests run every one of them)."""

_registered: dict[str, EngineFactory] = {}
"""Engines added by :func:`register_strategy` (benchmarks), not in STRATEGIES."""


def register_strategy(name: str, factory: EngineFactory) -> None:
    """Make ``name`` a completion strategy of this process, built by ``factory``.

    An extension point for benchmarks and experiments, not public API:
    afterwards ``gpuaio.configure(completion=name)`` and
    ``GPUAIO_COMPLETION=name`` select it; ``gpuaio.STRATEGIES`` is unchanged.
    Registering a name again replaces its factory; a library strategy cannot
    be replaced.
    """
    if name in _ENGINES:
        raise InvalidArgumentError(f"completion strategy {name!r} is built in")
    _registered[name] = factory


def check_strategy(value: object, argument: str = "completion") -> Strategy:
    """``value`` as a strategy name; InvalidArgumentError naming ``argument`` and
    the valid names if it is none (registered names are valid too)."""
    if isinstance(value, str) and (value in _ENGINES or value in _registered):
        return cast(Strategy, value)
    valid = ", ".join(repr(s) for s in (*_ENGINES, *_registered))
    raise InvalidArgumentError(
        f"{argument} must be a completion strategy, one of {valid} (got {value!r})"
    )


def make_engine(
    strategy: Strategy, backend: Backend, device: int, faults: FaultLog | None = None
) -> CompletionEngine:
    """Build the engine for ``strategy``; it logs its sticky error to ``faults``."""
    name = check_strategy(strategy)
    eng = (_ENGINES.get(name) or _registered[name])(backend, device)
    if faults is not None:
        eng.faults = faults
    return eng
