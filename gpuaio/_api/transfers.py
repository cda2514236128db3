"""Copies and memsets of a stream, and the checks of their arguments.

A mixin of :class:`gpuaio.Stream` (see ``gpuaio._api.device``): the part of
a stream that moves bytes. Work the driver runs asynchronously is enqueued by
the calling thread; anything touching pageable memory goes to the stager or
becomes a host step, so the event loop never blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from .._core.compiled import mypyc_attr
from .._core.errors import InvalidArgumentError
from .._core.operation import Operation, completed
from .._core.progress import report_progress
from .._engine.buffers import BufferInfo, InUse
from .._engine.early import adopt, issue
from .._engine.stagingconfig import PCIE_BPS
from ..backends import MemoryKind
from .describe import cached_pageable, describe
from .memory import DeviceArray

if TYPE_CHECKING:
    from .._engine.hostwork import HostPool
    from .._engine.sequencer import Sequencer
    from .._engine.staging import Stager
    from ..backends import Backend
    from .runtime import Runtime

__all__ = ["Transfers", "check_copy"]


@mypyc_attr(allow_interpreted_subclasses=True)  # Stream, compiled or not
class Transfers:
    """Copies and memsets, mixed into :class:`gpuaio.Stream`."""

    _rt: Runtime
    _ordinal: int
    _seq: Sequencer
    _native: Any
    _key: int
    _closed: bool

    @property
    def handle(self) -> int:
        raise NotImplementedError  # Stream's

    def _check(self) -> None:
        raise NotImplementedError  # Stream's

    # -- submission ----------------------------------------------------
    # Work is handed to the stream's sequencer: ``self._seq.gpu`` for driver
    # work, ``self._seq.host`` for host steps (see gpuaio._engine.sequencer).

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
        """Hold gpuaio allocations in use until ``op`` completes.

        All or none: if one was freed meanwhile (raises), those acquired
        already are released again.
        """
        allocs = [info.alloc for info in infos if info.alloc is not None]
        if not allocs:
            return
        for i, alloc in enumerate(allocs):
            try:
                alloc.acquire()
            except BaseException:
                for taken in allocs[:i]:
                    taken.release()
                raise
        held = op._allocs
        op._allocs = allocs if held is None else [*held, *allocs]

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

        ``progress(done_bytes, total_bytes)``, if given, is called after each
        staged chunk, from the stream's host thread, and once on success, from
        the thread that finds the copy complete: a gpuaio thread, or the event
        loop of a task polling for it. Keep it quick and thread-safe.
        """
        _live(self)
        if progress is not None and not callable(progress):
            raise InvalidArgumentError(
                "copy: progress must be a callable taking (done_bytes, total_bytes), not "
                f"{type(progress).__name__}"
            )
        if progress is None and type(dst) is np.ndarray and type(src) is DeviceArray:
            op = _download_early(self, dst, src)
            if op is not None:
                return op
        rt = self._rt
        d = describe(dst, rt, "dst")
        s = describe(src, rt, "src")
        check_copy(d, s)
        d_host, s_host = d.kind.is_host, s.kind.is_host
        if d_host is not s_host:  # one side on a GPU: it must be this stream's
            dev_side, role = (s, "source") if d_host else (d, "destination")
            if dev_side.device is not None and dev_side.device != self._ordinal:
                raise InvalidArgumentError(
                    f"the {role} is on device {dev_side.device} but this stream is on device "
                    f"{self._ordinal}; use a stream of device {dev_side.device}"
                )
        n = d.nbytes
        if n == 0:
            return completed(_COPY_LABELS[s.kind, d.kind], self)
        if progress is None and d.kind is not _PAGEABLE and s.kind is not _PAGEABLE:
            # The driver's own asynchronous copy: between device and pinned
            # memory, or within one device.
            pcie = d_host is not s_host
            if pcie or (
                not d_host and (d.device == s.device or d.device is None or s.device is None)
            ):
                direct = _direct_copy(self, dst, src, d, s, pcie)
                if direct is not None:
                    return direct
        label = _COPY_LABELS[s.kind, d.kind]
        # The objects passed in too: a described buffer's owner may be only
        # the memory behind it (a device array's allocation).
        op = Operation(label, self, (dst, src, d.owner, s.owner), n)
        if d.alloc is not None or s.alloc is not None:
            _hold(op, d.alloc, s.alloc)
        # Partials, not closures (see Sequencer._gpu_job); and a call with
        # none makes no closure storage at all.
        if progress is not None:
            op._progress = progress
            op._add_done_callback(functools.partial(_report_done, op, progress, n))
        if d_host and s_host:
            h2h = functools.partial(_host_copy, rt.host, d.host_array(), s.host_array())
            return self._seq.host(op, h2h, after_gpu=True)
        if d.kind is _PAGEABLE or s.kind is _PAGEABLE:
            return _pageable_copy(self, op, d, s)
        backend = rt.backend
        if not d_host and not s_host and d.device != s.device and None not in (d.device, s.device):
            dp, dd, sp, sd = d.ptr, d.device, s.ptr, s.device
            assert dd is not None and sd is not None
            rt.ensure_peer_access(dd, sd)
            op._est = n / _NVLINK_BPS
            return self._seq.gpu(op, backend.memcpy_peer_async, dp, dd, sp, sd, n)
        op._est = n / (PCIE_BPS if d_host or s_host else _HBM_BPS)
        return self._seq.gpu(op, backend.memcpy_async, d.ptr, s.ptr, n)

    # -- memset --------------------------------------------------------
    # ``value`` and ``width`` are typed with numpy's integers, which they may
    # be, and checked by ``_as_int``, which takes any object: compiled
    # (hatch_build.py), a parameter typed ``int`` would turn True into 1 and
    # reject a numpy integer with a TypeError, and a check narrowing the
    # declared type would trust it.
    def memset(
        self,
        dst: Any,
        value: int | np.integer[Any],
        *,
        width: int | np.integer[Any] | None = None,
    ) -> Operation:
        """Fill ``dst`` with a repeated ``width``-byte pattern ``value``.

        ``width`` (1, 2 or 4) defaults to the item size of ``dst``'s dtype
        when that is 1, 2 or 4. Device and managed memory are filled by the
        GPU; host memory (pinned or pageable) by a worker thread, in stream
        order.
        """
        _live(self)
        rt = self._rt
        d = describe(dst, rt, "dst")
        # One unpacking: each field read by name is an attribute lookup of its own.
        ptr, nbytes, _shape, dtype, kind, device, readonly, contiguous, owner, alloc = d
        if readonly or not contiguous:
            _check_writable(d, "memset destination")
        if width is None:
            w = dtype.itemsize
            if w not in (1, 2, 4):
                raise InvalidArgumentError(
                    f"cannot infer a memset width from dtype {dtype}; pass width=1, 2 or 4"
                )
        else:
            checked = width if type(width) is int else _as_int(width)
            if checked is None:
                raise InvalidArgumentError(
                    f"memset width must be 1, 2 or 4 (an int), not {width!r}"
                )
            w = checked
        limits = _MEMSET_LIMITS.get(w)
        if limits is None:
            raise InvalidArgumentError(f"memset width must be 1, 2 or 4 bytes, not {w}")
        checked = value if type(value) is int else _as_int(value)
        if checked is None:
            raise InvalidArgumentError(f"memset value must be an int, not {type(value).__name__}")
        v = checked
        low, mask = limits
        if not low <= v <= mask:
            raise InvalidArgumentError(f"memset value {v} does not fit in {w} byte(s)")
        v &= mask
        if nbytes % w:
            raise InvalidArgumentError(
                f"destination of {nbytes} bytes is not a whole number of {w}-byte items"
            )
        on_device = kind is _DEVICE or kind is _MANAGED
        if on_device and device is not None and device != self._ordinal:
            raise InvalidArgumentError(
                f"the destination is on device {device} but this stream is on device "
                f"{self._ordinal}"
            )
        label = _MEMSET_LABELS[kind]
        if nbytes == 0:
            return completed(label, self)
        op = Operation(label, self, (dst, owner), nbytes)
        if alloc is not None:
            alloc.acquire()  # what _hold does for one allocation, without its call
            op._allocs = (alloc,)
        if not on_device:
            fill = functools.partial(_host_fill, rt.host, d.host_array(), v, w)
            return self._seq.host(op, fill, after_gpu=True)
        op._est = nbytes / _HBM_BPS
        count = nbytes // w
        words = None
        if nbytes <= _WORDS_MAX and kind is _DEVICE and not (ptr | nbytes) & 3:
            # A few aligned words: may be deferred to the stream's batch and
            # enqueued with its other ones in one call (``_queue``).
            pattern = v * _REPEAT[w]
            words = [ptr, pattern]
            if nbytes > 4:
                for i in range(4, nbytes, 4):
                    words += (ptr + i, pattern)
        return self._seq.gpu(op, rt.backend.memset_async, ptr, v, w, count, words=words)


