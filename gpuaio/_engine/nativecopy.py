"""Copy threads that never take the GIL: the native engine of sliced host copies.

A compiled install (``hatch_build.py``) builds ``_copythreads.c`` into the
extension module ``gpuaio._engine._copythreads``: a pool of pthreads that
claim, copy and report slices of a host copy without Python. This module
drives it through ctypes. :class:`gpuaio._engine.hostwork.HostPool` uses it
for a staged transfer's chunk copies where it is there, and its own Python
threads (:class:`~gpuaio._engine.hostwork.SlicedCopy`, the same semantics)
where it is not, where ``GPUAIO_NATIVE_COPY=0``, and where a copy is traced;
gated copies (:mod:`gpuaio._engine.gated`) use it alone, through the flag
words a copy sets once it has ended and may wait for before it starts.

Why: as Python threads, each copy thread needs the GIL to leave its queue
and to report a slice, and gets it in turn. On an H200 host twelve of them
started 30-60 us apart, and the stream thread's DMA calls came back
180-880 us late, queued for the GIL behind them (issue 13, runs BH-BM).
"""

from __future__ import annotations

import ctypes
import importlib
import os
from collections.abc import Callable
from typing import Any

from .._core.compiled import c_function, native_library
from .pool import parse_size

__all__ = [
    "COPY_SPINNERS",
    "COPY_SPIN_US",
    "NativeCopy",
    "NativePool",
    "available",
    "host_copier",
    "nt_copier",
]

NATIVE_SLICE = parse_size(os.environ.get("GPUAIO_NATIVE_SLICE") or "512K")
"""The slice of a staging chunk's host copy that a native copy thread claims at
a time (``hostwork.native_step`` reads it at each copy); 0: one slice per
copy thread, of at least 1 MiB (the rule before round fifty-two).

With one slice per thread (a 32 MiB chunk of a 64 MiB upload on 12 threads:
2.7 MiB each) every slice of a chunk finishes at about the same time, at the
chunk's end: an upload's first DMA of the chunk waits for all of it, and the
last chunk's whole DMA (about 0.6 ms at 32 MiB) follows the last host copy.
Fixed slices, claimed front to back, complete a chunk from its front, so the
DMA trails the copy by a few slices (``Stager._h2d``), and spread a
download's copy-out of a chunk over every thread. Each slice costs its
thread a lock and a wake-up of a waiting stream thread, no Python. On two
H100 hosts (runs KD and KF, six rounds of alternating processes) 512 KiB
slices ran awaited 64 MiB copies 1.15x as fast as one slice per thread both
ways, 256 MiB 1.12x (up) and 1.05x (down), 1 GiB 1.03-1.04x; 256 KiB came
1-4% behind it, 1 MiB lost at 64 MiB down."""


COPY_SPINNERS = int(os.environ.get("GPUAIO_COPY_SPINNERS", "12"))
"""How many idle native copy threads poll for work, instead of sleeping,
while gated copies wait for their DMAs (``NativePool.spin``), for at most
:data:`COPY_SPIN_US` after one was submitted; none on a machine of four
cores or fewer, where a spinning thread would take the event loop's core.

Issue 13, run EE (H100 host, 12 copy threads, one process per setting, two
rounds): a gated 4 MiB download's first chunk was copied out 66-76 us after
its ready word with 12 spinning, 102-112 us with none (the threads woke
first); awaited, 310-332 us against 357-366 us (4 spinning: 312-355)."""

COPY_SPIN_US = 200
"""See :data:`COPY_SPINNERS`: a gated chunk's DMA lasts tens of microseconds."""


_c_u64 = ctypes.c_uint64
_c_ptr = ctypes.c_void_p


