"""Gated uploads: the native copy threads stage, the GPU waits for them.

A mid-size upload from pageable memory has no good place to run its host
copy. On the calling thread (an event loop's) it holds the loop for the
whole copy; as a host job it pays two thread hand-offs, the stream thread's
wake-up and the loop's, which on an H200 host cost more than the copy (issue
13, run DH: a 1 MiB upload as a host job ran at 0.37-0.42x the speed of the
one staged on the loop, and 4 MiB ones staged through the native threads
by the host thread at best tied the driver's own path: 0.73-1.02x).

Here the calling thread hands the host copy to the native copy threads and
at once enqueues, in stream order, a ``cuStreamWaitValue32`` on a flag word
in pinned memory and the DMA from the block. The threads copy the source
into the block and set the flag; the GPU, waiting on it, then runs the DMA.
No Python thread takes part, and nothing waits on the calling thread: it
makes a handful of calls, like a pinned copy's.

Stream order holds as for a copy staged on the calling thread: it is taken
only when no host action of the stream that may write host memory is pending
(``Sequencer.reads_clear``), so the source holds what stream order says;
everything the stream does after it waits for the DMA, which waits for the
copy. The copy threads run every copy handed to them without waiting for
anything, so a stream waiting on a flag always gets it: no cycle through a
GPU stream can form.

The flag words (:class:`Gates`) live in one pinned block and the copies'
blocks come from the pool's cache: neither is allocated on the calling
thread. The first upload of a size finds neither, goes the usual way, and
has the reaper thread pin them for the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core.operation import Operation
from .buffers import BufferInfo
from .pool import PinnedBlock, PinnedPool, size_class
from .stagingconfig import (
    GATED_COPY_BPS,
    GATED_MAX,
    GATED_MIN,
    GATED_SLICE,
    NT_MIN,
    PCIE_BPS,
)

if TYPE_CHECKING:
    from .nativecopy import NativeCopy
    from .sequencer import Sequencer
    from .services import Services

__all__ = ["GatedUploads", "Gates"]

GATED_CHUNKS = 4
"""The most chunks a gated upload goes in (each a block, a flag and a DMA)."""
GATE_STRIDE = 64
"""Bytes between two flag words: one cache line each, so that a thread
setting one flag does not take the line of another from whoever reads it."""
GATES_BYTES = 4096
"""The flag block: 64 flags, as many gated uploads in flight at once. Pinned
apart from the staging pool (whose smallest block is far larger), like a
completion engine's flag slab, and outside its budget."""


class Gates:
    """Flag words in one pinned allocation at ``ptr``: :meth:`take` one (set
    to 0), :meth:`give` it back.

    Taken and given back on any thread (the GIL makes the list's pop and
    append atomic).
    """

    __slots__ = ("_free", "ptr")

    def __init__(self, ptr: int) -> None:
        self.ptr: int = ptr
        self._free: list[int] = list(range(ptr, ptr + GATES_BYTES, GATE_STRIDE))

    def take(self) -> int | None:
        """The address of a free flag word, now 0; None when all are in use."""
        try:
            addr = self._free.pop()
        except IndexError:
            return None
        # Its last user's stream has passed its wait (that op completed).
        ctypes.c_uint32.from_address(addr).value = 0
        return addr

    def give(self, addr: int) -> None:
        """Hand back a flag word whose copy has ended and whose op has completed."""
        self._free.append(addr)

    @property
    def free(self) -> int:
        """Flag words not in use."""
        return len(self._free)


