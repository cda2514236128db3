"""Simulated streams and the work enqueued on them: copies, memsets, stream memory ops.

Each stream is a worker thread (``SimCore._worker``); the enqueue calls here
block their caller exactly where CUDA's do (the table in the package
docstring) and pace each op to the modelled time.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from .._base import MemoryKind
from ._config import (
    _DEINITIALIZED,
    _DEVICE_SIDE,
    _INVALID_HANDLE,
    _INVALID_VALUE,
    _POLL_S,
    _error,
)
from ._core import SimCore, _in_context
from ._memory import _view
from ._state import SimStream, _Dropped, _Op

_thread_ids = itertools.count()

_SLICE = 1 << 20


def _paced_copy(dst: npt.NDArray[np.uint8], src: npt.NDArray[np.uint8], gbps: float) -> None:
    """Copy in 1 MiB slices spread over the modelled time, as a DMA engine would.

    Short bursts keep a simulated transfer from monopolising a host core
    (CI machines have two), so the event loop under test stays schedulable.
    """
    n = dst.nbytes
    if n <= _SLICE:
        np.copyto(dst, src)
        return
    start = time.monotonic()
    per_byte = 1.0 / (gbps * 1e9)
    for off in range(0, n, _SLICE):
        end = min(n, off + _SLICE)
        np.copyto(dst[off:end], src[off:end])
        ahead = start + end * per_byte - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        else:
            os.sched_yield()


class SimStreams(SimCore):
    """The stream calls of the simulated backend, and what they enqueue but kernels."""

    # -- streams -------------------------------------------------------
    @_in_context("device", "device")
    def stream_priority_range(self, device: int) -> tuple[int, int]:
        """``SimConfig.priority_range`` (as ``cuCtxGetStreamPriorityRange`` gives it)."""
        with self._lock:
            self._device_locked(device, "cuCtxGetStreamPriorityRange")
            self._on_device_locked("cuCtxGetStreamPriorityRange", device)
        return self.config.priority_range

    @_in_context("device", "device")
    def stream_create(self, device: int, priority: int = 0) -> SimStream:
        """A stream with its own worker thread; ``priority`` is clamped to the range."""
        call = "cuStreamCreateWithPriority"
        least, greatest = self.config.priority_range
        with self._lock:
            if self._closed:
                raise _error(call, _DEINITIALIZED, "the sim backend is closed")
            dev = self._check_locked(call, device)
            assert dev is not None
            owner = self._on_device_locked(call, device)
            s = SimStream(device, min(least, max(greatest, priority)), self._lock, owner)
            s.thread = threading.Thread(
                target=self._worker, args=(s,), name=f"gpuaio-sim-stream-{next(_thread_ids)}"
            )
            s.thread.daemon = True
            dev.streams.add(s)
            self._handles[id(s)] = s
        s.thread.start()
        return s

    def stream_from_handle(self, device: int, handle: int) -> SimStream:
        """The live sim stream whose :meth:`stream_handle` is ``handle``."""
        with self._lock:
            s = self._handles.get(handle)
            if s is None or s.device != device:
                raise _error(
                    "cuStreamGetCtx",
                    _INVALID_HANDLE,
                    f"no sim stream {handle!r} on device {device!r}",
                )
        return s

    def stream_handle(self, stream: Any) -> int:
        """A unique integer standing for the simulated ``CUstream``."""
        if not isinstance(stream, SimStream):
            raise _error("cuStreamGetId", _INVALID_HANDLE, f"{stream!r} is not a sim stream")
        return id(stream)

    @_in_context("handle", "stream")
    def stream_destroy(self, stream: Any) -> None:
        """Returns at once; the worker finishes the queued ops, then exits."""
        with self._lock:
            if self._closed:  # every worker is gone already
                return
            s = self._stream_locked(stream, "cuStreamDestroy")
            self._owner_current_locked("cuStreamDestroy", s.ctx, s)
            s.destroyed = True
            self._handles.pop(id(s), None)
            s.cond.notify()
            # Like cuStreamDestroy on a faulted context (the worker exits all the same).
            self._check_locked("cuStreamDestroy", s.device)

    @_in_context("handle", "stream")
    def stream_synchronize(self, stream: Any) -> None:
        """Block until everything enqueued before this call has run."""
        call = "cuStreamSynchronize"
        with self._lock:
            s = self._stream_locked(stream, call)
            self._owner_current_locked(call, s.ctx, s)
            dev = self._check_locked(call, s.device)
            target = s.submitted
            self._wait_locked(call, dev, lambda: s.retired >= target)

    # -- copies and memsets -------------------------------------------
    def _copy_op(self, call: str, dst: int, src: int, nbytes: int, gbps: float) -> _Op:
        def run() -> None:
            _paced_copy(_view(dst, nbytes), _view(src, nbytes), gbps)

        cost = self.config.latency_s + nbytes / (gbps * 1e9)
        return _Op(call, run, cost, spans=((dst, dst + nbytes), (src, src + nbytes)))

    @_in_context("handle", "stream")
    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """``cuMemcpyAsync``, blocking the caller where CUDA does (see the module docstring)."""
        call = "cuMemcpyAsync"
        cfg = self.config
        s, dev = self._begin(stream, call)
        with self._lock:
            dkind = self._kind_locked(dst, nbytes, call)
            skind = self._kind_locked(src, nbytes, call)
        d_dev, s_dev = dkind in _DEVICE_SIDE, skind in _DEVICE_SIDE
        if d_dev and s_dev:
            self._push(s, self._copy_op(call, dst, src, nbytes, cfg.d2d_gbps))
        elif s_dev:
            pinned = dkind is MemoryKind.PINNED
            gbps = cfg.dma_gbps if pinned else cfg.pageable_gbps
            self._push(s, self._copy_op(call, dst, src, nbytes, gbps), wait=not pinned)
        elif d_dev and skind is MemoryKind.PINNED:
            self._push(s, self._copy_op(call, dst, src, nbytes, cfg.dma_gbps))
        elif d_dev:
            # Pageable source: the driver syncs the stream, stages the bytes in the
            # caller's thread, and returns once they are staged (src reusable).
            with self._lock:
                target = s.submitted
                self._wait_locked(call, dev, lambda: s.retired >= target)
            start = time.monotonic()
            staged = _view(src, nbytes).copy()
            self._pace(start, nbytes / (cfg.pageable_gbps * 1e9))

            def dma() -> None:
                _paced_copy(_view(dst, nbytes), staged, cfg.dma_gbps)

            cost = cfg.latency_s + nbytes / (cfg.dma_gbps * 1e9)
            self._push(s, _Op(call, dma, cost, spans=((dst, dst + nbytes),)))
        else:
            self._push(s, self._copy_op(call, dst, src, nbytes, cfg.host_gbps), wait=True)

    @_in_context("handle", "stream")
    def memcpy_peer_async(
        self, dst: int, dst_device: int, src: int, src_device: int, nbytes: int, stream: Any
    ) -> None:
        """Asynchronous copy between two devices at ``peer_gbps``."""
        call = "cuMemcpyPeerAsync"
        s, _ = self._begin(stream, call)
        with self._lock:
            self._device_locked(dst_device, call)
            self._device_locked(src_device, call)
            self._kind_locked(dst, nbytes, call)
            self._kind_locked(src, nbytes, call)
        self._push(s, self._copy_op(call, dst, src, nbytes, self.config.peer_gbps))

    @_in_context("handle", "stream")
    def memset_async(self, ptr: int, value: int, itemsize: int, count: int, stream: Any) -> None:
        """Fill ``count`` little-endian items; async on device/managed, sync on pinned."""
        call = f"cuMemsetD{8 * itemsize}Async" if itemsize in (1, 2, 4) else "cuMemsetD8Async"
        if itemsize not in (1, 2, 4):
            raise _error(call, _INVALID_VALUE, f"itemsize must be 1, 2 or 4, not {itemsize!r}")
        s, _ = self._begin(stream, call)
        nbytes = itemsize * count
        with self._lock:
            kind = self._kind_locked(ptr, nbytes, call)
        if kind is MemoryKind.PAGEABLE:
            raise _error(call, _INVALID_VALUE, f"{ptr:#x} is pageable host memory")
        if ptr % itemsize:
            raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not {itemsize}-byte aligned")
        dtype = np.dtype(f"<u{itemsize}")
        pattern = value & ((1 << (8 * itemsize)) - 1)

        def run() -> None:
            _view(ptr, nbytes).view(dtype)[:] = pattern

        host = kind is MemoryKind.PINNED
        gbps = self.config.host_gbps if host else self.config.d2d_gbps
        cost = self.config.latency_s + nbytes / (gbps * 1e9)
        self._push(s, _Op(call, run, cost, spans=((ptr, ptr + nbytes),)), wait=host)

    # -- stream memory ops --------------------------------------------
    def _word_locked(self, ptr: int, call: str) -> None:
        kind = self._kind_locked(ptr, 4, call)
        # Stricter than some drivers: CUDA documents these operations for
        # device memory and mapped pinned memory only, never managed memory.
        if kind is MemoryKind.PAGEABLE or kind is MemoryKind.MANAGED or ptr % 4:
            raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not aligned mapped/device memory")

    @_in_context("handle", "stream")
    def stream_write_value32(self, stream: Any, device_ptr: int, value: int) -> None:
        """In stream order, store ``value`` as a little-endian uint32 at ``device_ptr``."""
        call = "cuStreamWriteValue32"
        s, _ = self._begin(stream, call)
        with self._lock:
            self._word_locked(device_ptr, call)
        if not 0 <= value <= 0xFFFFFFFF:
            raise _error(call, _INVALID_VALUE, f"{value!r} is not a uint32")
        data = value.to_bytes(4, "little")

        def run() -> None:
            ctypes.memmove(device_ptr, data, 4)

        self._push(s, _Op(call, run, self.config.latency_s, counted=False))

    @_in_context("handle", "stream")
    def stream_wait_value32(self, stream: Any, device_ptr: int, value: int) -> None:
        """The stream waits until ``(int32)(*device_ptr - value) >= 0`` (CUDA's cyclic GEQ)."""
        call = "cuStreamWaitValue32"
        s, dev = self._begin(stream, call)
        with self._lock:
            self._word_locked(device_ptr, call)
        if not 0 <= value <= 0xFFFFFFFF:
            raise _error(call, _INVALID_VALUE, f"{value!r} is not a uint32")

        def run() -> None:
            while (int.from_bytes(ctypes.string_at(device_ptr, 4), "little") - value) & (1 << 31):
                if dev.fault is not None or self._closed:
                    raise _Dropped
                self._stop.wait(_POLL_S)

        self._push(s, _Op(call, run, self.config.latency_s, counted=False))
