"""Host-side work off the event loop: parallel memcpy/fill and ordered executors.

numpy's copies release the GIL, so large host copies split across a few
threads run in parallel (host memcpy into pinned memory scales to ~8 threads
on the H100 hosts we measured).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import trace as _trace
from .._core.timerslack import precise_timers
from . import nativecopy
from .nativecopy import COPY_SPIN_US, COPY_SPINNERS, NativeCopy, NativePool
from .pool import parse_size

__all__ = ["HostPool", "SerialExecutor", "SlicedCopy", "byte_view", "native_step", "slice_step"]

MIN_SLICE = 1 << 20
"""Bytes below which a host copy or fill is not split (thread hand-off costs ~10-50 µs)."""

STAGE_SLICE = parse_size(os.environ.get("GPUAIO_STAGE_SLICE") or str(2 << 20))
"""The smallest slice of a staging chunk a copy thread claims (:class:`SlicedCopy`);
a chunk is cut into one slice per copy thread where slices are larger.

Every slice is a return to Python under the GIL: on an H200 host, 1 MiB
slices cut 64 MiB-1 GiB uploads by up to a third and the 8 GiB soak's rate
by a third or more (issue 13, run BE); one slice per thread (12 of 5.3 MiB
in a 64 MiB chunk, against 16 of 4 MiB before) made them 5-11% faster
(run BF)."""


def slice_step(nbytes: int, threads: int, least: int = STAGE_SLICE) -> int:
    """The slice size of a sliced copy of ``nbytes`` on ``threads`` threads: one
    slice per thread where that is at least ``least``, so that each thread
    reports once per chunk; a multiple of 4 KiB."""
    step = max(4096, least, -(-nbytes // max(1, threads)))
    return (step + 4095) & ~4095


def native_step(nbytes: int, threads: int) -> int:
    """The slice size of a copy of ``nbytes`` on ``threads`` native copy threads:
    ``nativecopy.NATIVE_SLICE`` (512 KiB), or where that is 0 one slice per thread of
    at least 1 MiB."""
    fixed = nativecopy.NATIVE_SLICE
    return slice_step(0, 1, fixed) if fixed > 0 else slice_step(nbytes, threads, 1 << 20)


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


def _copy_slice(dst: int, src: int, nbytes: int) -> None:
    """One thread's copy of ``nbytes`` between host addresses (``memmove``,
    the GIL released); on machines with few cores, in pieces that yield the
    CPU, so that the event loop's thread gets a core at once instead of after
    the scheduler's time slice. Tests wrap it to see the slices."""
    if not _FEW_CORES or nbytes <= _YIELD_SLICE:
        ctypes.memmove(dst, src, nbytes)
        return
    for off in range(0, nbytes, _YIELD_SLICE):
        ctypes.memmove(dst + off, src + off, min(_YIELD_SLICE, nbytes - off))
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
        self._native: NativePool | None = None
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
            _copy_slice(dst.ctypes.data, src.ctypes.data, n)
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
        dst: int,
        src: int,
        nbytes: int,
        span: tuple[str, _trace.Tracer | None, dict[str, Any]] | None = None,
        nt: bool = False,
    ) -> SlicedCopy | NativeCopy:
        """Start copying ``nbytes`` from address ``src`` to ``dst`` on the copy
        threads, in slices claimed front to back; returns at once.

        The threads are native ones that never take the GIL where the install
        has them (:mod:`gpuaio._engine.nativecopy`), Python ones otherwise
        and while ``span`` = (name, tracer, args) has a tracer recording:
        then each slice is a span in ``tracer`` and, if ``nvtx`` is
        installed, an NVTX range (as it is on the Python threads untraced),
        on the thread that copies it, with ``args`` plus the slice's
        ``bytes`` and ``offset`` (``args["offset"]`` plus its place in the
        copy). Native threads record no NVTX range: an installed ``nvtx``
        package must not cost every copy its speed.

        ``nt``: the native threads copy with non-temporal stores
        (:func:`gpuaio._engine.nativecopy.nt_copier`); Python ones ignore it.
        """
        if nativecopy.available() and (span is None or span[1] is None):
            return self._native_pool().submit_copy(
                dst, src, nbytes, native_step(nbytes, self.threads), nt
            )
        return SlicedCopy(self._executor(), self.threads, dst, src, nbytes, span)

    def submit_flagged(
        self, dst: int, src: int, nbytes: int, least: int, nt: bool, flag: int, ready: int = 0
    ) -> NativeCopy:
        """Start copying on the native copy threads, in slices of at least
        ``least`` bytes, and set the uint32 at ``flag`` to 1 once the copy has
        ended; with ``ready``, not before the uint32 there is non-zero
        (:meth:`gpuaio._engine.nativecopy.NativePool.submit_copy`). Raises
        RuntimeError where they cannot take it (then the flag is untouched);
        only where :attr:`native`."""
        step = slice_step(nbytes, self.threads, least)
        return self._native_pool().submit_copy(dst, src, nbytes, step, nt, flag, ready)

    def submit_chunks(
        self,
        dsts: list[int],
        srcs: list[int],
        lens: list[int],
        least: int,
        nt: bool,
        flags: list[int],
        readies: list[int] | None = None,
        post: bool = True,
    ) -> list[NativeCopy]:
        """:meth:`submit_flagged` for each chunk ``k`` (``lens[k]`` bytes from
        ``srcs[k]`` to ``dsts[k]``, flag ``flags[k]``, ready word
        ``readies[k]`` if given), in one call; with ``post`` false none starts
        before :meth:`post_chunks` (:meth:`NativePool.submit_chunks`). Raises
        RuntimeError where the threads cannot take them; only where
        :attr:`native`."""
        step = slice_step(max(lens), self.threads, least)
        return self._native_pool().submit_chunks(dsts, srcs, lens, step, nt, flags, readies, post)

    def post_chunks(self, copies: list[NativeCopy]) -> None:
        """Start copies made by :meth:`submit_chunks` without ``post``; where
        this pool was closed meanwhile, stop them (their flags set, nothing
        copied), as copies held when it closes."""
        with self._lock:
            native = self._native
        if native is None:
            for cp in copies:
                cp.stop()
            return
        native.post_chunks(copies)

    @property
    def native(self) -> bool:
        """Whether untraced chunk copies run on the native copy threads."""
        return nativecopy.available()

    def _native_pool(self) -> NativePool:
        with self._lock:
            if self._native is None:
                piece = _YIELD_SLICE if _FEW_CORES else 0
                self._native = NativePool(self.threads, max(0, COPY_NICE), piece)
                if not _FEW_CORES:
                    self._native.spin(COPY_SPINNERS, COPY_SPIN_US)
            return self._native

    def warm(self, seconds: float) -> bool:
        """Have the native copy threads poll for work for up to ``seconds``
        rather than sleep (:meth:`NativePool.warm`): a chunk copy is due
        within about that long. Nothing on the Python threads, before the
        native ones started, or on machines of four cores or fewer, where a
        polling thread would take the event loop's core. Returns whether
        they were warmed."""
        native = self._native  # read once: close() may clear it
        if native is None or _FEW_CORES or not self.native:
            return False
        return native.warm(int(seconds * 1e6))

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
            native, self._native = self._native, None
        if pool is not None:
            pool.shutdown(wait=True)
        if native is not None:
            native.close()