class GatedUploads:
    """The gated path of one stager: :meth:`copy` takes an upload or declines it."""

    def __init__(
        self, runtime: Services, pool: PinnedPool, nt: bool, chunk_for: Callable[[int], int]
    ) -> None:
        """``nt``: the copy threads may copy with non-temporal stores (from
        ``NT_MIN``); ``chunk_for(nbytes)``: the stager's chunk size for a
        transfer of that size (the blocks it stages with, and reserves)."""
        self._rt = runtime
        self._pool = pool
        self._nt = nt
        self._chunk_for = chunk_for
        self.gates: Gates | None = None
        self._devices: dict[int, bool] = {}
        """Per device: whether its streams can wait on a word (``stream_mem_ops``)."""
        self._priming: set[int] = set()
        """Chunk sizes the reaper is pinning blocks for."""
        self.taken: int = 0
        """Uploads this path took (tests and probes read it)."""
        self._closed = threading.Event()

    @staticmethod
    def covers(nbytes: int) -> bool:
        """Whether an upload of this size is one for this path (``GATED_MIN``-``GATED_MAX``;
        none while ``GATED_MAX`` is 0, the default)."""
        return GATED_MIN <= nbytes <= GATED_MAX

    def copy(self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo) -> bool:
        """Enqueue ``op`` (an upload of a size :meth:`covers`) gated on the copy
        threads, and return True; or return False, having enqueued nothing,
        where it cannot go this way now (the caller stages it as usual).

        The upload goes in the stager's chunks, each copied into a block of
        its own and DMAed once its copy's flag is set, so that the DMA of
        the first runs while the others are copied.
        """
        n = d.nbytes
        chunk = self._chunk_for(n)
        count = -(-n // chunk)
        pool = self._pool
        if count > GATED_CHUNKS or size_class(chunk) * count * 4 > pool.budget:
            return False  # a budget this tight is the staging pipeline's to share
        gates = self.gates
        if gates is None or not self._devices.get(seq.ordinal, False):
            self._prime(seq.ordinal, chunk, count)
            return False
        if op._tracer is not None or not seq.reads_clear():
            return False  # traced copies show their slices on Python threads
        # Cached blocks only: pinning memory is a slow driver call.
        blocks: list[PinnedBlock] = []
        flags: list[int] = []
        copies: list[NativeCopy] = []
        nt = self._nt and min(chunk, n) >= NT_MIN
        host = self._rt.host
        try:
            for off in range(0, n, chunk):
                block = pool.take_cached(chunk)
                if block is None:
                    self._prime(seq.ordinal, chunk, count)
                    return False
                blocks.append(block)
                flag = gates.take()
                if flag is None:
                    return False
                flags.append(flag)
                ln = min(chunk, n - off)
                copies.append(
                    host.submit_flagged(block.ptr, s.ptr + off, ln, GATED_SLICE, nt, flag)
                )
        except (RuntimeError, MemoryError):  # the native threads could not take one
            return False
        finally:
            if len(copies) < count:  # declined: stop what started, hand all back
                _hand_back(copies, gates, flags, pool, blocks)

        def release() -> None:
            # Done: every DMA ran, after its flag, after its copy. Failed: a
            # copy may still run; stop it (which sets its flag) before its
            # block and flag are anyone else's.
            _hand_back(copies, gates, flags, pool, blocks)

        op._add_done_callback(release)
        op._est = n / PCIE_BPS + min(chunk, n) / GATED_COPY_BPS
        self.taken += 1
        ptrs = [b.ptr for b in blocks]
        seq.gpu(op, self._enqueue, d.ptr, ptrs, n, chunk, flags)
        return True

    def _enqueue(
        self, dst: int, blocks: list[int], nbytes: int, chunk: int, flags: list[int], native: Any
    ) -> None:
        backend = self._rt.backend
        for k, (block, flag) in enumerate(zip(blocks, flags, strict=True)):
            off = k * chunk
            backend.stream_wait_value32(native, flag, 1)
            backend.memcpy_async(dst + off, block, min(chunk, nbytes - off), native)

    # -- set-up, on the reaper thread -------------------------------------
    def _prime(self, device: int, chunk: int, count: int) -> None:
        """Have the reaper pin what a gated upload needs and lacks: the flag
        block, and ``count`` cached blocks of ``chunk`` bytes."""
        if chunk in self._priming:
            return
        self._priming.add(chunk)
        self._rt.reaper.submit(lambda: self._pin(device, chunk, count))

    def prepare(self, device: int, nbytes: int) -> None:
        """Pin the flag block and the blocks of an upload of ``nbytes`` now,
        if the budget has room (blocks; never on an event loop's thread)."""
        chunk = self._chunk_for(nbytes)
        self._pin(device, chunk, -(-nbytes // chunk))

    def _pin(self, device: int, chunk: int, count: int) -> None:
        try:
            if device not in self._devices:
                props = self._rt.backend.device_properties(device)
                self._devices[device] = props.stream_mem_ops
            if self.gates is None and not self._closed.is_set():
                self.gates = Gates(self._rt.backend.host_alloc(GATES_BYTES))
                if self._closed.is_set():  # closed meanwhile
                    self.close()
            # Pinned now if the budget has room, cached for the next upload.
            self._pool.reserve(chunk, count)
        except Exception:  # a closed pool, a budget too small: uploads go the usual way
            return
        finally:
            self._priming.discard(chunk)

    def close(self) -> None:
        """Free the flag block, waiting for that a second at most (the stager
        closes its pool next, which waits for uploads still in flight)."""
        self._closed.set()
        gates, self.gates = self.gates, None
        if gates is None:
            return
        backend = self._rt.backend

        def free() -> None:
            # A pinned free waits for the device's work, which a hung
            # kernel never finishes: then the flags stay behind, like the
            # pool's blocks (PinnedPool.close), and closing goes on.
            with contextlib.suppress(Exception):
                backend.host_free(gates.ptr)

        t = threading.Thread(target=free, name="gpuaio-gates-free", daemon=True)
        t.start()
        t.join(1.0)


def _hand_back(
    copies: list[NativeCopy],
    gates: Gates,
    flags: list[int],
    pool: PinnedPool,
    blocks: list[PinnedBlock],
) -> None:
    """Stop the copies (each sets its flag if it had not), then hand back
    their flags and blocks."""
    for cp in copies:
        cp.stop()
    for flag in flags:
        gates.give(flag)
    for block in blocks:
        pool.release(block)