class _Lib:
    """The library's functions: those that may block release the GIL (a
    ``CDLL``), the others keep it (a ``PyDLL``: no hand-off for a call of
    microseconds)."""

    def __init__(self, path: str) -> None:
        free, held = ctypes.CDLL(path), ctypes.PyDLL(path)
        u64, ptr, size = _c_u64, _c_ptr, ctypes.c_size_t
        self.pool_new: Callable[..., Any] = c_function(
            held, "gcp_pool_new", [ctypes.c_int, ctypes.c_int, u64], ptr
        )
        self.submit: Callable[..., Any] = c_function(
            held, "gcp_submit_copy_flag", [ptr, size, size, u64, u64, ctypes.c_int, size], ptr
        )
        self.submit_gated: Callable[..., Any] = c_function(
            held,
            "gcp_submit_copy_gated",
            [ptr, size, size, u64, u64, ctypes.c_int, size, size],
            ptr,
        )
        # Releases the GIL, as ctypes.memmove does: it copies up to a MiB.
        self.copy_nt: Callable[..., Any] = c_function(free, "gcp_copy_nt", [size, size, u64], None)
        self.has_nt: Callable[..., Any] = c_function(held, "gcp_has_nt", [], ctypes.c_int)
        self.copied: Callable[..., Any] = c_function(held, "gcp_copied", [ptr], u64)
        self.free: Callable[..., Any] = c_function(held, "gcp_free", [ptr], None)
        self.wait_prefix: Callable[..., Any] = c_function(
            free, "gcp_wait_prefix", [ptr, u64], ctypes.c_int64
        )
        self.take: Callable[..., Any] = c_function(
            free, "gcp_take", [ptr, u64, ptr, ptr], ctypes.c_int64
        )
        self.stop: Callable[..., Any] = c_function(free, "gcp_stop", [ptr], None)
        self.pool_close: Callable[..., Any] = c_function(free, "gcp_pool_close", [ptr], None)
        self.pool_spin: Callable[..., Any] = c_function(
            held, "gcp_pool_spin", [ptr, ctypes.c_int, u64], None
        )
        self.pool_spinning: Callable[..., Any] = c_function(
            held, "gcp_pool_spinning", [ptr], ctypes.c_int
        )
        # Releases the GIL: it wakes every idle thread, a system call each.
        self.pool_warm: Callable[..., Any] = c_function(
            free, "gcp_pool_warm", [ptr, u64], ctypes.c_int
        )


def _load() -> _Lib | None:
    path = native_library("gpuaio._engine._copythreads")
    if path is None:
        return None
    try:
        return _Lib(path)
    except (OSError, AttributeError):  # not loadable here, or an older build
        return None


_LIB = _load()


def _load_ext() -> Any:
    """The extension module's Python-level functions (``submit_chunks``)."""
    if _LIB is None:
        return None
    try:
        return importlib.import_module("gpuaio._engine._copythreads")
    except ImportError:
        return None


_EXT: Any = _load_ext()


def available() -> bool:
    """Whether this install has the native copy threads and they are not
    switched off (``GPUAIO_NATIVE_COPY=0``)."""
    return _LIB is not None and os.environ.get("GPUAIO_NATIVE_COPY", "1") != "0"


def nt_copier() -> Callable[[int, int, int], None] | None:
    """``copy(dst, src, nbytes)`` between host addresses with non-temporal
    stores, the GIL released, or None where this install or CPU has none
    (then staging uses ``memmove``) or the native copy threads are off.

    The stores send the destination's lines to memory instead of leaving
    them dirty in the CPU's caches, where a DMA that reads them next would
    have to snoop each one out (``_copythreads.c``, ``copy_nt``)."""
    lib = _LIB
    if lib is None or not available() or not lib.has_nt():
        return None
    return lib.copy_nt


def host_copier() -> Callable[[int, int, int], object]:
    """``copy(dst, src, nbytes)`` between host addresses on the calling thread,
    for staging's small copies: the extension's own ``copy`` where this
    install built it, else ``ctypes.memmove``.

    The extension's is a Python function, not a ctypes call, and keeps the
    GIL for copies of up to 64 KiB: on an H100 host ``ctypes.memmove`` took
    1.1 us even for 8 bytes, converting its arguments and releasing the GIL,
    which can also send the event loop's thread to the back of the GIL's
    queue (issue 13, run DR). Not switched off by ``GPUAIO_NATIVE_COPY=0``:
    it starts no thread."""
    if _LIB is None:
        return ctypes.memmove
    try:
        copy: Callable[[int, int, int], object] = importlib.import_module(
            "gpuaio._engine._copythreads"
        ).copy
    except (ImportError, AttributeError):  # an older build: no such function
        return ctypes.memmove
    return copy