# The copy's helpers below are functions of the stream, not methods: compiled,
# a method called on a gpuaio.Stream (an interpreted subclass) is looked up by
# name through the stream's class, about 1,000 instructions a call
# (tools/instr_probe.py); a function is a C call.


def _live(t: Transfers) -> None:
    """``t._check()`` on the hot path: the same errors, and while the stream
    is open, the process unforked and the device's engine healthy, no call
    into the interpreted stream and runtime (two calls, about 0.4 us of the
    3 us before a 4 KiB copy's driver call in a compiled build, issue 13)."""
    if t._closed or t._rt.forked is not None or not t._seq.healthy():
        t._check()


def _direct_copy(
    t: Transfers, dst: Any, src: Any, d: BufferInfo, s: BufferInfo, pcie: bool
) -> Operation | None:
    """:meth:`Transfers.copy`'s driver copy (``d`` and ``s`` checked, device or pinned
    memory), enqueued by the calling thread before its op is made, as the
    early download's DMA is (``gpuaio._engine.early``): the op, its label
    and its bookkeeping no longer delay the copy's start on the GPU. None,
    with nothing done, where the stream has work queued on its host thread
    or may not take more from this one now: the usual path queues it then.

    The allocations behind both buffers are held from before the copy is
    enqueued (raises if one was freed, with nothing enqueued)."""
    seq = t._seq
    engine = seq._engine  # seq.engine(), without a call on the hot path
    if engine is None or engine.closed:
        engine = seq.engine()
    n = d.nbytes
    est = n / (PCIE_BPS if pcie else _HBM_BPS)
    short = 0.0 < est <= engine.short_op_s and not seq.exported
    if not seq.may_enqueue(engine, short):
        return None
    a, b = d.alloc, s.alloc
    allocs = _acquire(a, b)
    native = seq.native
    try:
        t._rt.backend.memcpy_async(d.ptr, s.ptr, n, native)
    except BaseException:
        _release(allocs)  # nothing was enqueued
        raise
    try:
        op = Operation(_COPY_LABELS[s.kind, d.kind], t, (dst, src, d.owner, s.owner), n)
    except BaseException:
        # The copy runs with nobody to release its buffers: once the stream
        # has drained, the host thread does.
        if allocs:
            seq.release_after_drain(allocs)
        raise
    op._est = est
    if allocs:
        op._allocs = allocs
    return seq.watch(engine, op, native, short)


