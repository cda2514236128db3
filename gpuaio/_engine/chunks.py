"""One chunk of a staged transfer: its pinned block, its DMA, its host copy.

The steps that :mod:`gpuaio._engine.staging` (uploads) and
:mod:`gpuaio._engine.download` (downloads) build their pipelines from, on
the stream's host thread: take a block for a chunk (:func:`chunk_block`),
enqueue a DMA to or from it behind which an event is recorded
(:func:`guarded_dma`), start the chunk's host copy (:func:`stage`), and,
after an error or an abort, stop the copies still touching blocks and hand
the blocks back once no DMA can touch them (:func:`drop`).
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable
from typing import Any

from .._core import trace as _trace
from .eventcache import EventCache
from .hostwork import HostPool, SlicedCopy
from .nativecopy import NativeCopy
from .pool import PinnedBlock, PinnedPool, release_after_drain

__all__ = [
    "D2H_CHUNK",
    "H2D_CHUNK",
    "chunk_block",
    "copy_here",
    "drop",
    "guarded_dma",
    "stage",
]

H2D_CHUNK = "gpuaio stage h2d chunk"
"""The trace name of an upload's chunk copy."""
D2H_CHUNK = "gpuaio stage d2h chunk"
"""The trace name of a download's chunk copy."""


def guarded_dma(
    backend: Any,
    native: Any,
    events: EventCache,
    device: int,
    pool: PinnedPool,
    block: PinnedBlock,
    dst: int,
    src: int,
    nbytes: int,
    drain: bool = False,
) -> Any:
    """Enqueue a DMA to or from ``block`` and return an event (from ``events``)
    recorded behind it; ``drain``: earlier DMAs of the block are enqueued.

    On failure ``block`` goes back to the pool only when no DMA can still
    touch it: at once if no copy of it was enqueued, after a drain otherwise;
    an event that failed to record goes back to ``events``.
    """
    try:
        backend.memcpy_async(dst, src, nbytes, native)
    except BaseException:
        if drain:
            release_after_drain(backend, native, pool, block)
        else:
            pool.release(block)  # nothing was enqueued
        raise
    ev = None
    try:
        ev = events.get(device)
        backend.event_record(ev, native)
    except BaseException:
        if ev is not None:
            events.put([ev])  # not recorded: nothing waits on it
        release_after_drain(backend, native, pool, block)
        raise
    return ev


def chunk_block(
    pool: PinnedPool, nbytes: int, wait: bool, min_bytes: int, own: bool
) -> PinnedBlock | None:
    """A pinned block for a staged chunk of ``nbytes`` (see :meth:`PinnedPool.acquire`).

    A cached block of the chunk's size class first. Then, for a copy small
    enough for its caller's thread (``own``: it came here only because no
    block of its class was cached), a block of that class, pinned now if the
    budget has room: cached afterwards, it keeps the next copy of that size
    on its caller's thread. Taking any larger cached block instead, as a
    chunk of a large copy does, left the class empty for good: after one
    large copy every 4-256 KiB copy took this thread's path, 4-13x slower
    (issue 13, runs CS and CX). Then any cached block of at least ``min_bytes``, or a new
    one, waiting for one if ``wait``.
    """
    block = pool.take_cached(nbytes)
    if block is None and own:
        block = pool.acquire(nbytes, wait=False)
    if block is None:
        block = pool.acquire(nbytes, wait=wait, min_bytes=min_bytes)
    return block


def stage(
    host: HostPool,
    name: str,
    tracer: Any,
    chunk: int,
    offset: int,
    dst: int,
    src: int,
    nbytes: int,
    solo: bool,
    nt: Callable[[int, int, int], None] | None = None,
) -> SlicedCopy | NativeCopy | None:
    """Start the host copy of one chunk (``nbytes`` from ``src`` to ``dst``):
    a solo chunk is copied here, at once (returns None); otherwise its slices
    go to the copy threads (returns the copy in progress). ``nt``: copy with
    non-temporal stores, through this function where this thread copies."""
    span = (name, tracer, {"chunk": chunk, "offset": offset})
    if solo:
        copy_here(span, dst, src, nbytes, nt)
        return None
    return host.submit_copy(dst, src, nbytes, span, nt is not None)


def copy_here(
    span: tuple[str, Any, dict[str, Any]],
    dst: int,
    src: int,
    nbytes: int,
    nt: Callable[[int, int, int], None] | None = None,
) -> None:
    """Copy a chunk on the calling (stream host) thread, traced like a copy
    thread's slice (``span``: name, tracer, args); through ``nt``
    (non-temporal stores) if given."""
    name, tracer, args = span
    args = {**args, "bytes": nbytes}
    copy = ctypes.memmove if nt is None else nt
    _trace.traced_call(name, tracer, args, copy, dst, src, nbytes)


def drop(backend: Any, native: Any, pool: PinnedPool, copying: deque[list[Any]]) -> None:
    """After an error or an abort: stop the host copies still touching blocks,
    then return the blocks (once DMAed parts of them have run). An entry
    without a block is a piece of a download's chunk whose block a later
    entry (or the chunk's piece still in DMA) holds."""
    for _o, _ln, block, cp, sent in copying:
        if cp is not None:
            cp.stop()
        if block is None:
            continue
        if sent:
            release_after_drain(backend, native, pool, block)
        else:
            pool.release(block)
    copying.clear()
