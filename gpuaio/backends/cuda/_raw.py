"""libcuda's copy enqueue called with the GIL held (``ctypes.PyDLL``).

cuda-bindings releases the GIL around every driver call. For a call that
blocks that is right; for ``cuMemcpyAsync`` between device and pinned
memory, which only enqueues (a few microseconds), it is costly where other
threads want the GIL: the caller then waits to get it back. On an H200 host,
with 12 copy threads returning from their slices, a staged upload's DMA
calls took 180-880 us to return on the stream's host thread (issue 13, run
BI's timelines), and the chunk DMAs they should have started fell behind
the host copy. Holding the GIL across so short a call costs the other
threads those few microseconds instead.

Only for copies the driver never makes synchronously: device or pinned
memory on both sides (pageable memory may block for the whole copy).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["RawCalls", "raw_calls"]


class RawCalls:
    """``cuCtxGetCurrent`` and ``cuMemcpyAsync`` from libcuda, GIL held."""

    __slots__ = ("get_current", "memcpy_async")

    def __init__(self, lib: ctypes.PyDLL) -> None:
        get_current = lib.cuCtxGetCurrent
        get_current.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        get_current.restype = ctypes.c_int
        memcpy_async = lib.cuMemcpyAsync
        memcpy_async.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        memcpy_async.restype = ctypes.c_int
        self.get_current = get_current
        self.memcpy_async = memcpy_async

    def current(self) -> int:
        """The calling thread's current context's address (0: none, or the call failed)."""
        ctx = ctypes.c_void_p()
        if self.get_current(ctypes.byref(ctx)):
            return 0
        return ctx.value or 0


_calls: RawCalls | None = None
_tried = False


def raw_calls() -> RawCalls | None:
    """The calls, or None where libcuda cannot be loaded this way or
    ``GPUAIO_RAW_DMA=0`` (then every copy goes through cuda-bindings)."""
    global _calls, _tried
    if not _tried:
        if os.environ.get("GPUAIO_RAW_DMA", "1") != "0" and sys.platform.startswith("linux"):
            try:
                _calls = RawCalls(ctypes.PyDLL("libcuda.so.1"))
            except (OSError, AttributeError):
                _calls = None
        _tried = True
    return _calls