def _download_early(t: Transfers, dst: np.ndarray[Any, Any], src: DeviceArray) -> Operation | None:
    """:meth:`Transfers.copy` of a small download into pageable memory, its DMA issued
    before ``dst`` is described (``gpuaio._engine.early``), once its size,
    dtype and shape are found to fit; None, with nothing done, where that
    does not apply: the usual path then takes the copy (or rejects it)."""
    rt = t._rt
    host = cached_pageable(dst, rt)
    if not host:
        return None
    stager: Stager | None = rt.extras.get("stager")
    if stager is None:
        return None
    try:
        s = describe(src, rt, "src")
    except Exception:  # freed: the usual path says so, after checking dst
        return None
    if s.kind is not _DEVICE or s.device != t._ordinal or not s.contiguous:
        return None
    if not _fits(dst, s):  # the usual path raises the mismatch, nothing enqueued
        return None
    seq = t._seq
    early = issue(stager, seq, s, host)
    if early is None:
        return None
    n = s.nbytes
    try:
        # No check_copy: cached_pageable and _fits covered all it asks.
        d = describe(dst, rt, "dst")
    except BaseException:
        # Raised as before (only a change since, by another thread),
        # nothing written: the DMA completes unawaited.
        adopt(stager, seq, early, Operation(_EARLY_LABEL, t, (src, s.owner), n), 0)
        raise
    if d.kind is not _PAGEABLE:  # registered since the check (another thread)
        adopt(stager, seq, early, Operation(_EARLY_LABEL, t, (src, s.owner), n), 0)
        return None
    op = Operation(_EARLY_LABEL, t, (dst, src, d.owner, s.owner), n)
    return adopt(stager, seq, early, op, d.ptr)


