"""The backend interface: the only place gpuaio touches a driver.

A backend owns devices, memory, streams, events and kernels. Its enqueue
calls follow CUDA's own synchronization rules exactly (see
``shared/reference/cuda-api-sync-behavior.md``): copies that involve pageable
memory or only host memory may block the calling thread. The layers above
never make such calls on the event-loop thread.

Handles (streams, events, kernels) are opaque objects owned by the backend.
Pointers are plain ``int`` addresses (unified virtual addressing).
Every failure is raised as :class:`gpuaio.CudaError` (or
:class:`gpuaio.DeviceFatalError` for sticky errors) naming the call.
"""

from __future__ import annotations

import abc
import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GATED_DOWN_DMAS",
    "GATED_DOWN_WAITS",
    "GATED_UP",
    "Backend",
    "DeviceProperties",
    "MemoryKind",
    "PointerInfo",
    "keeps_context",
    "kernel_array_interface",
]

OWN_THREAD_PREFIX = "gpuaio-"
"""Every thread gpuaio starts is named so (host threads, watchers, the reaper)."""
_RUNS_USER_CODE = ("gpuaio-prefetch",)  # pulls batches from the user's iterator


def keeps_context(thread: threading.Thread) -> bool:
    """Whether a backend may leave its context current in ``thread`` after a call.

    Only in gpuaio's own threads: there the context it binds stays current,
    so later calls find it and switch nothing. In any other thread (the
    event loop's, the user's, anyio's worker threads, and gpuaio's prefetch
    thread, which runs the user's iterator) other code relies on what it
    made current.
    """
    name = thread.name
    return name.startswith(OWN_THREAD_PREFIX) and not name.startswith(_RUNS_USER_CODE)


class MemoryKind(enum.Enum):
    """Where a buffer lives, which decides how gpuaio moves it."""

    PAGEABLE = "pageable"
    """Ordinary host memory the driver does not know about."""
    PINNED = "pinned"
    """Page-locked host memory (allocated pinned, or registered)."""
    DEVICE = "device"
    """Memory on a GPU."""
    MANAGED = "managed"
    """Unified (managed) memory, migrated on demand."""

    is_host: bool
    """Pageable or pinned (set on each member below: a plain attribute is read
    on every copy, and a property cost more than the rest of the check)."""

    def __hash__(self) -> int:
        # Members are singletons: hashed by identity. Replaced below by
        # object's C slot; Enum's own hash is a Python call, paid on every
        # copy's label lookup. (Written as a method for type checkers.)
        return id(self)


def _mark_host_kinds() -> None:
    for kind in MemoryKind:
        kind.is_host = kind.value in ("pageable", "pinned")


_mark_host_kinds()
MemoryKind.__hash__ = object.__hash__  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class PointerInfo:
    """What the driver says about an address."""

    kind: MemoryKind
    device: int | None
    """Ordinal of the owning device; ``None`` for host memory."""


@dataclass(frozen=True, slots=True)
class DeviceProperties:
    """What gpuaio needs to know of a device."""

    ordinal: int
    name: str
    total_memory: int
    compute_capability: tuple[int, int]
    multiprocessors: int
    pci_bus_id: str
    can_map_host_memory: bool
    stream_mem_ops: bool
    """Whether ``cuStreamWriteValue32``/``cuStreamWaitValue32`` are usable."""


GATED_UP = 0
"""An upload's part of :meth:`Backend.enqueue_gated` (all of it)."""
GATED_DOWN_DMAS = 1
"""A download's first part of :meth:`Backend.enqueue_gated`: its DMAs and ready words."""
GATED_DOWN_WAITS = 2
"""A download's second part of :meth:`Backend.enqueue_gated`: its waits for its flags."""


