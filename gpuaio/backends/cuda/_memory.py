"""Memory: device, managed and pinned allocations, host registration, pointer kinds.

Device and managed memory is allocated in its device's primary context and
freed in its owner's. :meth:`MemoryCalls.mem_free_async` frees device memory
that nothing uses any more on a stream of the backend's own, without the
device-wide wait of ``cuMemFree``. Pinned memory is portable and mapped on
every device, so its calls run in whichever of the backend's contexts is
current (never in a foreign one: the memory would go when that context is
destroyed); it comes from a host memory pool where the driver has one
(``GPUAIO_HOST_POOL=0`` turns that off) and is freed the same stream-ordered
way.
:meth:`MemoryCalls.pointer_info` classifies an address with one
``cuPointerGetAttributes`` call, in any current context.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import cuda.bindings.driver as driver

from ..._core.errors import InvalidArgumentError
from .._base import MemoryKind, PointerInfo
from ._driver import _INVALID_VALUE, DriverBase, _check, _cuda_error, _logger

_ATTACH_GLOBAL = int(driver.CUmemAttach_flags.CU_MEM_ATTACH_GLOBAL)
_HOST_ALLOC_FLAGS = int(driver.CU_MEMHOSTALLOC_PORTABLE) | int(driver.CU_MEMHOSTALLOC_DEVICEMAP)
_HOST_REGISTER_FLAGS = int(driver.CU_MEMHOSTREGISTER_PORTABLE) | int(
    driver.CU_MEMHOSTREGISTER_DEVICEMAP
)

# One cuPointerGetAttributes call answers everything pointer_info needs.
_POINTER_ATTRIBUTES = (
    driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
    driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_MANAGED,
    driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
)
_MEMORYTYPE_HOST = int(driver.CUmemorytype.CU_MEMORYTYPE_HOST)
_MEMORYTYPE_DEVICE = int(driver.CUmemorytype.CU_MEMORYTYPE_DEVICE)
_MEMORYTYPE_UNIFIED = int(driver.CUmemorytype.CU_MEMORYTYPE_UNIFIED)
_OUT_OF_MEMORY = driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY
_NOT_SUPPORTED = driver.CUresult.CUDA_ERROR_NOT_SUPPORTED
_NON_BLOCKING = int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)


def _drain_and_destroy(stream: Any) -> None:
    driver.cuStreamSynchronize(stream)
    driver.cuStreamDestroy(stream)


def _free_and_release(ptr: int, stream: Any) -> tuple[Any, Any]:
    """``cuMemFreeAsync`` of ``ptr`` on ``stream`` (empty but for frees), then
    ``cuStreamSynchronize`` of that stream: the driver gives freed memory back
    only at a synchronization. Without one, 2 GiB from ``cuMemAlloc`` freed
    so stayed taken for as long as was watched (``cuMemGetInfo``, 1.5 s; the
    GPU suite's check, 10 s); a memory pool (the host pool) gives what is
    freed into it back at a synchronization too, by CUDA's documentation.
    After the stream's synchronize it was back within 0.03 ms.
    The synchronize (0.6-1.9 ms for 2 GiB, the release itself) waits for
    that stream only: with a 200 ms kernel running on another it did not
    wait for the kernel, and another thread's ``cuEventRecord`` took at most
    44 us meanwhile (issue 13, run ET, on an H100). Returns both calls'
    ``CUresult``; no synchronize where the free failed (``None``)."""
    (err,) = driver.cuMemFreeAsync(ptr, stream)
    if err:
        return err, None
    (synced,) = driver.cuStreamSynchronize(stream)
    return err, synced


def _alloc_from_pool(nbytes: int, pool: Any, stream: Any) -> Any:
    """``cuMemAllocFromPoolAsync`` on ``stream``, then wait for that stream: the
    memory is usable by every stream (and the host) once its stream has
    reached the allocation. A failed wait comes back as the call's error."""
    result = driver.cuMemAllocFromPoolAsync(nbytes, pool, stream)
    if result[0]:
        return result
    (err,) = driver.cuStreamSynchronize(stream)
    return (err, None) if err else result


class MemoryCalls(DriverBase):
    """The memory calls of :class:`~gpuaio.backends.cuda.CudaBackend`."""

    def __init__(self) -> None:
        super().__init__()
        self._allocations: dict[int, int] = {}  # device/managed pointer -> device
        self._managed: set[int] = set()  # the managed ones among them
        # device -> the stream mem_free_async frees on; None: the driver
        # refused cuMemFreeAsync there, so it frees with cuMemFree.
        self._free_streams: dict[int, Any] = {}
        self._free_lock = threading.Lock()
        # The host memory pool: None until tried, False where there is none.
        self._host_pool_handle: Any = None
        self._host_pool_device = 0  # whose free stream its allocations and frees use
        self._pooled_host: dict[int, int] = {}  # its pointers -> that device

    # -- memory --------------------------------------------------------
    @staticmethod
    def _check_size(nbytes: int) -> None:
        if nbytes <= 0:
            raise InvalidArgumentError(f"allocation size must be positive, got {nbytes}")

    def mem_alloc(self, device: int, nbytes: int) -> int:
        """``cuMemAlloc`` on ``device``; returns the device address.

        Out of memory, it synchronizes the device's free stream and tries once
        more: each stream-ordered free gives its memory back itself
        (:func:`_free_and_release`), but one on another thread may be between
        its ``cuMemFreeAsync`` and that synchronize.
        """
        self._check_size(nbytes)
        _, prev = self._enter_device(device)
        try:
            result = driver.cuMemAlloc(nbytes)
            if result[0] == _OUT_OF_MEMORY:
                stream = self._free_streams.get(device)
                if stream is not None and not driver.cuStreamSynchronize(stream)[0]:
                    result = driver.cuMemAlloc(nbytes)
            ptr = int(_check("cuMemAlloc", result))
        finally:
            if prev is not None:
                self._leave(prev)
        self._allocations[ptr] = device
        return ptr

    def mem_alloc_managed(self, device: int, nbytes: int) -> int:
        """``cuMemAllocManaged`` (``CU_MEM_ATTACH_GLOBAL``) in ``device``'s context."""
        self._check_size(nbytes)
        _, prev = self._enter_device(device)
        try:
            result = driver.cuMemAllocManaged(nbytes, _ATTACH_GLOBAL)
        finally:
            if prev is not None:
                self._leave(prev)
        ptr = int(_check("cuMemAllocManaged", result))
        self._allocations[ptr] = device
        self._managed.add(ptr)
        return ptr

    def mem_free(self, ptr: int) -> None:
        """Free device or managed memory once the work already enqueued in its
        owner's context is done (what ``cuMemFree`` waits for).

        Device memory from :meth:`mem_alloc` waits with ``cuCtxSynchronize``
        and then goes back with ``cuMemFreeAsync`` on the free stream:
        ``cuMemFree`` waits while it holds a lock of the driver's, so every
        other thread's next driver call waits too (run EI, on an H100: another
        thread's ``cuEventRecord`` waited 179 ms of a 200 ms kernel), while a
        synchronize holds nothing up (run EL: records at most 44 us).
        Managed or foreign memory, or a device whose driver refuses
        ``cuMemFreeAsync``, is freed with ``cuMemFree``, after a synchronize
        all the same (see :meth:`_free_blocking`).
        """
        device = self._allocations.get(ptr)
        if device is not None and ptr not in self._managed:
            self._synchronize(device)
            if self._free_ordered(ptr, device):
                return
        self._free_blocking(ptr)

    def mem_free_async(self, ptr: int) -> None:
        """``cuMemFreeAsync`` of device memory from :meth:`mem_alloc` on a stream
        of its own (non-blocking, empty but for frees), then a synchronize of
        that stream, without which the driver keeps the memory
        (:func:`_free_and_release`): nothing waits for the device's other
        work (run EI: the loop thread's records were as fast as with no free;
        run ET: the synchronize did not wait for a running kernel).

        The caller guarantees that nothing uses ``ptr`` any more. Managed or
        foreign memory, or a device whose driver refuses ``cuMemFreeAsync``,
        is freed with ``cuMemFree``.
        """
        device = self._allocations.get(ptr)
        if device is None or ptr in self._managed or not self._free_ordered(ptr, device):
            self._free_blocking(ptr)

    def _free_ordered(self, ptr: int, device: int) -> bool:
        """``cuMemFreeAsync`` of ``ptr`` on ``device``'s free stream; False where
        the driver refuses it (nothing was freed)."""
        stream = self._free_stream(device)
        if stream is None:
            return False
        freed, synced = self._on_device(device, _free_and_release, ptr, stream)
        if freed == _NOT_SUPPORTED:
            self._free_streams[device] = None
            return False
        _check("cuMemFreeAsync", (freed,))
        self._allocations.pop(ptr, None)  # freed: whatever the synchronize says
        _check("cuStreamSynchronize", (synced,))
        return True

    def _free_blocking(self, ptr: int) -> None:
        """``cuMemFree`` in the owner's context (found by asking the driver for
        foreign memory), after ``cuCtxSynchronize`` there.

        ``cuMemFree`` waits for the device's work while it holds a lock of the
        driver's; waiting first without it leaves the lock held for the free
        itself only (run EL, ``cuMemFreeHost`` of 64 MiB: other threads'
        records held 11 ms after a synchronize, the rest of a 200 ms kernel
        without one).
        """
        self._managed.discard(ptr)
        device = self._allocations.pop(ptr, None)
        if device is None:
            info = self.pointer_info(ptr)  # a foreign allocation: find its device
            device = info.device
        if device is None:
            result = self._restoring(self._enter_host(), driver.cuMemFree, ptr)
        else:
            self._synchronize(device)
            result = self._on_device(device, driver.cuMemFree, ptr)
        _check("cuMemFree", result)

    def _synchronize(self, device: int) -> None:
        """``cuCtxSynchronize`` in ``device``'s context: a wait for the device
        that, unlike a free's, holds up no other thread (run EL)."""
        _check("cuCtxSynchronize", self._on_device(device, driver.cuCtxSynchronize))

    def _synchronize_all(self) -> None:
        """:meth:`_synchronize` every context, before freeing or unlocking host
        memory any device may use. A device that failed (a sticky error) runs
        nothing more, so there is nothing to wait for: it is skipped, and the
        memory is still freed."""
        for device in sorted(self._contexts):
            (err,) = self._on_device(device, driver.cuCtxSynchronize)
            if err:
                _logger.debug("device %d not synchronized before a host free: %s", device, err)

    def _on_device(self, device: int, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` in ``device``'s context, then the caller's again."""
        return self._restoring(self._enter_device(device)[1], call, *args)

    def _free_stream(self, device: int) -> Any:
        """The stream :meth:`mem_free_async` frees on for ``device`` (made on first use)."""
        try:
            return self._free_streams[device]
        except KeyError:
            pass
        with self._free_lock:
            if device not in self._free_streams:
                result = self._on_device(device, driver.cuStreamCreate, _NON_BLOCKING)
                self._free_streams[device] = _check("cuStreamCreate", result)
            return self._free_streams[device]

    def _close_free_streams(self) -> None:
        """Wait for the queued frees and destroy the free streams (before the
        contexts are released: another library may keep them alive)."""
        with self._free_lock:
            streams, self._free_streams = self._free_streams, {}
        for device, stream in streams.items():
            if stream is None:
                continue
            try:
                self._on_device(device, _drain_and_destroy, stream)
            except Exception:  # the driver may already be torn down at exit
                _logger.debug("destroying device %d's free stream failed", device, exc_info=True)

    def close(self) -> None:
        """Destroy the free streams and the host pool, then release the
        contexts (see :class:`DriverBase`)."""
        try:
            self._close_free_streams()
            with self._free_lock:
                pool, self._host_pool_handle = self._host_pool_handle, None
            if pool:
                try:
                    # Memory still allocated from it goes when the last is freed.
                    driver.cuMemPoolDestroy(pool)
                except Exception:  # the driver may already be torn down at exit
                    _logger.debug("destroying the host memory pool failed", exc_info=True)
        finally:
            super().close()

    def host_alloc(self, nbytes: int) -> int:
        """Pinned host memory, portable and mapped on every device.

        From the backend's host memory pool (a CUDA memory pool located on
        the host, every device given read/write access) where the driver has
        one, so that its frees hold up no other thread's driver calls
        (``cuMemFreeAsync``); else, or with ``GPUAIO_HOST_POOL=0``,
        ``cuMemHostAlloc(PORTABLE | DEVICEMAP)``. Words that streams write or
        wait on come from :meth:`host_alloc_mapped`.
        """
        self._check_size(nbytes)
        pool = self._host_pool()
        if pool is None:
            return self.host_alloc_mapped(nbytes)
        device = self._host_pool_device
        stream = self._free_stream(device)
        if stream is None:
            return self.host_alloc_mapped(nbytes)
        result = self._on_device(device, _alloc_from_pool, nbytes, pool, stream)
        ptr = int(_check("cuMemAllocFromPoolAsync", result))
        self._pooled_host[ptr] = device
        return ptr

    def host_alloc_mapped(self, nbytes: int) -> int:
        """``cuMemHostAlloc(PORTABLE | DEVICEMAP)``: pinned, mapped on every device,
        good for the words of stream memory operations; freed with ``cuMemFreeHost``."""
        self._check_size(nbytes)
        result = self._restoring(
            self._enter_host(), driver.cuMemHostAlloc, nbytes, _HOST_ALLOC_FLAGS
        )
        return int(_check("cuMemHostAlloc", result))

    def host_free(self, ptr: int) -> None:
        """Free memory from :meth:`host_alloc` or :meth:`host_alloc_mapped` once
        the work already enqueued in the backend's contexts is done (what
        ``cuMemFreeHost`` waits for: another library's copy may still read it).

        Host pool memory waits with ``cuCtxSynchronize`` in each context and
        then goes back as :meth:`host_free_async` gives it back.
        ``cuMemFreeHost`` waits while it holds every other thread's driver
        calls, and holds them for the free itself too (run EI: 186 ms of a
        200 ms kernel; run EL: 11 ms for 64 MiB on an idle device); the
        synchronizes and the pool's free hold nothing up (run EL).
        """
        if ptr in self._pooled_host:
            self._synchronize_all()
        self._free_host(ptr)  # not self.host_free_async: wrappers on the instance see one free

    def host_free_async(self, ptr: int) -> None:
        """Free memory from :meth:`host_alloc` or :meth:`host_alloc_mapped` that
        nothing uses any more, without waiting for the device.

        Host pool memory goes back with ``cuMemFreeAsync`` on an idle stream
        and that stream's synchronize (:func:`_free_and_release`; without it
        the pool keeps the memory), which hold up no other thread (run EL, on
        an H100: another thread's ``cuEventRecord`` took at most 78 us while
        64 MiB was freed during a 200 ms kernel). Other pinned memory is freed
        with ``cuMemFreeHost`` after a synchronize in each context, as
        :meth:`_free_blocking` frees.
        """
        self._free_host(ptr)

    def _free_host(self, ptr: int) -> None:
        device = self._pooled_host.pop(ptr, None)
        if device is not None:
            stream = self._free_stream(device)
            if stream is None:
                # cuMemFreeAsync refused there for device memory (a pool's is
                # still freed): on the legacy stream, which is not waited
                # for, as that would wait for every blocking stream's work.
                result = self._on_device(device, driver.cuMemFreeAsync, ptr, driver.CUstream(0))
                _check("cuMemFreeAsync", result)
                return
            freed, synced = self._on_device(device, _free_and_release, ptr, stream)
            _check("cuMemFreeAsync", (freed,))
            _check("cuStreamSynchronize", (synced,))
            return
        self._synchronize_all()
        result = self._restoring(self._enter_host(), driver.cuMemFreeHost, ptr)
        _check("cuMemFreeHost", result)

    def _host_pool(self) -> Any:
        """The host memory pool (made on first use), or ``None`` where there is none."""
        pool = self._host_pool_handle
        if pool is not None:
            return pool or None
        with self._free_lock:
            if self._host_pool_handle is None:
                try:
                    self._host_pool_handle = self._make_host_pool() or False
                except Exception:  # bindings without the calls, say: cuMemHostAlloc serves
                    _logger.debug("no host memory pool", exc_info=True)
                    self._host_pool_handle = False
            return self._host_pool_handle or None

    def _make_host_pool(self) -> Any:
        # On unless turned off: the whole GPU suite passed with it (run EN,
        # an H100), and its frees hold up no other thread (run EL).
        if os.environ.get("GPUAIO_HOST_POOL", "1") == "0":
            return None
        props = driver.CUmemPoolProps()
        props.allocType = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        props.handleTypes = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        where = driver.CUmemLocation()
        where.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST
        where.id = 0
        props.location = where
        access = []
        for device in range(self._count):
            desc = driver.CUmemAccessDesc()
            loc = driver.CUmemLocation()
            loc.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            loc.id = device
            desc.location = loc
            desc.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            access.append(desc)
        contexts = self._contexts
        self._host_pool_device = min(contexts) if contexts else 0
        _, prev = self._enter_device(self._host_pool_device)
        try:
            err, pool = driver.cuMemPoolCreate(props)
            if err:
                # An older driver, or a system without host memory pools.
                _logger.debug("no host memory pool (cuMemPoolCreate: %s)", err)
                return None
            (err,) = driver.cuMemPoolSetAccess(pool, access, len(access))
            if err:
                _logger.debug("no host memory pool (cuMemPoolSetAccess: %s)", err)
                driver.cuMemPoolDestroy(pool)
                return None
            return pool
        finally:
            if prev is not None:
                self._leave(prev)

    def host_register(self, ptr: int, nbytes: int) -> None:
        """``cuMemHostRegister(PORTABLE | DEVICEMAP)``: page-lock and map a host range."""
        self._check_size(nbytes)
        result = self._restoring(
            self._enter_host(), driver.cuMemHostRegister, ptr, nbytes, _HOST_REGISTER_FLAGS
        )
        _check("cuMemHostRegister", result)

    def host_unregister(self, ptr: int) -> None:
        """``cuMemHostUnregister`` of a range registered by :meth:`host_register`,
        after a synchronize in each context: it waits for the device's work
        holding every other thread's driver calls, as ``cuMemFree`` does (run
        EI: 180 ms of a 200 ms kernel), and then holds them only for itself."""
        self._synchronize_all()
        result = self._restoring(self._enter_host(), driver.cuMemHostUnregister, ptr)
        _check("cuMemHostUnregister", result)

    def host_device_pointer(self, ptr: int) -> int:
        """``cuMemHostGetDevicePointer``: the device address of mapped pinned memory."""
        result = self._restoring(self._enter_host(), driver.cuMemHostGetDevicePointer, ptr, 0)
        return int(_check("cuMemHostGetDevicePointer", result))

    def pointer_info(self, ptr: int) -> PointerInfo:
        """Classify ``ptr`` with one ``cuPointerGetAttributes`` call.

        Unknown addresses (``CUDA_ERROR_INVALID_VALUE`` or no memory type) are
        pageable; host memory the driver knows (allocated pinned or registered)
        is pinned; device memory is managed when the driver says so.
        """
        prev = self._enter_host(any_context=True)
        try:
            err, values = driver.cuPointerGetAttributes(3, _POINTER_ATTRIBUTES, ptr)
        finally:
            if prev is not None:
                self._leave(prev)
        if err:
            if err == _INVALID_VALUE:
                return PointerInfo(MemoryKind.PAGEABLE, None)
            raise _cuda_error("cuPointerGetAttributes", err)
        memory_type, is_managed, ordinal = int(values[0]), bool(values[1]), int(values[2])
        device = ordinal if 0 <= ordinal < self._count else None
        if is_managed or memory_type == _MEMORYTYPE_UNIFIED:
            return PointerInfo(MemoryKind.MANAGED, device)
        if memory_type == _MEMORYTYPE_DEVICE:
            return PointerInfo(MemoryKind.DEVICE, device)
        if memory_type == _MEMORYTYPE_HOST:
            return PointerInfo(MemoryKind.PINNED, None)
        return PointerInfo(MemoryKind.PAGEABLE, None)
