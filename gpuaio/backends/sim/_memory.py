"""Simulated memory: device, managed and pinned allocations, host registration, pointers.

Device memory is host memory (so a pointer is a real address), charged to
the device's ``SimConfig.device_memory`` budget; every allocation or
registration is a region in ``SimCore``'s table, which classifies pointers.
"""

from __future__ import annotations

import bisect
import ctypes

import numpy as np
import numpy.typing as npt

from .._base import MemoryKind, PointerInfo
from ._config import (
    _ALIGN,
    _ALREADY_REGISTERED,
    _DEVICE_SIDE,
    _INVALID_VALUE,
    _NOT_REGISTERED,
    _OUT_OF_MEMORY,
    _error,
)
from ._core import SimCore, _in_context
from ._state import _dead, _Region


def _view(ptr: int, nbytes: int) -> npt.NDArray[np.uint8]:
    """A writable uint8 view of ``nbytes`` at address ``ptr``."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)), dtype=np.uint8)


class SimMemory(SimCore):
    """The memory calls of the simulated backend."""

    def _alloc(self, call: str, device: int | None, nbytes: int, kind: MemoryKind) -> int:
        with self._lock:
            dev = self._check_locked(call, device)
            if device is None:
                owner = self._current_locked(call)
            else:
                owner = self._on_device_locked(call, device)
            if not isinstance(nbytes, int) or nbytes <= 0:
                raise _error(call, _INVALID_VALUE, f"cannot allocate {nbytes!r} bytes")
            budgeted = dev is not None and kind is MemoryKind.DEVICE
            if dev is not None and budgeted:
                if dev.used + nbytes > self.config.device_memory:
                    free = self.config.device_memory - dev.used
                    raise _error(call, _OUT_OF_MEMORY, f"{nbytes} bytes asked, {free} free")
                dev.used += nbytes
        try:
            base = np.zeros(nbytes + _ALIGN, dtype=np.uint8)  # calloc: big blocks stay lazy
        except MemoryError:
            with self._lock:
                if dev is not None and budgeted:
                    dev.used -= nbytes
            raise _error(call, _OUT_OF_MEMORY, f"host could not back {nbytes} bytes") from None
        offset = -base.ctypes.data % _ALIGN
        array = base[offset : offset + nbytes]
        if kind is MemoryKind.PINNED:
            # Page-locked memory is resident: fault it in now, as pinning does,
            # rather than on the first copy (page faults stall every thread).
            array.fill(0)
        ptr = int(array.ctypes.data)
        with self._lock:
            self._add_region_locked(_Region(ptr, ptr + nbytes, kind, device, array, owner))
        return ptr

    @_in_context("device", "device")
    def mem_alloc(self, device: int, nbytes: int) -> int:
        """Device memory (host-backed, 256-byte aligned), charged to the device budget."""
        return self._alloc("cuMemAlloc", device, nbytes, MemoryKind.DEVICE)

    @_in_context("device", "device")
    def mem_alloc_managed(self, device: int, nbytes: int) -> int:
        """Managed memory; it can oversubscribe, so it is not charged to the budget."""
        return self._alloc("cuMemAllocManaged", device, nbytes, MemoryKind.MANAGED)

    @_in_context("owner", "ptr")
    def mem_free(self, ptr: int) -> None:
        """Free device/managed memory once work enqueued on its device has finished.

        Like ``cuMemFree`` on a faulted context, this raises the sticky error
        and keeps the memory.
        """
        self._free_device_side("cuMemFree", ptr, wait=True)

    @_in_context("owner", "ptr")
    def mem_free_async(self, ptr: int) -> None:
        """Free device memory at once, waiting for nothing (``cuMemFreeAsync``
        on an idle stream); managed memory is refused, as CUDA's pools hold none.

        Stricter than CUDA, which would let queued work use freed memory:
        memory a queued or running copy, memset or launch uses is refused
        (``CUDA_ERROR_INVALID_VALUE``) and stays allocated.
        """
        self._free_device_side("cuMemFreeAsync", ptr, wait=False)

    def _free_device_side(self, call: str, ptr: int, *, wait: bool) -> None:
        kinds = _DEVICE_SIDE if wait else (MemoryKind.DEVICE,)
        with self._lock:
            self._check_locked(call, None)
            region = self._regions.get(ptr)
            if region is None or region.device is None or region.kind not in kinds:
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not a device allocation")
            if _dead(region.ctx):
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was freed with {region.ctx!r}")
            self._on_device_locked(call, region.device)
            dev = self._devices[region.device]
            if wait:
                targets = [(s, s.submitted) for s in dev.streams]
                self._wait_locked(
                    call, dev, lambda: self._closed or all(s.retired >= n for s, n in targets)
                )
            elif dev.fault is not None:  # a faulted context fails every call, this one too
                raise self._fault_error(call, dev)
            else:
                self._refuse_in_use_locked(call, region)
            if self._regions.get(ptr) is not region:  # freed meanwhile by another thread
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was already freed")
            self._remove_region_locked(region)
            if region.kind is MemoryKind.DEVICE:
                dev.used -= region.end - region.start

    @_in_context("any")
    def host_alloc(self, nbytes: int) -> int:
        """Pinned, portable, mapped host memory (its device address is ``ptr`` itself)."""
        return self._alloc("cuMemHostAlloc", None, nbytes, MemoryKind.PINNED)

    @_in_context("any")
    def host_free(self, ptr: int) -> None:
        """Free pinned memory after all work already enqueued on any stream has finished."""
        self._free_pinned("cuMemFreeHost", ptr, wait=True)

    @_in_context("any")
    def host_free_async(self, ptr: int) -> None:
        """Free pinned memory at once, waiting for nothing (as the CUDA backend
        gives host pool memory back with ``cuMemFreeAsync``).

        Stricter than CUDA, as :meth:`mem_free_async` is: memory that queued
        or running work uses is refused and stays allocated.
        """
        self._free_pinned("cuMemFreeAsync", ptr, wait=False)

    def _free_pinned(self, call: str, ptr: int, *, wait: bool) -> None:
        with self._lock:
            self._check_locked(call, None)
            self._current_locked(call)
            region = self._regions.get(ptr)
            if region is None or region.kind is not MemoryKind.PINNED or region.array is None:
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} is not from cuMemHostAlloc")
            if _dead(region.ctx):
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was freed with {region.ctx!r}")
            if wait:
                targets = [(s, s.submitted) for d in self._devices for s in d.streams]
                self._changed.wait_for(
                    lambda: self._closed or all(s.retired >= n for s, n in targets)
                )
            else:
                self._refuse_in_use_locked(call, region)
            if self._regions.get(ptr) is not region:
                raise _error(call, _INVALID_VALUE, f"{ptr:#x} was already freed")
            self._remove_region_locked(region)

    def _refuse_in_use_locked(self, call: str, region: _Region) -> None:
        user = self._user_locked(region.start, region.end)
        if user is not None:
            op, stream = user
            raise _error(
                call,
                _INVALID_VALUE,
                f"{region.start:#x} is still used by {op.call} on {stream!r}: "
                "freeing it without waiting for the device would be a use after free",
            )

    @_in_context("any")
    def host_register(self, ptr: int, nbytes: int) -> None:
        """Mark ``[ptr, ptr + nbytes)`` pinned; overlapping pinned memory gives 712."""
        call = "cuMemHostRegister"
        with self._lock:
            self._check_locked(call, None)
            owner = self._current_locked(call)
            if ptr == 0 or not isinstance(nbytes, int) or nbytes <= 0:
                raise _error(call, _INVALID_VALUE, f"bad range {ptr:#x}+{nbytes!r}")
            overlap = self._region_locked(ptr)
            i = bisect.bisect_left(self._starts, ptr)
            if overlap is None and i < len(self._starts) and self._starts[i] < ptr + nbytes:
                overlap = self._regions[self._starts[i]]
            if overlap is not None:
                code = _ALREADY_REGISTERED if overlap.kind is MemoryKind.PINNED else _INVALID_VALUE
                raise _error(call, code, f"{ptr:#x}+{nbytes} overlaps {overlap.kind.value} memory")
            self._add_region_locked(
                _Region(ptr, ptr + nbytes, MemoryKind.PINNED, None, None, owner)
            )

    @_in_context("any")
    def host_unregister(self, ptr: int) -> None:
        """Undo :meth:`host_register` of the range starting at ``ptr`` (else 713, as CUDA)."""
        call = "cuMemHostUnregister"
        with self._lock:
            self._check_locked(call, None)
            self._current_locked(call)
            region = self._regions.get(ptr)
            if region is None or region.kind is not MemoryKind.PINNED or region.array is not None:
                raise _error(call, _NOT_REGISTERED, f"{ptr:#x} is not a registered range")
            self._remove_region_locked(region)

    @_in_context("any")
    def host_device_pointer(self, ptr: int) -> int:
        """Pinned memory is mapped at the same address; anything else is invalid."""
        with self._lock:
            self._current_locked("cuMemHostGetDevicePointer")
            region = self._region_locked(ptr)
        if region is None or region.kind is not MemoryKind.PINNED or _dead(region.ctx):
            raise _error("cuMemHostGetDevicePointer", _INVALID_VALUE, f"{ptr:#x} is not pinned")
        return ptr

    @_in_context("some")
    def pointer_info(self, ptr: int) -> PointerInfo:
        """Classify ``ptr`` by the sim's allocation table; unknown memory is pageable.

        Freed memory answers pageable here. On CUDA the attributes of memory
        freed with ``cuMemFreeAsync`` (every device free, and host-pool frees,
        since round forty) are undefined: an H100 went on answering "device"
        for seconds (run ER). The sim cannot refuse such a query, as its
        device memory is host memory that a user's array may reuse; gpuaio
        classifies only addresses it was handed, and its tests watch frees at
        the backend's calls instead."""
        with self._lock:
            self._current_locked("cuPointerGetAttributes")
            region = self._region_locked(ptr)
        if region is None or _dead(region.ctx):  # memory of a destroyed context is unmapped
            return PointerInfo(MemoryKind.PAGEABLE, None)
        return PointerInfo(region.kind, region.device)
