"""Streams and events, and the work enqueued on a stream other than launches.

:class:`CudaStream` and :class:`CudaEvent` are the handles; each carries its
device's primary context, and every call on it runs there. The enqueue
calls here (copies, memsets, the stream memory operations
``cuStreamWriteValue32``/``cuStreamWaitValue32``, event records and waits) and
``event_query`` run on event loops: they keep the context steps inline instead
of going through ``_restoring``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import cuda.bindings.driver as driver

from ..._core.errors import InvalidArgumentError
from ._driver import _NOT_READY, DriverBase, _check, _cuda_error, _uint32_error

_STREAM_NON_BLOCKING = int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
_EVENT_DISABLE_TIMING = int(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
_EVENT_BLOCKING_SYNC = int(driver.CUevent_flags.CU_EVENT_BLOCKING_SYNC)
_WAIT_GEQ = int(driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
_WRITE_DEFAULT = int(driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
_WRITE_32 = driver.CUstreamBatchMemOpType.CU_STREAM_MEM_OP_WRITE_VALUE_32
_NOT_SUPPORTED = driver.CUresult.CUDA_ERROR_NOT_SUPPORTED
_NOT_READY_CODE = int(_NOT_READY)
_BATCH_MAX = 255
"""``cuStreamBatchMemOp`` takes fewer than 256 operations a call."""
_GATED_STEPS = {1: "cuMemcpyAsync", 2: "cuStreamWriteValue32", 3: "cuStreamWaitValue32"}
"""The call a failed ``_fast.gated`` names (its answer's step)."""


class _WordParams(threading.local):
    """Each thread's ``cuStreamBatchMemOp`` parameters, made once and refilled.

    Making one through cuda-bindings took 4 us on the CPU machine, refilling
    its address and value 0.25 us (``fields`` are views into ``params``).
    """

    def __init__(self) -> None:
        self.params: list[Any] = []
        self.fields: list[Any] = []

    def grow(self, n: int) -> None:
        while len(self.params) < n:
            p = driver.CUstreamBatchMemOpParams()
            f = p.writeValue
            f.operation = _WRITE_32
            f.flags = _WRITE_DEFAULT
            self.params.append(p)
            self.fields.append(f)


_word_params = _WordParams()

_MEMSET_CALLS: dict[int, tuple[str, Callable[..., tuple[Any, ...]], int]] = {
    1: ("cuMemsetD8Async", driver.cuMemsetD8Async, 0xFF),
    2: ("cuMemsetD16Async", driver.cuMemsetD16Async, 0xFFFF),
    4: ("cuMemsetD32Async", driver.cuMemsetD32Async, 0xFFFFFFFF),
}


class CudaStream:
    """A stream handle owned (or, for foreign streams, only wrapped) by the backend."""

    __slots__ = ("address", "ctx", "ctx_addr", "destroyed", "device", "handle", "owned")

    def __init__(self, handle: Any, device: int, ctx: Any, owned: bool) -> None:
        self.handle: Any = handle
        """The ``driver.CUstream`` passed to every enqueue call."""
        self.address: int = int(handle)
        self.device: int = device
        self.ctx: Any = ctx
        """The primary context of ``device`` (what ``_enter`` makes current)."""
        self.ctx_addr: int = int(ctx)
        self.owned: bool = owned
        self.destroyed: bool = False

    def __repr__(self) -> str:
        kind = "owned" if self.owned else "foreign"
        return f"<CudaStream 0x{self.address:x} device={self.device} {kind}>"


class CudaEvent:
    """A timing-disabled event created by the backend."""

    __slots__ = ("address", "ctx", "ctx_addr", "destroyed", "device", "handle")

    def __init__(self, handle: Any, device: int, ctx: Any) -> None:
        self.handle: Any = handle
        self.address: int = int(handle)
        self.device: int = device
        self.ctx: Any = ctx
        self.ctx_addr: int = int(ctx)
        self.destroyed: bool = False

    def __repr__(self) -> str:
        return f"<CudaEvent 0x{self.address:x} device={self.device}>"


class StreamCalls(DriverBase):
    """The stream, copy, memset and event calls of :class:`~gpuaio.backends.cuda.CudaBackend`."""

    # -- streams -------------------------------------------------------
    def stream_priority_range(self, device: int) -> tuple[int, int]:
        """``cuCtxGetStreamPriorityRange``: (least, greatest); greatest is lower."""
        cached = self._priority_ranges.get(device)
        if cached is not None:
            return cached
        _, prev = self._enter_device(device)
        try:
            result = driver.cuCtxGetStreamPriorityRange()
        finally:
            if prev is not None:
                self._leave(prev)
        least, greatest = _check("cuCtxGetStreamPriorityRange", result)
        cached = (int(least), int(greatest))
        self._priority_ranges[device] = cached
        return cached

    def stream_create(self, device: int, priority: int = 0) -> CudaStream:
        """``cuStreamCreateWithPriority(CU_STREAM_NON_BLOCKING, priority)`` on ``device``.

        The driver clamps ``priority`` into :meth:`stream_priority_range`.
        """
        ctx, prev = self._enter_device(device)
        try:
            result = driver.cuStreamCreateWithPriority(_STREAM_NON_BLOCKING, priority)
        finally:
            if prev is not None:
                self._leave(prev)
        handle = _check("cuStreamCreateWithPriority", result)
        return CudaStream(handle, device, ctx, owned=True)

    def stream_from_handle(self, device: int, handle: int) -> CudaStream:
        """Wrap a foreign ``CUstream`` address of ``device``; never destroyed here."""
        return CudaStream(driver.CUstream(int(handle)), device, self._context(device), owned=False)

    def stream_handle(self, stream: CudaStream) -> int:
        """The ``CUstream`` address of ``stream``."""
        return stream.address

    def stream_destroy(self, stream: CudaStream) -> None:
        """``cuStreamDestroy`` for owned streams (idempotent); foreign ones are left alone.

        Work already enqueued still completes.
        """
        if not stream.owned or stream.destroyed:
            return
        result = self._restoring(
            self._enter(stream.ctx, stream.ctx_addr), driver.cuStreamDestroy, stream.handle
        )
        _check("cuStreamDestroy", result)
        stream.destroyed = True

    def stream_synchronize(self, stream: CudaStream) -> None:
        """``cuStreamSynchronize``; the GIL is released while it blocks."""
        result = self._restoring(
            self._enter(stream.ctx, stream.ctx_addr), driver.cuStreamSynchronize, stream.handle
        )
        _check("cuStreamSynchronize", result)

    # -- enqueue -------------------------------------------------------
    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: CudaStream) -> None:
        """``cuMemcpyAsync`` between any two unified addresses.

        Follows CUDA's synchronization rules: with pageable memory on either
        side the call may block the calling thread until the copy is staged
        or done. ``nbytes == 0`` enqueues nothing.
        """
        if nbytes <= 0:
            if nbytes < 0:
                raise InvalidArgumentError(f"copy size must not be negative, got {nbytes}")
            return
        fast = self._fast
        if fast is not None:
            code = fast.memcpy(stream.ctx_addr, dst, src, nbytes, stream.address)
            if code == 0:
                return
            if code > 0:
                raise _cuda_error("cuMemcpyAsync", code)
            # Another context is current: the switch below.
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuMemcpyAsync(dst, src, nbytes, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuMemcpyAsync", err)

    def memcpy_peer_async(
        self,
        dst: int,
        dst_device: int,
        src: int,
        src_device: int,
        nbytes: int,
        stream: CudaStream,
    ) -> None:
        """``cuMemcpyPeerAsync`` between the two devices' primary contexts."""
        if nbytes <= 0:
            if nbytes < 0:
                raise InvalidArgumentError(f"copy size must not be negative, got {nbytes}")
            return
        dst_ctx = self._context(dst_device)
        src_ctx = self._context(src_device)
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuMemcpyPeerAsync(dst, dst_ctx, src, src_ctx, nbytes, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuMemcpyPeerAsync", err)

    def memset_async(
        self, ptr: int, value: int, itemsize: int, count: int, stream: CudaStream
    ) -> None:
        """``cuMemsetD{8,16,32}Async`` by ``itemsize``.

        ``value`` is taken modulo ``2 ** (8 * itemsize)``, so ``-1`` sets all
        bits. ``count == 0`` enqueues nothing.
        """
        call = _MEMSET_CALLS.get(itemsize)
        if call is None:
            raise InvalidArgumentError(f"memset item size must be 1, 2 or 4, got {itemsize}")
        if count <= 0:
            if count < 0:
                raise InvalidArgumentError(f"memset count must not be negative, got {count}")
            return
        name, fn, mask = call
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = fn(ptr, value & mask, count, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error(name, err)

    def stream_write_value32(self, stream: CudaStream, device_ptr: int, value: int) -> None:
        """``cuStreamWriteValue32`` (with a memory barrier); ``value`` is a uint32.

        ``device_ptr`` must be device memory or the device address of mapped
        pinned memory (:meth:`host_device_pointer`), never managed memory.
        """
        if not 0 <= value <= 0xFFFFFFFF:
            raise _uint32_error("cuStreamWriteValue32", value)
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuStreamWriteValue32(stream.handle, device_ptr, value, _WRITE_DEFAULT)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuStreamWriteValue32", err)

    def stream_write_words(self, stream: CudaStream, words: Sequence[int]) -> None:
        """``cuStreamBatchMemOp`` of ``CU_STREAM_MEM_OP_WRITE_VALUE_32`` operations.

        Up to 255 words a call. One call cost about as much as one
        ``cuMemsetD32Async`` on an H200 host, and each word 0.12 us more
        (``.bench/memop_probe.py``, issue 13's run AO). Where the driver does
        not support the operation, one ``cuMemsetD32Async`` per word instead.
        """
        n = len(words) // 2
        for i in range(1, 2 * n, 2):
            if not 0 <= words[i] <= 0xFFFFFFFF:
                raise _uint32_error("cuStreamBatchMemOp", words[i])
        tls = _word_params
        tls.grow(min(n, _BATCH_MAX))
        params, fields = tls.params, tls.fields
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            for start in range(0, n, _BATCH_MAX):
                k = min(_BATCH_MAX, n - start)
                i = 2 * start
                for f in fields[:k]:
                    f.address = words[i]
                    f.value = words[i + 1]
                    i += 2
                (err,) = driver.cuStreamBatchMemOp(stream.handle, k, params[:k], 0)
                if err == _NOT_SUPPORTED:
                    for j in range(2 * start, 2 * n, 2):
                        (err,) = driver.cuMemsetD32Async(words[j], words[j + 1], 1, stream.handle)
                        if err:
                            raise _cuda_error("cuMemsetD32Async", err)
                    return
                if err:
                    raise _cuda_error("cuStreamBatchMemOp", err)
        finally:
            if prev is not None:
                self._leave(prev)

    def stream_wait_value32(self, stream: CudaStream, device_ptr: int, value: int) -> None:
        """``cuStreamWaitValue32(GEQ)``: later work waits until the word reaches ``value``.

        The comparison is CUDA's cyclic one, ``(int32_t)(*addr - value) >= 0``.
        """
        if not 0 <= value <= 0xFFFFFFFF:
            raise _uint32_error("cuStreamWaitValue32", value)
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuStreamWaitValue32(stream.handle, device_ptr, value, _WAIT_GEQ)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuStreamWaitValue32", err)

    def enqueue_gated(
        self,
        stream: CudaStream,
        part: int,
        device_ptr: int,
        blocks: list[int],
        nbytes: int,
        chunk: int,
        flags: list[int],
    ) -> None:
        """As :meth:`Backend.enqueue_gated`, in one C call where the fast calls
        are bound and the stream's context is current (``_fast``): through
        cuda.bindings a 4 MiB download's six calls took 30-45 us of the
        calling thread, against 12 us for the bare calls (issue 13, run ED)."""
        fast = self._fast
        if fast is not None:
            code = fast.gated(
                stream.ctx_addr,
                stream.address,
                part,
                device_ptr,
                blocks,
                nbytes,
                chunk,
                flags,
            )
            if code == 0:
                return
            if code > 0:
                step, err = divmod(code, 65536)
                raise _cuda_error(_GATED_STEPS.get(step, "cuMemcpyAsync"), err)
            # Another context is current, or the driver lacks the calls: one by one.
        super().enqueue_gated(stream, part, device_ptr, blocks, nbytes, chunk, flags)

    # -- events --------------------------------------------------------
    def event_create(self, device: int, blocking_sync: bool = False) -> CudaEvent:
        """``cuEventCreate(CU_EVENT_DISABLE_TIMING [| CU_EVENT_BLOCKING_SYNC])``.

        With ``blocking_sync`` a thread in :meth:`event_synchronize` sleeps
        instead of spinning.
        """
        flags = _EVENT_DISABLE_TIMING | (_EVENT_BLOCKING_SYNC if blocking_sync else 0)
        ctx, prev = self._enter_device(device)
        try:
            result = driver.cuEventCreate(flags)
        finally:
            if prev is not None:
                self._leave(prev)
        handle = _check("cuEventCreate", result)
        return CudaEvent(handle, device, ctx)

    def event_destroy(self, event: CudaEvent) -> None:
        """``cuEventDestroy`` (idempotent); a pending record still completes."""
        if event.destroyed:
            return
        result = self._restoring(
            self._enter(event.ctx, event.ctx_addr), driver.cuEventDestroy, event.handle
        )
        _check("cuEventDestroy", result)
        event.destroyed = True

    def event_record(self, event: CudaEvent, stream: CudaStream) -> None:
        """``cuEventRecord``: ``event`` completes when ``stream``'s prior work has."""
        fast = self._fast
        if fast is not None:
            code = fast.record(stream.ctx_addr, event.address, stream.address)
            if code == 0:
                return
            if code > 0:
                raise _cuda_error("cuEventRecord", code)
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuEventRecord(event.handle, stream.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuEventRecord", err)

    def event_query(self, event: CudaEvent) -> bool:
        """``cuEventQuery``: True when done, False on ``CUDA_ERROR_NOT_READY``, else raises."""
        fast = self._fast
        if fast is not None:
            code = fast.query(event.ctx_addr, event.address)
            if code == 0:
                return True
            if code == _NOT_READY_CODE:
                return False
            if code > 0:
                raise _cuda_error("cuEventQuery", code)
        prev = self._enter(event.ctx, event.ctx_addr)
        try:
            (err,) = driver.cuEventQuery(event.handle)
        finally:
            if prev is not None:
                self._leave(prev)
        if not err:
            return True
        if err == _NOT_READY:
            return False
        raise _cuda_error("cuEventQuery", err)

    def event_synchronize(self, event: CudaEvent) -> None:
        """``cuEventSynchronize``; the GIL is released while it blocks."""
        result = self._restoring(
            self._enter(event.ctx, event.ctx_addr), driver.cuEventSynchronize, event.handle
        )
        _check("cuEventSynchronize", result)

    def stream_wait_event(self, stream: CudaStream, event: CudaEvent) -> None:
        """``cuStreamWaitEvent``: later work on ``stream`` waits for ``event`` (any device)."""
        prev = self._enter(stream.ctx, stream.ctx_addr)
        try:
            (err,) = driver.cuStreamWaitEvent(stream.handle, event.handle, 0)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            raise _cuda_error("cuStreamWaitEvent", err)
