"""The stream sequencer: the one ordering authority of a CUDA stream.

A stream is a queue. Every operation submitted to it takes effect after
everything submitted before it, host-side parts included (staging copies,
copy-outs into pageable memory, host memsets, host-to-host copies), and
after everything a ``wait(event)`` names. One :class:`Sequencer` per
``CUstream`` enforces that, whatever the completion strategy and whichever
thread resolves an operation. Three places run a stream's work; the
sequencer decides which, and orders them:

* **GPU work** (copies between device and pinned memory, device memsets,
  launches, markers) is enqueued in submission order: on the calling thread
  when nothing of the stream is queued on its host thread, otherwise as a
  job on that thread, behind what is queued there.
* **Host steps** run on the stream's host thread, one at a time, in
  submission order. Before a host step touches host memory it *settles*:
  it waits until every earlier host action of the stream, and every one a
  ``wait`` named, has taken effect. A host step that may touch memory the
  GPU uses (host memsets, host-to-host copies) also waits for the stream's
  earlier GPU work.
* **Copy-outs** of small device-to-host copies into pageable memory are the
  one host action off the host thread: a copy-out is its operation's
  completion step, run by the stream's completion queue when the DMA's
  marker is reached, in queue order, before the operation counts as done.
  Host steps settle on it; a small host-to-device copy reads its source on
  the calling thread only when no host action that may write host memory
  is pending on the stream (or on a stream it waits for), else it becomes a
  host step. Staged uploads only read host memory: they may be pending.

A :class:`Frontier` is how far a stream's host actions had been submitted
at one moment: its host jobs so far and its last copy-out. An event carries
its stream's frontier (and the frontiers that stream waited for), and
``wait`` hands them to the waiting stream, whose later host steps settle on
them. Frontiers are taken at submission, so waits follow submission order
and cannot form a cycle.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .._core.errors import DeviceFatalError
from .._core.operation import InUse, Operation
from .hostwork import SerialExecutor

if TYPE_CHECKING:
    from .completion import CompletionEngine
    from .services import Services

__all__ = ["Frontier", "HostWork", "Sequencer"]

log = logging.getLogger("gpuaio")

HostWork = Callable[[], bool]
"""A host step's body; returns True when it enqueued GPU work that needs a marker."""


