"""The ``flags`` strategy: the ``events`` engine with markers written into mapped pinned memory.

Kept apart so that dropping it is this module plus its registry entry in
``gpuaio/_completion/__init__.py``: the lead decides from GPU benchmarks
whether it earns its place. It must pass the same tests as ``events`` (the
tests iterate over ``gpuaio.STRATEGIES``).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..hostwork import byte_view
from ._engine import CompletionEngine
from ._events import EventEngine

if TYPE_CHECKING:
    from ...backends import Backend

__all__ = ["FlagEngine", "make_flag_engine"]

log = logging.getLogger("gpuaio")


class FlagEngine(EventEngine):
    """Markers are words written by the stream into a slab of mapped pinned memory.

    ``cuStreamWriteValue32`` stores a fresh value into the op's slot once all
    earlier work on the stream is done; checking a marker is then a plain
    memory read, with no driver call, so polling many streams costs almost
    nothing. A slab never reports a failed context, so the fault probe is
    made at once, and the watcher and sweeps query it every
    ``FAULT_PROBE_S`` while ops pend.
    """

    strategy = "flags"
    SLOTS = 1 << 16

    def __init__(self, backend: Backend, device: int) -> None:
        super().__init__(backend, device)
        self._slab_host = backend.host_alloc(4 * self.SLOTS)
        self._slab_dev = backend.host_device_pointer(self._slab_host)
        self._slab = byte_view(self._slab_host, 4 * self.SLOTS).view(np.uint32)
        self._slab[:] = 0
        self._gen = [0] * self.SLOTS
        self._free_slots = list(range(self.SLOTS - 1, -1, -1))
        self._slot_lock = threading.Lock()
        self._probe.start()

    def _place(self, stream: Any) -> Any:
        with self._slot_lock:
            try:
                slot = self._free_slots.pop()
            except IndexError:
                raise RuntimeError(
                    f"more than {self.SLOTS} operations pending on device {self.device}"
                ) from None
            gen = self._gen[slot] = (self._gen[slot] % 0xFFFFFFFF) + 1
        try:
            self.backend.stream_write_value32(stream, self._slab_dev + 4 * slot, gen)
        except BaseException:
            with self._slot_lock:
                self._free_slots.append(slot)
            raise
        return (slot, gen)

    def _fired(self, marker: Any) -> bool:
        slot, gen = marker
        return bool(self._slab[slot] == gen)

    def _recycle(self, marker: Any) -> None:
        with self._slot_lock:
            self._free_slots.append(marker[0])

    def close(self) -> None:
        idle = self.pending() == 0
        super().close()  # destroys the probe event too
        try:
            if idle:
                # Every marker placed has been seen: no write into the slab
                # is outstanding. Otherwise it stays allocated for good.
                self.backend.host_free(self._slab_host)
        except Exception as exc:  # a faulted context: logged already
            log.debug("could not release the flag slab: %s", exc)


def make_flag_engine(backend: Backend, device: int) -> CompletionEngine:
    """A :class:`FlagEngine`, or an ``events`` one where the device lacks stream memory ops."""
    if not backend.device_properties(device).stream_mem_ops:
        log.warning("device %d lacks stream memory operations: using events", device)
        return EventEngine(backend, device)
    return FlagEngine(backend, device)