class NativeCopy:
    """One host copy on native threads, with the interface of
    :class:`gpuaio._engine.hostwork.SlicedCopy` (which see): slices claimed
    front to back, a copied prefix to wait for, the slices copied since the
    last call to take in any order, and :meth:`stop`."""

    __slots__ = ("_handle", "_lens", "_lib", "_offs", "_room", "nbytes")

    def __init__(self, lib: _Lib, handle: int, nbytes: int, slices: int) -> None:
        self._lib = lib
        self._handle = handle
        self.nbytes: int = nbytes
        """Bytes the copy moves."""
        # take_copied's out-arrays, made at its first call: a gated copy
        # never takes, and making them took 1 us of its call.
        self._room = max(1, slices)
        self._offs: Any = None
        self._lens: Any = None

    def copied(self) -> int:
        """Bytes copied so far, counted from the start without a gap."""
        return int(self._lib.copied(self._handle))

    def wait_copied(self, have: int = 0, at_least: int = 0) -> int:
        """Block until more than ``have`` bytes are copied from the start, and
        at least ``at_least`` (or all); return how many are. Raises if the
        copy was stopped short of it."""
        target = min(self.nbytes, max(have + 1, at_least))
        got = int(self._lib.wait_prefix(self._handle, target))
        if got < 0:
            raise RuntimeError("host copy ended with slices uncopied")
        return got

    def take_copied(self, at_least: int = 1) -> list[tuple[int, int]]:
        """Block until slices of at least ``at_least`` bytes (or all that are
        left) are copied that no earlier call returned; return them as
        ``(offset, bytes)`` ranges in address order, adjacent ones merged (an
        empty list once every slice was returned). Raises if the copy was
        stopped short of it."""
        if self._offs is None:
            self._offs, self._lens = (_c_u64 * self._room)(), (_c_u64 * self._room)()
        offs, lens = self._offs, self._lens
        k = int(self._lib.take(self._handle, max(1, at_least), offs, lens))
        if k < 0:
            raise RuntimeError("host copy ended with slices uncopied")
        return [(offs[i], lens[i]) for i in range(k)]

    def stop(self) -> None:
        """Let no thread claim another slice; return once none copies any more.

        After it, the copy's memory is untouched: what was not copied stays so.
        """
        self._lib.stop(self._handle)

    def __del__(self) -> None:
        # The handle only: a slice still copying keeps the copy's record
        # alive until it is done (the caller stopped it first if its memory
        # goes).
        handle, self._handle = self._handle, 0
        if handle:
            self._lib.free(handle)