class Backend(abc.ABC):
    """Interface implemented by the ``cuda`` and ``sim`` backends.

    Thread safety: every method may be called from any thread.

    Contexts: a backend works in each device's primary context, whatever
    context the calling thread has current (PyTorch and CuPy make another
    device's primary context current, PyCUDA or ``cuCtxCreate`` a context of
    their own). Memory, streams and events are made in the device's primary
    context, and work is enqueued in the context of its stream. A method that
    needs a context checks the thread's current one (one ``cuCtxGetCurrent``),
    makes the one it needs current only when they differ, and makes the
    previous one current again before it returns, so the caller's libraries
    find what they left. Two exceptions leave the context current: in
    gpuaio's own threads (:func:`keeps_context`), and device 0's primary
    context in a thread where none was current (which the CUDA runtime, and
    so PyTorch and CuPy, would make current there anyway). Host memory is
    portable: any of the backend's primary contexts serves, and queries
    (:meth:`pointer_info`) run in whatever context is current.
    """

    name: str
    """``"cuda"`` or ``"sim"``."""

    launch_queue: int = 1024
    """About how many entries a stream's launch queue holds; enqueueing into a
    full one blocks the calling thread until the GPU has run one (CUDA's is
    about 1,000 deep and not configurable)."""

    # -- devices -------------------------------------------------------
    @abc.abstractmethod
    def device_count(self) -> int:
        """How many devices the backend sees."""

    @abc.abstractmethod
    def device_properties(self, device: int) -> DeviceProperties:
        """Name, memory and limits of ``device``."""

    @abc.abstractmethod
    def driver_version(self) -> str:
        """The driver version, as text (``"13.0"``; the sim says so)."""

    @abc.abstractmethod
    def can_access_peer(self, device: int, peer: int) -> bool:
        """Whether ``device`` can map ``peer``'s memory (``cuDeviceCanAccessPeer``)."""

    @abc.abstractmethod
    def enable_peer_access(self, device: int, peer: int) -> None:
        """Let ``device`` access ``peer``'s memory (idempotent)."""

    # -- contexts ------------------------------------------------------
    @abc.abstractmethod
    def current_context(self) -> int:
        """The address of the calling thread's current context (``cuCtxGetCurrent``; 0: none)."""

    @abc.abstractmethod
    def set_current_context(self, ctx: int) -> None:
        """Make context ``ctx`` current in the calling thread (``cuCtxSetCurrent``; 0: none)."""

    @abc.abstractmethod
    def primary_context(self, device: int) -> int:
        """The address of ``device``'s primary context, the one the backend works in."""

    # -- memory --------------------------------------------------------
    @abc.abstractmethod
    def mem_alloc(self, device: int, nbytes: int) -> int:
        """Allocate device memory; ``nbytes`` > 0."""

    @abc.abstractmethod
    def mem_alloc_managed(self, device: int, nbytes: int) -> int:
        """Allocate managed (unified) memory attached globally; ``nbytes`` > 0."""

    @abc.abstractmethod
    def mem_free(self, ptr: int) -> None:
        """Free device or managed memory once the work already enqueued on its
        device is done (as ``cuMemFree`` does)."""

    def mem_free_async(self, ptr: int) -> None:
        """Free device memory from :meth:`mem_alloc` without waiting for the device.

        The caller guarantees that no work enqueued or yet to come uses
        ``ptr``: unlike :meth:`mem_free`, this does not wait for the device's
        work first. The default is :meth:`mem_free`.
        """
        self.mem_free(ptr)

    @abc.abstractmethod
    def host_alloc(self, nbytes: int) -> int:
        """Allocate pinned, portable, device-mapped host memory."""

    def host_alloc_mapped(self, nbytes: int) -> int:
        """Pinned memory as :meth:`host_alloc`, good also for the words that
        stream memory operations write and wait on (``cuMemHostAlloc``
        memory). The default is :meth:`host_alloc`."""
        return self.host_alloc(nbytes)

    @abc.abstractmethod
    def host_free(self, ptr: int) -> None:
        """Free memory from :meth:`host_alloc` or :meth:`host_alloc_mapped` once
        the work already enqueued on the device is done (as ``cuMemFreeHost``
        does: another library's copy may still use it)."""

    def host_free_async(self, ptr: int) -> None:
        """Free memory from :meth:`host_alloc` or :meth:`host_alloc_mapped`
        without waiting for the device.

        The caller guarantees that no work enqueued or yet to come uses
        ``ptr`` (gpuaio's staging blocks, whose copies are all done). The
        default is :meth:`host_free`.
        """
        self.host_free(ptr)

    @abc.abstractmethod
    def host_register(self, ptr: int, nbytes: int) -> None:
        """Page-lock an existing host range (``cuMemHostRegister``, portable)."""

    @abc.abstractmethod
    def host_unregister(self, ptr: int) -> None:
        """Undo :meth:`host_register`; the range is pageable again."""

    @abc.abstractmethod
    def host_device_pointer(self, ptr: int) -> int:
        """The device address of mapped pinned memory (for stream-written flags)."""

    @abc.abstractmethod
    def pointer_info(self, ptr: int) -> PointerInfo:
        """Classify ``ptr``; pageable memory gives ``MemoryKind.PAGEABLE``."""

    # -- streams -------------------------------------------------------
    @abc.abstractmethod
    def stream_priority_range(self, device: int) -> tuple[int, int]:
        """(least, greatest) priority; greater priority is numerically lower."""

    @abc.abstractmethod
    def stream_create(self, device: int, priority: int = 0) -> Any:
        """Create a non-blocking stream on ``device``."""

    @abc.abstractmethod
    def stream_from_handle(self, device: int, handle: int) -> Any:
        """Wrap a foreign ``CUstream`` address; it is never destroyed by gpuaio."""

    @abc.abstractmethod
    def stream_handle(self, stream: Any) -> int:
        """The ``CUstream`` address of ``stream`` (for ``__cuda_stream__``)."""

    @abc.abstractmethod
    def stream_destroy(self, stream: Any) -> None:
        """Release ``stream``; work already enqueued still completes."""

    @abc.abstractmethod
    def stream_synchronize(self, stream: Any) -> None:
        """Block the calling thread until ``stream`` is idle."""

    # -- enqueue -------------------------------------------------------
    @abc.abstractmethod
    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """``cuMemcpyAsync``: follows CUDA's sync rules for pageable/host memory."""

    @abc.abstractmethod
    def memcpy_peer_async(
        self, dst: int, dst_device: int, src: int, src_device: int, nbytes: int, stream: Any
    ) -> None:
        """``cuMemcpyPeerAsync`` between two devices' memory, in ``stream``'s order."""

    @abc.abstractmethod
    def memset_async(self, ptr: int, value: int, itemsize: int, count: int, stream: Any) -> None:
        """``cuMemsetD{8,16,32}Async``: write ``count`` items of ``itemsize`` bytes."""

    @abc.abstractmethod
    def launch(
        self,
        kernel: Any,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[Any],
        shared_mem: int,
        stream: Any,
    ) -> None:
        """Enqueue a kernel. ``kernel`` comes from :meth:`compile` or is a native kernel."""

    @abc.abstractmethod
    def launch_host_func(self, stream: Any, fn: Callable[[], None]) -> None:
        """``cuLaunchHostFunc``: run ``fn`` on a driver thread in stream order.

        The stream does not advance until ``fn`` returns: if ``fn`` needs the
        GIL the GPU waits on Python. gpuaio's default never uses this.
        """

    @abc.abstractmethod
    def stream_write_value32(self, stream: Any, device_ptr: int, value: int) -> None:
        """``cuStreamWriteValue32`` into (mapped) memory, in stream order."""

    def stream_write_words(self, stream: Any, words: Sequence[int]) -> None:
        """Store 32-bit values in stream order: ``words`` is ``[address, value, ...]``.

        Each address is 4-byte aligned device memory (never managed or host
        memory), each value a uint32. One call enqueues them all, in order:
        how short ops' memsets are handed to the GPU a batch at a time
        (``gpuaio._engine.completion._queue``). This default makes one
        :meth:`stream_write_value32` per word.
        """
        for i in range(0, len(words), 2):
            self.stream_write_value32(stream, words[i], words[i + 1])

    @abc.abstractmethod
    def stream_wait_value32(self, stream: Any, device_ptr: int, value: int) -> None:
        """``cuStreamWaitValue32`` (>=): the stream waits until the word reaches ``value``."""

    def enqueue_gated(
        self,
        stream: Any,
        part: int,
        device_ptr: int,
        blocks: list[int],
        nbytes: int,
        chunk: int,
        flags: list[int],
    ) -> None:
        """A part of a gated copy's stream work (``gpuaio._engine.gated``), in order.

        ``nbytes`` at ``device_ptr`` go in chunks of ``chunk`` bytes, chunk
        ``k`` through the pinned block ``blocks[k]``. :data:`GATED_UP`, an
        upload: per chunk, a wait for ``flags[k]`` to reach 1, then the
        chunk's copy from its block. A download in two parts:
        :data:`GATED_DOWN_DMAS`, per chunk the copy into its block, then a
        write of 1 to ``flags[2k]`` (its ready word); :data:`GATED_DOWN_WAITS`,
        a wait for each ``flags[2k + 1]`` to reach 1. A wait is enqueued only
        once whatever sets its flag runs (see ``gated.GatedCopies``). Raises at
        the first call that fails, what came before it enqueued. This default
        makes one call per step. Lists, not any sequence: CUDA's override
        hands them to one C call as they are.
        """
        if part == GATED_UP:
            for k, (block, flag) in enumerate(zip(blocks, flags, strict=True)):
                off = k * chunk
                self.stream_wait_value32(stream, flag, 1)
                self.memcpy_async(device_ptr + off, block, min(chunk, nbytes - off), stream)
        elif part == GATED_DOWN_DMAS:
            for k, block in enumerate(blocks):
                off = k * chunk
                self.memcpy_async(block, device_ptr + off, min(chunk, nbytes - off), stream)
                self.stream_write_value32(stream, flags[2 * k], 1)
        elif part == GATED_DOWN_WAITS:
            for k in range(len(blocks)):
                self.stream_wait_value32(stream, flags[2 * k + 1], 1)
        else:
            raise ValueError(f"no such part of a gated copy: {part}")

    # -- events --------------------------------------------------------
    @abc.abstractmethod
    def event_create(self, device: int, blocking_sync: bool = False) -> Any:
        """Create a timing-disabled event."""

    @abc.abstractmethod
    def event_destroy(self, event: Any) -> None:
        """Destroy ``event``; safe while a record of it is still pending."""

    @abc.abstractmethod
    def event_record(self, event: Any, stream: Any) -> None:
        """Record ``event`` in ``stream``: it completes when the work before it has."""

    @abc.abstractmethod
    def event_query(self, event: Any) -> bool:
        """True when done, False while pending; raises on a failed context."""

    @abc.abstractmethod
    def event_synchronize(self, event: Any) -> None:
        """Block the calling thread until ``event`` has completed."""

    @abc.abstractmethod
    def stream_wait_event(self, stream: Any, event: Any) -> None:
        """Make ``stream``'s later work wait for ``event`` (no host wait)."""

    # -- kernels -------------------------------------------------------
    @abc.abstractmethod
    def compile(
        self,
        device: int,
        source: str,
        name: str,
        options: Sequence[str],
        sim: Callable[..., None] | None,
    ) -> Any:
        """Compile ``source`` and return kernel ``name`` (``sim`` is the simulated body)."""

    # -- lifecycle -----------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend-wide resources (called at interpreter exit)."""


def memcpy_call_name(dst_kind: MemoryKind, src_kind: MemoryKind) -> str:
    """The ``cuMemcpy*Async`` name matching a pair of kinds, for messages."""
    src = "D" if src_kind in (MemoryKind.DEVICE, MemoryKind.MANAGED) else "H"
    dst = "D" if dst_kind in (MemoryKind.DEVICE, MemoryKind.MANAGED) else "H"
    return f"cuMemcpy{src}to{dst}Async"


def kernel_array_interface(arg: Any) -> Any:
    """A kernel argument's CUDA Array Interface dict, or ``None``.

    A gpuaio ``DeviceArray`` is asked through its private ``_gpuaio_cai``: its
    public one refuses on the simulated backend and marks the memory as used
    outside gpuaio (so its free waits for the device), while a launch holds
    its arrays until it has run.
    """
    own = getattr(type(arg), "_gpuaio_cai", None)
    if own is not None:
        return own(arg)
    return getattr(arg, "__cuda_array_interface__", None)
