"""The event-loop watchdog: fails an async test whose loop was blocked too long.

:class:`LoopWatchdog` times callbacks posted to the running loop (asyncio,
uvloop or trio) from a thread of its own, and records where the loop thread was
and how much of each block the garbage collector took. The
``gpuaio_loop_watchdog`` fixture hands one to a test; the ``pytest_runtest_call``
hook here runs the test's coroutine under :meth:`LoopWatchdog.watch` when that
fixture, the ``gpuaio_max_loop_block_ms`` marker or ``--gpuaio-max-loop-block-ms``
(``gpuaio_max_loop_block_ms``) asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

DEFAULT_MAX_LOOP_BLOCK_MS = 20.0
"""The loop watchdog's limit when neither an option nor a marker sets one."""


@dataclass(frozen=True, slots=True)
class LoopBlock:
    """One time the event loop did not run for ``duration_s``."""

    duration_s: float
    stack: str
    """Where the loop thread was, ``max_block_ms`` into the block (may be empty)."""
    gc_s: float = 0.0
    """How much of the block Python's garbage collector ran (it holds the GIL)."""
    cpu_wait_s: float = 0.0
    """How much of the block is explained by threads waiting for a CPU (Linux).

    The loop thread's own wait on a run queue, plus, when the watchdog could not
    take the loop thread's stack (something held the GIL), the longest such
    wait of another thread of this process: that thread may have held the GIL.
    A loaded machine, not the code under test; left out of :attr:`counted_s`."""

    @property
    def counted_s(self) -> float:
        """The part of the block held against the test: ``duration_s - cpu_wait_s``."""
        return self.duration_s - self.cpu_wait_s


