"""The process-wide runtime: one backend, its devices, engines and helpers.

Created lazily on first use. :func:`use_backend` swaps it (tests use this to
get a fresh simulated backend); objects from an earlier runtime must not be
used after a swap.

A process forked after the runtime was created cannot use it (see
:mod:`gpuaio._api.fork`): the ``os.register_at_fork`` hooks at the end of this
module disable it in the child.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, NoReturn

import anyio.to_thread

from .._core import operation as _operation
from .._core.errors import DeviceFatalError, ForkedProcessError, InvalidArgumentError
from .._engine.completion import CompletionEngine, FaultLog, Strategy, check_strategy, make_engine
from .._engine.hostwork import HostPool, SerialExecutor
from .._engine.pool import MIN_CLASS, PoolStats, parse_size
from .._engine.reaper import LeakingReaper, Reaper
from .._engine.sequencer import Sequencer
from .._engine.staging import Stager, StagingConfig
from ..backends import Backend, create_backend
from .fork import disable_backend, forked_message

__all__ = ["Runtime", "configure", "current_runtime", "reserve_pinned", "use_backend"]

log = logging.getLogger("gpuaio")


class SequencerShare:
    """What the streams over one ``CUstream`` hold to share its :class:`Sequencer`.

    The runtime keeps a weak reference to it, so that the sequencer (and its
    host thread) goes once the last of those streams has, and a compiled
    ``Sequencer`` (``hatch_build.py``) cannot be weakly referenced itself.
    """

    __slots__ = ("__weakref__", "seq")

    def __init__(self, seq: Sequencer) -> None:
        self.seq: Sequencer = seq


class Runtime:
    """One backend with its devices, completion engines, host threads and reaper."""

    def __init__(self, backend: Backend, reason: str, completion: Strategy | None = None) -> None:
        self.backend = backend
        self.reason = reason
        if completion:
            strategy = check_strategy(completion)
        else:
            env = os.environ.get("GPUAIO_COMPLETION") or "events"
            strategy = check_strategy(env, "GPUAIO_COMPLETION")
        self.strategy: Strategy = strategy
        self.host: HostPool = HostPool()
        self.faults: FaultLog = FaultLog()
        """Logs each device's sticky error once (engines and release paths share it)."""
        self.reaper: Reaper = Reaper(self.log_failure)
        self._engines: dict[int, CompletionEngine] = {}
        self._peers: set[tuple[int, int]] = set()
        self._sequencers: weakref.WeakValueDictionary[tuple[int, int], SequencerShare] = (
            weakref.WeakValueDictionary()
        )
        """Per ``(device, CUstream)``, the share its streams hold, while one does."""
        self._lock = threading.Lock()
        self._staging_settings: tuple[StagingConfig | None, int | None] = (None, None)
        """What :meth:`configure_staging` set last (config, pinned budget)."""
        self._release_lock = threading.Lock()
        """Held to release the backend, and by each stream release (``backend_held``)."""
        self._releases: list[tuple[SerialExecutor, int]] = []
        """Stream releases queued on their host threads (``expect_release``)."""
        self.closed: bool = False
        self.released: bool = False
        """The backend is released (or is the parent's, after a fork): no driver
        call may be made any more. Later than :attr:`closed`: the frees queued
        before :meth:`close` still run while it closes."""
        self.extras: dict[str, Any] = {}
        self.devices: dict[int, object] = {}
        """The :class:`gpuaio.Device` objects, kept by ``gpuaio._api.device.device_of``
        (the runtime sits below devices and does not import them)."""
        self.forked: str | None = None
        """In a child forked after this runtime was created: why it cannot be used."""

    def forked_error(self, call: str) -> ForkedProcessError:
        """The error for ``call`` in a child forked after this runtime was made."""
        return ForkedProcessError(call, detail=self.forked or "")

    def _raise_forked(self, call: str) -> NoReturn:
        raise self.forked_error(call)

    def engine(self, device: int) -> CompletionEngine:
        """The completion engine of ``device``, started on first use."""
        eng = self._engines.get(device)
        if eng is None:
            with self._lock:
                eng = self._engines.get(device)
                if eng is None:
                    eng = self._engines[device] = make_engine(
                        self.strategy, self.backend, device, self.faults
                    )
        return eng

    def sequencer(self, device: int, native: Any) -> SequencerShare:
        """The ordering authority of the ``CUstream`` ``native``, shared by its wrappers.

        Two :class:`~gpuaio.Stream` objects over one ``CUstream`` (say, two
        ``wrap_stream`` calls) must not order its work independently. Each
        keeps the returned share; the runtime forgets the sequencer when no
        stream keeps it any more.
        """
        key = (device, self.backend.stream_handle(native))
        with self._lock:
            share = self._sequencers.get(key)
            if share is None:
                share = self._sequencers[key] = SequencerShare(Sequencer(self, device, native))
            return share

    def sequencers(self) -> list[Sequencer]:
        """The sequencers of the streams alive now."""
        with self._lock:
            return [share.seq for share in list(self._sequencers.values())]

    def forget_sequencer(self, seq: Sequencer) -> None:
        """``seq``'s stream is being destroyed: a new stream may reuse its handle."""
        key = (seq.ordinal, seq.key)
        with self._lock:
            share = self._sequencers.get(key)
            if share is not None and share.seq is seq:
                del self._sequencers[key]

    @property
    def stager(self) -> Stager | None:
        """The pageable-transfer stager (None when ``GPUAIO_STAGING=0``)."""
        if self.forked is not None:
            self._raise_forked("stager")
        try:
            return self.extras["stager"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        with self._lock:
            if "stager" not in self.extras:
                off = os.environ.get("GPUAIO_STAGING", "1") == "0"
                self.extras["stager"] = None if off else Stager(self)
        return self.extras["stager"]  # type: ignore[no-any-return]

    def configure_staging(
        self,
        *,
        staging: bool | None = None,
        pinned_budget: int | str | None = None,
        chunk_bytes: int | str | None = None,
        staging_depth: int | None = None,
        inline_max: int | str | None = None,
    ) -> None:
        """Replace the stager with one of these settings (see :func:`configure`)."""
        if self.forked is not None:
            self._raise_forked("configure")
        if staging is not None and not isinstance(staging, bool):
            raise InvalidArgumentError(f"staging must be True or False, not {staging!r}")
        budget = _size_arg("pinned_budget", pinned_budget, minimum=MIN_CLASS)
        chunk = _size_arg("chunk_bytes", chunk_bytes, minimum=1)
        small = _size_arg("inline_max", inline_max, minimum=0)
        depth_ok = isinstance(staging_depth, int) and not isinstance(staging_depth, bool)
        if staging_depth is not None and not (depth_ok and staging_depth >= 1):
            raise InvalidArgumentError(f"staging_depth must be an int >= 1, not {staging_depth!r}")
        with self._lock:
            old = self.extras.get("stager")
            if staging is not None:
                on = staging
            elif "stager" in self.extras:  # made already: on unless turned off
                on = old is not None
            else:
                on = os.environ.get("GPUAIO_STAGING", "1") != "0"
            saved_config, saved_budget = self._staging_settings
            base = old.config if old is not None else saved_config or StagingConfig()
            if chunk is not None and chunk < base.min_chunk:
                raise InvalidArgumentError(
                    f"chunk_bytes must be at least the smallest chunk, {base.min_chunk}, "
                    f"not {chunk}"
                )
            config = StagingConfig(
                max_chunk=base.max_chunk if chunk is None else chunk,
                min_chunk=base.min_chunk,
                depth=base.depth if staging_depth is None else staging_depth,
                inline_max=base.inline_max if small is None else small,
                split=base.split,
                driver_max=base.driver_max,
            )
            if budget is None:
                budget = old.pool.budget if old is not None else saved_budget
            if old is not None and old.pool.stats().in_use:
                raise RuntimeError(
                    "staged transfers hold pinned blocks: change staging settings before "
                    "transfers start or after they end"
                )
            self.extras["stager"] = Stager(self, config, budget) if on else None
            self._staging_settings = (config, budget)  # kept while staging is off
        if old is not None:
            self.reaper.submit(old.close)  # frees pinned memory: not on the caller's thread

    def set_completion(self, strategy: Strategy) -> None:
        """Use ``strategy`` for every device from now on (no op may be pending)."""
        strategy = check_strategy(strategy)
        if self.forked is not None:
            self._raise_forked("configure")
        with self._lock:
            busy = [e.device for e in self._engines.values() if e.pending()]
            if busy:
                raise RuntimeError(f"operations are pending on device(s) {busy}")
            old = list(self._engines.values())
            self._engines.clear()
            self.strategy = strategy
        for eng in old:
            eng.close()

    def ensure_peer_access(self, a: int, b: int) -> None:
        """Enable direct access between devices ``a`` and ``b`` where the hardware allows.

        Without it, peer copies still work: the driver stages them through
        host memory.
        """
        key = (min(a, b), max(a, b))
        if key in self._peers:
            return
        with self._lock:
            if key in self._peers:
                return
            be = self.backend
            for x, y in ((a, b), (b, a)):
                if be.can_access_peer(x, y):
                    try:
                        be.enable_peer_access(x, y)
                    except Exception:
                        log.warning("could not enable peer access %d -> %d", x, y, exc_info=True)
            self._peers.add(key)

    def log_failure(self, what: str, exc: BaseException, device: int | None = None) -> None:
        """Log that releasing something (a free, a destroy) failed with ``exc``.

        A sticky error is logged once per device, with its traceback, however
        many frees and destroys fail with it afterwards (later ones at DEBUG,
        without a traceback); ``device`` is the device the failed call was
        for, None when unknown (pinned memory). Anything else is an error with
        its traceback.
        """
        if isinstance(exc, DeviceFatalError):
            self.faults.report(what, exc, device)
        else:
            log.error("%s", what, exc_info=exc)

    def check_device(self, ordinal: int) -> None:
        """Raise the device's sticky error, if it has had one (or if this process was forked)."""
        if self.forked is not None:
            self._raise_forked("gpuaio")
        eng = self._engines.get(ordinal)
        if eng is not None and eng.fatal is not None:
            raise DeviceFatalError(eng.fatal.call, eng.fatal.code, eng.fatal.name, eng.fatal.detail)

    def close(self) -> None:
        """Stop engines and threads, then release the backend."""
        if self.closed:
            return
        self.closed = True
        for eng in list(self._engines.values()):
            eng.close()
        for closer in list(self.extras.values()):
            close = getattr(closer, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    self.log_failure(f"gpuaio: error while closing {closer!r}", exc)
        self.host.close()
        self.reaper.close()  # runs the frees already queued, the backend still open
        # Streams dropped meanwhile are destroyed on their host threads, behind
        # their earlier jobs: let those run too, for a while (a stream stuck
        # behind a hung kernel must not hang the exit; its release then finds
        # the backend gone and leaves the stream to the context's teardown).
        deadline = time.monotonic() + _RELEASE_WAIT_S
        for executor, job in self._releases:
            if not executor.wait_for(job, max(0.0, deadline - time.monotonic())):
                break
        self._releases.clear()
        with self._release_lock:
            self.released = True
            self.backend.close()

    @contextlib.contextmanager
    def backend_held(self) -> Iterator[bool]:
        """Hold off the backend's release; yields False once it was released."""
        with self._release_lock:
            yield not self.released

    def expect_release(self, executor: SerialExecutor, job: int) -> None:
        """Job ``job`` of ``executor`` releases driver objects: :meth:`close` lets
        it run (up to a few seconds) before releasing the backend."""
        releases = self._releases
        releases.append((executor, job))
        if len(releases) > 64:  # keep only the pending ones
            releases[:] = [(e, j) for e, j in releases if e.completed < j]

    def _disown(self, detail: str) -> None:
        """In a forked child: refuse every use, free nothing, close nothing at exit.

        Runs inside ``os.fork`` in the child, where only the forking thread
        exists: it takes no lock and makes no driver call, only replaces
        what a thread of the parent may have held at the fork.
        """
        self.forked = detail
        self.closed = True  # close() and the frees of collected arrays do nothing now
        self.released = True
        self._lock = threading.Lock()
        self.reaper = LeakingReaper()
        disable_backend(self.backend, detail)


_current: Runtime | None = None
_current_lock = threading.Lock()
_cuda_pid: int | None = None
"""The process in which gpuaio initialized CUDA (a forked child cannot use it)."""


def current_runtime() -> Runtime:
    """The active runtime, created on first use from the environment."""
    rt = _current
    if rt is None:
        return _create(None, None)
    return rt


def _create(backend: Backend | str | None, completion: Strategy | None) -> Runtime:
    global _current, _cuda_pid
    _warm_imports()  # not under the lock: a loop asking for the runtime would wait for it
    with _current_lock:
        if backend is None and _current is not None:
            return _current
        if isinstance(backend, Backend):
            be, reason = backend, f"{backend.name} backend chosen by the caller"
        else:
            _refuse_cuda_after_fork(backend)
            be, reason = create_backend(backend)
        if be.name == "cuda" and _cuda_pid is None:
            _cuda_pid = os.getpid()
        old, _current = _current, Runtime(be, reason, completion)
    if old is not None:
        old.close()
    return _current


_warmed = False


def _warm_imports() -> None:
    """Import now, where the runtime starts, what a first call would import later.

    DLPack input goes through cuda.core's ``StridedMemoryView``, and importing
    ``cuda.core`` takes 0.2-0.4 s: a first ``copy`` of a torch or JAX tensor
    inside an event loop would block it that long. The runtime starts on the
    thread of the first ``Device`` (a worker with ``await Device.open()``),
    and once per process. Not on a thread of its own: cuda.core swaps its
    module for its cu12/cu13 build while it imports, so a second thread that
    imports it meanwhile can get a half-made module (seen on an H200: a
    compile found no ``ProgramOptions``).
    """
    global _warmed
    if _warmed:
        return
    _warmed = True
    with contextlib.suppress(Exception):  # a missing module fails later, where it is needed
        importlib.import_module("cuda.core.utils")


def _refuse_cuda_after_fork(name: str | None) -> None:
    """In a child forked after gpuaio initialized CUDA, CUDA cannot be initialized again.

    Without this, ``auto`` would silently fall back to the sim.
    """
    if _cuda_pid is None or _cuda_pid == os.getpid():
        return
    choice = (name or os.environ.get("GPUAIO_BACKEND") or "auto").lower()
    if choice in ("auto", "cuda"):
        raise ForkedProcessError(
            "use_backend", detail=forked_message("cuda", os.getpid(), _cuda_pid)
        )


def use_backend(backend: Backend | str, *, completion: Strategy | None = None) -> Runtime:
    """Switch to ``backend`` (a :class:`Backend`, ``"cuda"``, ``"sim"`` or ``"auto"``).

    The previous runtime is closed: its devices, streams and arrays must not
    be used afterwards. Returns the new runtime.
    """
    return _create(backend, completion)


def _drop_current(rt: Runtime) -> None:
    """Forget ``rt`` as the current runtime: its owner closed it (a test's fixture).

    Later calls then start a runtime from the environment instead of finding
    a closed one ("the sim backend is closed").
    """
    global _current
    with _current_lock:
        if _current is rt:
            _current = None


def configure(
    *,
    completion: Strategy | None = None,
    staging: bool | None = None,
    pinned_budget: int | str | None = None,
    chunk_bytes: int | str | None = None,
    staging_depth: int | None = None,
    inline_max: int | str | None = None,
) -> Runtime:
    """Settings of the current runtime, in code; each overrides its environment variable.

    Args:
        completion: the completion strategy (``GPUAIO_COMPLETION``).
        staging: False sends pageable copies to the driver's own path
            (``GPUAIO_STAGING=0``).
        pinned_budget: bytes of pinned memory the staging pool may hold
            (``GPUAIO_PINNED_BUDGET``); sizes may be strings like ``"512M"``.
        chunk_bytes: the largest staging chunk (``GPUAIO_CHUNK_BYTES``).
        staging_depth: chunks in flight per transfer (``GPUAIO_STAGING_DEPTH``).
        inline_max: the largest copy staged without a thread hop
            (``GPUAIO_INLINE_MAX``).

    Settings not given keep their values. A bad value raises
    ``InvalidArgumentError`` naming the argument, and nothing changes.
    Changing the completion strategy while operations are pending, or a
    staging setting while staged transfers hold pinned blocks, raises
    ``RuntimeError``. Streams and arrays stay valid; the old staging pool's
    pinned memory is freed on gpuaio's reaper thread. Call it at start-up.
    """
    rt = current_runtime()
    staging_args = (staging, pinned_budget, chunk_bytes, staging_depth, inline_max)
    if any(a is not None for a in staging_args):
        rt.configure_staging(
            staging=staging,
            pinned_budget=pinned_budget,
            chunk_bytes=chunk_bytes,
            staging_depth=staging_depth,
            inline_max=inline_max,
        )
    if completion is not None:
        rt.set_completion(completion)
    return rt


def _size_arg(name: str, value: int | str | None, *, minimum: int) -> int | None:
    """A size argument of :func:`configure`: bytes, or a string like ``"512M"``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            n = parse_size(value)
        except InvalidArgumentError:
            raise InvalidArgumentError(f"{name}: cannot read a size from {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        raise InvalidArgumentError(f"{name} must be a size in bytes (int or str), not {value!r}")
    if n < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum} bytes, not {n}")
    return n


async def reserve_pinned(transfer_bytes: int, *, concurrent: int = 1) -> PoolStats:
    """Pin, ahead of time, the staging blocks that pageable transfers of this size use.

    Allocating pinned memory is slow (the driver locks every page) and, while
    it runs, holds the process's memory-map lock, so any thread that faults a
    page waits too, the event loop's included: the first large pageable
    transfers of a process pay for it. A service calls this once at start-up
    with its typical transfer size and concurrency; later transfers of up to
    that size find their blocks cached.

    The allocation runs on a worker thread; the loop is never blocked. It
    stops at the pinned budget (``GPUAIO_PINNED_BUDGET``) and never evicts
    cached blocks. Idempotent: blocks already cached count. Returns the
    pool's counters afterwards. Does nothing when staging is off
    (``GPUAIO_STAGING=0``).
    """
    if isinstance(transfer_bytes, bool) or not isinstance(transfer_bytes, int):
        raise InvalidArgumentError(f"transfer_bytes must be an int, not {transfer_bytes!r}")
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise InvalidArgumentError(f"concurrent must be an int >= 1, not {concurrent!r}")
    if transfer_bytes < 1:
        raise InvalidArgumentError(f"transfer_bytes must be positive, not {transfer_bytes}")
    stager = current_runtime().stager
    if stager is None:
        return PoolStats(0, 0, 0, 0, 0, 0, 0, 0)
    size, count = stager.blocks_for(transfer_bytes, concurrent)
    pool = stager.pool

    def reserve() -> PoolStats:
        pool.reserve(size, count)
        return pool.stats()  # off the loop too: the pool's lock may be held by a free

    return await anyio.to_thread.run_sync(reserve)


@atexit.register
def _shutdown() -> None:
    rt = _current
    if rt is not None:
        try:
            rt.close()
        except Exception:
            log.exception("gpuaio: error at shutdown")


# -- fork ----------------------------------------------------------------------

_RELEASE_WAIT_S = 5.0
"""How long :meth:`Runtime.close` lets queued stream releases run, in all."""
_FORK_LOCK_TIMEOUT_S = 30.0
_fork_holds_lock = False


def _before_fork() -> None:
    # No runtime is half created or half swapped at the fork.
    global _fork_holds_lock
    _fork_holds_lock = _current_lock.acquire(timeout=_FORK_LOCK_TIMEOUT_S)


def _after_fork_in_parent() -> None:
    global _fork_holds_lock
    if _fork_holds_lock:
        _fork_holds_lock = False
        _current_lock.release()


def _after_fork_in_child() -> None:
    """Disable the inherited runtime; a process that never created one starts fresh.

    Runs in the child inside ``os.fork``: no driver call, no lock a thread of
    the parent may have held.
    """
    global _current_lock, _fork_holds_lock
    _current_lock = threading.Lock()
    _fork_holds_lock = False
    rt = _current
    if rt is None:
        return
    _operation.forked_child = True
    rt._disown(forked_message(rt.backend.name, os.getpid(), os.getppid()))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
