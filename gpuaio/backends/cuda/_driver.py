"""The driver itself: the bindings, errors, devices, and the context each call runs in.

:class:`DriverBase` is what the other parts of the backend build on. It
initializes the driver, knows the devices and their properties, retains each
device's primary context, and makes the right context current around every
driver call (``_enter*``, then ``_leave`` or ``_restoring``; the package
docstring says why each call reads the thread's current context). The helpers
here turn every ``CUresult`` into a gpuaio error.

Every module of the package calls the driver as ``driver.cuX(...)`` on the one
``cuda.bindings.driver`` module object, so a stand-in for the driver patches
that module's functions (as ``tests/test_context.py`` does). The few functions
taken at import (the memset table, the host-function trampoline) do not follow
such a patch.

cuda-bindings 12.x (>= 12.8) and 13.x: every driver call the package makes has
the same Python signature in both (checked against 12.8.0, 12.9 and 13.5), and
the stream memory operations reach the same v2 entry points. Calls whose
signature changed in 13 (``cuCtxCreate``, ``cuMemPrefetchAsync``,
``cuMemAdvise``, ...) are not used here; a new use must handle both.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import cuda.bindings
import cuda.bindings.driver as driver

from ..._core.errors import CudaError, NoDeviceError, make_cuda_error
from .._base import Backend, DeviceProperties, keeps_context
from ._fast import FastCalls
from ._fast import load as load_fast_calls

_logger = logging.getLogger("gpuaio")

_CUresult = driver.CUresult
_NOT_READY = _CUresult.CUDA_ERROR_NOT_READY
_INVALID_VALUE = _CUresult.CUDA_ERROR_INVALID_VALUE
_PEER_ALREADY_ENABLED = _CUresult.CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED

_ATTR = driver.CUdevice_attribute


def _error_text(err: Any) -> tuple[str, str]:
    """``(name, description)`` of a ``CUresult``; never raises."""
    name = getattr(err, "name", None) or f"CUresult({int(err)})"
    detail = ""
    try:
        status, raw = driver.cuGetErrorName(err)
        if not status and raw:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
        status, raw = driver.cuGetErrorString(err)
        if not status and raw:
            detail = raw.decode() if isinstance(raw, bytes) else str(raw)
    except Exception:  # naming an error must never mask it
        pass
    return name, detail


def _cuda_error(call: str, err: Any) -> CudaError:
    """The gpuaio exception for a failed driver call.

    ``err`` is a ``CUresult``, or its plain int (the C calls of ``_fast``): one
    this cuda.bindings does not know (a newer driver's) is named by number.
    """
    if not isinstance(err, _CUresult):
        with contextlib.suppress(ValueError):
            err = _CUresult(int(err))
    name, detail = _error_text(err)
    return make_cuda_error(call, int(err), name, detail)


def _uint32_error(call: str, value: int) -> CudaError:
    """What the driver would say about a value that is no uint32 (the sim says the same)."""
    return make_cuda_error(
        call, int(_INVALID_VALUE), "CUDA_ERROR_INVALID_VALUE", f"{value!r} is not a uint32"
    )


def _check(call: str, result: tuple[Any, ...]) -> Any:
    """Raise for a failed ``cuda.bindings`` call; return its payload.

    ``cuda.bindings`` returns ``(CUresult, *outputs)``. The payload is
    ``None`` for no output, the output itself for one, a tuple for several.
    ``CUresult`` is an ``int`` subclass, so ``CUDA_SUCCESS`` is falsy.
    """
    err = result[0]
    if err:
        raise _cuda_error(call, err)
    n = len(result)
    if n == 2:
        return result[1]
    if n == 1:
        return None
    return result[1:]


def _decode_c_string(raw: Any) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).split(b"\x00", 1)[0].decode(errors="replace")
    return str(raw)


# The oldest driver of each CUDA major version, as nvidia-smi prints it.
_FIRST_DRIVER = {12: "R525 (525.60.13)", 13: "R580 (580.65.06)"}


def _check_driver_supports_bindings() -> None:
    """Refuse cuda-bindings newer than the driver, naming the fix.

    cuda-bindings 13.x calls entry points that a driver of the CUDA 12 era
    lacks; left alone, that surfaces later as an obscure missing-symbol or
    CUDA_ERROR error. ``cuDriverGetVersion`` works before ``cuInit``.
    """
    bindings = str(cuda.bindings.__version__)
    needs = int(bindings.split(".")[0])
    err, version = driver.cuDriverGetVersion()
    if err:  # reported by cuInit, which follows
        return
    major, minor = int(version) // 1000, (int(version) % 1000) // 10
    if major < needs:
        first = _FIRST_DRIVER.get(needs, f"one for CUDA {needs}")
        raise NoDeviceError(
            f"cuda-bindings {bindings} needs a driver that supports CUDA {needs} ({first} or "
            f"later), but this driver supports CUDA {major}.{minor}: install "
            f"'gpuaio[cu{major}]' (cuda-bindings {major}.x), or a newer driver"
        )


class _ThreadState(threading.local):
    """Per thread: whether the backend leaves the context it binds current there."""

    def __init__(self) -> None:  # runs in each thread, on its first use
        self.keep: bool = keeps_context(threading.current_thread())


class DriverBase(Backend):
    """Devices, primary contexts and lifecycle: the part every other part builds on.

    The parts in the sibling modules are mixins on this class;
    :class:`~gpuaio.backends.cuda.CudaBackend` puts them together.
    """

    def __init__(self) -> None:
        try:
            _check_driver_supports_bindings()
            result = driver.cuInit(0)
        except NoDeviceError:
            raise
        except Exception as exc:  # the driver library itself could not be loaded
            raise NoDeviceError(f"the CUDA driver library could not be loaded: {exc}") from exc
        if result[0]:
            name, detail = _error_text(result[0])
            raise NoDeviceError(f"cuInit failed: {name} ({int(result[0])}): {detail}")
        err, count = driver.cuDeviceGetCount()
        if err:
            name, detail = _error_text(err)
            raise NoDeviceError(f"cuDeviceGetCount failed: {name} ({int(err)}): {detail}")
        if count <= 0:
            raise NoDeviceError("the CUDA driver reports no devices")
        self._count: int = int(count)
        self._devices: list[Any] = [
            _check("cuDeviceGet", driver.cuDeviceGet(i)) for i in range(self._count)
        ]
        version = int(_check("cuDriverGetVersion", driver.cuDriverGetVersion()))
        self._driver_version_int = version
        self._driver_version = f"{version // 1000}.{(version % 1000) // 10}"
        self._lock = threading.Lock()
        self._contexts: dict[int, Any] = {}
        self._ctx_addrs: dict[int, int] = {}  # device -> address of its primary context
        self._own_addrs: set[int] = set()  # the addresses of all of them
        self._tls = _ThreadState()
        # The hot path's driver calls without cuda.bindings' wrappers, where
        # this install built them (None: every call goes through the bindings).
        self._fast: FastCalls | None = load_fast_calls()
        self._properties: dict[int, DeviceProperties] = {}
        self._priority_ranges: dict[int, tuple[int, int]] = {}
        self._peers_enabled: set[tuple[int, int]] = set()

    @property
    def fast_driver_calls(self) -> bool:
        """Whether the hot path's copies, event records and queries call the
        driver directly (``_fast``), not through cuda.bindings."""
        return self._fast is not None

    # -- contexts ------------------------------------------------------
    def _cu_device(self, device: int) -> Any:
        if not 0 <= device < self._count:
            raise NoDeviceError(
                f"CUDA device {device} is not available ({self._count} device(s) present)"
            )
        return self._devices[device]

    def _context(self, device: int) -> Any:
        """The primary context of ``device``, retained on first use."""
        ctx = self._contexts.get(device)
        if ctx is not None:
            return ctx
        with self._lock:
            ctx = self._contexts.get(device)
            if ctx is None:
                cu_device = self._cu_device(device)
                ctx = _check("cuDevicePrimaryCtxRetain", driver.cuDevicePrimaryCtxRetain(cu_device))
                # The addresses first: a thread that finds the context finds them.
                self._ctx_addrs[device] = int(ctx)
                self._own_addrs.add(int(ctx))
                self._contexts[device] = ctx
            return ctx

    @staticmethod
    def _current() -> Any:
        """``cuCtxGetCurrent``: the calling thread's current context (``CUcontext(0)``: none)."""
        err, cur = driver.cuCtxGetCurrent()
        if err:
            raise _cuda_error("cuCtxGetCurrent", err)
        return cur

    def _switch(self, ctx: Any, addr: int, cur: Any, cur_addr: int) -> Any:
        """Make ``ctx`` current in place of ``cur``; return ``cur`` if it must come back.

        ``None`` means it stays: in gpuaio's own threads, and where no context
        was current and ``ctx`` is device 0's primary context (the one the CUDA
        runtime would make current there: torch and CuPy see no change).
        """
        (err,) = driver.cuCtxSetCurrent(ctx)
        if err:
            raise _cuda_error("cuCtxSetCurrent", err)
        if self._tls.keep or (cur_addr == 0 and addr == self._ctx_addrs.get(0)):
            return None
        return cur

    def _enter(self, ctx: Any, addr: int) -> Any:
        """Make ``ctx`` (at ``addr``) current in this thread for one call.

        Returns the context to make current again with :meth:`_leave` once the
        call is done, or ``None`` for nothing to restore. One
        ``cuCtxGetCurrent``; a switch only when another context is current.
        """
        cur = self._current()
        cur_addr = int(cur)
        if cur_addr == addr:
            return None
        return self._switch(ctx, addr, cur, cur_addr)

    def _enter_device(self, device: int) -> tuple[Any, Any]:
        """:meth:`_enter` ``device``'s primary context: ``(ctx, what to restore)``."""
        ctx = self._contexts.get(device)
        if ctx is None:
            ctx = self._context(device)
        addr = self._ctx_addrs.get(device)
        return ctx, self._enter(ctx, int(ctx) if addr is None else addr)

    def _enter_host(self, *, any_context: bool = False) -> Any:
        """:meth:`_enter` for device-agnostic calls: one of our contexts, if none is current.

        Portable pinned memory and unified addressing make these calls
        independent of which device's context is current. Memory must not be
        allocated or registered in a foreign context, though: it would go
        when that context is destroyed. ``any_context``: any current context
        serves (queries).
        """
        cur = self._current()
        cur_addr = int(cur)
        if cur_addr in self._own_addrs or (any_context and cur_addr):
            return None
        contexts = self._contexts
        device = min(contexts) if contexts else 0
        ctx = self._context(device)
        return self._switch(ctx, int(ctx), cur, cur_addr)

    def _restoring(self, prev: Any, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, then make ``prev`` (from an ``_enter*``) current again.

        For the calls off the hot path (allocation, frees, destroys,
        synchronizes). The enqueue and query calls that run on an event loop
        keep the same steps inline: going through here costs about 140 ns more
        per call.
        """
        try:
            return call(*args)
        finally:
            if prev is not None:
                self._leave(prev)

    def _leave(self, prev: Any) -> None:
        """Make ``prev``, current before :meth:`_enter`, current again."""
        (err,) = driver.cuCtxSetCurrent(prev)
        if err:
            # The call itself was done: raising now would misreport it.
            _logger.warning(
                "gpuaio could not make the thread's CUDA context %#x current again: %s",
                int(prev),
                _error_text(err)[0],
            )

    def current_context(self) -> int:
        """``cuCtxGetCurrent``: the address of the calling thread's current context (0: none)."""
        return int(self._current())

    def set_current_context(self, ctx: int) -> None:
        """``cuCtxSetCurrent`` of the context at address ``ctx`` (0: none)."""
        _check("cuCtxSetCurrent", driver.cuCtxSetCurrent(driver.CUcontext(int(ctx))))

    def primary_context(self, device: int) -> int:
        """The address of ``device``'s primary context (retained on first use)."""
        return int(self._context(device))

    # -- devices -------------------------------------------------------
    def device_count(self) -> int:
        """Number of CUDA devices visible to this process."""
        return self._count

    def _attribute(self, device: int, attribute: Any) -> int:
        return int(
            _check(
                "cuDeviceGetAttribute",
                driver.cuDeviceGetAttribute(attribute, self._cu_device(device)),
            )
        )

    def device_properties(self, device: int) -> DeviceProperties:
        """Static properties of ``device`` (cached after the first query).

        ``stream_mem_ops`` is true on CUDA >= 12.0 drivers, where the v2
        stream memory operations that ``cuStreamWriteValue32`` and
        ``cuStreamWaitValue32`` map to are always available, or where the
        legacy ``CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1`` says so.
        """
        props = self._properties.get(device)
        if props is not None:
            return props
        cu_device = self._cu_device(device)
        name = _decode_c_string(_check("cuDeviceGetName", driver.cuDeviceGetName(256, cu_device)))
        total = int(_check("cuDeviceTotalMem", driver.cuDeviceTotalMem(cu_device)))
        bus_id = _decode_c_string(
            _check("cuDeviceGetPCIBusId", driver.cuDeviceGetPCIBusId(64, cu_device))
        )
        memops_v1 = getattr(_ATTR, "CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1", None)
        stream_mem_ops = self._driver_version_int >= 12000
        if not stream_mem_ops and memops_v1 is not None:
            try:
                stream_mem_ops = bool(self._attribute(device, memops_v1))
            except CudaError:
                stream_mem_ops = False
        props = DeviceProperties(
            ordinal=device,
            name=name,
            total_memory=total,
            compute_capability=(
                self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            ),
            multiprocessors=self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            pci_bus_id=bus_id,
            can_map_host_memory=bool(
                self._attribute(device, _ATTR.CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)
            ),
            stream_mem_ops=stream_mem_ops,
        )
        self._properties[device] = props
        return props

    def driver_version(self) -> str:
        """The CUDA version the driver supports, e.g. ``"13.0"``."""
        return self._driver_version

    def can_access_peer(self, device: int, peer: int) -> bool:
        """``cuDeviceCanAccessPeer``: whether ``device`` can map ``peer``'s memory.

        As in CUDA, a device is not its own peer (``False`` for ``device == peer``).
        """
        cu_device, cu_peer = self._cu_device(device), self._cu_device(peer)
        if device == peer:
            return False
        return bool(
            _check("cuDeviceCanAccessPeer", driver.cuDeviceCanAccessPeer(cu_device, cu_peer))
        )

    def enable_peer_access(self, device: int, peer: int) -> None:
        """``cuCtxEnablePeerAccess`` from ``device`` to ``peer`` (idempotent; no-op if equal)."""
        self._cu_device(device)
        self._cu_device(peer)
        if device == peer or (device, peer) in self._peers_enabled:
            return
        peer_ctx = self._context(peer)
        _, prev = self._enter_device(device)
        try:
            (err,) = driver.cuCtxEnablePeerAccess(peer_ctx, 0)
        finally:
            if prev is not None:
                self._leave(prev)
        if err and err != _PEER_ALREADY_ENABLED:
            raise _cuda_error("cuCtxEnablePeerAccess", err)
        self._peers_enabled.add((device, peer))

    # -- lifecycle -----------------------------------------------------
    def close(self) -> None:
        """Release the primary contexts this backend retained (safe to call twice).

        Streams, events and memory created through the backend are invalid
        once the last reference to their context is gone. A later call
        retains the contexts again.
        """
        with self._lock:
            contexts, self._contexts = self._contexts, {}
            self._ctx_addrs, self._own_addrs = {}, set()
            self._priority_ranges.clear()
            self._peers_enabled.clear()
            for device in sorted(contexts):
                try:
                    (err,) = driver.cuDevicePrimaryCtxRelease(self._devices[device])
                except Exception:  # the driver may already be torn down at exit
                    _logger.debug("cuDevicePrimaryCtxRelease(%d) raised", device, exc_info=True)
                    continue
                if err:
                    _logger.debug("cuDevicePrimaryCtxRelease(%d) failed: %s", device, err)
