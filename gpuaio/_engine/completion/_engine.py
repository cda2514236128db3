"""What every completion engine shares: its interface, its fault log and its fault probe.

A :class:`CompletionEngine` resolves the operations of one device when their
markers fire; the strategies (``_events``, ``_hostfunc``) differ
only in what a marker is and in which thread notices it. Every engine must
also notice a sticky (context-fatal) error and fail every pending operation
of its device with :class:`~gpuaio.DeviceFatalError` instead of leaving
awaits hanging; :class:`FaultProbe` is how, and :class:`FaultLog` logs that
error once per device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._core.compiled import mypyc_attr
from ..._core.errors import CudaError, DeviceFatalError

if TYPE_CHECKING:
    from ..._core.operation import Operation
    from ...backends import Backend

__all__ = ["CompletionEngine", "FaultLog", "FaultProbe"]

log = logging.getLogger("gpuaio")


class FaultLog:
    """Logs each device's sticky error once, with its traceback.

    After a sticky error every driver call of the context fails with it: the
    frees and destroys that follow (device memory, pinned blocks, events,
    streams) would each log it again. A runtime's engines and its release
    paths share one ``FaultLog``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logged: set[int | None] = set()

    def report(self, what: str, exc: DeviceFatalError, device: int | None = None) -> bool:
        """Log ``exc`` at ERROR with its traceback, unless a sticky error of
        ``device`` (for ``device=None``, of any device) was logged already: then
        at DEBUG without one. Returns whether it logged at ERROR."""
        with self._lock:
            if device is None:
                known = bool(self._logged)
            else:
                known = device in self._logged or None in self._logged
            self._logged.add(device)
        if known:
            log.debug("%s: %s (the sticky error, logged already)", what, exc)
            return False
        log.error("%s: %s", what, exc, exc_info=exc)
        return True


class FaultProbe:
    """A never-recorded event of one device: its query reports only the sticky error.

    The driver reports a fault through such a query first (on an H200, about
    250 ms before the queries of the markers behind the faulting kernel), and
    markers that never fire (host functions) cannot report it at all.
    Creating and destroying the event are driver calls: never on a loop.
    """

    def __init__(self, backend: Backend, device: int) -> None:
        self._backend = backend
        self._device = device
        self.event: Any = None
        """The probe event, None until :meth:`start` succeeded."""

    def start(self) -> None:
        """Create the event unless it exists (raises CudaError or DeviceFatalError)."""
        if self.event is None:
            self.event = self._backend.event_create(self._device)

    def check(self) -> None:
        """Raise DeviceFatalError if the device has failed; a no-op before :meth:`start`.

        Any other driver error is logged at DEBUG and ignored: the probe is
        only a backstop, and the markers still fire.
        """
        event = self.event
        if event is None:
            return
        try:
            self._backend.event_query(event)
        except DeviceFatalError:
            raise
        except CudaError:
            log.debug("gpuaio fault probe failed", exc_info=True)

    def close(self) -> None:
        """Destroy the event (after a fault the destroy fails: logged at DEBUG)."""
        event, self.event = self.event, None
        if event is not None:
            try:
                self._backend.event_destroy(event)
            except Exception as exc:  # a faulted context: logged already
                log.debug("could not destroy the fault probe event: %s", exc)


def _no_first_poll(op: Operation, now: float) -> bool:
    return False


