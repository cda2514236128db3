"""Opt-in per-operation timeline, exported as Chrome-trace JSON (Perfetto opens it).

::

    with gpuaio.trace("copy.trace.json"):
        await stream.copy(d, host)

Each operation becomes one span from enqueue to completion on a track per
stream (``pid`` = device, ``tid`` = stream), with its bytes, kind and the
completion strategy; staged transfers add one span per chunk on the host
thread that copied it. With the ``nvtx`` package installed, host-side
staging work also shows as NVTX ranges in Nsight Systems. Tracing costs
nothing while off: a single global check per operation.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._operation import Operation

__all__ = ["Tracer", "active", "nvtx_range", "trace"]

_T0 = time.perf_counter()

active: Tracer | None = None
"""The tracer collecting spans now, if any."""


class Tracer:
    """Collects spans; :meth:`chrome_trace` turns them into a Chrome-trace document."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []

    def op_done(self, op: Operation, t_start: float) -> None:
        """Record ``op`` (enqueued at ``t_start``) as it completes."""
        end = time.perf_counter()
        stream = op.stream
        ev = {
            "name": op.label,
            "ph": "X",
            "ts": (t_start - _T0) * 1e6,
            "dur": (end - t_start) * 1e6,
            "pid": f"device {stream.device.ordinal}" if stream is not None else "host",
            "tid": f"stream {stream.handle:#x}" if stream is not None else "ops",
            "args": {
                "bytes": op.nbytes,
                "ok": op._exc is None,
                "strategy": stream._rt.strategy if stream is not None else None,
            },
        }
        with self._lock:
            self.events.append(ev)

    def span(self, name: str, t_start: float, **args: Any) -> None:
        """Record host work on the calling thread (a staging chunk, say)."""
        end = time.perf_counter()
        ev = {
            "name": name,
            "ph": "X",
            "ts": (t_start - _T0) * 1e6,
            "dur": (end - t_start) * 1e6,
            "pid": "host",
            "tid": threading.current_thread().name,
            "args": args,
        }
        with self._lock:
            self.events.append(ev)

    def chrome_trace(self) -> dict[str, Any]:
        """The events so far as a Chrome-trace document (Perfetto opens it)."""
        with self._lock:
            return {"traceEvents": list(self.events), "displayTimeUnit": "ms"}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`chrome_trace` as JSON to ``path``; returns the path."""
        p = Path(path)
        p.write_text(json.dumps(self.chrome_trace()))
        return p


@contextlib.contextmanager
def trace(path: str | os.PathLike[str] | None = None) -> Iterator[Tracer]:
    """Record a timeline of every operation completed inside the block.

    Writes Chrome-trace JSON to ``path`` on exit when given; the
    :class:`Tracer` is yielded either way. Operations still pending at exit
    are not recorded.
    """
    global active
    tracer = Tracer()
    previous, active = active, tracer
    try:
        yield tracer
    finally:
        active = previous
        if path is not None:
            tracer.save(path)


try:  # NVTX ranges when the package is there; nothing otherwise.
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range (if ``nvtx`` is installed) plus a trace span (if tracing)."""
    tracer = active
    t0 = time.perf_counter() if tracer is not None else 0.0
    if _nvtx is not None:
        _nvtx.push_range(name, domain="gpuaio")
    try:
        yield
    finally:
        if _nvtx is not None:
            _nvtx.pop_range(domain="gpuaio")
        if tracer is not None:
            tracer.span(name, t0)
