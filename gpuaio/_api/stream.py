"""Streams: ordered queues of awaitable copies, memsets, launches and events.

Every method validates its arguments, then enqueues at once and returns an
:class:`~gpuaio.Operation`; ``await`` it when the result is needed.

Order is kept by the stream's :class:`~gpuaio._sequencer.Sequencer`, never
by the thread that happens to run a step, and the event loop never blocks:

* Work the driver runs asynchronously (device memsets, launches, copies
  between device memory and pinned memory, device-to-device copies) is
  enqueued directly by the calling thread: a few microseconds.
* Work the driver would run synchronously (anything touching pageable
  memory, host-to-host copies, memsets of host memory) becomes a *host step*
  on the stream's host thread. It first settles on the host actions before
  it (and on the GPU work before it where the GPU may touch its memory).
* While a host step is queued or running, later device work on that stream
  is handed to the same thread, so it is enqueued in submission order.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from .._core.errors import InvalidArgumentError, StreamClosedError
from .._core.kernel import Kernel, normalize_dim3
from .._core.operation import Operation, completed
from .._core.progress import report_progress
from .._engine.sequencer import Frontier, Sequencer
from ..backends import MemoryKind
from .memory import BufferInfo, DeviceArray, describe

if TYPE_CHECKING:
    from .device import Device
    from .runtime import Runtime

__all__ = ["Event", "Stream"]

log = logging.getLogger("gpuaio")


class Event(Operation):
    """A point in a stream's order: awaitable, and usable in :meth:`Stream.wait`."""

    __slots__ = ("_frontier", "_native", "_recorded")

    def __init__(self, stream: Stream) -> None:
        super().__init__("event", stream)
        self._native: Any = None
        self._recorded = False
        # The host actions submitted before the event (see Stream.wait).
        self._frontier: tuple[Frontier, ...] = ()

    def __del__(self) -> None:
        native, self._native = self._native, None
        stream = self.stream
        if native is not None and stream is not None:
            # Not here: the last reference may drop on any thread, even one
            # inside a backend call; the reaper thread destroys it.
            backend = stream._rt.backend
            with contextlib.suppress(Exception):
                stream._rt.reaper.submit(lambda: backend.event_destroy(native))


