"""Operation handles: enqueue now, await later.

An :class:`Operation` is returned by every enqueueing call. The work is
already submitted (or scheduled in stream order) when the handle is
returned; awaiting it only waits. The handle keeps every buffer the
operation touches alive until the operation has completed, whether or not
anyone awaits it, so cancelling an ``await`` never frees or recycles memory
the GPU may still use.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import sniffio

from . import trace as _trace
from .compiled import mypyc_attr
from .errors import (
    ClosedWhilePendingError,
    DeviceFatalError,
    ForkedProcessError,
    OperationAbortedError,
)
from .loopport import THREAD_PORT, Port, current_port

if TYPE_CHECKING:
    from .streamref import StreamRef

__all__ = ["ClosedWhilePendingError", "InUse", "Operation", "resolve_many", "wait_all"]


class InUse(Protocol):
    """A gpuaio allocation, counted in use while an operation touches it."""

    def acquire(self) -> None:
        """One more operation uses it (raises if it was freed)."""
        ...

    def release(self) -> None:
        """That operation has completed."""
        ...


_QUIET = (OperationAbortedError, DeviceFatalError, ForkedProcessError, ClosedWhilePendingError)
"""Errors an unretrieved op does not warn about (see ``Operation.__del__``)."""

_warn = warnings.warn  # bound now: ``__del__`` may run at interpreter shutdown
_modules = sys.modules

forked_child = False
"""Set in a child forked after gpuaio initialized (see gpuaio._api.fork): operations
pending at the fork never complete there, and awaiting one fails at once."""


# Subclassed by gpuaio.Event, which a compiled install leaves interpreted.
@mypyc_attr(allow_interpreted_subclasses=True)
class Operation:
    """An enqueued copy, memset, launch or marker; awaitable once or many times.

    ``await op`` returns when the operation has completed and every buffer it
    touched may be reused, or raises the error that failed it. Cancelling the
    ``await`` does not cancel the operation: it still runs to completion and
    keeps its buffers alive until then.
    """

    __slots__ = (
        "__weakref__",
        "_abort",
        "_allocs",
        "_callbacks",
        "_complete",
        "_done",
        "_est",
        "_eta",
        "_exc",
        "_keep",
        "_poll",
        "_prewoken",
        "_progress",
        "_retrieved",
        "_t0",
        "_tracer",
        "_waiters",
        "label",
        "nbytes",
        "stream",
    )

    def __init__(
        self,
        label: str,
        stream: StreamRef | None,
        keep: tuple[Any, ...] = (),
        nbytes: int = 0,
    ) -> None:
        self.label: str = label
        self.stream: StreamRef | None = stream
        """The :class:`gpuaio.Stream` it was enqueued on (None for a few host-only ops)."""
        self.nbytes: int = nbytes
        self._keep: tuple[Any, ...] | None = keep
        self._done = False
        self._exc: BaseException | None = None
        self._waiters: list[tuple[Port, Callable[[], None]]] | None = None  # made on demand
        self._callbacks: list[Callable[[], object]] | None = None
        self._allocs: Sequence[InUse] | None = None
        """gpuaio allocations the op uses, each acquired once (``_track``): released
        as the op completes, after its callbacks (cheaper than a callback each)."""
        self._complete: Callable[[], object] | None = None  # its result is ignored
        self._abort = False
        self._retrieved = False  # whether anyone saw the error (await, exception())
        self._est = 0.0  # expected GPU time in seconds, 0 if unknown
        self._eta = 0.0  # perf_counter() time it should complete by, 0 if unknown
        self._poll: tuple[Any, ...] | None = None
        self._prewoken = False
        self._progress: Callable[[int, int], None] | None = None
        # The tracer of the enqueueing task, captured now: completion and
        # staging run on other threads, outside that task's context.
        # current() only inside a trace() block: a call into the interpreted
        # module costs a 4 KiB copy about 0.1 us before its driver call.
        self._tracer: _trace.Tracer | None = _trace.current() if _trace._open else None
        self._t0 = time.perf_counter() if self._tracer is not None else 0.0

    def __repr__(self) -> str:
        state = "pending" if not self._done else ("failed" if self._exc else "done")
        size = f" {self.nbytes}B" if self.nbytes else ""
        return f"<gpuaio.Operation {self.label}{size} {state}>"

    # -- public --------------------------------------------------------
    def done(self) -> bool:
        """True once the operation has completed or failed."""
        return self._done

    def exception(self) -> BaseException | None:
        """The error that failed the operation, or None (also while pending)."""
        if self._done:
            self._retrieved = True
        return self._exc

    def __del__(self) -> None:
        # asyncio's "exception was never retrieved", as a ResourceWarning: an
        # op that failed while nobody awaited it would otherwise lose its
        # error silently (ops need not be awaited: a later await on the same
        # stream covers them, but only when they succeed). Not for an op the
        # caller aborted, nor for a device fault, which the runtime logs once,
        # nor for one still pending when the runtime closed.
        exc = self._exc
        if exc is None or self._retrieved or isinstance(exc, _QUIET):
            return
        _warn(
            f"{self!r} failed and its error was never retrieved "
            f"(await it, or call exception()): {exc!r}",
            ResourceWarning,
            source=self,
        )

    def abort(self) -> bool:
        """Ask a staged transfer to stop between chunks.

        The operation then fails with :class:`~gpuaio.OperationAbortedError`
        once every chunk already in flight has finished (so no buffer is
        still in use when the await returns); the destination may be partly
        written. Other operations cannot be stopped once enqueued and run to
        completion. Returns False if the operation had already finished.
        """
        if self._done:
            return False
        self._abort = True
        return True

    def __await__(self) -> Generator[Any, None, None]:
        # A generator rather than a coroutine: the common cases (done, or done
        # after a few polls) create no coroutine at all. The hot path (a short
        # op found done at the first poll) is kept to a few statements.
        if not self._done and not (forked_child and self._abandon_if_inherited()):
            yield_now: Callable[[], Awaitable[None]] | None = None
            # Without trio imported the loop is asyncio's (or uvloop's): no
            # need to ask, which costs about 0.4 us inside a running loop.
            asyncio_loop = "trio" not in _modules or asyncio._get_running_loop() is not None
            woken_early = False
            clock = time.perf_counter
            while True:
                poll = self._poll  # None until the op is watched (staged ops)
                engine: Any = poll[0] if poll is not None else None
                spin = engine.loop_spin_s if engine is not None else 0.0
                start = clock()
                if spin and (woken_early or self._eta - start < spin):
                    # Short ops, or long ones about to complete: poll from this
                    # loop for a moment, yielding to other tasks, which beats
                    # any cross-thread wake-up. Yield before the first poll, as
                    # a rule: a GPU takes microseconds to even start an op.
                    # Longer ops are left to the watcher thread.
                    assert engine is not None  # spin is non-zero
                    deadline = 0.0  # worked out at the first miss: most ops never miss
                    # On asyncio (and uvloop) a bare yield reschedules the task
                    # for the next turn of the loop, which is all
                    # asyncio.sleep(0) does, without a coroutine per poll.
                    if not asyncio_loop and yield_now is None:
                        yield_now = _yielder()
                    # A lone tiny op may be done already, and then the yield
                    # would cost a turn of the loop for nothing: the engine
                    # decides whether to poll first (``_firstpoll``). Never on
                    # trio, where an await is a checkpoint, nor for an op in a
                    # batch (``_poll[2]``): many tasks are about, and a poll
                    # would seal the batch. This check is the cheap one.
                    lone = asyncio_loop and not woken_early and poll[2] is None  # type: ignore[index]
                    first = lone
                    while not (first and engine.first_poll(self, start)):
                        first = False
                        if yield_now is None:
                            yield
                        else:
                            yield from yield_now().__await__()
                        # Poll at least once after yielding, even past the
                        # deadline: with many tasks one turn of the loop can
                        # outlast the whole window, and by then the op is done.
                        if engine.poll_for(self):
                            break
                        # Not done yet: a lone short op may be polled on for,
                        # once, rather than found a whole turn late (``_firstpoll``).
                        if lone:
                            lone = False
                            if engine.tail_spin(self, clock()):
                                break
                        if not deadline:
                            # Past the expected time by a fifth of the op's
                            # estimate too (up to 0.5 ms): estimates come from
                            # optimistic rates.
                            deadline = max(start, self._eta) + spin + min(0.2 * self._est, 5e-4)
                        if clock() >= deadline:
                            break
                # done(), not _done: the checks above narrowed the attribute.
                if self.done():
                    break
                yield from self._wait_woken(engine).__await__()
                if self.done():
                    break
                # Woken ahead of completion (``_prewake``): the op is due any
                # moment, so go round and poll for it from here, even if it is
                # due further off than the polling window (a loop that woke
                # quickly), or sleeping again would waste the early wake-up.
                woken_early = True
        # An op found done returns at once, like a done asyncio future.
        if self._exc is not None:
            self._retrieved = True
            raise self._exc

    async def wait(self) -> None:
        """Wait until the operation has completed; raise its error if it failed."""
        await self

    async def _wait_woken(self, engine: Any) -> None:
        """Wait for the resolver (a watcher thread, another task's poll) to wake us."""
        event = anyio.Event()
        entry = (current_port(), event.set)
        self._add_waiter(entry)
        # The resolver sets _done before it takes _waiters: if it ran between
        # our check and append, we saw neither and wake ourselves.
        if self.done():  # another thread may have set it meanwhile
            event.set()
        elif engine is not None:
            engine.hand_off()  # no loop polls for this op any more
        try:
            await event.wait()
        finally:
            if not event.is_set():
                # Cancelled: take the waiter back, or every timed-out await of
                # a long op would leave one behind until the op completes.
                waiters = self._waiters
                if waiters is not None:
                    with contextlib.suppress(ValueError):
                        waiters.remove(entry)

    def _prewake(self) -> None:
        """Wake the tasks asleep on this op just before it is due to complete.

        Called by a watcher that expects the op to complete within moments,
        at most once per op: waking an event loop that has slept a while
        takes 50-250 us, so the loop wakes while the GPU finishes, and its
        task then polls for the op itself (``__await__``). Threads blocked in
        :meth:`_wait_blocking` are left asleep. A woken task that finds the op
        still pending past its polling window sleeps again, and is woken at
        completion.
        """
        waiters = self._waiters
        # Once per op: a task that polled through its window and slept again is
        # woken at completion, not pre-woken over and over by a bad estimate.
        if not waiters or self._done or self._prewoken:
            return
        self._prewoken = True
        early = [w for w in waiters if w[0] is not THREAD_PORT]
        if not early:
            return
        for w in early:
            with contextlib.suppress(ValueError):  # resolved meanwhile: list swapped
                waiters.remove(w)
        _post(early)

    def _add_waiter(self, entry: tuple[Port, Callable[[], None]]) -> None:
        waiters = self._waiters  # read once: a resolver may swap it out
        if waiters is None:
            self._waiters = [entry]
        else:
            waiters.append(entry)

    def _wait_blocking(self) -> None:
        """Block the calling thread until the op is resolved (never on an event loop).

        Used by a stream's host thread that must see an earlier operation's
        host-side effects. It also drains the op's stream itself now and
        then, so it does not depend on the watcher's schedule.
        """
        if self._done:
            return
        woken = threading.Event()
        self._add_waiter((THREAD_PORT, woken.set))
        if self.done():  # resolved meanwhile, before it could see our waiter
            return
        poll = self._poll
        engine: Any = poll[0] if poll is not None else None
        if engine is not None:
            engine.hand_off()
        timeout = 50e-6
        while not woken.wait(timeout):
            if self.done():
                return
            if engine is not None:
                engine.drain_for(self)
            timeout = min(timeout * 2, 5e-3)

    # -- internal ------------------------------------------------------
    def _abandon_if_inherited(self) -> bool:
        """In a forked child: fail this op if it belongs to the runtime the child inherited.

        Nothing in the child would ever complete it (the parent's threads are
        gone, and the child cannot query the parent's driver state). Its
        completion step and callbacks are dropped, not run: they would touch
        buffers and locks of the parent's runtime, which the child leaks.
        Waiters are dropped too: they belong to threads and event loops of
        the parent; the caller raises the error itself.
        """
        stream = self.stream
        detail = stream._rt.forked if stream is not None else None
        if detail is None:
            return False
        self._complete = self._callbacks = self._keep = self._waiters = None
        self._exc = ForkedProcessError("await", detail=detail)
        self._done = True
        return True

    def _add_done_callback(self, cb: Callable[[], object]) -> None:
        """Run ``cb`` in the resolving thread as the op completes (at once if done).

        Callbacks are added before the op's work is enqueued; they may read
        ``self._exc`` to tell success from failure.
        """
        if self._done:
            cb()
            return
        if self._callbacks is None:
            self._callbacks = [cb]
        else:
            self._callbacks.append(cb)

    def _finish(self, exc: BaseException | None) -> Sequence[tuple[Port, Callable[[], None]]]:
        """Run the completion step, mark done, release buffers; return the waiters to wake.

        The completion step (a small copy-out into pageable memory) is the
        op's last host action: the stream's completion queue calls this in
        stream order, so it lands before any later host step of the stream.
        """
        if self._done:
            return ()
        step, self._complete = self._complete, None
        if step is not None and exc is None:
            try:
                step()
            except BaseException as step_exc:
                exc = step_exc
        self._exc = exc
        callbacks, self._callbacks = self._callbacks, None
        # Callbacks run before the op counts as done: a staged copy-out must
        # have landed before anyone can observe completion.
        if callbacks:
            self._exc = _run_all(callbacks, self._exc)
        allocs, self._allocs = self._allocs, None
        if allocs:
            self._exc = _release_all(allocs, self._exc)
        self._keep = None
        # Nothing of the op's may outlive it in this frame (the loops run in
        # helpers for that): a task that sees _done returns from its await at
        # once, and an allocation whose last reference it then drops must be
        # freed, not kept alive by a resolver thread on its way out of here
        # (a GPU-suite failure on trio, issue 13's run AA).
        step = callbacks = allocs = None
        self._done = True
        tracer = self._tracer
        if tracer is not None:
            self._tracer = None
            tracer.op_done(self.label, self.nbytes, self._exc is None, self.stream, self._t0)
        waiters, self._waiters = self._waiters, None
        return waiters or ()

    def _resolve(self, exc: BaseException | None = None) -> None:
        """Complete this op from any thread and wake its waiters."""
        _post(self._finish(exc))


def _run_all(
    callbacks: list[Callable[[], object]], exc: BaseException | None
) -> BaseException | None:
    """Run every callback; return ``exc``, or else the first callback's error."""
    for cb in callbacks:
        try:
            cb()
        except BaseException as cb_exc:
            if exc is None:
                exc = cb_exc
    return exc


def _release_all(allocs: Sequence[InUse], exc: BaseException | None) -> BaseException | None:
    """Release every allocation; return ``exc``, or else the first release's error."""
    for alloc in allocs:
        try:
            alloc.release()
        except BaseException as rel_exc:
            if exc is None:
                exc = rel_exc
    return exc


def _yielder() -> Callable[[], Awaitable[None]]:
    """The cheapest way to let the running event loop run its other tasks once."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.checkpoint
    return _asyncio_yield


async def _asyncio_yield() -> None:
    await asyncio.sleep(0)


def post_waiters(waiters: Iterable[tuple[Port, Callable[[], None]]]) -> None:
    """Wake ``waiters`` (from ``Operation._finish``), each loop once."""
    _post(waiters)


def _post(waiters: Iterable[tuple[Port, Callable[[], None]]]) -> None:
    by_port: defaultdict[Port, list[Callable[[], None]]] = defaultdict(list)
    for port, cb in waiters:
        by_port[port].append(cb)
    for port, cbs in by_port.items():
        port.post(cbs)


def resolve_many(items: Iterable[tuple[Operation, BaseException | None]]) -> None:
    """Complete many ops and wake each event loop once for all of them."""
    waiters: list[tuple[Port, Callable[[], None]]] = []
    for op, exc in items:
        waiters.extend(op._finish(exc))
    if waiters:
        _post(waiters)


def completed(label: str, stream: StreamRef | None = None) -> Operation:
    """An operation that is already done (zero-byte copies and the like)."""
    op = Operation(label, stream)
    op._finish(None)
    return op


async def wait_all(ops: Iterable[Awaitable[Any]]) -> None:
    """Await every op; raise the first error (in the order given) after all have finished.

    Unlike awaiting them one by one, every op is waited for even when an
    earlier one failed, so no buffer is reused while an op may still run.

    Awaitables that are not operations (coroutines, futures) are awaited in
    the order given, each after the operations before it, so a coroutine
    still runs only once what precedes it is done. Runs of consecutive
    operations are awaited last first: a stream completes in order, so a
    batch on one stream costs its event loop one wake-up instead of one per
    op (each wake-up from another thread also cuts short the loop's sleep
    towards its next timer, which asyncio then overshoots by up to 1 ms).
    """
    items = list(ops)
    errors: list[Exception | None] = [None] * len(items)
    i = 0
    while i < len(items):
        end = i + 1
        if isinstance(items[i], Operation):
            while end < len(items) and isinstance(items[end], Operation):
                end += 1
        # Awaiting an operation has no side effect, so any order within a run
        # waits for the same work; last first sleeps through the others.
        for k in range(end - 1, i - 1, -1):
            try:
                await items[k]
            except Exception as exc:
                errors[k] = exc
        i = end
    first = next((exc for exc in errors if exc is not None), None)
    if first is not None:
        raise first