class SlicedCopy:
    """One host copy, split into slices that copy threads claim in order.

    The copy is cut into one slice per thread, none under
    :data:`STAGE_SLICE` bytes; as many tasks go to the copy threads, each
    claiming the next slice until none is left. Slices are claimed front to
    back, so the copy completes roughly that way: :meth:`wait_copied`
    returns a growing copied prefix, and :meth:`take_copied` the slices
    copied since its last call, in any order, which the stager DMAs while
    the rest is still being copied. A thread that runs out of
    slices takes the next task in the pool's queue (the next chunk's) at
    once: no thread idles at a chunk boundary.
    """

    __slots__ = (
        "_active",
        "_claim",
        "_count",
        "_cv",
        "_done",
        "_dst",
        "_error",
        "_fresh",
        "_fresh_bytes",
        "_futs",
        "_prefix",
        "_span",
        "_src",
        "_step",
        "_stop",
        "_taken",
        "_want",
        "_want_fresh",
        "nbytes",
    )

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        threads: int,
        dst: int,
        src: int,
        nbytes: int,
        span: tuple[str, _trace.Tracer | None, dict[str, Any]] | None = None,
    ) -> None:
        self.nbytes: int = nbytes
        """Bytes the copy moves."""
        self._dst, self._src = dst, src
        step = self._step = slice_step(nbytes, threads)
        self._count = -(-nbytes // step)
        self._claim = itertools.count().__next__  # atomic under the GIL
        self._done = bytearray(self._count)
        self._prefix = 0  # slices copied, counted from the first
        self._want = nbytes  # the waiter's target: notify only once reached
        # Slices copied but not yet handed out by take_copied, and their bytes.
        self._fresh: list[int] = []
        self._fresh_bytes = 0
        self._taken = 0  # bytes handed out by take_copied
        self._want_fresh = nbytes + 1  # take_copied's target: none while nobody waits
        self._error: BaseException | None = None
        self._stop = False
        self._cv = threading.Condition(threading.Lock())
        self._span = span if span is not None and _trace.wanted(span[1]) else None
        tasks = max(1, min(threads, self._count))
        self._active = tasks
        self._futs: list[Future[None]] = []
        try:
            for _ in range(tasks):
                self._futs.append(executor.submit(self._run))
        except BaseException:
            with self._cv:
                self._active -= tasks - len(self._futs)
            self.stop()
            raise

    def _run(self) -> None:
        step, count, n = self._step, self._count, self.nbytes
        dst, src, span = self._dst, self._src, self._span
        done, cv = self._done, self._cv
        try:
            while not self._stop:
                k = self._claim()
                if k >= count:
                    break
                off = k * step
                ln = min(step, n - off)
                if span is None:
                    _copy_slice(dst + off, src + off, ln)
                else:
                    name, tracer, args = span
                    sargs = {**args, "offset": args.get("offset", 0) + off, "bytes": ln}
                    _trace.traced_call(name, tracer, sargs, _copy_slice, dst + off, src + off, ln)
                with cv:
                    done[k] = 1
                    p = self._prefix
                    if k == p:
                        p += 1
                        while p < count and done[p]:
                            p += 1
                        self._prefix = p
                    self._fresh.append(k)
                    self._fresh_bytes += ln
                    front = p == count or p * step >= self._want
                    if front or self._fresh_bytes >= self._want_fresh:
                        cv.notify_all()
        except BaseException as exc:
            with cv:
                if self._error is None:
                    self._error = exc
                self._stop = True
        finally:
            with cv:
                self._active -= 1
                if self._active == 0 or self._error is not None:
                    cv.notify_all()

    def copied(self) -> int:
        """Bytes copied so far, counted from the start without a gap."""
        return min(self._prefix * self._step, self.nbytes)

    def wait_copied(self, have: int = 0, at_least: int = 0) -> int:
        """Block until more than ``have`` bytes are copied from the start, and
        at least ``at_least`` (or all); return how many are.

        Raises the first error of a slice, once no thread copies any more.
        """
        n = self.nbytes
        target = min(n, max(have + 1, at_least))
        with self._cv:
            while True:
                p = min(self._prefix * self._step, n)
                if p >= target:
                    return p
                self._raise_if_ended()
                self._want = target
                self._cv.wait()

    def _raise_if_ended(self) -> None:
        """For a waiter, under the lock: once no thread copies any more, raise
        the first slice's error (or that slices went uncopied)."""
        if self._active == 0:
            if self._error is not None:
                raise self._error
            raise RuntimeError("host copy ended with slices uncopied")  # every slice was claimed

    def take_copied(self, at_least: int = 1) -> list[tuple[int, int]]:
        """Block until slices of at least ``at_least`` bytes (or all that are
        left) are copied that no earlier call returned; return them as
        ``(offset, bytes)`` ranges in address order, adjacent ones merged
        (an empty list once every slice was returned).

        Unlike :meth:`wait_copied`, slices come as they complete, in any
        order: a slice a late thread still copies holds none back.
        Raises the first error of a slice, once no thread copies any more.
        """
        with self._cv:
            while True:
                left = self.nbytes - self._taken
                if left == 0:
                    return []
                want = min(max(1, at_least), left)
                if self._fresh_bytes >= want:
                    break
                self._raise_if_ended()
                self._want_fresh = want
                self._cv.wait()
            fresh = sorted(self._fresh)
            self._fresh.clear()
            self._taken += self._fresh_bytes
            self._fresh_bytes = 0
            self._want_fresh = self.nbytes + 1
        step, n = self._step, self.nbytes
        ranges: list[tuple[int, int]] = []
        for k in fresh:
            off, end = k * step, min(n, (k + 1) * step)
            if ranges and sum(ranges[-1]) == off:
                ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
            else:
                ranges.append((off, end - off))
        return ranges

    def stop(self) -> None:
        """Let no thread claim another slice; return once none copies any more.

        After it, the copy's memory is untouched: what was not copied stays so.
        """
        self._stop = True
        ended = 0
        for f in self._futs:
            if f.cancel():
                ended += 1
        if ended:
            with self._cv:
                self._active -= ended
        wait(self._futs)


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
        self.last_writer: int = 0
        """The number of the last job submitted that may write host memory the
        caller can read (every job but those submitted with ``writes=False``)."""
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

    def submit(self, job: Callable[[], None], writes: bool = True) -> None:
        """Queue ``job`` as number :attr:`submitted`; it runs after every job before it.

        ``writes=False`` promises that the job writes no host memory a caller
        can read (it only reads such memory, or enqueues GPU work): it then
        leaves :attr:`last_writer` alone.
        """
        with self._cv:
            self.submitted += 1
            if writes:
                self.last_writer = self.submitted
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