def _pageable_copy(t: Transfers, op: Operation, d: BufferInfo, s: BufferInfo) -> Operation:
    try:
        stager = t._rt.stager
    except BaseException as exc:  # a bad staging setting: nothing was enqueued
        op._resolve(exc)
        raise
    if stager is not None:
        return stager.copy(t._seq, op, d, s)
    # The driver's own path blocks the calling thread (and, for H2D,
    # synchronizes the stream first): run it on the executor thread.
    driver_copy = functools.partial(_driver_copy, t._rt.backend, d.ptr, s.ptr, d.nbytes, t._native)
    return t._seq.host(op, driver_copy, after_gpu=False)


# Optimistic transfer rates (bytes/s), so that expected completion times are
# early rather than late: they decide when to start polling, never correctness.
# PCIe: the stager's PCIE_BPS.
# Every constant here is Final: a compiled module keeps it in a C static (a
# float inlined), where a plain global is a dict lookup on each use.
_NVLINK_BPS: Final = 450e9
_HBM_BPS: Final = 3e12

_COPY_LABELS: Final = {(a, b): f"copy {a.value}->{b.value}" for a in MemoryKind for b in MemoryKind}
_DEVICE: Final = MemoryKind.DEVICE
_MANAGED: Final = MemoryKind.MANAGED
_PAGEABLE: Final = MemoryKind.PAGEABLE
_EARLY_LABEL: Final = _COPY_LABELS[_DEVICE, _PAGEABLE]
_MEMSET_LABELS: Final = {k: f"memset {k.value}" for k in MemoryKind}
_MEMSET_LIMITS: Final = {w: (-(1 << (8 * w - 1)), (1 << (8 * w)) - 1) for w in (1, 2, 4)}
"""Per memset width: the lowest value accepted (as signed) and the mask (highest, unsigned)."""
_REPEAT: Final = {1: 0x01010101, 2: 0x00010001, 4: 1}
"""Per memset width: the factor that repeats a value across a 32-bit word."""
_WORDS_MAX: Final = 16
"""The largest memset (bytes) that may be deferred as 32-bit words."""


def _report_done(op: Operation, progress: Callable[[int, Any], None], n: int) -> None:
    """A copy with a progress callback is done: report all of it, unless it failed."""
    if op._exc is None:
        report_progress(progress, n, n)


def _host_copy(host: HostPool, dst: np.ndarray, src: np.ndarray) -> bool:
    """A host-to-host copy's host step (nothing for the GPU to watch)."""
    host.copy(dst, src)
    return False