class NativePool:
    """``threads`` native copy threads, started at the first copy, each
    ``nice`` nice levels below the process, copying in ``piece``-byte pieces
    with a yield of the CPU between them where ``piece`` > 0."""

    def __init__(self, threads: int, nice: int, piece: int) -> None:
        lib = _LIB
        if lib is None:
            raise RuntimeError("gpuaio was installed without its native copy threads")
        handle = lib.pool_new(threads, nice, piece)
        if not handle:
            raise MemoryError("cannot create the native copy pool")
        self._lib: _Lib = lib
        self._handle: int = handle

    def spin(self, spinners: int, spin_us: int) -> None:
        """Let up to ``spinners`` idle threads poll for work instead of sleeping
        while gated copies are held, for at most ``spin_us`` microseconds after
        one was submitted (0 either way: none does). A held copy is queued once
        its stream's DMA has landed; a spinning thread starts it at once, a
        sleeping one only after waking."""
        if self._handle:
            self._lib.pool_spin(self._handle, max(0, spinners), max(0, spin_us))

    def warm(self, warm_us: int) -> bool:
        """Wake the idle threads now, to poll for work for up to ``warm_us``
        microseconds instead of sleeping: for a copy that is due but cannot
        be queued yet (a staged download's first chunk, in DMA). A sleeping
        thread starts a queued copy only once the kernel has woken it; the
        wake-ups happen here instead, on the caller's thread. Returns whether
        it warmed the pool: not before its threads started (at its first
        copy), while copies are queued (its threads are busy), or closed."""
        if not self._handle:
            return False
        return bool(self._lib.pool_warm(self._handle, max(0, warm_us)))

    def submit_chunks(
        self,
        dsts: list[int],
        srcs: list[int],
        lens: list[int],
        step: int,
        nt: bool,
        flags: list[int],
        readies: list[int] | None,
        post: bool,
    ) -> list[NativeCopy]:
        """Copies ``k`` of ``lens[k]`` bytes from ``srcs[k]`` to ``dsts[k]``,
        each as :meth:`submit_copy` with the flag ``flags[k]`` and, given
        ``readies``, the ready word ``readies[k]``: made in one call (64 at
        most). With ``post`` false the threads take none of them before
        :meth:`post_chunks`, which cannot fail. Raises RuntimeError where
        they cannot be taken (nothing was made, no flag set)."""
        ext = _EXT
        if ext is None or not self._handle:
            raise RuntimeError("the native copy pool is closed, or this build has no submit_chunks")
        handles = ext.submit_chunks(self._handle, dsts, srcs, lens, step, nt, flags, readies, post)
        if handles is None:
            raise RuntimeError(
                "the native copy threads could not take the copies (out of memory, no thread "
                "could start, or the pool is closed)"
            )
        lib = self._lib
        return [NativeCopy(lib, h, ln, -(-ln // step)) for h, ln in zip(handles, lens, strict=True)]

    def post_chunks(self, copies: list[NativeCopy]) -> None:
        """Hand copies made by :meth:`submit_chunks` without ``post`` to the
        threads; a closed pool stops them (their flags set, nothing copied)."""
        ext = _EXT
        if ext is not None and self._handle:
            ext.post_chunks(self._handle, [cp._handle for cp in copies])
        else:
            for cp in copies:
                cp.stop()

    @property
    def spinning(self) -> int:
        """How many threads spin now (:meth:`spin`)."""
        return int(self._lib.pool_spinning(self._handle)) if self._handle else 0

    def submit_copy(
        self,
        dst: int,
        src: int,
        nbytes: int,
        step: int,
        nt: bool = False,
        flag: int = 0,
        ready: int = 0,
    ) -> NativeCopy:
        """Start copying ``nbytes`` from address ``src`` to ``dst`` in slices of
        ``step`` bytes, with non-temporal stores if ``nt`` (see
        :func:`nt_copier`); returns at once.

        ``flag``: the address of a uint32 that the threads set to 1 once the
        copy has ended, every byte copied (or the copy stopped, which only an
        abort does), its stores visible before it: a GPU stream may wait for
        it (``cuStreamWaitValue32``) before it reads the destination. The
        copy's handle must be kept until then: dropping it stops the copy.

        ``ready``: the address of a uint32 that something else (a GPU stream,
        ``cuStreamWriteValue32``) sets non-zero once ``src`` holds the bytes:
        no slice is copied before. A watcher thread holds the copy until
        then, so no copy thread ever waits for a GPU; a pool that closes
        first stops it (its flag set, nothing copied)."""
        if not self._handle:
            raise RuntimeError("the native copy pool is closed")
        lib, handle, mode = self._lib, self._handle, 1 if nt else 0
        if ready:
            handle = lib.submit_gated(handle, dst, src, nbytes, step, mode, flag, ready)
        else:
            handle = lib.submit(handle, dst, src, nbytes, step, mode, flag)
        if not handle:
            raise RuntimeError(
                "the native copy threads could not take the copy (out of memory, or no thread "
                "could start)"
            )
        return NativeCopy(self._lib, handle, nbytes, -(-nbytes // step))

    def close(self) -> None:
        """Stop the threads after the copies already submitted.

        Safe against a thread that read the handle just before: the C pool is
        never freed, so its late call finds the pool closed and fails as a
        call on a closed pool does. Closing twice does nothing."""
        handle, self._handle = self._handle, 0
        if handle:
            self._lib.pool_close(handle)
