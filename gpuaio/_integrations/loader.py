"""Prefetching loader: host batches in, device batches out, transfers overlapped.

:func:`prefetch` wraps any iterable (sync or async) of host batches: numpy
arrays, torch CPU tensors, anything with the buffer protocol,
``__array_interface__``, ``__cuda_array_interface__`` or ``__dlpack__``, and
dicts, lists and tuples (named tuples too) nesting them. Each buffer leaf is
copied into a fresh device array on the loader's stream; other leaves
(strings, numbers, ``None``) pass through unchanged. The consumer gets
batches whose copies have completed::

    async with gpuaio.prefetch(dataset, depth=2, to="torch") as batches:
        async for batch in batches:
            ...   # batch["image"] is a CUDA tensor, ready on any stream

How the stages overlap:

* A **sync** source is pulled on a thread of its own (``next()`` never runs
  on the event loop), up to ``depth`` batches ahead of the consumer. Each
  batch's copies are enqueued on the event loop as soon as it arrives, so
  producing, transferring and the consumer's computing all overlap.
* An **async** source is advanced inside ``__anext__``, in the consumer's
  task: the source's own awaits do not overlap the consumer's computing,
  the transfers do. To overlap an async producer too, run it in a task of
  its own that sends batches into a memory object stream, and pass the
  receiving end.
* Pageable batches are staged through gpuaio's pinned pool (within its
  budget); pinned ones go straight to DMA.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast, overload

import anyio
import anyio.lowlevel
import anyio.to_thread
import numpy as np

from .._api.describe import describe
from .._api.device import Device, Stream
from .._api.memory import DeviceArray
from .._core import trace as _trace
from .._core.errors import InvalidArgumentError
from .._core.loopport import LoopPort, current_port
from .._core.operation import Operation, wait_all
from .._core.progress import LoaderProgressCallback, report_progress
from .batches import is_buffer, is_device_array, map_leaves, needs_prepare, prepare
from .interop import converter

__all__ = ["Prefetcher", "prefetch"]

log = logging.getLogger("gpuaio")

Target = Literal["gpuaio", "cupy", "torch"]
"""The array types :func:`prefetch` can yield."""

BatchT = TypeVar("BatchT")
"""What a :class:`Prefetcher` yields: a device batch."""
_R = TypeVar("_R")

_HostArray = np.ndarray[Any, Any]


@overload
def prefetch(
    source: Iterable[_HostArray] | AsyncIterable[_HostArray],
    *,
    depth: int = 2,
    device: Device | None = None,
    stream: Stream | None = None,
    to: Literal["gpuaio"] = "gpuaio",
    progress: LoaderProgressCallback | None = None,
) -> Prefetcher[DeviceArray]: ...


@overload
def prefetch(
    source: Iterable[_HostArray] | AsyncIterable[_HostArray],
    *,
    depth: int = 2,
    device: Device | None = None,
    stream: Stream | None = None,
    to: Callable[[DeviceArray], _R],
    progress: LoaderProgressCallback | None = None,
) -> Prefetcher[_R]: ...


@overload
def prefetch(
    source: Iterable[Any] | AsyncIterable[Any],
    *,
    depth: int = 2,
    device: Device | None = None,
    stream: Stream | None = None,
    to: Target | Callable[[DeviceArray], Any] = "gpuaio",
    progress: LoaderProgressCallback | None = None,
) -> Prefetcher[Any]: ...


def prefetch(
    source: Iterable[Any] | AsyncIterable[Any],
    *,
    depth: int = 2,
    device: Device | None = None,
    stream: Stream | None = None,
    to: Literal["gpuaio", "cupy", "torch"] | Callable[[DeviceArray], Any] = "gpuaio",
    progress: Callable[[int, int | None], None] | None = None,
) -> Prefetcher[Any]:
    """Iterate ``source``'s host batches as device batches, ``depth`` transfers ahead.

    A batch is a buffer, or a ``dict``, ``list`` or ``tuple`` (named tuples
    too) nesting buffers, to any depth. Buffers are numpy arrays, torch CPU
    tensors, and anything with the buffer protocol,
    ``__array_interface__``, ``__cuda_array_interface__`` or ``__dlpack__``;
    each is copied into a fresh device array on the loader's stream. Other
    leaves (strings, numbers, ``None``) pass through unchanged, and the
    structure is rebuilt around the device arrays: a batch
    ``{"image": np.ndarray, "label": 3}`` comes out as
    ``{"image": DeviceArray, "label": 3}`` (with ``to="torch"``, a CUDA
    tensor in place of the ``DeviceArray``).

    Args:
        source: a sync or async iterable of batches. ``iter(source)`` and
            every ``next()`` of a sync source run on a worker thread.
        depth: how many batches may be pulled from the source and in
            transfer while the consumer holds one (at least 1). Memory in
            use is bounded by it: at most ``depth`` host batches are held,
            and device memory for ``depth`` batches plus those the consumer
            keeps.
        device: the device to copy to (default: ``stream``'s, else device 0).
        stream: the stream to copy on (default: a stream of the loader's
            own, closed when the loader is).
        to: ``"gpuaio"`` (:class:`~gpuaio.DeviceArray`), ``"cupy"``,
            ``"torch"`` (zero-copy views through CAI / DLPack), or a callable
            applied to each device array.
        progress: called as ``progress(batches, total)`` on the consumer's
            task after each batch is handed over (``total``: ``len(source)``
            if the source has a length, else None), and once more with
            ``total == batches`` when the source is exhausted;
            :func:`~gpuaio.progress_bar` with ``unit="batch"`` draws a bar.

    Returns:
        a :class:`Prefetcher`: an async iterator and async context manager.
        Its type says what it yields where the source's items are NumPy
        arrays: ``Prefetcher[DeviceArray]``, or ``Prefetcher[R]`` for a
        callable ``to`` returning ``R``; other batch structures give
        ``Prefetcher[Any]``.

    Guarantees: batches come in source order; a yielded batch's copies have
    completed, so any stream of any library may use it at once with no
    synchronization; its device arrays are fresh allocations the consumer
    owns (they stay valid for as long as it keeps them). An exception raised
    by the source (or by a copy) reaches the consumer, with its traceback,
    at that batch's position, after the batches before it. Closing the
    loader (``aclose()``, leaving ``async with``, or dropping it) stops the
    source, and no copy is left running once ``aclose()`` returns.
    """
    return Prefetcher(source, depth=depth, device=device, stream=stream, to=to, progress=progress)


# -- pipeline -------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """One batch pulled from the source: its device copy, or the error in its place."""

    value: Any
    ops: list[Operation] = field(default_factory=list)
    error: BaseException | None = None


class _SyncPuller:
    """Pulls a sync iterable on a thread of its own, at most ``room`` batches ahead.

    Results go to the event loop through ``port``: ``deliver("item", batch)``,
    ``("error", exc)`` or ``("end", None)``, then ``("exit", None)`` once the
    source has been closed. Holds only a weak reference to the
    :class:`Prefetcher`, so an abandoned loader is collected (and closes
    this puller) even while a ``next()`` is running.
    """

    def __init__(
        self,
        source: Iterable[Any],
        room: int,
        port: LoopPort,
        deliver: Callable[[str, Any], None],
    ) -> None:
        self._source: Iterable[Any] | None = source
        self._room = room
        self._port = port
        self._deliver = weakref.WeakMethod(deliver)
        self._cv = threading.Condition()  # an RLock: close() may run from a finalizer
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="gpuaio-prefetch", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """The consumer took a batch: one more may be pulled."""
        with self._cv:
            self._room += 1
            self._cv.notify()

    def close(self) -> None:
        """Stop after the ``next()`` in progress (if any); the thread closes the source."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def _stopping(self) -> bool:
        with self._cv:
            return self._closing

    def _post(self, kind: str, payload: Any) -> None:
        # The callback looks the loader up when it runs: holding it from here
        # would keep an abandoned loader alive until the loop ran the callback,
        # past the collection that should close it.
        ref = self._deliver
        if ref() is None:
            return

        def deliver() -> None:
            target = ref()
            if target is not None:
                target(kind, payload)

        self._port.post([deliver])

    def _run(self) -> None:
        source, self._source = self._source, None
        it: Any = None
        try:
            assert source is not None
            it = iter(source)
            del source
            while True:
                with self._cv:
                    while self._room <= 0 and not self._closing:
                        self._cv.wait()
                    if self._closing:
                        return
                    self._room -= 1
                try:
                    batch = prepare(next(it))
                except StopIteration:
                    self._post("end", None)
                    return
                if self._stopping():
                    return
                self._post("item", batch)
                del batch
        except BaseException as exc:
            self._post("error", exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("gpuaio.prefetch: closing the source failed")
            del it
            self._post("exit", None)


class Prefetcher(Generic[BatchT]):
    """The async iterator :func:`prefetch` returns; also an async context manager.

    Use it from one task of one event loop. ``async with`` (or
    :meth:`aclose`) closes it deterministically; a loader left after an
    early ``break`` is closed when it is garbage-collected (its copies still
    own their buffers until they complete).
    """

    def __init__(
        self,
        source: Iterable[Any] | AsyncIterable[Any],
        *,
        depth: int = 2,
        device: Device | None = None,
        stream: Stream | None = None,
        to: Target | Callable[[DeviceArray], Any] = "gpuaio",
        progress: LoaderProgressCallback | None = None,
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise InvalidArgumentError(f"depth must be an int >= 1, not {depth!r}")
        if stream is not None and not isinstance(stream, Stream):
            raise InvalidArgumentError(
                f"stream must be a gpuaio Stream (wrap foreign ones with Device.wrap_stream), "
                f"not {type(stream).__name__}"
            )
        if device is None:
            device = stream.device if stream is not None else Device(0)
        elif stream is not None and stream.device is not device:
            raise InvalidArgumentError(
                f"stream is on device {stream.device.ordinal}, device is {device.ordinal}"
            )
        self._async_source: AsyncIterator[Any] | None = None
        self._sync_source: Iterable[Any] | None = None
        if hasattr(source, "__aiter__"):
            self._async_source = cast("AsyncIterable[Any]", source).__aiter__()
        elif hasattr(source, "__iter__"):
            self._sync_source = source  # pyright: ignore[reportAttributeAccessIssue]
        else:
            raise InvalidArgumentError(
                f"source must be an iterable or async iterable, not {type(source).__name__}"
            )
        if progress is not None and not callable(progress):
            raise InvalidArgumentError(
                f"progress must be a callable, not {type(progress).__name__}"
            )
        self._progress = progress
        self._total: int | None = None
        if progress is not None:
            try:
                self._total = len(source)  # type: ignore[arg-type]
            except TypeError:
                self._total = None
        self._convert = converter(to)
        self._identity = to == "gpuaio"
        self._depth = depth
        self._device = device
        self._stream = stream
        self._owns_stream = stream is None
        self._entries: deque[_Entry] = deque()
        self._puller: _SyncPuller | None = None
        self._started = False
        # The consumer's tracer, seen at its last next(): the puller's batches
        # are enqueued from loop callbacks, outside the consumer task's context.
        self._tracer: _trace.Tracer | None = None
        self._exhausted = False  # the source has no more batches
        self._stopped = False  # no more batches will be handed over
        self._puller_exited = False
        self._waiter: anyio.Event | None = None  # set when an entry arrives or on stop
        self._exit_waiter: anyio.Event | None = None  # set when the puller has exited
        self._draining: list[Operation] = []  # ops of dropped entries, awaited by aclose
        self._running = False
        self.pulled: int = 0
        """Batches taken from the source and received by the loader so far."""
        self.delivered: int = 0
        """Batches handed to the consumer so far."""

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"{self.in_flight} in flight"
        return f"<gpuaio.Prefetcher depth={self._depth} {state}>"

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def in_flight(self) -> int:
        """Batches pulled from the source and not yet handed to the consumer."""
        return self.pulled - self.delivered

    # -- protocol ----------------------------------------------------------
    def __aiter__(self) -> Prefetcher[BatchT]:
        return self

    async def __anext__(self) -> BatchT:
        """The next device batch, its copies complete; ``StopAsyncIteration`` at the end.

        Cancelling this call loses nothing: the batch it waited for is handed
        over by the next call.
        """
        if self._running:
            raise RuntimeError("another task is already waiting in this Prefetcher's __anext__")
        self._running = True
        try:
            return cast(BatchT, await self._next())
        finally:
            self._running = False

    async def __aenter__(self) -> Prefetcher[BatchT]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the loader: stop pulling, let copies in flight finish, close the source.

        When it returns, no copy of this loader is running and its own stream
        is closed. Staged copies of batches not yet handed over are aborted
        between chunks. Waiting for copies is shielded from cancellation (it
        is short and bounded); closing a sync source waits for the ``next()``
        in progress, unless this call is cancelled, in which case the worker
        thread closes the source by itself when that ``next()`` returns.
        """
        self._stop()
        with anyio.CancelScope(shield=True):
            while self._draining:
                op = self._draining.pop()
                with contextlib.suppress(Exception):
                    await op
        self._release_stream()
        source, self._async_source = self._async_source, None
        if source is not None and not self._running:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()
        while self._puller is not None and not self._puller_exited:
            waiter = self._exit_waiter = anyio.Event()
            await waiter.wait()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # Abandoned (e.g. ``break`` without ``async with``): stop without waiting.
        # In-flight operations own their buffers until they complete.
        abandoned = getattr(self, "_started", False) and not getattr(self, "_stopped", True)
        try:
            self._stop()
            self._release_stream()
        except Exception:
            pass
        if abandoned:  # as asyncio warns of an unclosed transport; last: -W error raises
            _warn(
                f"unclosed {self!r}: use `async with gpuaio.prefetch(...)` or aclose()",
                ResourceWarning,
                source=self,
            )

    # -- internals -----------------------------------------------------------
    def _start(self) -> None:
        self._started = True
        if self._stream is None:
            self._stream = self._device.stream()
        if self._sync_source is not None:
            source, self._sync_source = self._sync_source, None
            self._puller = _SyncPuller(source, self._depth, current_port(), self._deliver)

    def _stop(self) -> None:
        """Hand over nothing more: stop the puller, abort and set aside pending copies."""
        self._stopped = True
        self._sync_source = None
        if self._puller is not None:
            self._puller.close()
        for entry in self._entries:
            for op in entry.ops:
                if not op.done():
                    op.abort()
                    self._draining.append(op)
        self._entries.clear()
        self._wake()  # a task waiting in __anext__ sees the stop

    def _release_stream(self) -> None:
        stream = self._stream
        if self._owns_stream and stream is not None and not stream.closed:
            stream.close()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()

    def _deliver(self, kind: str, payload: Any) -> None:
        """Runs on the event loop (posted by the puller); never raises."""
        try:
            if kind == "exit":
                self._puller_exited = True
                exit_waiter, self._exit_waiter = self._exit_waiter, None
                if exit_waiter is not None:
                    exit_waiter.set()
            elif self._stopped:
                pass  # closing: drop what was still on its way
            elif kind == "item":
                self.pulled += 1
                self._entries.append(self._enqueue(payload))
            elif kind == "error":
                self.pulled += 1
                self._exhausted = True
                self._entries.append(_Entry(None, error=payload))
            else:
                self._exhausted = True
        except BaseException as exc:  # never let an error escape into the loop
            self._entries.append(_Entry(None, error=exc))
            self._exhausted = True
        self._wake()

    def _enqueue(self, batch: Any) -> _Entry:
        """Allocate device arrays for ``batch``'s leaves and enqueue their copies."""
        stream = self._stream
        assert stream is not None
        device = self._device
        rt = device._runtime
        ops: list[Operation] = []

        def leaf(host: Any) -> DeviceArray:
            info = describe(host, rt)
            dst = device.empty(info.shape, info.dtype)
            ops.append(stream.copy(dst, host))
            return dst

        try:
            with _trace.using(self._tracer):
                value = map_leaves(batch, leaf, is_buffer)
        except Exception as exc:
            return _Entry(None, ops, exc)
        return _Entry(value, ops)

    async def _pull_async(self) -> None:
        """Advance an async source until ``depth`` batches wait behind the head."""
        source = self._async_source
        assert source is not None
        while not self._exhausted and len(self._entries) <= self._depth:
            try:
                batch = await source.__anext__()
            except StopAsyncIteration:
                self._exhausted = True
                return
            except Exception as exc:
                self.pulled += 1
                self._exhausted = True
                self._entries.append(_Entry(None, error=exc))
                return
            self.pulled += 1
            if needs_prepare(batch):
                with anyio.CancelScope(shield=True):  # short; keeps the batch on cancel
                    batch = await anyio.to_thread.run_sync(prepare, batch)
            self._entries.append(self._enqueue(batch))

    async def _next(self) -> Any:
        # A checkpoint per batch: cancellable even when every batch is ready,
        # and callbacks the puller posted run before the entries are read.
        await anyio.lowlevel.checkpoint()
        if self._stopped:
            raise StopAsyncIteration
        self._tracer = _trace.current()
        if not self._started:
            self._start()
        if self._async_source is not None:
            await self._pull_async()
        while not self._entries:
            if self._exhausted or self._stopped:
                self._finish()
                raise StopAsyncIteration
            waiter = self._waiter = anyio.Event()
            await waiter.wait()
        entry = self._entries[0]
        if entry.ops:
            try:
                # Every op, last first (one wake-up for a batch on the stream);
                # on an error, the first in order once all of them finished.
                await wait_all(entry.ops)
            except Exception as exc:
                if entry.error is None:
                    entry.error = exc
        if self._stopped or not self._entries or self._entries[0] is not entry:
            raise StopAsyncIteration  # closed while we waited
        self._entries.popleft()
        self.delivered += 1
        if self._progress is not None:
            report_progress(self._progress, self.delivered, self._total)
        if self._puller is not None:
            self._puller.release()
        if entry.error is not None:
            self._stop()
            self._release_stream()
            raise entry.error
        if self._identity:
            return entry.value
        return map_leaves(entry.value, self._convert, is_device_array)

    def _finish(self) -> None:
        """The source is exhausted and every batch handed over: release what we own."""
        if self._progress is not None and not self._stopped:
            report_progress(self._progress, self.delivered, self.delivered)
        self._stopped = True
        self._release_stream()