class Sequencer:
    """Orders the GPU work and host steps of one ``CUstream`` (see the module docstring).

    Streams wrapping the same ``CUstream`` share one sequencer
    (``Runtime.sequencer`` in ``gpuaio._api.runtime``).
    """

    __slots__ = (
        "__weakref__",
        "_copy_out",
        "_deps",
        "_engine",
        "_rt",
        "_spin_event",
        "_sync_event",
        "executor",
        "exported",
        "key",
        "native",
        "ordinal",
    )

    def __init__(self, runtime: Services, ordinal: int, native: Any) -> None:
        self._rt = runtime
        self.ordinal: int = ordinal
        self.native: Any = native
        self.key: int = runtime.backend.stream_handle(native)
        self.executor: SerialExecutor = SerialExecutor(f"gpuaio-stream-{ordinal}")
        self._copy_out: Operation | None = None
        self._deps: list[Frontier] = []
        self._sync_event: Any = None
        self._spin_event: Any = None
        self._engine: CompletionEngine | None = None
        """The device's completion engine as last looked up (:meth:`engine`)."""
        self.exported: bool = False
        """Whether other libraries may enqueue on this ``CUstream`` (a wrapped stream,
        or one whose handle was handed out): then every op gets a marker of its own."""

    def engine(self) -> CompletionEngine:
        """The device's completion engine: the runtime's, kept until it closes
        (a new completion strategy replaces it)."""
        engine = self._engine
        if engine is None or engine.closed:
            engine = self._engine = self._rt.engine(self.ordinal)
        return engine

    def healthy(self) -> bool:
        """Whether the device's engine, as last looked up, is open and has had
        no sticky error (False also before the first lookup)."""
        engine = self._engine
        return engine is not None and not engine.closed and engine.fatal is None

    # -- what is pending -----------------------------------------------
    @property
    def idle(self) -> bool:
        """True when no host job of this stream is queued or running."""
        return not self.executor.busy

    def deps_clear(self) -> bool:
        """True when every frontier this stream waits for has been reached."""
        if self._deps:
            self._deps = [f for f in self._deps if not f.reached()]
        return not self._deps

    def reads_clear(self) -> bool:
        """True when no host action that may write host memory is pending, on this
        stream or on one it waits for.

        Then host memory holds what stream order says it holds, and the
        calling thread may read it for the next op. Host jobs that only read
        host memory (staged uploads) may still be pending: reads commute. A
        stream kept busy by uploads would otherwise never be idle, and every
        small upload on it would go to its host thread, behind the others
        (1,000 tasks uploading 4 KiB each on 16 streams ran that way for good
        once a few blocks had missed the pool's cache, issue 13).
        """
        ex = self.executor
        c = self._copy_out
        return ex.completed >= ex.last_writer and (c is None or c._done) and self.deps_clear()

    def frontier(self) -> tuple[Frontier, ...]:
        """This stream's frontier now, and the pending ones it waits for."""
        c = self._copy_out
        own = Frontier(self, self.executor.submitted, None if c is None or c._done else c)
        if self.deps_clear():
            return (own,)
        return (own, *self._deps)

    def add_deps(self, frontiers: tuple[Frontier, ...]) -> None:
        """Later host steps of this stream settle on ``frontiers`` too (``wait``)."""
        for f in frontiers:
            if f.seq is not self and not f.reached():
                self._deps.append(f)

    def note_copy_out(self, op: Operation) -> None:
        """``op``'s completion step writes host memory: later host steps settle on it."""
        self._copy_out = op

    # -- submission ----------------------------------------------------
    def gpu(
        self,
        op: Operation,
        enqueue: Callable[..., None],
        *args: Any,
        words: list[int] | None = None,
    ) -> Operation:
        """Enqueue asynchronous driver work now, or in order behind host jobs.

        ``enqueue(*args, native_stream)`` does the work; passing its arguments
        rather than a closure saves a function object on the hot path.
        ``words`` (``[address, value, ...]``, aligned 32-bit stores to device
        memory) say the same work for a tiny memset: the engine may take them
        instead, to enqueue with its batch (``gpuaio._engine.completion._queue``).
        """
        engine = self._engine  # self.engine(), without a call on the hot path
        if engine is None or engine.closed:
            engine = self.engine()
        # A short op may share its marker with the short ops around it; before
        # anything else, the batch of those before it is sealed (its marker
        # placed), so that they do not wait for it (gpuaio._engine.completion._queue).
        short = 0.0 < op._est <= engine.short_op_s and not self.exported
        # Past the engine's share of the launch queue, enqueue on the host thread;
        # also if sealing means waiting for another thread placing a marker
        # (the calling thread may be an event loop's: the host thread waits).
        # A short op is enqueued behind the open batch's deferred memsets.
        ex = self.executor
        if ex.completed >= ex.submitted:  # not ex.busy: a property is a call
            native = self.native
            # (defer checks the stream's share of the launch queue itself.)
            if words is not None and short and engine.defer(op, self.key, native, words):
                return op
            if not self._may_enqueue(engine, short):
                return self._submit(op, enqueue, args, short, words)
            try:
                if len(args) == 3:
                    # A copy's (dst, src, nbytes): called directly, where a
                    # call with *args builds a list and a tuple (compiled,
                    # about 350 of a 4 KiB copy call's 29,000 instructions,
                    # tools/instr_probe.py).
                    enqueue(args[0], args[1], args[2], native)
                else:
                    enqueue(*args, native)
            except BaseException as exc:
                op._resolve(exc)  # nothing was enqueued: release at once
                raise
            return self.watch(engine, op, native, short)
        return self._submit(op, enqueue, args, short, words)

    def may_enqueue(self, engine: CompletionEngine, short: bool) -> bool:
        """Whether the calling thread may enqueue GPU work now, as :meth:`gpu`
        would: nothing of the stream is queued on its host thread, the
        engine's share of the launch queue is not used up, and the open
        batch is sealed (flushed, for a ``short`` op) without waiting for
        another thread. Work enqueued so must then be :meth:`watch`-ed."""
        ex = self.executor
        return ex.completed >= ex.submitted and self._may_enqueue(engine, short)

    def _may_enqueue(self, engine: CompletionEngine, short: bool) -> bool:
        if engine.pending_on(self.key) >= engine.direct_limit:
            return False
        return engine.flush(self.key, False) if short else engine.seal(self.key, False)

    def watch(self, engine: CompletionEngine, op: Operation, native: Any, short: bool) -> Operation:
        """Have ``engine`` complete ``op``, whose GPU work the calling thread
        has just enqueued on this stream; returns ``op``."""
        try:
            engine.watch(op, native, short)
        except BaseException as exc:
            # The work may still run: release the op's buffers only once
            # the stream has drained, off this thread.
            self.executor.submit(functools.partial(self._fail_after_drain, op, exc), False)
            raise
        return op

    def _submit(
        self,
        op: Operation,
        enqueue: Callable[..., None],
        args: tuple[Any, ...],
        short: bool,
        words: list[int] | None = None,
    ) -> Operation:
        """:meth:`gpu`'s work as a job on the host thread, behind what is queued there.

        The host thread may wait for another thread sealing the stream's
        batch (``block``): a tiny memset still joins it, and a short op shares
        its marker. Run AR's marker test got 633 of 2,000 memsets their own
        markers when each of these jobs, too, gave up on a busy batch: each
        took a driver call or two more, so the loop's ops stayed on this
        thread, behind them, and the watcher sealed the batches of tasks
        that now slept, which kept the batch busy.
        """

        job = functools.partial(self._gpu_job, op, enqueue, args, short, words)
        self.executor.submit(job, False)  # GPU work: no host memory written here
        return op

    # Jobs are bound methods under functools.partial, never closures: a
    # compiled closure's storage is reused from a one-slot free list that a
    # freed closure joins before its fields are cleared, so a job submitted
    # by a finalizer run during that clearing (dropping a user's buffer
    # may run code) lost its state, and the op failed with "attribute
    # 'copy_out' of 'host_Sequencer_env' undefined" (mypyc's env and
    # callable classes; tests/test_lifetime.py).
    def _gpu_job(
        self,
        op: Operation,
        enqueue: Callable[..., None],
        args: tuple[Any, ...],
        short: bool,
        words: list[int] | None,
    ) -> None:
        native = self.native
        engine = self.engine()
        if words is not None and short and engine.defer(op, self.key, native, words, True):
            return
        try:
            if short:
                engine.flush(self.key)
            else:
                engine.seal(self.key)
            enqueue(*args, native)
        except BaseException as exc:
            op._resolve(exc)
            return
        try:
            engine.watch(op, native, short, True)
        except BaseException as exc:
            self._fail_after_drain(op, exc)

    def host(
        self, op: Operation, work: HostWork, *, after_gpu: bool, writes_host: bool = True
    ) -> Operation:
        """Run ``work`` on the host thread once the stream's earlier host actions landed.

        With ``after_gpu`` it also waits for the stream's earlier GPU work.
        ``writes_host=False`` promises that ``work`` writes no host memory the
        user can read (a staged upload): later small uploads may then read
        their sources on the calling thread while it is pending
        (:meth:`reads_clear`).
        Returns ``op``, resolved when ``work`` returns False, or watched
        behind the GPU work it enqueued when it returns True.
        """
        c = self._copy_out
        copy_out = None if c is None or c._done else c
        deps = () if self.deps_clear() else tuple(self._deps)

        job = functools.partial(self._host_job, op, work, copy_out, deps, after_gpu)
        self.executor.submit(job, writes_host)
        return op

    def _host_job(
        self,
        op: Operation,
        work: HostWork,
        copy_out: Operation | None,
        deps: tuple[Frontier, ...],
        after_gpu: bool,
    ) -> None:
        """:meth:`host`'s job, on the host thread."""
        try:
            # Whatever ``work`` enqueues must not hold back short ops'
            # markers, and the wait for earlier GPU work (``after_gpu``)
            # must cover their deferred memsets.
            self.engine().seal(self.key)
            self._settle(copy_out, deps, after_gpu)
            enqueued = work()
        except BaseException as exc:
            # The work may have enqueued GPU work before it failed.
            self._fail_after_drain(op, exc)
            return
        if not enqueued:
            op._resolve(None)
            return
        try:
            self.engine().watch(op, self.native)
        except BaseException as exc:
            self._fail_after_drain(op, exc)

    def marker(self, op: Operation, enqueue: Callable[[Any], None]) -> Operation:
        """Enqueue a marker (``enqueue(native_stream)``): an event record, a synchronize.

        ``op`` then stands for everything submitted before it. While this
        stream waits for other streams' host actions, the marker is placed
        from the host thread once they have landed, so awaiting ``op`` covers
        them too; otherwise it is an ordinary GPU step.
        """
        if self.deps_clear():
            return self.gpu(op, enqueue)
        settled = functools.partial(_enqueue_then_true, enqueue, self.native)
        return self.host(op, settled, after_gpu=False)

    # -- on the host thread ----------------------------------------------
    def _settle(
        self, copy_out: Operation | None, deps: tuple[Frontier, ...], after_gpu: bool
    ) -> None:
        """Wait until the host actions before a host step have taken effect."""
        if after_gpu:
            self.wait_prior()
        if copy_out is not None and not copy_out._done:
            if after_gpu:
                # Its DMA is done: resolve it (and its copy-out) from here.
                self.engine().drain_for(copy_out)
            copy_out._wait_blocking()
        for f in deps:
            f.wait()

    def wait_prior(self) -> None:
        """Block the host thread until the stream's enqueued GPU work is done."""
        self._wait_gpu(spin=False)

    def wait_tail(self) -> None:
        """Block the host thread until the stream's enqueued GPU work is done, spinning.

        For waits of microseconds, such as the last DMA of an upload the
        driver staged: the driver spins with the GIL released, where
        :meth:`wait_prior`'s event sleeps, and a sleeping thread took tens of
        microseconds to wake on an H200 host.
        """
        self._wait_gpu(spin=True)

    def _wait_gpu(self, *, spin: bool) -> None:
        """Record this stream's event of that kind (made on first use) and wait for it."""
        backend = self._rt.backend
        event = self._spin_event if spin else self._sync_event
        if event is None:
            event = backend.event_create(self.ordinal, blocking_sync=not spin)
            if spin:
                self._spin_event = event
            else:
                self._sync_event = event
        backend.event_record(event, self.native)
        backend.event_synchronize(event)

    def _fail_after_drain(self, op: Operation, exc: BaseException) -> None:
        """Fail ``op`` once no GPU work it enqueued can still touch its buffers."""
        if self._drained(op.label):
            op._resolve(exc)

    def release_after_drain(self, allocs: Sequence[InUse]) -> None:
        """Release ``allocs`` on the host thread once the stream has drained:
        GPU work enqueued with them held whose op could not be made."""
        self.executor.submit(functools.partial(self._release_allocs_job, allocs), False)

    def _release_allocs_job(self, allocs: Sequence[InUse]) -> None:
        if self._drained("a copy"):
            for alloc in allocs:
                alloc.release()

    def _drained(self, what: str) -> bool:
        """Wait until no GPU work enqueued so far on the stream can touch its
        buffers; False if that cannot be told (then keep them for good)."""
        try:
            self._rt.backend.stream_synchronize(self.native)
        except DeviceFatalError:
            pass  # a dead context runs nothing more: the buffers are safe
        except Exception:
            # Cannot tell whether the work ran: keep the buffers for good
            # rather than risk the GPU writing freed memory.
            log.warning("%s failed and its stream could not be drained", what)
            return False
        return True

    def release(self, destroy_stream: bool) -> None:
        """After every job so far: free the sync event (and the stream, if owned)."""
        self.executor.submit(functools.partial(self._release_job, destroy_stream), False)
        self._rt.expect_release(self.executor, self.executor.submitted)
        self.executor.linger(0)  # no thread left idling once the release has run

    def _release_job(self, destroy_stream: bool) -> None:
        """:meth:`release`'s job, on the host thread."""
        events = (self._sync_event, self._spin_event)
        self._sync_event = self._spin_event = None
        rt = self._rt
        with rt.backend_held() as live:
            if not live:
                return  # released with the backend: its context took them along
            # Short ops' shared marker goes on the stream before it is destroyed.
            engine = self.engine()
            engine.seal(self.key)
            # Each is attempted: after a sticky error all fail (logged once).
            for ev in events:
                if ev is None:
                    continue
                try:
                    rt.backend.event_destroy(ev)
                except Exception as exc:
                    rt.log_failure("gpuaio failed to destroy an event", exc, self.ordinal)
            if destroy_stream:
                try:
                    rt.backend.stream_destroy(self.native)
                except Exception as exc:
                    rt.log_failure("gpuaio failed to destroy a stream", exc, self.ordinal)
                engine.forget(self.key)


# After Sequencer: a compiled NamedTuple evaluates its field types when the
# module runs, and Sequencer's type must exist by then (hatch_build.py).
class Frontier(NamedTuple):
    """The host actions one stream had submitted at some moment."""

    seq: Sequencer
    jobs: int
    """Host jobs submitted on ``seq`` by then (they run in order)."""
    copy_out: Operation | None
    """The last small copy-out submitted by then, if it was pending."""

    def reached(self) -> bool:
        """Whether all of those host actions have taken effect."""
        c = self.copy_out
        return self.seq.executor.completed >= self.jobs and (c is None or c._done)

    def wait(self) -> None:
        """Block the calling thread (a stream's host thread) until :meth:`reached`."""
        self.seq.executor.wait_for(self.jobs)
        c = self.copy_out
        if c is not None:
            c._wait_blocking()


def _enqueue_then_true(enqueue: Callable[[Any], None], native: Any) -> bool:
    """A marker's host step (:meth:`Sequencer.marker`): enqueue it, say so."""
    enqueue(native)
    return True
