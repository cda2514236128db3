"""Gated copies: the native copy threads stage, the GPU and they wait on flags.

A mid-size copy between the GPU and pageable memory has no good place to
run its host copy. On the calling thread (an event loop's) it holds the
loop for the whole copy; as a host job it pays two thread hand-offs, the
stream thread's wake-up and the loop's, which on an H200 host cost more
than the copy (issue 13, run DH: a 1 MiB upload as a host job ran at
0.37-0.42x the speed of the one staged on the loop, and 4 MiB ones staged
through the native threads by the host thread at best tied the driver's own
path: 0.73-1.02x).

Here no Python thread takes part and nothing waits on the calling thread,
which makes a handful of calls, like a pinned copy's:

* **Upload**: the calling thread hands each chunk's host copy to the native
  copy threads and at once enqueues, in stream order, a
  ``cuStreamWaitValue32`` on the chunk's flag word (pinned memory) and the
  chunk's DMA from its block. The threads copy the source into the block
  and set the flag; the GPU, waiting on it, then runs the DMA.
* **Download**: the calling thread enqueues each chunk's DMA into its block
  and a ``cuStreamWriteValue32`` of the chunk's ready word (fenced: the
  block's bytes land first), then a wait on every chunk's flag, and hands
  the copy-outs to the native threads gated on the ready words
  (``gcp_submit_copy_gated``): a watcher thread queues each once its word is
  set; the threads copy it out and set its flag. The op's marker, behind
  the waits, fires with the bytes in the destination.

Stream order holds as for a copy staged on the calling thread. An upload is
taken only when no host action that may write host memory is pending on
the stream (``Sequencer.reads_clear``), so the source holds what stream
order says; everything the stream does after it waits for its DMAs, which
wait for the copies. A download is taken only when the host actions of the
streams this one waits for have landed (``Sequencer.deps_clear``); it
counts as the stream's copy-out (``note_copy_out``): later host steps settle
on it, and later uploads do not read host memory until it is done. No copy
thread ever waits: a copy held for its ready word sits with the watcher,
not in the queue, so a stream waiting on a flag always gets it, and no
cycle through a GPU stream can form.

The flag words (:class:`Gates`) live in one pinned allocation and the
copies' blocks come from the pool's cache: neither is allocated on the
calling thread. The first copy of a size finds neither, goes the usual way,
and has the reaper thread pin them for the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core.operation import Operation
from ..backends._base import GATED_DOWN_DMAS, GATED_DOWN_WAITS, GATED_UP
from .buffers import BufferInfo
from .lent import staged_at
from .pool import PinnedBlock, PinnedPool, size_class
from .stagingconfig import (
    GATED_COPY_BPS,
    GATED_DOWN_MAX,
    GATED_DOWN_MIN,
    GATED_SLICE,
    GATED_UP_MAX,
    GATED_UP_MIN,
    NT_MIN,
    PCIE_BPS,
)

if TYPE_CHECKING:
    from .nativecopy import NativeCopy
    from .sequencer import Sequencer
    from .services import Services

__all__ = ["GatedCopies", "Gates"]

GATED_CHUNKS = 4
"""The most chunks a gated copy goes in (each a block, a flag or two and a DMA)."""
GATE_STRIDE = 64
"""Bytes between two flag words: one cache line each, so that a thread
setting one flag does not take the line of another from whoever reads it."""
GATES_BYTES = 4096
"""The flag block: 64 flags (an upload takes one per chunk, a download two).
Pinned apart from the staging pool (whose smallest block is far larger) and
outside its budget."""


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


class GatedCopies:
    """The gated path of one stager: :meth:`copy` takes a copy or declines it."""

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
        self.uploads: int = 0
        """Uploads this path took (tests and probes read it)."""
        self.downloads: int = 0
        """Downloads this path took."""
        ranges = ((GATED_UP_MIN, GATED_UP_MAX), (GATED_DOWN_MIN, GATED_DOWN_MAX))
        self.least: int = min((lo for lo, hi in ranges if hi), default=1 << 63)
        """The smallest copy :meth:`covers` in either direction, as set when the
        path was made: the stager asks :meth:`covers` only from this size, so
        a small copy pays no call for the path (issue 13)."""
        self._closed = threading.Event()

    @staticmethod
    def covers(nbytes: int, upload: bool) -> bool:
        """Whether an upload (else a download) of this size is one for this
        path (``GATED_UP_MIN``-``GATED_UP_MAX``, ``GATED_DOWN_MIN``-``GATED_DOWN_MAX``;
        none of a direction whose maximum is 0)."""
        if upload:
            return GATED_UP_MIN <= nbytes <= GATED_UP_MAX
        return GATED_DOWN_MIN <= nbytes <= GATED_DOWN_MAX

    def copy(self, seq: Sequencer, op: Operation, d: BufferInfo, s: BufferInfo) -> bool:
        """Enqueue ``op`` (a copy from or into pageable memory, of a size
        :meth:`covers`) gated on the copy threads, and return True; or return
        False, having enqueued nothing, where it cannot go this way now (the
        caller stages it as usual).

        The copy goes in the stager's chunks, each through a block of its
        own. An upload's chunk is copied into its block, and DMAed once its
        copy's flag is set: the DMA of the first runs while the others are
        copied. A download's chunk is DMAed into its block, then the stream
        sets the chunk's ready word, on which the copy threads copy it out
        and set its flag; the stream waits for every chunk's flag, so the
        op (its marker behind those waits) completes with the bytes in the
        destination, and later work of the stream comes after.
        """
        up = s.kind.is_host
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
        # An upload reads its source now: no pending host action may write
        # it. A download writes its destination once its DMA is done: after
        # the host actions of the streams this one waits for (as a small
        # download's copy-out). Traced copies show their slices on Python
        # threads, and a copy with a progress callback reports each chunk
        # from one: the copy threads run no Python.
        clear = seq.reads_clear() if up else seq.deps_clear()
        if op._tracer is not None or op._progress is not None or not clear:
            return False
        held = self._take(gates, seq.ordinal, chunk, count, 1 if up else 2)
        if held is None:
            return False
        blocks, flags = held
        host = (s if up else d).ptr
        ptrs = [staged_at(b, host + i * chunk) for i, b in enumerate(blocks)]
        taken = self._start(up, host, ptrs, n, chunk, flags)
        if taken is None:  # the native threads could not take them
            _hand_back([], gates, flags, pool, blocks)
            return False

        def release() -> None:
            # Done: every copy ended before the stream passed its flag.
            if op._exc is None:
                _hand_back(taken, gates, flags, pool, blocks)
                return
            # Failed: part of the work may have been enqueued, and may still
            # run: a DMA into or out of a block, a write of a ready word. Stop
            # the copies (which sets their flags, so no stream waits on them
            # for ever), and hand the blocks and words back only once the
            # stream has drained, on its host thread.
            for cp in taken:
                cp.stop()
            seq.executor.submit(
                lambda: _hand_back_after_drain(
                    self._rt.backend, seq.native, gates, flags, pool, blocks
                ),
                False,
            )

        op._add_done_callback(release)
        op._est = n / PCIE_BPS + min(chunk, n) / GATED_COPY_BPS
        if up:
            self.uploads += 1
            seq.gpu(op, self._enqueue_up, d.ptr, ptrs, n, chunk, flags)
        else:
            self.downloads += 1
            # Raising, it resolved the op with the error: release() stops the
            # copies, posted or not (setting their flags), and hands all back.
            seq.gpu(op, self._enqueue_down, s.ptr, ptrs, n, chunk, flags, taken)
            seq.note_copy_out(op)  # later host steps settle on it
        return True

    def _take(
        self, gates: Gates, device: int, chunk: int, count: int, per: int
    ) -> tuple[list[PinnedBlock], list[int]] | None:
        """``count`` cached blocks of ``chunk`` bytes and ``per`` flag words a
        block (a download's ready word first), or None with nothing taken."""
        pool = self._pool
        blocks: list[PinnedBlock] = []
        flags: list[int] = []
        for _ in range(count):
            # Cached blocks only: pinning memory is a slow driver call.
            block = pool.take_cached(chunk)
            if block is None:
                self._prime(device, chunk, count)
                break
            blocks.append(block)
            for _ in range(per):
                flag = gates.take()
                if flag is None:
                    break
                flags.append(flag)
            if len(flags) < len(blocks) * per:  # all words in use
                break
        if len(flags) == count * per:
            return blocks, flags
        _hand_back([], gates, flags, pool, blocks)
        return None

    def _start(
        self, up: bool, host: int, blocks: list[int], n: int, chunk: int, flags: list[int]
    ) -> list[NativeCopy] | None:
        """The chunks' host copies, in one call: an upload's from ``host`` into
        the blocks, started now (its DMAs wait for them); a download's out of
        the blocks into ``host``, each gated on its ready word and started
        only once posted (``HostPool.post_chunks``), after its DMAs are
        enqueued: the calling thread's bookkeeping then runs while the first
        DMA does. None where the native threads cannot take them."""
        at = [host + off for off in range(0, n, chunk)]
        lens = [min(chunk, n - off) for off in range(0, n, chunk)]
        nt = up and self._nt and min(chunk, n) >= NT_MIN
        try:
            if up:
                return self._rt.host.submit_chunks(blocks, at, lens, GATED_SLICE, nt, flags)
            return self._rt.host.submit_chunks(
                at, blocks, lens, GATED_SLICE, nt, flags[1::2], flags[0::2], False
            )
        except (RuntimeError, MemoryError):
            return None

    def _enqueue_up(
        self, dev: int, blocks: list[int], nbytes: int, chunk: int, flags: list[int], native: Any
    ) -> None:
        # One backend call (on CUDA one C call): the copies it waits for run.
        self._rt.backend.enqueue_gated(native, GATED_UP, dev, blocks, nbytes, chunk, flags)

    def _enqueue_down(
        self,
        dev: int,
        blocks: list[int],
        nbytes: int,
        chunk: int,
        flags: list[int],
        copies: list[NativeCopy],
        native: Any,
    ) -> None:
        # The DMAs first, so that the first runs while this thread posts the
        # copy-outs; the waits for them only after: a wait whose flag no
        # running thread would set deadlocked this thread's next driver call
        # (the marker's record) against a cuMemFree on the reaper thread,
        # which waits for the device while holding the driver's lock (issue
        # 13, run EG's GPU suite).
        backend = self._rt.backend
        backend.enqueue_gated(native, GATED_DOWN_DMAS, dev, blocks, nbytes, chunk, flags)
        self._rt.host.post_chunks(copies)
        backend.enqueue_gated(native, GATED_DOWN_WAITS, dev, blocks, nbytes, chunk, flags)

    # -- set-up, on the reaper thread -------------------------------------
    def _prime(self, device: int, chunk: int, count: int) -> None:
        """Have the reaper pin what a gated copy needs and lacks: the flag
        block, and ``count`` cached blocks of ``chunk`` bytes."""
        if chunk in self._priming:
            return
        self._priming.add(chunk)
        self._rt.reaper.submit(lambda: self._pin(device, chunk, count))

    def prepare(self, device: int, nbytes: int) -> None:
        """Pin the flag block and the blocks of a copy of ``nbytes`` now,
        if the budget has room (blocks; never on an event loop's thread)."""
        chunk = self._chunk_for(nbytes)
        self._pin(device, chunk, -(-nbytes // chunk))

    def _pin(self, device: int, chunk: int, count: int) -> None:
        try:
            if device not in self._devices:
                props = self._rt.backend.device_properties(device)
                self._devices[device] = props.stream_mem_ops
            if self.gates is None and not self._closed.is_set():
                # Words streams write and wait on: cuMemHostAlloc memory.
                self.gates = Gates(self._rt.backend.host_alloc_mapped(GATES_BYTES))
                if self._closed.is_set():  # closed meanwhile
                    self.close()
            # Pinned now if the budget has room, cached for the next upload.
            self._pool.reserve(chunk, count)
        except Exception:  # a closed pool, a budget too small: copies go the usual way
            return
        finally:
            self._priming.discard(chunk)

    def close(self) -> None:
        """Free the flag block, waiting for that a second at most (the stager
        closes its pool next, which waits for copies still in flight)."""
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


def _hand_back_after_drain(
    backend: Any,
    native: Any,
    gates: Gates,
    flags: list[int],
    pool: PinnedPool,
    blocks: list[PinnedBlock],
) -> None:
    """A failed gated copy's blocks and words, once nothing its stream had
    enqueued can touch them; never, where that cannot be told (a dead
    context runs nothing more, but the error may be another)."""
    try:
        backend.stream_synchronize(native)
    except Exception:
        return
    _hand_back([], gates, flags, pool, blocks)
