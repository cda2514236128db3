"""Simulated devices and contexts: properties, peers, current contexts, created contexts.

Contexts are modelled per thread, as the driver keeps them (``SimCore``
binds them for each call); :meth:`SimDevices.context_create` and
:meth:`SimDevices.context_destroy` let tests make and tear down others.
"""

from __future__ import annotations

from typing import Any

from ..._core.errors import InvalidArgumentError
from .._base import DeviceProperties, MemoryKind
from ._config import _INVALID_CONTEXT, _error
from ._core import SimCore, _in_context
from ._state import SimContext, SimEvent, SimStream


class SimDevices(SimCore):
    """The device and context calls of the simulated backend."""

    # -- devices -------------------------------------------------------
    def device_count(self) -> int:
        """How many simulated devices (``SimConfig.devices``)."""
        return len(self._devices)

    def device_properties(self, device: int) -> DeviceProperties:
        """Simulated properties, shaped like an H100's."""
        with self._lock:
            self._device_locked(device, "cuDeviceGetAttribute")
        return DeviceProperties(
            ordinal=device,
            name="gpuaio simulated device",
            total_memory=self.config.device_memory,
            compute_capability=(9, 0),
            multiprocessors=132,
            pci_bus_id=f"0000:00:{device:02x}.0",
            can_map_host_memory=True,
            stream_mem_ops=True,
        )

    def driver_version(self) -> str:
        """Always ``"sim"``."""
        return "sim"

    def can_access_peer(self, device: int, peer: int) -> bool:
        """Every pair of distinct simulated devices can."""
        with self._lock:
            self._device_locked(device, "cuDeviceCanAccessPeer")
            self._device_locked(peer, "cuDeviceCanAccessPeer")
        return device != peer

    @_in_context("device", "device")
    def enable_peer_access(self, device: int, peer: int) -> None:
        """Validates the ordinals; peers can always reach each other here."""
        with self._lock:
            self._device_locked(device, "cuCtxEnablePeerAccess")
            self._device_locked(peer, "cuCtxEnablePeerAccess")
            self._on_device_locked("cuCtxEnablePeerAccess", device)

    # -- contexts ------------------------------------------------------
    def current_context(self) -> int:
        """The handle of the calling thread's current context (0: none)."""
        ctx = self._thread.ctx
        return 0 if ctx is None else ctx.handle

    def set_current_context(self, ctx: int) -> None:
        """Make the context with handle ``ctx`` current in the calling thread (0: none)."""
        if ctx == 0:
            self._thread.ctx = None
            return
        with self._lock:
            found = self._contexts.get(ctx)
            if found is None or found.destroyed:
                raise _error("cuCtxSetCurrent", _INVALID_CONTEXT, f"no live sim context {ctx!r}")
        self._thread.ctx = found

    def primary_context(self, device: int) -> int:
        """The handle of ``device``'s primary context."""
        with self._lock:
            self._device_locked(device, "cuDevicePrimaryCtxRetain")
        return self._primary[device].handle

    # -- created contexts (test hooks) --------------------------------
    def context_create(self, device: int = 0) -> int:
        """A new (non-primary) context on ``device``, made current in the calling thread.

        What ``cuCtxCreate`` does, and what a library with its own context
        (PyCUDA's ``make_context``) leaves current. Returns its handle.
        """
        with self._lock:
            self._device_locked(device, "cuCtxCreate")
            ctx = SimContext(device, primary=False)
            self._contexts[ctx.handle] = ctx
        self._thread.ctx = ctx
        return ctx.handle

    def context_destroy(self, ctx: int) -> None:
        """Destroy a context from :meth:`context_create`, and everything it owns.

        Its memory is unmapped (a later use is ``CUDA_ERROR_INVALID_VALUE``),
        its streams and events are destroyed, their queued work dropped. If it
        is current in the calling thread, no context is current there after.
        """
        call = "cuCtxDestroy"
        with self._lock:
            found = self._contexts.get(ctx)
            if found is None or found.destroyed or found.primary:
                raise _error(call, _INVALID_CONTEXT, f"{ctx!r} is no live created sim context")
            found.destroyed = True
            for region in self._regions.values():
                # Kept in the table, its backing array alive: the address stays
                # reserved, so a use finds it dead instead of reading freed memory.
                if region.ctx is found and region.kind is MemoryKind.DEVICE:
                    assert region.device is not None
                    self._devices[region.device].used -= region.end - region.start
            for dev in self._devices:
                for stream in dev.streams:
                    if stream.ctx is found and not stream.destroyed:
                        stream.destroyed = True
                        stream.retired += len(stream.queue)
                        stream.queue.clear()
                        stream.load = 0
                        self._handles.pop(id(stream), None)
                        stream.cond.notify()
            self._changed.notify_all()
        if self._thread.ctx is found:
            self._thread.ctx = None

    def context_of(self, obj: Any) -> int:
        """The handle of the context that owns ``obj`` (0: none known).

        ``obj`` is a pointer (an ``int``), a sim stream or event, or anything
        with a ``ptr`` (gpuaio buffers) or ``_native`` (gpuaio streams, events).
        """
        obj = getattr(obj, "_native", obj)
        ptr = getattr(obj, "ptr", obj)
        if isinstance(obj, (SimStream, SimEvent)):
            owner = obj.ctx
        elif isinstance(ptr, int):
            with self._lock:
                region = self._region_locked(ptr)
            owner = None if region is None else region.ctx
        else:
            raise InvalidArgumentError(f"context_of: {obj!r} is no pointer, stream or event")
        return 0 if owner is None else owner.handle
