"""The end-of-test leak check: pending operations, staging blocks, pinned memory.

:class:`PinnedAccounting` counts the pinned and registered host memory of a
backend; :class:`ResourceBaseline` is what a runtime held when a test started;
:func:`leak_problems` says what the runtime still holds that the test should
have released, after giving pending operations a grace period to finish. The
``gpuaio_runtime`` fixture runs it when a test ends, as ``--gpuaio-leak-check``
(``gpuaio_leak_check``) and ``--gpuaio-pending-grace-ms`` say.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from .._api import memory as _memory

if TYPE_CHECKING:
    from .._api.runtime import Runtime

DEFAULT_PENDING_GRACE_MS = 100.0


def _leak_mode(request: pytest.FixtureRequest) -> str:
    if request.node.get_closest_marker("gpuaio_no_leak_check") is not None:
        return "off"
    opt = request.config.getoption("--gpuaio-leak-check", default=None)
    mode = str(opt or request.config.getini("gpuaio_leak_check") or "error").strip().lower()
    if mode not in ("error", "warn", "off"):
        raise pytest.UsageError(f"gpuaio_leak_check must be error, warn or off, not {mode!r}")
    return mode


def _pending_grace_s(config: pytest.Config) -> float:
    opt = config.getoption("--gpuaio-pending-grace-ms", default=None)
    raw = opt if opt is not None else config.getini("gpuaio_pending_grace_ms")
    try:
        return max(0.0, float(raw)) / 1000.0
    except (TypeError, ValueError):
        raise pytest.UsageError(f"gpuaio_pending_grace_ms must be a number, not {raw!r}") from None


class PinnedAccounting:
    """Counts the pinned and registered host bytes a backend holds.

    Installed on a runtime's backend by wrapping its ``host_alloc``,
    ``host_free``/``host_free_async`` and ``host_register``/``host_unregister``.
    An allocation made for a user (:func:`gpuaio.pinned_empty` and other
    gpuaio allocations) is told apart from gpuaio's own (the staging pool, a
    completion engine's flag slab) by whether ``gpuaio/_api/memory.py`` asked
    for it.
    """

    _by_backend: ClassVar[weakref.WeakKeyDictionary[Any, PinnedAccounting]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pinned: dict[int, tuple[int, bool]] = {}
        """Live ``host_alloc`` blocks: address -> (bytes, made for a user)."""
        self.registered: dict[int, int] = {}
        """Live ``host_register`` ranges: address -> bytes."""
        self.allocs = 0
        self.frees = 0

    @property
    def pinned_bytes(self) -> int:
        """Every live pinned byte, gpuaio's own included."""
        with self._lock:
            return sum(n for n, _user in self.pinned.values())

    @property
    def user_pinned_bytes(self) -> int:
        """Live pinned bytes allocated for users (not the pool's, not engines')."""
        with self._lock:
            return sum(n for n, user in self.pinned.values() if user)

    @property
    def registered_bytes(self) -> int:
        with self._lock:
            return sum(self.registered.values())

    @classmethod
    def of(cls, runtime: Runtime) -> PinnedAccounting | None:
        """The accounting installed on ``runtime``'s backend, if any."""
        return cls._by_backend.get(runtime.backend)

    @classmethod
    def install(cls, runtime: Runtime) -> PinnedAccounting:
        """Count ``runtime.backend``'s pinned memory from now on (idempotent)."""
        backend = runtime.backend
        acct = cls._by_backend.get(backend)
        if acct is not None:
            return acct
        acct = cls()
        alloc, free, free_async = backend.host_alloc, backend.host_free, backend.host_free_async
        register, unregister = backend.host_register, backend.host_unregister

        def host_alloc(nbytes: int) -> int:
            ptr = alloc(nbytes)
            user = _called_from(_MEMORY_MODULE)
            with acct._lock:
                acct.pinned[ptr] = (nbytes, user)
                acct.allocs += 1
            return ptr

        def counting(real: Callable[[int], None]) -> Callable[[int], None]:
            def host_free(ptr: int) -> None:
                real(ptr)
                with acct._lock:
                    if acct.pinned.pop(ptr, None) is not None:
                        acct.frees += 1

            return host_free

        def host_register(ptr: int, nbytes: int) -> None:
            register(ptr, nbytes)
            with acct._lock:
                acct.registered[ptr] = nbytes

        def host_unregister(ptr: int) -> None:
            unregister(ptr)
            with acct._lock:
                acct.registered.pop(ptr, None)

        for name, fn in (
            ("host_alloc", host_alloc),
            ("host_free", counting(free)),
            ("host_free_async", counting(free_async)),
            ("host_register", host_register),
            ("host_unregister", host_unregister),
        ):
            setattr(backend, name, fn)
        cls._by_backend[backend] = acct
        return acct


# Taken from the module, not built from this file's path, so that it follows
# gpuaio/_api/memory.py wherever the package puts it.
_MEMORY_MODULE = os.path.abspath(inspect.getfile(_memory))


def _called_from(filename: str, depth: int = 6) -> bool:
    """Whether one of the ``depth`` callers above the wrapper runs code of ``filename``."""
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_filename == filename:
            return True
        frame = frame.f_back
    return False


def _pool_stats(runtime: Runtime) -> tuple[int, int]:
    """(reserved, in_use) bytes of the runtime's staging pool, reclaiming fired blocks."""
    stager = runtime.extras.get("stager")
    if stager is None:
        return 0, 0
    stats = stager.pool.stats()  # reclaims blocks whose GPU work has finished
    return stats.reserved, stats.in_use