# Compiled, a native class: an engine's own code reads its attributes from
# slots, and the compiled sequencer calls ``watch``, ``pending_on`` and
# ``flush`` directly, not through instance dictionaries: about 0.3 us of a
# 4 KiB copy's call on the CPU machine (issue 13). The price: a compiled
# engine's methods cannot be replaced on an instance (tests observe its
# state or subclass it instead; those that cannot are ``patches_compiled``).
# The other strategies (``_hostfunc``) and tools subclass it from Python.
@mypyc_attr(allow_interpreted_subclasses=True)
class CompletionEngine:
    """Resolves operations of one device when their markers fire."""

    strategy: str
    """The strategy's name (one of ``gpuaio.STRATEGIES``, or a registered one)."""
    loop_spin_s: float = 0.0
    """How long an awaiting task polls from its loop (:meth:`poll_for`) before it
    sleeps until woken; 0 for engines that leave every completion to a thread."""
    short_op_s: float = 0.0
    """Ops expected to take at most this long (and more than 0) are watched with
    ``short=True``; 0 for engines that give every op a marker of its own."""

    def __init__(self, backend: Backend, device: int) -> None:
        self.backend = backend
        self.device = device
        # An op takes up to two launch-queue entries (its work and its
        # marker), and enqueueing into a full queue blocks the calling thread,
        # which must never be an event loop's.
        self.direct_limit: int = max(1, backend.launch_queue // 4)
        """Ops pending on a stream (as :meth:`pending_on` counts them) from which
        its work is enqueued on its host thread rather than the calling one."""
        self.fatal: DeviceFatalError | None = None
        self.faults: FaultLog = FaultLog()
        """Where the sticky error is logged (the runtime shares one across engines)."""
        self.closed: bool = False
        """Set by :meth:`close`: streams that kept the engine look it up again."""
        self.first_poll: Callable[[Operation, float], bool] = _no_first_poll
        """``first_poll(op, now)``, from an asyncio loop's await before its task
        first yields: poll for ``op`` if that is likely to find it done, and
        return whether it did (then the task does not yield). Only called while
        ``loop_spin_s`` is non-zero; engines that never poll first return False."""
        self.tail_spin: Callable[[Operation, float], bool] = _no_first_poll
        """``tail_spin(op, now)``, from an asyncio loop's await whose first poll
        after a yield found ``op`` not done: poll on for it without yielding if
        that is likely to find it done soon, and return whether it did."""

    def watch(self, op: Operation, stream: Any, short: bool = False, block: bool = False) -> None:
        """Place a marker behind the work just enqueued on ``stream``.

        Call right after enqueueing, from the thread that enqueued (stream
        order is the order of calls). ``op`` is resolved when the marker fires.
        ``short`` (an op expected to take at most ``short_op_s`` on the GPU)
        lets an engine share one marker among consecutive short ops; the
        caller then calls :meth:`seal` before enqueueing anything else.
        With ``block`` (never on an event loop's thread) a short op may wait
        for another thread placing a marker, rather than get one of its own.
        """
        raise NotImplementedError

    def seal(self, key: int, block: bool = True) -> bool:
        """Place the marker short ops watched on the stream ``key`` wait for, if any.

        Call before enqueueing anything but a short op on that stream, so
        that no short op's completion waits for it (a long copy, a kernel
        that waits for the host). Returns False if, without ``block``, it
        would have had to wait for another thread placing a marker.
        """
        return True

    def defer(
        self, op: Operation, key: int, stream: Any, words: list[int], block: bool = False
    ) -> bool:
        """Take the tiny memset ``op`` on ``stream`` (its ``CUstream`` address ``key``)
        without its work enqueued, as 32-bit ``words``
        (``[address, value, ...]``) that the engine enqueues before its marker.

        Returns False, taking nothing, if the caller must enqueue the work and
        :meth:`watch` the op itself; engines without batches always do. So
        does a call without ``block`` while ``direct_limit`` ops are pending on
        the stream (:meth:`pending_on`): joining may enqueue the batch's words
        and marker, and the calling thread may be an event loop's.
        ``block`` as in :meth:`watch`.
        """
        return False

    def flush(self, key: int, block: bool = True) -> bool:
        """Enqueue the memsets deferred on the stream ``key``, if any.

        Call before enqueueing a short op there (:meth:`seal` does it for the
        rest). Returns False if, without ``block``, it would have had to wait
        for another thread enqueueing on it.
        """
        return True

    def forget(self, key: int) -> None:
        """The stream ``key`` was destroyed: keep nothing learnt about it.

        The driver may give its ``CUstream`` address to the next stream
        created, which must not inherit what the old one's ops were like.
        """

    def pending(self) -> int:
        """Number of operations watched and not yet resolved."""
        raise NotImplementedError

    def pending_on(self, key: int) -> int:
        """Operations watched on the stream ``key`` (its ``CUstream`` address) and
        not yet resolved; engines that do not track streams count all."""
        return self.pending()

    def poll_for(self, op: Operation) -> bool:
        """From an awaiting loop: resolve what has fired; returns whether ``op`` is done.

        Only called while ``loop_spin_s`` is non-zero.
        """
        return op._done

    def hand_off(self) -> None:
        """Someone now sleeps until an op is resolved: make sure something watches."""

    def drain_for(self, op: Operation) -> None:
        """Resolve what has fired on ``op``'s stream, from any thread but a loop's.

        Waits for another thread's drain of that stream to finish rather than
        skipping it, so that afterwards every op whose marker had fired is
        resolved.
        """

    def close(self) -> None:
        """Stop the engine; ops still pending fail with an error."""
        self.closed = True

    def _fail_fatal(self, exc: DeviceFatalError) -> None:
        """Remember the device's sticky error (the first one) and log it once."""
        if self.fatal is None:
            self.fatal = exc
            self.faults.report(f"device {self.device} hit a sticky error", exc, self.device)
