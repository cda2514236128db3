"""The driver calls of every awaited operation, without cuda.bindings' wrappers.

A compiled install (``hatch_build.py``) builds ``_fastcalls.c`` into the
extension module ``gpuaio.backends.cuda._fastcalls``: ``cuMemcpyAsync``,
``cuEventRecord`` and ``cuEventQuery``, each one C function that first checks
that the handle's context is current, called through the function pointers
``cuGetProcAddress`` gives; and ``gated``, a gated copy's whole stream work
(copies, ``cuStreamWriteValue32``, ``cuStreamWaitValue32``) in one call.
Through cuda.bindings a small copy made four driver calls from Python for
these three steps (the context check is a ``cuCtxGetCurrent`` of its own),
each converting its arguments and building a result tuple and a
``CUresult`` object (issue 13). Like the bindings, each lets the GIL go
while the driver runs: the driver may block on work that needs it (a host
function on the stream is Python).

:func:`load` binds the extension and returns it, or ``None`` where this
install did not build it, the driver does not give the functions, or
``GPUAIO_FAST_DRIVER_CALLS=0``: the backend then makes the same calls through
cuda.bindings (``_streams.StreamCalls``).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Protocol

import cuda.bindings.driver as driver

__all__ = ["ABI_VERSION", "OPTIONAL", "SYMBOLS", "FastCalls", "load"]

_logger = logging.getLogger("gpuaio")

SYMBOLS = ("cuCtxGetCurrent", "cuMemcpyAsync", "cuEventRecord", "cuEventQuery")
"""What :meth:`FastCalls.bind` takes the addresses of, in its order."""

OPTIONAL = ("cuStreamWriteValue32", "cuStreamWaitValue32")
"""What :meth:`FastCalls.bind` takes next, for ``gated``; without them (0) it
answers ``NOT_BOUND`` and the backend makes the calls through cuda.bindings."""

ABI_VERSION = 12000
"""The CUDA version whose signatures of :data:`SYMBOLS` and :data:`OPTIONAL`
are asked for: those of ``_fastcalls.c``'s typedefs, unchanged since CUDA 4.0
(the stream memory operations: since 11.7, their ``_v2``, which this version
names) and given by every driver that cuda-bindings 12.8 and later run on."""


class FastCalls(Protocol):
    """``gpuaio.backends.cuda._fastcalls``. Every call answers a ``CUresult`` as
    an int, or :attr:`NOT_CURRENT` (the handle's context is not the calling
    thread's current one: nothing was done) or :attr:`NOT_BOUND`."""

    NOT_CURRENT: int
    NOT_BOUND: int

    def bind(
        self,
        ctx_get_current: int,
        memcpy: int,
        record: int,
        query: int,
        write_value32: int,
        wait_value32: int,
        /,
    ) -> bool: ...

    def memcpy(self, ctx: int, dst: int, src: int, nbytes: int, stream: int, /) -> int: ...

    def record(self, ctx: int, event: int, stream: int, /) -> int: ...

    def query(self, ctx: int, event: int, /) -> int: ...

    def gated(
        self,
        ctx: int,
        stream: int,
        part: int,
        device_ptr: int,
        blocks: list[int],
        nbytes: int,
        chunk: int,
        flags: list[int],
        /,
    ) -> int:
        """``Backend.enqueue_gated``'s calls: 0, ``NOT_CURRENT`` or ``NOT_BOUND``
        (nothing done), or the failing call's ``CUresult`` plus 65536 times its
        step (1 ``cuMemcpyAsync``, 2 ``cuStreamWriteValue32``, 3
        ``cuStreamWaitValue32``)."""
        ...


def _address(symbol: str) -> int:
    """``cuGetProcAddress(symbol, ABI_VERSION)``, or 0 where the driver has no such function."""
    flags = driver.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT
    result: Any = driver.cuGetProcAddress(symbol.encode(), ABI_VERSION, flags)
    if result[0]:
        return 0
    if len(result) > 2 and int(result[2]) != 0:  # symbolStatus: not CU_GET_PROC_ADDRESS_SUCCESS
        return 0
    return int(result[1])


def load() -> FastCalls | None:
    """The extension, bound to this process's driver; ``None`` to use cuda.bindings."""
    if os.environ.get("GPUAIO_FAST_DRIVER_CALLS", "1") == "0":
        return None
    if os.environ.get("CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM", "0") not in ("", "0"):
        # cuda.bindings then resolves the per-thread default stream's
        # variants; the legacy ones here would treat stream 0 differently.
        return None
    try:
        module: Any = importlib.import_module("gpuaio.backends.cuda._fastcalls")
    except ImportError:  # a pure-Python install
        return None
    try:
        addresses = [_address(symbol) for symbol in SYMBOLS]
        optional = [_address(symbol) for symbol in OPTIONAL]
    except Exception as exc:  # an older cuda.bindings: no cuGetProcAddress of this shape
        _logger.debug("gpuaio: fast driver calls unavailable: %r", exc)
        return None
    if not all(addresses) or not module.bind(*addresses, *optional):
        return None
    fast: FastCalls = module
    return fast