class Stream:
    """An ordered queue of GPU and host work on one device.

    Created by :meth:`gpuaio.Device.stream` or wrapped around a foreign
    stream with :meth:`gpuaio.Device.wrap_stream`. Use ``async with`` (or
    :meth:`aclose`) to wait for its work and release it.
    """

    def __init__(
        self,
        device: Device,
        native: Any,
        *,
        owned: bool,
        priority: int = 0,
    ) -> None:
        self.device = device
        self.priority = priority
        self._rt: Runtime = device._runtime
        self._ordinal = device.ordinal
        self._native = native
        self._owned = owned
        self._seq: Sequencer = self._rt.sequencer(device.ordinal, native)
        self._key = self._seq.key
        self._closed = False  # last: __del__ of a half-made stream has nothing to release

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<gpuaio.Stream device={self._ordinal} handle={self.handle:#x}{state}>"

    @property
    def handle(self) -> int:
        """The ``CUstream`` address."""
        return self._rt.backend.stream_handle(self._native)

    def __cuda_stream__(self) -> tuple[int, int]:
        """cuda.core's stream protocol: ``(version, CUstream address)``."""
        return (0, self.handle)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lifecycle -----------------------------------------------------
    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the work submitted so far, then close the stream.

        The stream is closed however this returns: also when the caller is
        cancelled (``async with dev.stream()`` left by a timeout) and when
        the work failed. The wait is shielded from cancellation, so the
        stream is handed back idle; its error, if any, is raised.
        """
        if self._closed:
            return
        try:
            # Shielded: under a cancelled scope an unshielded await raises at
            # once (anyio and trio cancel level-triggered), which leaked the
            # stream and its threads on every timed-out request.
            with anyio.CancelScope(shield=True):
                await self.synchronize()
        finally:
            self.close()

    def close(self) -> None:
        """Refuse new work; release the stream once submitted work is enqueued.

        Work already submitted still runs and its operations still complete.
        """
        if self._closed:
            return
        self._closed = True
        if self._rt.forked is not None:
            return  # in a forked child: the parent's stream is left alone (leaked)
        if self._owned:
            self._rt.forget_sequencer(self._seq)
        self._seq.release(destroy_stream=self._owned)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # An owned stream dropped unclosed would keep its CUstream (and, on
        # the sim, a worker thread) for good. Nothing of it can be pending:
        # an operation keeps its stream alive until it completes.
        if getattr(self, "_closed", True) or not self._owned:
            return
        self._closed = True
        rt = self._rt
        if rt.closed or rt.forked is not None:
            return  # released with the backend, or the parent's (a forked child leaks it)
        # Not here: this may run on any thread, even one holding a lock that
        # forget_sequencer or the release take; the reaper thread does it
        # (and the stream's host thread destroys it, off the loop).
        seq = self._seq

        def release() -> None:
            rt.forget_sequencer(seq)
            seq.release(destroy_stream=True)

        with contextlib.suppress(Exception):
            rt.reaper.submit(release)
        # Last: under ``-W error`` this raises (reported as unraisable).
        _warn(
            f"unclosed {self!r}: use `async with dev.stream()` or aclose()",
            ResourceWarning,
            source=self,
        )

    def _check(self) -> None:
        if self._closed:
            raise StreamClosedError("this stream is closed")
        self._rt.check_device(self._ordinal)

    # -- submission ----------------------------------------------------
    # Work is handed to the stream's sequencer: ``self._seq.gpu`` for driver
    # work, ``self._seq.host`` for host steps (see gpuaio._sequencer).

    def _array_args(self, args: Sequence[Any]) -> list[BufferInfo]:
        """Describe the arrays among ``args``; reject device memory of another device."""
        infos: list[BufferInfo] = []
        for i, arg in enumerate(args):
            if isinstance(arg, DeviceArray) or hasattr(arg, "__cuda_array_interface__"):
                info = describe(arg, self._rt, f"argument {i}")
                if info.device not in (None, self._ordinal) and info.kind is MemoryKind.DEVICE:
                    raise InvalidArgumentError(
                        f"argument {i} is on device {info.device}, "
                        f"this stream is on device {self._ordinal}"
                    )
                infos.append(info)
        return infos

    def _track(self, op: Operation, infos: Sequence[BufferInfo]) -> None:
        """Hold gpuaio allocations in use until ``op`` completes."""
        for info in infos:
            alloc = info.alloc
            if alloc is not None:
                alloc.acquire()
                op._add_done_callback(alloc.release)

    # -- copies --------------------------------------------------------
    def copy(
        self, dst: Any, src: Any, *, progress: Callable[[int, int], None] | None = None
    ) -> Operation:
        """Copy all of ``src`` into ``dst``; returns an awaitable :class:`Operation`.

        Any pair of memory kinds works: pageable host, pinned host, device,
        managed. Sizes must match; shapes and dtypes must match unless one
        side is a flat byte buffer. Both must be C-contiguous, ``dst``
        writable. When the awaited operation returns, ``dst`` holds the data
        and ``src`` may be overwritten.

        ``progress(done_bytes, total_bytes)``, if given, is called from a
        worker thread after each staged chunk and once on success.
        """
        self._check()
        if progress is not None and not callable(progress):
            raise InvalidArgumentError(
                "copy: progress must be a callable taking (done_bytes, total_bytes), not "
                f"{type(progress).__name__}"
            )
        rt = self._rt
        d = describe(dst, rt, "dst")
        s = describe(src, rt, "src")
        _check_copy(d, s)
        for info, role in ((d, "destination"), (s, "source")):
            if (
                info.kind in (MemoryKind.DEVICE, MemoryKind.MANAGED)
                and info.device not in (None, self._ordinal)
                and (d.kind.is_host or s.kind.is_host)
            ):
                raise InvalidArgumentError(
                    f"the {role} is on device {info.device} but this stream is on device "
                    f"{self._ordinal}; use a stream of device {info.device}"
                )
        label = _COPY_LABELS[s.kind, d.kind]
        if d.nbytes == 0:
            return completed(label, self)
        op = Operation(label, self, keep=(d.owner, s.owner), nbytes=d.nbytes)
        self._track(op, (d, s))
        if progress is not None:
            op._progress = progress
            total = d.nbytes

            def report_done() -> None:
                if op._exc is None:
                    report_progress(progress, total, total)

            op._add_done_callback(report_done)
        backend = rt.backend
        n = d.nbytes
        if d.kind.is_host and s.kind.is_host:
            dv, sv = d.host_array(), s.host_array()

            def h2h() -> bool:
                rt.host.copy(dv, sv)
                return False

            return self._seq.host(op, h2h, after_gpu=True)
        if MemoryKind.PAGEABLE in (d.kind, s.kind):
            return self._pageable_copy(op, d, s)
        if (
            d.device is not None
            and s.device is not None
            and d.device != s.device
            and not d.kind.is_host
            and not s.kind.is_host
        ):
            dp, dd, sp, sd = d.ptr, d.device, s.ptr, s.device
            rt.ensure_peer_access(dd, sd)
            op._est = n / _NVLINK_BPS
            return self._seq.gpu(op, backend.memcpy_peer_async, dp, dd, sp, sd, n)
        host_side = d.kind.is_host or s.kind.is_host
        op._est = n / (_PCIE_BPS if host_side else _HBM_BPS)
        dp, sp = d.ptr, s.ptr
        return self._seq.gpu(op, backend.memcpy_async, dp, sp, n)

    def _pageable_copy(self, op: Operation, d: BufferInfo, s: BufferInfo) -> Operation:
        try:
            stager = self._rt.stager
        except BaseException as exc:  # a bad staging setting: nothing was enqueued
            op._resolve(exc)
            raise
        if stager is not None:
            return stager.copy(self, op, d, s)
        # The driver's own path blocks the calling thread (and, for H2D,
        # synchronizes the stream first): run it on the executor thread.
        backend = self._rt.backend
        dp, sp, n = d.ptr, s.ptr, d.nbytes

        def driver_copy() -> bool:
            backend.memcpy_async(dp, sp, n, self._native)
            return True

        return self._seq.host(op, driver_copy, after_gpu=False)

    # -- memset --------------------------------------------------------
    def memset(self, dst: Any, value: int, *, width: int | None = None) -> Operation:
        """Fill ``dst`` with a repeated ``width``-byte pattern ``value``.

        ``width`` (1, 2 or 4) defaults to the item size of ``dst``'s dtype
        when that is 1, 2 or 4. Device and managed memory are filled by the
        GPU; host memory (pinned or pageable) by a worker thread, in stream
        order.
        """
        self._check()
        rt = self._rt
        d = describe(dst, rt, "dst")
        _check_writable(d, "memset destination")
        if width is None:
            width = d.dtype.itemsize
            if width not in (1, 2, 4):
                raise InvalidArgumentError(
                    f"cannot infer a memset width from dtype {d.dtype}; pass width=1, 2 or 4"
                )
        elif type(width) is not int:  # the exact type: bool is an int too
            if isinstance(width, (bool, np.bool_)) or not isinstance(width, (int, np.integer)):
                raise InvalidArgumentError(
                    f"memset width must be 1, 2 or 4 (an int), not {width!r}"
                )
            width = int(width)
        limits = _MEMSET_LIMITS.get(width)
        if limits is None:
            raise InvalidArgumentError(f"memset width must be 1, 2 or 4 bytes, not {width}")
        if type(value) is not int:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InvalidArgumentError(
                    f"memset value must be an int, not {type(value).__name__}"
                )
            value = int(value)
        low, mask = limits
        if not low <= value <= mask:
            raise InvalidArgumentError(f"memset value {value} does not fit in {width} byte(s)")
        value &= mask
        nbytes = d.nbytes
        if nbytes % width:
            raise InvalidArgumentError(
                f"destination of {nbytes} bytes is not a whole number of {width}-byte items"
            )
        kind = d.kind
        on_device = kind is _DEVICE or kind is _MANAGED
        if on_device and d.device not in (None, self._ordinal):
            raise InvalidArgumentError(
                f"the destination is on device {d.device} but this stream is on device "
                f"{self._ordinal}"
            )
        label = _MEMSET_LABELS[kind]
        if nbytes == 0:
            return completed(label, self)
        op = Operation(label, self, (d.owner,), nbytes)
        self._track(op, (d,))
        if not on_device:
            view = d.host_array()
            w = width

            def fill() -> bool:
                rt.host.fill(view, value, w)
                return False

            return self._seq.host(op, fill, after_gpu=True)
        op._est = nbytes / _HBM_BPS
        return self._seq.gpu(op, rt.backend.memset_async, d.ptr, value, width, nbytes // width)

    # -- kernels -------------------------------------------------------
    def launch(
        self,
        kernel: Kernel | Any,
        grid: int | Sequence[int],
        block: int | Sequence[int],
        *args: Any,
        shared_mem: int = 0,
    ) -> Operation:
        """Launch ``kernel`` with ``args``; the op completes when the kernel has run.

        ``kernel`` is a :class:`Kernel` (or a backend-native kernel, e.g. a
        cuda.core ``Kernel``). gpuaio arrays and objects with
        ``__cuda_array_interface__`` are passed as pointers and kept alive
        until the kernel has finished; use numpy scalars (``np.int32``,
        ``np.float32``) for scalar parameters of a fixed width.
        """
        self._check()
        grid3 = normalize_dim3(grid, "grid")
        block3 = normalize_dim3(block, "block")
        threads = block3[0] * block3[1] * block3[2]
        if threads > 1024:
            raise InvalidArgumentError(f"a block has at most 1024 threads, not {threads}")
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer)):
            raise InvalidArgumentError(f"shared_mem must be a non-negative int, not {shared_mem!r}")
        shared_mem = int(shared_mem)
        if shared_mem < 0:
            raise InvalidArgumentError(f"shared_mem must be a non-negative int, not {shared_mem!r}")
        if shared_mem > _MAX_SHARED:
            raise InvalidArgumentError(
                f"shared_mem of {shared_mem} bytes exceeds the most any CUDA GPU allows a block "
                f"({_MAX_SHARED} bytes)"
            )
        if isinstance(kernel, Kernel):
            if kernel.device != self._ordinal:
                raise InvalidArgumentError(
                    f"kernel {kernel.name} was compiled for device {kernel.device}, "
                    f"this stream is on device {self._ordinal}"
                )
            native = kernel.native
            name = kernel.name
        else:
            native = kernel
            name = str(getattr(kernel, "name", None) or getattr(kernel, "__name__", "kernel"))
        infos = self._array_args(args)
        op = Operation(name, self, keep=(native, args))
        self._track(op, infos)
        backend = self._rt.backend
        return self._seq.gpu(op, backend.launch, native, grid3, block3, args, shared_mem)

    # -- ordering ------------------------------------------------------
    def record(self) -> Event:
        """Mark the current end of this stream; await the event, or pass it to :meth:`wait`.

        The event stands for everything submitted so far, host-side effects
        included: awaiting it, or waiting for it on another stream, orders
        after those too.
        """
        self._check()
        ev = Event(self)
        backend = self._rt.backend
        ev._native = backend.event_create(self._ordinal)
        ev._frontier = self._seq.frontier()

        def enqueue(h: Any) -> None:
            backend.event_record(ev._native, h)
            ev._recorded = True

        self._seq.marker(ev, enqueue)
        return ev

    def wait(self, other: Event | Stream) -> None:
        """Make later work on this stream wait for ``other``.

        ``other`` is an :class:`Event` or a stream (meaning: its work so far).
        Later GPU work waits on the GPU; later host steps (staging copies,
        copy-outs, host memsets, host-to-host copies) also come after the
        host-side effects of everything ``other`` stands for. The calling
        thread does not wait.
        """
        self._check()
        if isinstance(other, Stream):
            other = other.record()
        if not isinstance(other, Event):
            raise InvalidArgumentError(
                f"wait() takes an Event or a Stream, not {type(other).__name__}"
            )
        backend = self._rt.backend
        ev = other
        seq = self._seq
        seq.add_deps(ev._frontier)
        marker = Operation("wait", self, keep=(ev,))
        if ev._recorded:
            seq.gpu(marker, _wait_event, backend, ev._native)
            return

        def wait_recorded() -> bool:
            # The other stream's host thread records the event later; its own
            # completion implies it was recorded (or failed to be).
            while not ev._recorded and not ev.done():
                time.sleep(50e-6)
            if ev._recorded:
                backend.stream_wait_event(self._native, ev._native)
                return True
            return False

        seq.host(marker, wait_recorded, after_gpu=False)

    def synchronize(self) -> Operation:
        """An operation that completes when all work submitted so far is done.

        That includes host-side effects: copy-outs into pageable memory, and
        those of the streams this one waits for.
        """
        self._check()
        return self._seq.marker(Operation("synchronize", self), _nothing)


def _wait_event(backend: Any, event: Any, native: Any) -> None:
    backend.stream_wait_event(native, event)


def _nothing(native: Any) -> None:
    """Enqueue nothing: the marker placed behind it stands for the stream's work so far."""


# Optimistic transfer rates (bytes/s), so that expected completion times are
# early rather than late: they decide when to start polling, never correctness.
_MAX_SHARED = 228 << 10
"""Dynamic shared memory per block, the largest opt-in maximum of any GPU (Hopper)."""
_PCIE_BPS = 60e9
_NVLINK_BPS = 450e9
_HBM_BPS = 3e12

_COPY_LABELS = {(a, b): f"copy {a.value}->{b.value}" for a in MemoryKind for b in MemoryKind}
_MEMSET_LABELS = {k: f"memset {k.value}" for k in MemoryKind}
_MEMSET_LIMITS = {w: (-(1 << (8 * w - 1)), (1 << (8 * w)) - 1) for w in (1, 2, 4)}
"""Per memset width: the lowest value accepted (as signed) and the mask (highest, unsigned)."""
_DEVICE = MemoryKind.DEVICE
_MANAGED = MemoryKind.MANAGED


def _check_writable(d: BufferInfo, what: str) -> None:
    if d.readonly:
        raise InvalidArgumentError(f"the {what} is read-only")
    if not d.contiguous:
        raise InvalidArgumentError(
            f"the {what} is not C-contiguous; copy it into a contiguous buffer first"
        )


def _is_bytes(info: BufferInfo) -> bool:
    return info.dtype.itemsize == 1 and len(info.shape) <= 1


def _check_copy(d: BufferInfo, s: BufferInfo) -> None:
    _check_writable(d, "destination")
    if not s.contiguous:
        raise InvalidArgumentError(
            "the source is not C-contiguous; copy it into a contiguous buffer first"
        )
    if d.nbytes != s.nbytes:
        raise InvalidArgumentError(
            f"size mismatch: destination has {d.nbytes} bytes, source has {s.nbytes}"
        )
    if not (_is_bytes(d) or _is_bytes(s)):
        if d.dtype != s.dtype:
            raise InvalidArgumentError(
                f"dtype mismatch: destination is {d.dtype}, source is {s.dtype}"
            )
        if d.shape != s.shape:
            raise InvalidArgumentError(
                f"shape mismatch: destination is {d.shape}, source is {s.shape}"
            )
    if d.nbytes and d.ptr < s.ptr + s.nbytes and s.ptr < d.ptr + d.nbytes:
        raise InvalidArgumentError("source and destination overlap")
