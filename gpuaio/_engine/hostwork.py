"""Host-side work off the event loop: parallel memcpy/fill and ordered executors.

numpy's copies release the GIL, so large host copies split across a few
threads run in parallel (host memcpy into pinned memory scales to ~8 threads
on the H100 hosts we measured).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import trace as _trace
from .._core.timerslack import precise_timers

__all__ = ["HostPool", "SerialExecutor", "byte_view"]

MIN_SLICE = 1 << 20
"""Bytes below which a host copy or fill is not split (thread hand-off costs ~10-50 µs)."""

STAGE_SLICE = int(os.environ.get("GPUAIO_STAGE_SLICE", 4 << 20))
"""The smallest slice of a staging chunk a copy thread takes (:meth:`HostPool.submit_copy`).

4 MiB: on H200 hosts 16 MiB pageable copies ran 1.2-1.3x and 64 MiB ones
1.1x faster than in 1 MiB slices, in two runs (issue 13,
``benchmarks/results/2026-12-02-h200-variants-run-h.log`` and ``-run-i``):
each slice is a hand-off between threads under the GIL."""


def byte_view(ptr: int, nbytes: int, readonly: bool = False) -> npt.NDArray[np.uint8]:
    """A flat uint8 numpy view of ``nbytes`` at address ``ptr`` (host memory only)."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    buf = (ctypes.c_ubyte * nbytes).from_address(ptr)
    arr = np.frombuffer(memoryview(buf), dtype=np.uint8)
    if readonly:
        arr.flags.writeable = False
    return arr


COPY_NICE = int(os.environ.get("GPUAIO_HOST_NICE", "10"))
"""How much lower the copy threads' CPU priority is than the rest of the process
(their Linux nice value, raised by this much; 0: the same).

Copy threads are many and busy for whole transfers; when they and the event
loop's thread want the same core, the loop should get it at once. At +10 the
kernel's scheduler weighs a copy thread at a tenth of a normal thread and lets
a waking loop thread preempt it; with idle cores nothing changes."""


def _copy_thread_start() -> None:
    """Initializer of a copy thread: precise timers, and a lower CPU priority."""
    precise_timers()
    # Linux only: there PRIO_PROCESS with a thread id sets that thread's nice;
    # elsewhere the id would name a process (perhaps another program's).
    if COPY_NICE > 0 and sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + COPY_NICE)
        except OSError:
            pass  # a sandbox that forbids it: keep the default priority


_FEW_CORES = (os.cpu_count() or 1) <= 4
_YIELD_SLICE = 4 << 20


def _yielding_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """One thread's copy; on machines with few cores, in slices that yield the CPU.

    Between slices the event loop thread gets a core at once instead of
    after the scheduler's time slice.
    """
    n = dst.nbytes
    if not _FEW_CORES or n <= _YIELD_SLICE:
        np.copyto(dst, src)
        return
    for off in range(0, n, _YIELD_SLICE):
        end = min(n, off + _YIELD_SLICE)
        np.copyto(dst[off:end], src[off:end])
        os.sched_yield()