class LoopWatchdog:
    """Measures how late an event loop runs a callback posted from another thread.

    A watchdog thread posts a callback to the loop every ``interval`` (a
    quarter of the limit, at most 5 ms) and waits for it; when it has not run
    after ``max_block_ms``, the thread records the loop thread's stack. The
    lateness of every callback is the time the loop could not run anything:
    a blocking call, or a long stretch of CPU work without an ``await``.

    On a loaded machine a callback is also late while the loop thread (or a
    thread holding the GIL it needs) waits for a CPU. On Linux the watchdog
    reads how long this process's threads waited on a run queue during each
    late callback (``/proc/self/task/*/schedstat``) and holds only the rest
    of the block against the test (:attr:`LoopBlock.counted_s`): a blocked
    loop thread sleeps or runs, it does not wait for a CPU. Elsewhere every
    block counts in full.

    :meth:`watch` is entered inside the running loop (asyncio, uvloop or
    trio); the plugin does this around every test that uses the
    ``gpuaio_loop_watchdog`` fixture. :meth:`check` raises if a block was
    longer than the limit.
    """

    def __init__(self, max_block_ms: float = DEFAULT_MAX_LOOP_BLOCK_MS) -> None:
        self.max_block_ms = max_block_ms
        self.blocks: list[LoopBlock] = []
        """Every block longer than the limit in force when it ended."""
        self.worst_s: float = 0.0
        """The longest lateness held against the test, limit or not."""
        self.cpu_wait_s: float = 0.0
        """Time left out of blocks because threads waited for a CPU (Linux)."""
        self.pings: int = 0
        """Callbacks answered by the loop so far."""
        self.watching: bool = False
        """True while :meth:`watch` is active (the test body is being watched)."""
        self._allowed = 0
        self._allow_epoch = 0
        self._lock = threading.Lock()

    @property
    def max_block_s(self) -> float:
        return self.max_block_ms / 1000.0

    @contextlib.contextmanager
    def allow(self) -> Iterator[None]:
        """Blocks that overlap this ``with`` block are not held against the test."""
        with self._lock:
            self._allowed += 1
            self._allow_epoch += 1
        try:
            yield
        finally:
            with self._lock:
                self._allowed -= 1
                self._allow_epoch += 1

    @contextlib.contextmanager
    def watch(self) -> Iterator[LoopWatchdog]:
        """Watch the running event loop (call from inside it) until the block exits."""
        post = _loop_poster()
        run = _WatchRun(self, post, threading.get_ident())
        # Objects made before the watch are left out of garbage collections
        # during it: a full collection of a long test session's heap holds the
        # GIL for hundreds of ms, which is the session's doing, not the code's
        # under test (a 281 ms block with no stack on an H200, run i).
        gc.freeze()
        run.start()
        self.watching = True
        try:
            yield self
        finally:
            self.watching = False
            run.stop()
            gc.unfreeze()

    def _record(self, block: LoopBlock, epoch: int) -> None:
        with self._lock:
            self.pings += 1
            if self._allowed or epoch != self._allow_epoch:
                return
            self.cpu_wait_s += block.cpu_wait_s
            self.worst_s = max(self.worst_s, block.counted_s)
            if block.counted_s > self.max_block_s:
                self.blocks.append(block)

    def _epoch(self) -> int:
        with self._lock:
            return self._allow_epoch

    def failures(self) -> list[LoopBlock]:
        """The blocks whose counted part is longer than the current limit."""
        return [b for b in self.blocks if b.counted_s > self.max_block_s]

    def report(self) -> str:
        """A description of the blocks over the limit (empty: none)."""
        bad = self.failures()
        if not bad:
            return ""
        worst = max(bad, key=lambda b: b.counted_s)
        lines = [
            f"event loop blocked for {worst.counted_s * 1e3:.1f} ms (limit "
            f"{self.max_block_ms:g} ms; {len(bad)} block(s) over the limit). "
            "A blocking call ran on the event loop thread: move it to a worker thread "
            "(anyio.to_thread.run_sync) or use gpuaio's awaitable API."
        ]
        if worst.cpu_wait_s:
            lines.append(
                f"Not counted: another {worst.cpu_wait_s * 1e3:.1f} ms during which threads of "
                "this process waited for a CPU (a loaded machine)."
            )
        if worst.gc_s:
            lines.append(
                f"Python's garbage collector ran for {worst.gc_s * 1e3:.1f} ms of that block "
                "(a collection holds the GIL, whatever thread triggered it)."
            )
        if worst.stack:
            lines.append("The loop thread was here while blocked:")
            lines.append(worst.stack.rstrip())
        elif not worst.gc_s:
            lines.append(
                "No stack: the watchdog's own thread could not run during the block either, "
                "so something held the GIL throughout (a C call that does not release it)."
            )
        return "\n".join(lines)

    def check(self) -> None:
        """Fail (``pytest.fail``) if a block was longer than the limit."""
        msg = self.report()
        if msg:
            pytest.fail(msg, pytrace=False)


def _loop_poster() -> Callable[[Callable[[], None]], Any]:
    """``call_soon_threadsafe`` of the running loop (asyncio, uvloop) or trio's equivalent."""
    import sniffio

    lib = sniffio.current_async_library()
    if lib == "asyncio":
        import asyncio

        return asyncio.get_running_loop().call_soon_threadsafe
    if lib == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    raise RuntimeError(f"gpuaio's loop watchdog does not support {lib!r}")


def _stack_of(thread_id: int, limit: int = 12) -> str:
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame, limit=limit))


