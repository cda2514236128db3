"""Opt-in per-operation timeline, exported as Chrome-trace JSON (Perfetto opens it).

::

    with gpuaio.trace("copy.trace.json"):
        await stream.copy(d, host)

The document follows the Trace Event Format: integer ``pid``/``tid`` named
by ``M`` (metadata) events. Each operation is an async span (``b``/``e``,
category ``gpuaio.op``, one id per op) from enqueue to completion in the
process of its device, on the track of its stream: ops of one stream
overlap (the next is enqueued before the last completes), which complete
(``X``) events on one track may not. Staged transfers add one ``X`` span per
slice of each chunk on the host thread that copied it (``pid`` 1, ``tid``
the thread's native id); one thread copies one slice at a time, so these
never overlap.

:func:`trace` is scoped to the calling task through :mod:`contextvars`:
operations enqueued by that task (and by tasks it starts inside the block,
which inherit its context) are recorded, whatever thread later completes or
copies them; other tasks' and threads' operations are not. Each operation
captures the tracer when it is enqueued, so the work gpuaio does for it on
its own threads lands in the right trace.

With the ``nvtx`` package installed, the host copies of staged transfers
also show as NVTX ranges in Nsight Systems, traced or not. Tracing costs
nothing while off: one global check per operation.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .streamref import StreamRef

__all__ = [
    "HOST_PID",
    "Tracer",
    "current",
    "device_pid",
    "nvtx_range",
    "trace",
    "traced_call",
    "using",
    "wanted",
]

_T0 = time.perf_counter()

HOST_PID = 1
"""The trace's process for host-side work (gpuaio's threads)."""

_OPS_TID = 0
"""Track in the host process for operations bound to no stream (no OS thread has id 0)."""


def device_pid(ordinal: int) -> int:
    """The trace's process for device ``ordinal``."""
    return 2 + ordinal


_current: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar(
    "gpuaio_tracer", default=None
)
_open = 0  # trace() blocks open in the process: while 0, nothing looks at the context
_open_lock = threading.Lock()


def current() -> Tracer | None:
    """The tracer of the calling task (or thread), if it is inside :func:`trace`."""
    return _current.get() if _open else None


@contextlib.contextmanager
def using(tracer: Tracer | None) -> Iterator[None]:
    """Enqueue inside the block on behalf of a task whose tracer is ``tracer``.

    For gpuaio code that enqueues for a task from outside its context (a
    loop callback, say); synchronous use only.
    """
    token = _current.set(tracer)
    try:
        yield
    finally:
        _current.reset(token)


def _us(t: float) -> float:
    return (t - _T0) * 1e6