def _host_fill(host: HostPool, view: np.ndarray, value: int, width: int) -> bool:
    """A host memset's host step."""
    host.fill(view, value, width)
    return False


def _driver_copy(backend: Backend, dst: int, src: int, nbytes: int, native: Any) -> bool:
    """The driver's own pageable copy (staging off), on the stream's host thread."""
    backend.memcpy_async(dst, src, nbytes, native)
    return True


def _hold(op: Operation, a: InUse | None, b: InUse | None = None) -> None:
    """Hold the gpuaio allocations ``a`` and ``b`` (either may be None) until ``op``
    completes: :meth:`Transfers._track` for a fresh op, without its loops; all
    or none, as :func:`_acquire`."""
    allocs = _acquire(a, b)
    if allocs:
        op._allocs = allocs


def _acquire(a: InUse | None, b: InUse | None) -> tuple[InUse, ...]:
    """Hold the gpuaio allocations ``a`` and ``b`` (either may be None); returns
    those held. All or none: if ``b`` was freed (raises), ``a`` is released again."""
    if a is None:
        if b is None:
            return ()
        a, b = b, None
    a.acquire()
    if b is None:
        return (a,)
    try:
        b.acquire()
    except BaseException:
        a.release()
        raise
    return (a, b)


def _release(allocs: tuple[InUse, ...]) -> None:
    for alloc in allocs:
        alloc.release()


def _as_int(x: object) -> int | None:
    """``x`` as an int if it is an integer (a numpy one too) and not a bool, else None."""
    if type(x) is int:  # the exact type: bool is an int too
        return x
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        return None
    return int(x)


def _check_writable(d: BufferInfo, what: str) -> None:
    if d.readonly:
        raise InvalidArgumentError(f"the {what} is read-only")
    if not d.contiguous:
        raise InvalidArgumentError(
            f"the {what} is not C-contiguous; copy it into a contiguous buffer first"
        )


def _is_bytes(info: BufferInfo) -> bool:
    return info.dtype.itemsize == 1 and len(info.shape) <= 1


def _mismatch(nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...], s: BufferInfo) -> str:
    """Why a destination of this size, dtype and shape cannot take ``s`` ("" if
    it can): the same size, and the same dtype and shape unless either side is
    a byte buffer. :func:`check_copy`'s rule, and the early download's, which
    asks it of the array itself before its DMA (``_fits``)."""
    if nbytes != s.nbytes:
        return f"size mismatch: destination has {nbytes} bytes, source has {s.nbytes}"
    if (dtype.itemsize == 1 and len(shape) <= 1) or _is_bytes(s):
        return ""
    if dtype != s.dtype:
        return f"dtype mismatch: destination is {dtype}, source is {s.dtype}"
    if shape != s.shape:
        return f"shape mismatch: destination is {shape}, source is {s.shape}"
    return ""


def _fits(dst: np.ndarray[Any, Any], s: BufferInfo) -> bool:
    """Whether :func:`check_copy` passes ``dst`` against the contiguous device
    buffer ``s``, where ``dst`` is known writable, C-contiguous and non-empty
    (``cached_pageable``); a host array and device memory never overlap. Asked
    before a small download's early DMA: a call rejected for its arguments
    enqueues nothing (``tests/test_bad_input.py``)."""
    return not _mismatch(dst.nbytes, dst.dtype, dst.shape, s)


def check_copy(d: BufferInfo, s: BufferInfo) -> None:
    _check_writable(d, "destination")
    if not s.contiguous:
        raise InvalidArgumentError(
            "the source is not C-contiguous; copy it into a contiguous buffer first"
        )
    why = _mismatch(d.nbytes, d.dtype, d.shape, s)
    if why:
        raise InvalidArgumentError(why)
    if d.nbytes and d.ptr < s.ptr + s.nbytes and s.ptr < d.ptr + d.nbytes:
        raise InvalidArgumentError("source and destination overlap")