class _CpuWaits:
    """How long each Python thread of this process has waited for a CPU, in ns.

    The second field of Linux's ``/proc/self/task/<tid>/schedstat`` is the
    time a thread was runnable but not running. Files stay open between
    samples (a ``pread`` is a few us; the watchdog samples every ping). Where
    the files are missing, samples are empty and nothing is left out.
    """

    def __init__(self, skip: int | None) -> None:
        self.skip = skip  # the watchdog's own thread: its waits delay no callback
        self.fds: dict[int, int] = {}
        self.usable = sys.platform == "linux" and os.path.exists("/proc/self/task")

    def sample(self) -> dict[int, int]:
        if not self.usable:
            return {}
        waits: dict[int, int] = {}
        for t in threading.enumerate():
            tid = t.native_id
            if tid is None or tid == self.skip:
                continue
            try:
                fd = self.fds.get(tid)
                if fd is None:
                    fd = self.fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                waits[tid] = int(os.pread(fd, 128, 0).split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the thread has just ended
        for tid in self.fds.keys() - waits.keys():
            os.close(self.fds.pop(tid))
        return waits

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    @staticmethod
    def explained(
        before: dict[int, int], after: dict[int, int], loop: int, stack: str, duration_s: float
    ) -> float:
        """Seconds of a block of ``duration_s`` that waits for a CPU explain.

        The loop thread's own wait always counts. Another thread's counts only
        when the watchdog got no stack, that is when the GIL was held: then
        the thread that waited longest may have held it, and the loop thread
        slept waiting for the GIL meanwhile. Threads born during the block
        waited all their waits in it.
        """
        deltas = {tid: ns - before.get(tid, 0) for tid, ns in after.items()}
        own = deltas.pop(loop, 0)
        other = max(deltas.values(), default=0) if not stack else 0
        return min(duration_s, max(0, own + other) / 1e9)


class _WatchRun:
    """One watched stretch of a loop: the watchdog thread and its outstanding ping."""

    def __init__(
        self, dog: LoopWatchdog, post: Callable[[Callable[[], None]], Any], loop_thread: int
    ) -> None:
        self.dog = dog
        self.post = post
        self.loop_thread = loop_thread
        self.loop_native = threading.get_native_id()  # made on the loop thread
        # One sampler per thread that samples: the watchdog's before each
        # ping, the loop thread's when a ping came back late.
        self.late_waits = _CpuWaits(skip=None)
        self.waits_before: dict[int, int] = {}
        self.cv = threading.Condition(threading.Lock())
        self.stopped = False
        self.outstanding: tuple[float, int] | None = None  # (posted at, allow epoch)
        self.stack = ""
        self.seq = 0
        self.thread = threading.Thread(target=self._run, name="gpuaio-loop-watchdog", daemon=True)
        self.gc_passes: list[tuple[float, float]] = []
        self._gc_t0 = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self.thread.start()
        self.late_waits.skip = self.thread.native_id

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif len(self.gc_passes) < 100_000:
            self.gc_passes.append((self._gc_t0, time.perf_counter()))

    def _gc_within(self, t0: float, t1: float) -> float:
        """Seconds of garbage collection between ``t0`` and ``t1``."""
        return sum(
            max(0.0, min(b, t1) - max(a, t0)) for a, b in list(self.gc_passes) if b > t0 and a < t1
        )

    def stop(self) -> None:
        """On the loop thread: end the run; a ping still queued counts as lateness."""
        now = time.perf_counter()
        with self.cv:
            self.stopped = True
            late = self.outstanding
            self.outstanding = None
            stack = self.stack
            self.cv.notify_all()
        self.thread.join(timeout=5)
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if late is not None:
            self._record(late, now, stack)
        self.late_waits.close()

    def _answer(self, seq: int) -> None:
        now = time.perf_counter()
        with self.cv:
            late = self.outstanding if seq == self.seq else None
            self.outstanding = None
            stack = self.stack
            before = self.waits_before
            self.cv.notify_all()
        if late is not None:
            self._record(late, now, stack, before)

    def _record(
        self,
        late: tuple[float, int],
        now: float,
        stack: str,
        before: dict[int, int] | None = None,
    ) -> None:
        duration = now - late[0]
        cpu_wait = 0.0
        if duration > self.dog.max_block_s:  # sampled only then: it costs the loop ~50 us
            after = self.late_waits.sample()
            if before is None:
                before = self.waits_before
            cpu_wait = _CpuWaits.explained(before, after, self.loop_native, stack, duration)
        gc_s = self._gc_within(late[0], now)
        self.dog._record(LoopBlock(duration, stack, gc_s, cpu_wait), late[1])

    def _run(self) -> None:
        waits = _CpuWaits(skip=threading.get_native_id())
        try:
            self._ping_until_stopped(waits)
        finally:
            waits.close()

    def _ping_until_stopped(self, waits: _CpuWaits) -> None:
        limit = self.dog.max_block_s
        interval = min(limit / 4, 0.005)
        while True:
            # Sampled before the time is taken, so that a wait counted in a
            # block happened within it; outside the lock the loop takes.
            before = waits.sample()
            with self.cv:
                if self.stopped:
                    return
                self.seq += 1
                seq = self.seq
                self.stack = ""
                self.waits_before = before
                self.outstanding = (time.perf_counter(), self.dog._epoch())
            try:
                self.post(functools.partial(self._answer, seq))
            except Exception:  # the loop has closed
                with self.cv:
                    self.outstanding = None
                return
            with self.cv:
                self.cv.wait_for(lambda: self.outstanding is None or self.stopped, limit)
                late = self.outstanding is not None and not self.stopped
            if late:
                stack = _stack_of(self.loop_thread)
                with self.cv:
                    if self.outstanding is not None:
                        self.stack = stack
                    self.cv.wait_for(lambda: self.outstanding is None or self.stopped)
            with self.cv:
                if self.cv.wait_for(lambda: self.stopped, interval):
                    return


@pytest.fixture
def gpuaio_loop_watchdog(request: pytest.FixtureRequest) -> LoopWatchdog:
    """Fail this ``async def`` test if its event loop is blocked too long.

    The limit comes from the ``gpuaio_max_loop_block_ms`` marker, else
    ``--gpuaio-max-loop-block-ms``, else 20 ms; set ``.max_block_ms`` in the
    test to change it, and wrap expected blocking in ``with watchdog.allow():``.
    In a synchronous test that runs its own loop, enter ``watchdog.watch()``
    inside that loop and call ``watchdog.check()`` at the end.
    """
    limit = _configured_limit_ms(request.node)
    return LoopWatchdog(limit if limit else DEFAULT_MAX_LOOP_BLOCK_MS)


def _configured_limit_ms(item: pytest.Item) -> float | None:
    """The limit set by marker, option or ini; None or 0 for "not configured"."""
    marker = item.get_closest_marker("gpuaio_max_loop_block_ms")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("ms")
        return None if value is None else float(value)
    opt = item.config.getoption("--gpuaio-max-loop-block-ms", default=None)
    if opt is not None:
        return float(opt)
    raw = str(item.config.getini("gpuaio_max_loop_block_ms") or "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise pytest.UsageError(f"gpuaio_max_loop_block_ms must be a number, not {raw!r}") from None


def _watchdog_for(item: pytest.Item) -> LoopWatchdog | None:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    dog = funcargs.get("gpuaio_loop_watchdog")
    if isinstance(dog, LoopWatchdog):
        return dog
    marker = item.get_closest_marker("gpuaio_max_loop_block_ms")
    if marker is not None and (marker.args[:1] == (None,) or marker.kwargs.get("ms", 0) is None):
        return None
    limit = _configured_limit_ms(item)
    if not limit:
        return None
    return LoopWatchdog(limit)


def _watched(func: Callable[..., Any], dog: LoopWatchdog) -> Callable[..., Any]:
    @functools.wraps(func)
    async def run_watched(*args: Any, **kwargs: Any) -> Any:
        with dog.watch():
            return await func(*args, **kwargs)

    return run_watched


def _install_watch(item: pytest.Item, dog: LoopWatchdog) -> Callable[[], None] | None:
    """Make ``item`` run its coroutine under ``dog``; returns the undo, or None."""
    obj = getattr(item, "obj", None)
    inner = getattr(getattr(obj, "hypothesis", None), "inner_test", None)
    if inner is not None and inspect.iscoroutinefunction(inner):
        holder = obj.hypothesis  # type: ignore[union-attr]
        holder.inner_test = _watched(inner, dog)

        def undo_inner() -> None:
            holder.inner_test = inner

        return undo_inner
    if obj is not None and inspect.iscoroutinefunction(obj):
        item.obj = _watched(obj, dog)  # type: ignore[attr-defined]

        def undo() -> None:
            item.obj = obj  # type: ignore[attr-defined]

        return undo
    return None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    dog = _watchdog_for(item)
    undo = _install_watch(item, dog) if dog is not None else None
    if undo is None:
        return (yield)
    try:
        result = yield
    finally:
        undo()
    assert dog is not None
    dog.check()
    return result