class Tracer:
    """Collects spans; :meth:`chrome_trace` turns them into a Chrome-trace document.

    Thread-safe: gpuaio's threads record into it. Once its :func:`trace`
    block has ended it records nothing more.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        """The recorded events (``b``/``e`` pairs and ``X`` spans), without metadata."""
        self._processes: dict[int, str] = {HOST_PID: "gpuaio host"}
        self._threads: dict[tuple[int, int], str] = {}
        self._streams: dict[tuple[int, int], int] = {}  # (ordinal, handle) -> tid

    def close(self) -> None:
        """Stop recording (operations still pending then are left out)."""
        with self._lock:
            self._closed = True

    def op_done(
        self, label: str, nbytes: int, ok: bool, stream: StreamRef | None, t_start: float
    ) -> None:
        """Record an operation (enqueued at ``t_start``) as it completes: a ``b``/``e`` pair."""
        end = time.perf_counter()
        args: dict[str, Any] = {
            "bytes": nbytes,
            "strategy": stream._rt.strategy if stream is not None else None,
        }
        with self._lock:
            if self._closed:
                return
            if stream is not None:
                ordinal = stream._ordinal
                pid = device_pid(ordinal)
                self._processes.setdefault(pid, f"device {ordinal}")
                key = (ordinal, stream._key)
                tid = self._streams.get(key)
                if tid is None:
                    tid = self._streams[key] = len(self._streams) + 1
                    self._threads[(pid, tid)] = f"stream {stream._key:#x}"
                args["stream"] = f"{stream._key:#x}"
            else:
                pid, tid = HOST_PID, _OPS_TID
                self._threads.setdefault((pid, tid), "operations without a stream")
            op_id = f"{next(self._ids):#x}"
            common = {"name": label, "cat": "gpuaio.op", "id": op_id, "pid": pid, "tid": tid}
            self.events.append({**common, "ph": "b", "ts": _us(t_start), "args": args})
            self.events.append({**common, "ph": "e", "ts": _us(end), "args": {"ok": ok}})

    def span(self, name: str, t_start: float, **args: Any) -> None:
        """Record host work from ``t_start`` until now on the calling thread's track."""
        end = time.perf_counter()
        thread = threading.current_thread()
        tid = threading.get_native_id()
        ev = {
            "name": name,
            "cat": "gpuaio.host",
            "ph": "X",
            "ts": _us(t_start),
            "dur": (end - t_start) * 1e6,
            "pid": HOST_PID,
            "tid": tid,
            "args": args,
        }
        with self._lock:
            if self._closed:
                return
            self._threads[(HOST_PID, tid)] = thread.name
            self.events.append(ev)

    def chrome_trace(self) -> dict[str, Any]:
        """The events so far as a Chrome-trace document (Perfetto opens it).

        Metadata (``M``) events first name every process and thread used.
        """
        with self._lock:
            meta: list[dict[str, Any]] = []
            for pid, pname in sorted(self._processes.items()):
                meta.append(_meta("process_name", pid, 0, name=pname))
                meta.append(_meta("process_sort_index", pid, 0, sort_index=pid))
            for (pid, tid), tname in sorted(self._threads.items()):
                meta.append(_meta("thread_name", pid, tid, name=tname))
            return {"traceEvents": meta + self.events, "displayTimeUnit": "ms"}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`chrome_trace` as JSON to ``path``; returns the path."""
        p = Path(path)
        p.write_text(json.dumps(self.chrome_trace()))
        return p


def _meta(kind: str, pid: int, tid: int, **args: Any) -> dict[str, Any]:
    return {"name": kind, "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": args}


@contextlib.contextmanager
def trace(path: str | os.PathLike[str] | None = None) -> Iterator[Tracer]:
    """Record a timeline of the operations the calling task enqueues inside the block.

    Scoped to the calling task (through :mod:`contextvars`): operations of
    tasks started inside the block are included, those of other tasks and
    threads are not, and concurrent ``trace()`` blocks in different tasks
    record separately. Writes Chrome-trace JSON to ``path`` on exit when
    given; the :class:`Tracer` is yielded either way. Operations still
    pending at exit are not recorded.
    """
    global _open
    tracer = Tracer()
    token = _current.set(tracer)
    with _open_lock:
        _open += 1
    try:
        yield tracer
    finally:
        with _open_lock:
            _open -= 1
        tracer.close()
        with contextlib.suppress(ValueError):  # exited in another context than entered
            _current.reset(token)
        if path is not None:
            tracer.save(path)


try:  # NVTX ranges when the package is there; nothing otherwise.
    import nvtx as _nvtx  # pyright: ignore[reportMissingImports]
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None


_UNSET: Any = object()


@contextlib.contextmanager
def nvtx_range(name: str, tracer: Tracer | None = _UNSET, **args: Any) -> Iterator[None]:
    """An NVTX range (if ``nvtx`` is installed) plus a trace span (if tracing).

    ``tracer`` defaults to the calling task's; gpuaio's threads pass the one
    the operation captured when it was enqueued.
    """
    if tracer is _UNSET:
        tracer = current()
    t0 = time.perf_counter() if tracer is not None else 0.0
    if _nvtx is not None:
        _nvtx.push_range(name, domain="gpuaio")
    try:
        yield
    finally:
        if _nvtx is not None:
            _nvtx.pop_range(domain="gpuaio")
        if tracer is not None:
            tracer.span(name, t0, **args)


def wanted(tracer: Tracer | None) -> bool:
    """Whether host work for an op with this tracer needs :func:`traced_call`."""
    return tracer is not None or _nvtx is not None


def traced_call(
    name: str, tracer: Tracer | None, args: dict[str, Any], fn: Callable[..., object], *a: Any
) -> None:
    """``fn(*a)`` inside :func:`nvtx_range` (run on the thread doing the work)."""
    with nvtx_range(name, tracer, **args):
        fn(*a)
