"""The simulated driver objects: contexts, streams, events, kernels, devices, regions.

Plain records; the locking and the rules live in ``_core.SimCore``. Each
object's fields are read and written only with the backend's one lock held.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._base import MemoryKind, keeps_context
from ._config import _ILLEGAL_ADDRESS

_context_handles = itertools.count(0x5C0000, 0x100)


def _dead(ctx: SimContext | None) -> bool:
    """Whether ``ctx`` is a destroyed context (what it owned is gone with it)."""
    return ctx is not None and ctx.destroyed


@dataclass(frozen=True, slots=True)
class SimKernel:
    """A simulated kernel: ``fn(grid, block, *args)`` runs in the stream's worker.

    Array arguments (anything with ``__cuda_array_interface__``) reach ``fn``
    as writable numpy views of the memory. The launch takes at least
    ``duration_s`` of wall time.
    """

    fn: Callable[..., None]
    name: str = ""
    duration_s: float = 0.0

    def __call__(self, *args: Any) -> None:
        self.fn(*args)


class _Dropped(Exception):
    """A waiting op gave up because its device faulted or the backend closed."""


class _Op:
    """One unit of stream work; ``done`` is set (under the lock) once it succeeded."""

    __slots__ = ("call", "cost_s", "counted", "done", "fail_code", "run", "spans", "weight")

    def __init__(
        self,
        call: str,
        run: Callable[[], None],
        cost_s: float = 0.0,
        *,
        counted: bool = True,
        fail_code: int = _ILLEGAL_ADDRESS,
        weight: int = 1,
        spans: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.call: str = call
        self.weight: int = weight  # launch-queue entries it takes
        self.run: Callable[[], None] = run
        self.cost_s: float = cost_s
        # Only copies, memsets and kernels count: completion markers (event records,
        # host funcs, flag writes) differ between completion strategies, and fault
        # tests must not depend on which one the library picked.
        self.counted: bool = counted
        self.fail_code: int = fail_code  # the sticky error if ``run`` raises
        # The address ranges ``[start, end)`` the op reads or writes: a free
        # that promises nothing uses the memory any more checks them.
        self.spans: tuple[tuple[int, int], ...] = spans
        self.done: bool = False


class SimContext:
    """A simulated ``CUcontext``: it owns the memory, streams and events created in it.

    Each device has one primary context (the one CUDA's runtime, PyTorch and
    CuPy share); :meth:`SimBackend.context_create` makes others, as
    ``cuCtxCreate`` does. ``handle`` stands for the ``CUcontext`` address.
    """

    __slots__ = ("destroyed", "device", "handle", "primary")

    def __init__(self, device: int, primary: bool) -> None:
        self.device: int = device
        self.primary: bool = primary
        self.handle: int = next(_context_handles)
        self.destroyed: bool = False

    def __repr__(self) -> str:
        kind = "primary" if self.primary else "created"
        return f"<SimContext {self.handle:#x} device={self.device} {kind}>"


class _SimThread(threading.local):
    """What one thread has current, as the driver keeps it per thread."""

    def __init__(self) -> None:  # runs in each thread, on its first use
        self.ctx: SimContext | None = None
        """The thread's current context (``cuCtxGetCurrent``)."""
        self.keep = keeps_context(threading.current_thread())
        """Whether the backend leaves the context it binds current here."""


class SimStream:
    """A simulated ``CUstream``: a worker thread running its ops strictly in FIFO order.

    ``submitted``/``retired`` count ops pushed and finished (or dropped), so a
    synchronize waits only for work enqueued before it was called.
    """

    def __init__(
        self, device: int, priority: int, lock: threading.Lock, ctx: SimContext | None = None
    ) -> None:
        self.device = device
        self.priority = priority
        self.ctx = ctx
        """The context the stream was created in."""
        self.queue: deque[_Op] = deque()
        self.running: _Op | None = None  # the op the worker runs now
        self.load = 0  # launch-queue entries the queued ops take
        self.cond: threading.Condition = threading.Condition(lock)
        self.submitted = 0
        self.retired = 0
        self.destroyed = False
        self.thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<SimStream device={self.device} priority={self.priority} at {id(self):#x}>"


class SimEvent:
    """A simulated ``CUevent``: remembers the marker op of its most recent record."""

    def __init__(self, device: int, blocking_sync: bool, ctx: SimContext | None = None) -> None:
        self.device = device
        self.ctx = ctx
        """The context the event was created in."""
        self.blocking_sync = blocking_sync  # waits never spin here, so only kept for repr
        self.last: _Op | None = None
        self.destroyed = False

    def __repr__(self) -> str:
        return f"<SimEvent device={self.device} at {id(self):#x}>"


@dataclass(slots=True)
class _Region:
    start: int
    end: int
    kind: MemoryKind
    device: int | None
    array: npt.NDArray[np.uint8] | None  # None for registered user memory
    ctx: SimContext | None = None  # the context it was allocated (registered) in


class _Device:
    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal
        self.used = 0
        self.executed = 0
        self.fault: tuple[int, str] | None = None
        self.fault_at = 0.0  # time.perf_counter() when the fault struck
        self.inject: tuple[int, int] | None = None  # (ops still to run, code)
        self.streams: set[SimStream] = set()


class _Latch:
    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = False