@dataclass(frozen=True, slots=True)
class ResourceBaseline:
    """Pinned bytes held outside the staging pool, and registered bytes, at a moment."""

    user_pinned: int
    registered: int

    @classmethod
    def take(cls, runtime: Runtime) -> ResourceBaseline:
        """What ``runtime`` holds now: pinned bytes, pending ops and registrations."""
        acct = PinnedAccounting.of(runtime)
        if acct is None:
            return cls(0, 0)
        return cls(acct.user_pinned_bytes, acct.registered_bytes)


def pending_operations(runtime: Runtime) -> tuple[int, list[str]]:
    """Operations of ``runtime`` not yet complete: (count, labels of those known).

    Counts ops waiting for their completion marker and, on the simulated
    backend, stream work still queued (latches included).
    """
    count = 0
    labels: list[str] = []
    for eng in list(getattr(runtime, "_engines", {}).values()):
        n = eng.pending()
        count += n
        if not n:
            continue
        # Labels are diagnostics only: read the engines' tables without their
        # locks, and give up quietly if a strategy keeps them differently.
        with contextlib.suppress(RuntimeError, AttributeError, TypeError, ValueError):
            queues = getattr(eng, "_queues", None)
            if queues is not None:
                for q in list(queues.values()):
                    labels.extend(op.label for op, _ev in list(getattr(q, "entries", q)))
            else:
                labels.extend(op.label for op in list(eng._pending))
    if not count:
        count += _sim_backlog(runtime.backend)
    return count, labels


def _sim_backlog(backend: Any) -> int:
    """Work queued and not retired on the simulated backend's streams."""
    lock = getattr(backend, "_lock", None)
    devices = getattr(backend, "_devices", None)
    if lock is None or devices is None or getattr(backend, "_closed", True):
        return 0
    with lock:
        return sum(max(0, s.submitted - s.retired) for d in devices for s in list(d.streams))


def _any_device_faulted(runtime: Runtime) -> bool:
    """Whether a device of ``runtime`` has had a sticky (context-fatal) error."""
    from .._core.errors import DeviceFatalError

    backend = runtime.backend
    for ordinal in list(runtime.devices):
        try:
            backend.event_destroy(backend.event_create(ordinal))
        except DeviceFatalError:
            return True
        except Exception:  # a closed backend and the like: not a fault
            continue
    return False


def _flush_reaper(runtime: Runtime, timeout: float = 2.0) -> None:
    done = threading.Event()
    runtime.reaper.submit(done.set)
    done.wait(timeout)


def leak_problems(
    runtime: Runtime, baseline: ResourceBaseline | None = None, *, grace_s: float = 0.1
) -> list[str]:
    """What ``runtime`` still holds that a finished test should have released.

    Waits up to ``grace_s`` for pending operations. Returns one sentence per
    problem (empty: clean). ``baseline`` is from :meth:`ResourceBaseline.take`
    at the start of the test (default: nothing held).
    """
    baseline = baseline or ResourceBaseline(0, 0)
    problems: list[str] = []
    deadline = time.monotonic() + grace_s
    count, labels = pending_operations(runtime)
    while count and time.monotonic() < deadline:
        time.sleep(0.002)
        count, labels = pending_operations(runtime)
    if count:
        shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
        what = f": {shown}" if shown else " (queued stream work)"
        problems.append(
            f"{count} operation(s) still pending {grace_s * 1e3:.0f} ms after the test{what}; "
            "await every operation (or gpuaio.wait_all) before the test ends"
        )
    _reserved, in_use = _pool_stats(runtime)
    # A host step hands its staging blocks back just after its op resolves
    # (an aborted or abandoned transfer's step may still be copying): wait.
    deadline = time.monotonic() + grace_s
    while in_use and not count and time.monotonic() < deadline:
        time.sleep(0.002)
        _reserved, in_use = _pool_stats(runtime)
    if in_use and not count and not _any_device_faulted(runtime):
        # (After a sticky fault, blocks guarded by the dead device's events stay
        # out of the pool: that is the fault's doing, not the test's.)
        problems.append(f"{in_use} bytes of the pinned staging pool were not handed back")
    acct = PinnedAccounting.of(runtime)
    if acct is None:
        return problems

    def excess() -> tuple[int, int]:
        return (
            acct.user_pinned_bytes - baseline.user_pinned,
            acct.registered_bytes - baseline.registered,
        )

    pinned, registered = excess()
    # An op's buffers are let go just after it leaves the engine's queue (its
    # done-callbacks run after the count above dropped), and their frees go
    # through the reaper: collect, flush and look again, up to the grace.
    deadline = time.monotonic() + grace_s
    while pinned > 0 or registered > 0:
        gc.collect()
        _flush_reaper(runtime)
        pinned, registered = excess()
        if time.monotonic() >= deadline:
            break
        if pinned > 0 or registered > 0:
            time.sleep(0.005)
    if pinned > 0:
        problems.append(
            f"{pinned} bytes of pinned memory allocated during the test are still allocated "
            "(a pinned_empty array kept alive after the test?)"
        )
    if registered > 0:
        problems.append(
            f"{registered} bytes of host memory registered during the test are still "
            "registered (register_host without unregister?)"
        )
    return problems