class HostPool:
    """Threads that run the slices of large host copies and fills.

    ``threads`` is the parallelism of one copy. :meth:`copy` blocks and has
    the calling thread copy a share; :meth:`submit_copy` hands every slice to
    the pool and returns at once, so a stager can queue the next chunk while
    this one is still being copied.
    """

    def __init__(self, threads: int | None = None) -> None:
        if threads is None:
            env = os.environ.get("GPUAIO_HOST_THREADS")
            # Leave a core to the event loop: copy threads that take every
            # core delay the loop thread by whole scheduler time slices.
            # 12 threads measured best on a 16-core H100 host (44 GB/s).
            threads = int(env) if env else min(12, max(1, (os.cpu_count() or 1) - 1))
        self.threads: int = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.threads, thread_name_prefix="gpuaio-host", initializer=_copy_thread_start
                )
            return self._pool

    def copy(self, dst: np.ndarray, src: np.ndarray, threads: int | None = None) -> None:
        """Copy flat uint8 ``src`` into ``dst`` with up to ``threads`` threads; blocks."""
        n = dst.nbytes
        parts = min(threads or self.threads, max(1, n // MIN_SLICE))
        if parts <= 1:
            _yielding_copy(dst, src)
            return
        step = -(-n // parts)
        step = (step + 4095) & ~4095
        futs: list[Future[None]] = []
        pool = self._executor()
        for start in range(step, n, step):
            end = min(n, start + step)
            futs.append(pool.submit(np.copyto, dst[start:end], src[start:end]))
        np.copyto(dst[:step], src[:step])  # the calling thread takes a share too
        for f in futs:
            f.result()

    def submit_copy(
        self,
        dst: np.ndarray,
        src: np.ndarray,
        span: tuple[str, _trace.Tracer | None, dict[str, Any]] | None = None,
    ) -> list[Future[None]]:
        """Queue the copy of flat uint8 ``src`` into ``dst`` in slices; returns their futures.

        With ``span`` = (name, tracer, args), each slice is an NVTX range (if
        ``nvtx`` is installed) and a span in ``tracer`` (if not None) on the
        thread that copies it, with ``args`` plus the slice's ``bytes`` and
        ``offset`` (``args["offset"]`` plus its place in ``dst``).
        """
        n = dst.nbytes
        parts = min(self.threads, max(1, n // STAGE_SLICE))
        step = -(-n // parts)
        step = (step + 4095) & ~4095
        pool = self._executor()
        if span is None or not _trace.wanted(span[1]):
            return [
                pool.submit(_yielding_copy, dst[start : start + step], src[start : start + step])
                for start in range(0, n, step)
            ]
        name, tracer, args = span
        base = args.get("offset", 0)
        return [
            pool.submit(
                _trace.traced_call,
                name,
                tracer,
                {**args, "offset": base + start, "bytes": min(step, n - start)},
                _yielding_copy,
                dst[start : start + step],
                src[start : start + step],
            )
            for start in range(0, n, step)
        ]

    def fill(self, dst: np.ndarray, value: int, itemsize: int) -> None:
        """Fill flat uint8 ``dst`` with the little-endian ``itemsize``-byte ``value``."""
        typed = dst.view(np.dtype(f"<u{itemsize}"))
        pattern = np.array(value & ((1 << (8 * itemsize)) - 1), dtype=typed.dtype)
        n = typed.size
        parts = min(self.threads, max(1, dst.nbytes // MIN_SLICE))
        if parts <= 1:
            typed.fill(pattern)
            return
        step = -(-n // parts)
        pool = self._executor()
        futs = [pool.submit(typed[s : s + step].fill, pattern) for s in range(step, n, step)]
        typed[:step].fill(pattern)
        for f in futs:
            f.result()

    def close(self) -> None:
        """Stop the copy threads after the copies already submitted."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _wake() -> None:
    """Queued by :meth:`SerialExecutor.linger` to make the thread re-read its idle time."""


_WAKE = _wake


class SerialExecutor:
    """Runs submitted jobs one at a time, in order, on a thread of its own.

    The thread starts on demand and exits after ``idle_s`` without work, so
    a stream that never needs host work never owns a thread. Jobs are
    numbered from 1 in submission order; :meth:`wait_for` blocks until a
    given job has run.
    """

    def __init__(self, name: str, idle_s: float = 30.0) -> None:
        self._name = name
        self._idle_s = idle_s
        self._q: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._cv = threading.Condition(threading.Lock())
        self.submitted: int = 0
        """Jobs submitted so far (the number of the last one)."""
        self.completed: int = 0
        """Jobs that have run (they run in order: every job up to this number)."""
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._ident = 0

    @property
    def busy(self) -> bool:
        """True while any submitted job has not finished."""
        return self.completed < self.submitted

    def on_thread(self) -> bool:
        """Whether the caller is this executor's thread (running one of its jobs)."""
        return self._ident == threading.get_ident()

    def linger(self, idle_s: float) -> None:
        """Let the thread exit after ``idle_s`` without work (0: as soon as idle).

        A closed stream calls ``linger(0)`` so its thread ends once its last
        jobs have run, instead of idling on.
        """
        self._idle_s = idle_s
        self._q.put(_WAKE)

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` as number :attr:`submitted`; it runs after every job before it."""
        with self._cv:
            self.submitted += 1
            self._q.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        """Block until job number ``n`` (and so every job before it) has run,
        or ``timeout`` seconds have passed; returns whether it has run.

        Never from this executor's own thread for a job not yet run: that
        would wait for itself.
        """
        if self.completed >= n:
            return True
        if self.on_thread():
            raise RuntimeError("a stream's host job cannot wait for a later job of its own")
        with self._cv:
            self._waiting += 1
            try:
                return self._cv.wait_for(lambda: self.completed >= n, timeout)
            finally:
                self._waiting -= 1

    def _run(self) -> None:
        precise_timers()
        self._ident = threading.get_ident()
        while True:
            try:
                job = self._q.get(timeout=self._idle_s)
                if job is _WAKE:
                    continue
            except queue.Empty:
                with self._cv:
                    if self._q.empty():
                        self._thread = None
                        self._ident = 0
                        return
                continue
            try:
                job()
            except BaseException:
                # Jobs report their own errors to their operations; this is
                # a bug, but it must not take the stream's thread down.
                logging.getLogger("gpuaio").exception("gpuaio stream job failed")
            finally:
                # Drop the job (an op, its buffers) now, not when the next one
                # arrives: an idle thread would keep them alive until then.
                del job
                with self._cv:
                    self.completed += 1
                    if self._waiting:
                        self._cv.notify_all()
