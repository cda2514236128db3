"""Memory: device, managed and pinned allocations, host registration, pointer kinds.

Device and managed memory is allocated in its device's primary context and
freed in its owner's. Pinned memory is portable and mapped on every device, so
its calls run in whichever of the backend's contexts is current (never in a
foreign one: the memory would go when that context is destroyed).
:meth:`MemoryCalls.pointer_info` classifies an address with one
``cuPointerGetAttributes`` call, in any current context.
"""

from __future__ import annotations

import cuda.bindings.driver as driver

from ..._core.errors import InvalidArgumentError
from .._base import MemoryKind, PointerInfo
from ._driver import _INVALID_VALUE, DriverBase, _check, _cuda_error

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


class MemoryCalls(DriverBase):
    """The memory calls of :class:`~gpuaio.backends.cuda.CudaBackend`."""

    def __init__(self) -> None:
        super().__init__()
        self._allocations: dict[int, int] = {}  # device/managed pointer -> device

    # -- memory --------------------------------------------------------
    @staticmethod
    def _check_size(nbytes: int) -> None:
        if nbytes <= 0:
            raise InvalidArgumentError(f"allocation size must be positive, got {nbytes}")

    def mem_alloc(self, device: int, nbytes: int) -> int:
        """``cuMemAlloc`` on ``device``; returns the device address."""
        self._check_size(nbytes)
        _, prev = self._enter_device(device)
        try:
            ptr = int(_check("cuMemAlloc", driver.cuMemAlloc(nbytes)))
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
        return ptr

    def mem_free(self, ptr: int) -> None:
        """``cuMemFree`` of device or managed memory, in its owner's context."""
        device = self._allocations.pop(ptr, None)
        if device is None:
            info = self.pointer_info(ptr)  # a foreign allocation: find its device
            device = info.device
        prev = self._enter_host() if device is None else self._enter_device(device)[1]
        result = self._restoring(prev, driver.cuMemFree, ptr)
        _check("cuMemFree", result)

    def host_alloc(self, nbytes: int) -> int:
        """``cuMemHostAlloc(PORTABLE | DEVICEMAP)``: pinned, mapped on every device."""
        self._check_size(nbytes)
        result = self._restoring(
            self._enter_host(), driver.cuMemHostAlloc, nbytes, _HOST_ALLOC_FLAGS
        )
        return int(_check("cuMemHostAlloc", result))

    def host_free(self, ptr: int) -> None:
        """``cuMemFreeHost`` of memory from :meth:`host_alloc`."""
        result = self._restoring(self._enter_host(), driver.cuMemFreeHost, ptr)
        _check("cuMemFreeHost", result)

    def host_register(self, ptr: int, nbytes: int) -> None:
        """``cuMemHostRegister(PORTABLE | DEVICEMAP)``: page-lock and map a host range."""
        self._check_size(nbytes)
        result = self._restoring(
            self._enter_host(), driver.cuMemHostRegister, ptr, nbytes, _HOST_REGISTER_FLAGS
        )
        _check("cuMemHostRegister", result)

    def host_unregister(self, ptr: int) -> None:
        """``cuMemHostUnregister`` of a range registered by :meth:`host_register`."""
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
