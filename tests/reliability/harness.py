"""gpuaio's reliability harness: cancellation storm, soak, sticky fault, loop shutdown.

Shared by ``tests/test_reliability.py`` (small, fast settings in CI) and
``tools/reliability_report.py`` (full settings, figures written to
``tests/reliability/report-<backend>.json``). Every scenario returns a stats
object whose :meth:`failures` lists what went wrong (empty: passed), so the
report can count failures instead of stopping at the first.

The storm's checks:

* **byte-exact data**: every transaction's buffers are compared with a numpy
  model of the operations it issued, including those of cancelled awaits
  (cancelling an await does not cancel the operation, so its effect must
  still land);
* **no early reuse of pinned blocks**: every block the staging pool hands out
  is first filled with :data:`POISON`; a block reused while a DMA still reads
  or writes it puts poison (or another transfer's bytes) into some buffer;
* **nothing in a foreign thread**: exceptions in threads, unraisable
  exceptions, errors logged by gpuaio and errors reported to the event loop's
  exception handler (``InvalidStateError`` and the like) are all collected;
* **nothing leaked**: no op pending, every pool block handed back, no pinned
  byte allocated for the storm still allocated, the pool trims to zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine.hostwork import byte_view
from gpuaio.pytest_plugin import (
    PinnedAccounting,
    ResourceBaseline,
    leak_problems,
    pending_operations,
)

POISON = 0xDB
"""Fills every pinned staging block as the pool hands it out."""
SCRIBBLE = 0xA5
"""Written over a host source right after its copy's await returns (it must be free)."""

FAST_SIM: dict[str, Any] = {
    "dma_gbps": 400.0,
    "pageable_gbps": 400.0,
    "d2d_gbps": 2000.0,
    "peer_gbps": 400.0,
    "host_gbps": 400.0,
    "latency_s": 2e-6,
}
"""A quick simulated machine: real threads and ordering, little waiting."""

ADD_ONE_SRC = r"""
extern "C" __global__ void add_one(unsigned char* data, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) data[i] += 1;
}
"""


def _add_one_sim(grid: Any, block: Any, data: np.ndarray, n: Any) -> None:
    data.reshape(-1).view(np.uint8)[: int(n)] += 1


def add_one_kernel(dev: gpuaio.Device) -> gpuaio.Kernel:
    return dev.compile(ADD_ONE_SRC, "add_one", sim=_add_one_sim)


_BASE = np.random.default_rng(20240611).integers(0, 256, 8 << 20, dtype=np.uint8)


def pattern(n: int, seed: int) -> np.ndarray:
    """``n`` pseudo-random bytes, different for each ``seed`` (cheap: a slice and an xor)."""
    off = (seed * 7919) % (len(_BASE) - n + 1)
    return np.bitwise_xor(_BASE[off : off + n], np.uint8(seed & 0xFF))


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- trouble in foreign threads ----------------------------------------------


class Trouble:
    """Collects exceptions that never reach a test: threads, unraisables, logs, loops."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._lock = threading.Lock()

    def add(self, where: str, what: str) -> None:
        with self._lock:
            self.items.append(f"{where}: {what}")

    @contextlib.contextmanager
    def capture(self) -> Iterator[Trouble]:
        old_thread, old_unraisable = threading.excepthook, sys.unraisablehook

        def thread_hook(args: Any) -> None:
            name = args.thread.name if args.thread else "?"
            tb = "".join(
                traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
            )
            self.add(f"exception in thread {name}", tb)

        def unraisable_hook(args: Any) -> None:
            self.add("unraisable", f"{args.exc_type.__name__}: {args.exc_value} ({args.object!r})")

        handler = _ListHandler(self)
        logger = logging.getLogger("gpuaio")
        threading.excepthook = thread_hook
        sys.unraisablehook = unraisable_hook
        logger.addHandler(handler)
        try:
            yield self
        finally:
            logger.removeHandler(handler)
            threading.excepthook = old_thread
            sys.unraisablehook = old_unraisable

    def watch_loop(self) -> None:
        """On asyncio: route the running loop's exception handler here (call inside it)."""
        import sniffio

        if sniffio.current_async_library() != "asyncio":
            return
        import asyncio

        def handler(loop: Any, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            self.add("event loop", f"{context.get('message')}: {exc!r}")

        asyncio.get_running_loop().set_exception_handler(handler)


class _ListHandler(logging.Handler):
    def __init__(self, trouble: Trouble) -> None:
        super().__init__(level=logging.ERROR)
        self.trouble = trouble

    def emit(self, record: logging.LogRecord) -> None:
        self.trouble.add(f"gpuaio log {record.levelname}", record.getMessage())


# -- pool poisoning ------------------------------------------------------------


@contextlib.contextmanager
def poisoned_pool(rt: Any) -> Iterator[list[int]]:
    """Fill every block the staging pool hands out with :data:`POISON`.

    Yields a one-element list counting the blocks poisoned.
    """
    stager = rt.stager
    count = [0]
    if stager is None:
        yield count
        return
    pool = stager.pool
    original = pool.acquire

    def acquire(*args: Any, **kwargs: Any) -> Any:
        block = original(*args, **kwargs)
        if block is not None:
            byte_view(block.ptr, block.size)[:] = POISON
            count[0] += 1
        return block

    pool.acquire = acquire
    try:
        yield count
    finally:
        del pool.acquire


def poison_share(actual: np.ndarray, expected: np.ndarray) -> float:
    """The share of wrong bytes that are :data:`POISON` (1.0: an early-reuse signature)."""
    wrong = actual != expected
    n = int(wrong.sum())
    return float((actual[wrong] == POISON).sum()) / n if n else 0.0


async def early_reuse_probe(rt: Any) -> list[str]:
    """Two chunked pageable -> device copies queued on a held stream.

    The first copy's pinned block must stay out of the pool until its DMA has
    run; a pool that hands it to the second copy at once makes the first
    destination receive the second copy's bytes. Returns the mismatches.
    """
    from .. import conftest

    dev: gpuaio.Device = device_of(rt, 0)
    # Above the inline limit (1 MiB; inline copies release their block only
    # once done): two 1 MiB chunks each, staged on the stream's host thread.
    n = 2 << 20
    s = dev.stream()
    a, b = pattern(n, 1), pattern(n, 2)
    da, db = dev.empty(n), dev.empty(n)
    problems: list[str] = []
    with poisoned_pool(rt):
        release = conftest.latch(dev, s)
        ops = [s.copy(da, a), s.copy(db, b)]
        await anyio.sleep(0.05)  # both host jobs have staged their chunk
        release()
        await gpuaio.wait_all(ops)
        for name, d, exp in (("first", da, a), ("second", db, b)):
            out = np.empty(n, np.uint8)
            await s.copy(out, d)
            if not np.array_equal(out, exp):
                problems.append(
                    f"{name} destination: {int((out != exp).sum())} bytes wrong, "
                    f"{poison_share(out, exp):.0%} of them poison"
                )
    await s.aclose()
    return problems


# -- the cancellation storm -------------------------------------------------------


@dataclass
class StormConfig:
    ops: int = 10_000
    """Operations to enqueue (copies, memsets, launches, event records and waits)."""
    streams: int = 4
    workers: int = 12
    seed: int = 0
    cancel_rate: float = 0.6
    """Share of transactions cancelled at some await point."""
    large_rate: float = 0.04
    """Share of transfers of 1-3 MiB (chunked staging); others are 1 B - 256 KiB."""
    abort_rate: float = 0.03
    """Share of transactions that abort a staged transfer (Operation.abort)."""
    transient_fault_rate: float = 0.0
    """Per issued op, the chance of a one-shot driver failure (sim only)."""
    completion: str | None = None
    """Completion strategy to switch to first (None: keep the runtime's)."""
    cyclic_gc: bool = True
    """Leave Python's cyclic garbage collector on (it finalizes objects in any thread)."""


@dataclass
class StormStats:
    backend: str = ""
    loop: str = ""
    completion: str = ""
    ops: int = 0
    transactions: int = 0
    awaits: int = 0
    cancelled_awaits: int = 0
    cancels_requested: int = 0
    """Transactions given a cancellation (aimed at an await, a deadline, or another task)."""
    cancel_modes: dict[str, int] = field(default_factory=dict)
    """Transactions whose scope caught a cancellation, by how it was cancelled."""
    cancel_points: dict[str, int] = field(default_factory=dict)
    """Cancellations seen, by ``kind@await-index`` (every await point of every kind)."""
    aborts_requested: int = 0
    aborted_ops: int = 0
    transient_faults_injected: int = 0
    transient_errors_seen: int = 0
    poisoned_blocks: int = 0
    buffers_verified: int = 0
    bytes_verified: int = 0
    poison_hits: int = 0
    mismatches: list[str] = field(default_factory=list)
    unexpected_errors: list[str] = field(default_factory=list)
    foreign_exceptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    leaked_pinned_bytes: int = 0
    pool_in_use_after: int = 0
    pool_reserved_after_trim: int = 0
    pending_after: int = 0
    elapsed_s: float = 0.0

    def failures(self) -> list[str]:
        out = [*self.mismatches, *self.unexpected_errors, *self.foreign_exceptions, *self.leaks]
        if self.leaked_pinned_bytes:
            out.append(f"{self.leaked_pinned_bytes} pinned bytes leaked")
        if self.pool_in_use_after or self.pool_reserved_after_trim:
            out.append(
                f"pool: {self.pool_in_use_after} bytes in use, "
                f"{self.pool_reserved_after_trim} reserved after trim"
            )
        if self.pending_after:
            out.append(f"{self.pending_after} ops pending after the storm")
        return out

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = len(self.failures())
        d["failure_details"] = self.failures()[:20]
        for key in ("mismatches", "unexpected_errors", "foreign_exceptions", "leaks"):
            d[key] = len(d[key])
        return d


STEPS = {"staged": 3, "direct": 3, "memset_d2d": 4, "cross_stream": 5, "h2h": 3, "abort": 2}
"""Await points per transaction kind (a cancellation is aimed at each of them)."""
KINDS = ["staged", "direct", "memset_d2d", "cross_stream", "h2h"]
KIND_WEIGHTS = [0.3, 0.15, 0.2, 0.2, 0.15]
INJECTABLE = ("cuMemcpyAsync", "cuMemsetD8Async", "cuLaunchKernel", "cuEventRecord")


class _Faulted(Exception):
    """A transaction met an injected (transient) driver failure."""


class _Tx:
    """One transaction: a few awaited ops on fresh buffers, with a numpy model."""

    def __init__(self, storm: _Storm, kind: str, seed: int) -> None:
        self.storm = storm
        self.kind = kind
        self.seed = seed
        self.ops: list[gpuaio.Operation] = []
        self.expect: dict[str, tuple[Any, np.ndarray | None]] = {}
        self.step = 0
        self.cancel_at: int | None = None
        self.scope: anyio.CancelScope | None = None
        self.faulted = False
        self.aborted: set[int] = set()

    # the model
    def set(self, name: str, buf: Any, expected: np.ndarray | None) -> None:
        self.expect[name] = (buf, None if expected is None else expected.copy())

    def get(self, name: str) -> np.ndarray:
        exp = self.expect[name][1]
        assert exp is not None
        return exp

    def check_now(self, name: str) -> None:
        """``name`` is host memory whose last op was awaited: it must be right now."""
        buf, exp = self.expect[name]
        if exp is not None and not self.faulted:
            self.storm.compare(
                f"{self.kind}#{self.seed}:{name} (right after await)", _host_bytes(buf), exp
            )

    # issuing and awaiting
    async def run(self, issue: Callable[[], Any], effect: Callable[[], None] | None = None) -> Any:
        st = self.storm
        st.maybe_inject()
        try:
            op = issue()
        except gpuaio.CudaError as exc:
            if st.cfg.transient_fault_rate and not isinstance(exc, gpuaio.DeviceFatalError):
                self.faulted = True
                st.stats.transient_errors_seen += 1
                raise _Faulted from exc
            raise
        st.stats.ops += 1
        if isinstance(op, gpuaio.Operation):
            self.ops.append(op)
        if effect is not None:
            effect()
        here = self.step
        self.step += 1
        if self.cancel_at == here and self.scope is not None:
            self.scope.cancel()
        if not isinstance(op, gpuaio.Operation):
            return op
        st.stats.awaits += 1
        try:
            await op
        except anyio.get_cancelled_exc_class():
            st.stats.cancelled_awaits += 1
            key = f"{self.kind}@{here}"
            st.stats.cancel_points[key] = st.stats.cancel_points.get(key, 0) + 1
            raise
        except gpuaio.CudaError as exc:
            if st.cfg.transient_fault_rate and not isinstance(exc, gpuaio.DeviceFatalError):
                self.faulted = True  # counted when the transaction is verified
                raise _Faulted from exc
            raise
        if not op.done():
            st.stats.unexpected_errors.append(f"{op!r} returned from await while not done")
        return op

    def settled(self) -> bool:
        return all(op.done() for op in self.ops)


def _host_bytes(buf: Any) -> np.ndarray:
    return np.asarray(buf).reshape(-1).view(np.uint8)


def _memset_bytes(n: int, value: int, width: int) -> np.ndarray:
    return np.full(n // width, value, dtype=f"<u{width}").view(np.uint8)


class _Storm:
    def __init__(self, rt: Any, cfg: StormConfig, trouble: Trouble, kernel: Any) -> None:
        self.rt = rt
        self.cfg = cfg
        self.trouble = trouble
        self.dev: gpuaio.Device = device_of(rt, 0)
        self.stats = StormStats(backend=rt.backend.name, completion=rt.strategy)
        self.kernel = kernel
        self.streams = [self.dev.stream() for _ in range(cfg.streams)]
        self.verify_stream = self.dev.stream()
        self.live: dict[int, anyio.CancelScope] = {}
        self.rng = np.random.default_rng(cfg.seed)
        self.seq = 0
        self.done = False

    # -- helpers ---------------------------------------------------------
    def maybe_inject(self) -> None:
        rate = self.cfg.transient_fault_rate
        if rate and self.rng.random() < rate:
            call = INJECTABLE[int(self.rng.integers(len(INJECTABLE)))]
            self.rt.backend.fail_next(call)
            self.stats.transient_faults_injected += 1

    def compare(self, what: str, actual: np.ndarray, expected: np.ndarray) -> None:
        self.stats.buffers_verified += 1
        self.stats.bytes_verified += int(expected.nbytes)
        if actual.shape != expected.shape or not np.array_equal(actual, expected):
            share = poison_share(actual, expected) if actual.shape == expected.shape else 0.0
            if share > 0.5:
                self.stats.poison_hits += 1
            wrong = int((actual != expected).sum()) if actual.shape == expected.shape else -1
            self.stats.mismatches.append(
                f"{what}: {wrong} of {expected.nbytes} bytes wrong ({share:.0%} of them poison)"
            )

    def size(self, rng: np.random.Generator, multiple: int = 1) -> int:
        r = rng.random()
        if r < self.cfg.large_rate:
            n = int(rng.integers(1 << 20, 3 << 20))
        elif r < 0.25:
            n = int(rng.integers(64 << 10, 256 << 10))
        else:
            n = int(rng.integers(1, 64 << 10))
        return max(multiple, n - n % multiple)

    def stream(self, rng: np.random.Generator) -> gpuaio.Stream:
        return self.streams[int(rng.integers(len(self.streams)))]

    def launch_args(self, d: Any, n: int) -> tuple[Any, ...]:
        return (self.kernel, max(1, -(-n // 256)), 256, d, np.uint64(n))

    # -- transactions ----------------------------------------------------
    async def tx_staged(self, tx: _Tx, rng: np.random.Generator) -> None:
        """pageable -> device (staged), add_one, device -> pageable (staged)."""
        n = self.size(rng)
        s = self.stream(rng)
        src = pattern(n, tx.seed)
        d = self.dev.empty(n)
        await tx.run(lambda: s.copy(d, src), lambda: tx.set("d", d, src))
        src[:] = SCRIBBLE  # the await returned: the source is ours again
        await tx.run(
            lambda: s.launch(*self.launch_args(d, n)), lambda: tx.set("d", d, tx.get("d") + 1)
        )
        out = np.empty(n, np.uint8)
        await tx.run(lambda: s.copy(out, d), lambda: tx.set("out", out, tx.get("d")))
        tx.check_now("out")

    async def tx_direct(self, tx: _Tx, rng: np.random.Generator) -> None:
        """pinned -> device or managed (DMA), memset, -> pinned (DMA)."""
        n = self.size(rng, 4)
        s = self.stream(rng)
        src = gpuaio.pinned_empty(n)
        src[:] = pattern(n, tx.seed)
        d = self.dev.managed_empty(n) if rng.random() < 0.3 else self.dev.empty(n)
        await tx.run(lambda: s.copy(d, src), lambda: tx.set("d", d, src))
        src[:] = SCRIBBLE
        half = (n // 2) & ~3
        value = int(rng.integers(0, 1 << 32))

        def memset_effect() -> None:
            exp = tx.get("d").copy()
            exp[:half] = _memset_bytes(half, value, 4)
            tx.set("d", d, exp)

        await tx.run(lambda: s.memset(d[:half] if half else d[:0], value, width=4), memset_effect)
        out = gpuaio.pinned_empty(n)
        await tx.run(lambda: s.copy(out, d), lambda: tx.set("out", out, tx.get("d")))
        tx.check_now("out")

    async def tx_memset_d2d(self, tx: _Tx, rng: np.random.Generator) -> None:
        """memset device, device -> device, memset host (worker thread), device -> host."""
        width = int(rng.choice([1, 2, 4]))
        n = self.size(rng, width)
        s = self.stream(rng)
        value = int(rng.integers(0, 1 << (8 * width)))
        a, b = self.dev.empty(n), self.dev.empty(n)
        await tx.run(
            lambda: s.memset(a, value, width=width),
            lambda: tx.set("a", a, _memset_bytes(n, value, width)),
        )
        await tx.run(lambda: s.copy(b, a), lambda: tx.set("b", b, tx.get("a")))
        host = gpuaio.pinned_empty(n) if rng.random() < 0.5 else np.empty(n, np.uint8)
        hv = int(rng.integers(0, 256))
        await tx.run(
            lambda: s.memset(host, hv, width=1),
            lambda: tx.set("host", host, _memset_bytes(n, hv, 1)),
        )
        tx.check_now("host")
        await tx.run(lambda: s.copy(host, b), lambda: tx.set("host", host, tx.get("b")))
        tx.check_now("host")

    async def tx_cross_stream(self, tx: _Tx, rng: np.random.Generator) -> None:
        """s1: pageable -> device; s1.record(); s2.wait(event); s2: add_one, -> pageable."""
        n = self.size(rng)
        i = int(rng.integers(len(self.streams)))
        s1, s2 = self.streams[i], self.streams[(i + 1) % len(self.streams)]
        src = pattern(n, tx.seed)
        d = self.dev.empty(n)
        await tx.run(lambda: s1.copy(d, src), lambda: tx.set("d", d, src))
        ev = await tx.run(s1.record)
        await tx.run(lambda: s2.wait(ev))
        await tx.run(
            lambda: s2.launch(*self.launch_args(d, n)), lambda: tx.set("d", d, tx.get("d") + 1)
        )
        out = np.empty(n, np.uint8)
        await tx.run(lambda: s2.copy(out, d), lambda: tx.set("out", out, tx.get("d")))
        tx.check_now("out")

    async def tx_h2h(self, tx: _Tx, rng: np.random.Generator) -> None:
        """pageable -> pinned -> pageable, and a host memset, all on worker threads."""
        n = self.size(rng)
        s = self.stream(rng)
        src = pattern(n, tx.seed)
        mid = gpuaio.pinned_empty(n)
        await tx.run(lambda: s.copy(mid, src), lambda: tx.set("mid", mid, src))
        src[:] = SCRIBBLE
        out = np.empty(n, np.uint8)
        await tx.run(lambda: s.copy(out, mid), lambda: tx.set("out", out, tx.get("mid")))
        tx.check_now("out")
        await tx.run(
            lambda: s.memset(mid, 0x11, width=1),
            lambda: tx.set("mid", mid, _memset_bytes(n, 0x11, 1)),
        )
        tx.check_now("mid")

    async def tx_abort(self, tx: _Tx, rng: np.random.Generator) -> None:
        """A large staged transfer aborted between chunks; either direction."""
        n = int(rng.integers(2 << 20, 4 << 20))
        s = self.stream(rng)
        if rng.random() < 0.5:
            src = pattern(n, tx.seed)
            dst: Any = self.dev.empty(n)
        else:
            src = self.dev.empty(n)
            dst = np.empty(n, np.uint8)

        def issue() -> gpuaio.Operation:
            op = s.copy(dst, src)
            if op.abort():
                self.stats.aborts_requested += 1
                tx.aborted.add(id(op))
            return op

        with contextlib.suppress(gpuaio.OperationAbortedError):
            await tx.run(issue, lambda: tx.set("dst", dst, None))
        if (
            tx.ops
            and tx.ops[-1].done()
            and isinstance(tx.ops[-1].exception(), gpuaio.OperationAbortedError)
        ):
            self.stats.aborted_ops += 1
        # The stream still works after an abort.
        d = self.dev.empty(256)
        await tx.run(
            lambda: s.memset(d, 0x5C, width=1),
            lambda: tx.set("after", d, _memset_bytes(256, 0x5C, 1)),
        )

    # -- verification ----------------------------------------------------
    async def verify(self, tx: _Tx) -> None:
        for op in tx.ops:
            exc = op.exception()
            if exc is None:
                continue
            if isinstance(exc, gpuaio.OperationAbortedError) and id(op) in tx.aborted:
                continue
            if isinstance(exc, gpuaio.CudaError) and self.cfg.transient_fault_rate:
                tx.faulted = True
                self.stats.transient_errors_seen += 1
                continue
            self.stats.unexpected_errors.append(f"{tx.kind}#{tx.seed}: {op!r} failed: {exc!r}")
        if tx.faulted:
            return
        for name, (buf, exp) in tx.expect.items():
            if exp is None:
                continue
            if isinstance(buf, gpuaio.DeviceArray):
                actual = np.empty(buf.nbytes, np.uint8)
                for attempt in range(5):
                    try:
                        with anyio.CancelScope(shield=True):
                            await self.verify_stream.copy(actual, buf)
                        break
                    except gpuaio.CudaError:
                        if not self.cfg.transient_fault_rate or attempt == 4:
                            raise
            else:
                actual = _host_bytes(buf)
            self.compare(f"{tx.kind}#{tx.seed}:{name}", actual, exp)

    async def sweep(self, pending: list[_Tx], final: bool = False) -> None:
        keep = []
        for tx in pending:
            if final or tx.settled():
                await self.verify(tx)
            else:
                keep.append(tx)
        pending[:] = keep

    # -- workers ---------------------------------------------------------
    async def worker(self, index: int) -> None:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        pending: list[_Tx] = []
        funcs: dict[str, Callable[[_Tx, np.random.Generator], Awaitable[None]]] = {
            "staged": self.tx_staged,
            "direct": self.tx_direct,
            "memset_d2d": self.tx_memset_d2d,
            "cross_stream": self.tx_cross_stream,
            "h2h": self.tx_h2h,
            "abort": self.tx_abort,
        }
        while self.stats.ops < cfg.ops:
            kind = (
                "abort" if rng.random() < cfg.abort_rate else str(rng.choice(KINDS, p=KIND_WEIGHTS))
            )
            self.seq += 1
            tx = _Tx(self, kind, self.seq)
            mode = "none"
            if rng.random() < cfg.cancel_rate:
                mode = str(rng.choice(["before", "timeout", "external"], p=[0.5, 0.35, 0.15]))
            delay = float(rng.uniform(0, 0.0015)) if mode == "timeout" else float("inf")
            if mode == "before":
                tx.cancel_at = int(rng.integers(STEPS[kind]))
            self.stats.transactions += 1
            with anyio.CancelScope(deadline=anyio.current_time() + delay) as scope:
                tx.scope = scope
                if mode == "external":
                    self.live[index] = scope
                try:
                    await funcs[kind](tx, rng)
                except _Faulted:
                    pass
                except gpuaio.OperationAbortedError:
                    if kind != "abort":
                        self.stats.unexpected_errors.append(f"{kind}: unexpected abort")
                except Exception as exc:  # anything else is a bug: record, keep going
                    self.stats.unexpected_errors.append(
                        f"{kind}#{tx.seed}: {type(exc).__name__}: {exc}\n"
                        + "".join(traceback.format_exc(limit=6))
                    )
                finally:
                    self.live.pop(index, None)
            if mode != "none":
                self.stats.cancels_requested += 1
            if scope.cancelled_caught:
                self.stats.cancel_modes[mode] = self.stats.cancel_modes.get(mode, 0) + 1
            pending.append(tx)
            await self.sweep(pending)
        await self.drain_streams()
        await self.wait_settled(pending)
        await self.sweep(pending, final=True)

    async def chaos(self) -> None:
        """Cancel the transactions of randomly chosen workers at random moments."""
        rng = np.random.default_rng([self.cfg.seed, 999])
        while not self.done:
            await anyio.sleep(float(rng.uniform(0, 0.003)))
            if self.live:
                keys = list(self.live)
                scope = self.live.get(keys[int(rng.integers(len(keys)))])
                if scope is not None:
                    scope.cancel()

    async def drain_streams(self) -> None:
        with anyio.CancelScope(shield=True):
            for s in self.streams:
                for attempt in range(5):
                    try:
                        await s.synchronize()
                        break
                    except gpuaio.CudaError:
                        if not self.cfg.transient_fault_rate or attempt == 4:
                            raise

    async def wait_settled(self, pending: list[_Tx], limit_s: float = 60.0) -> None:
        deadline = time.monotonic() + limit_s
        while any(not tx.settled() for tx in pending):
            if time.monotonic() > deadline:
                stuck = [op for tx in pending for op in tx.ops if not op.done()]
                self.stats.unexpected_errors.append(
                    f"{len(stuck)} ops never completed: {stuck[:5]!r}"
                )
                return
            await anyio.sleep(0.002)


async def run_storm(rt: Any, cfg: StormConfig | None = None) -> StormStats:
    """The cancellation storm on ``rt``'s device 0 (call inside a running loop)."""
    cfg = cfg or StormConfig()
    if cfg.completion and rt.strategy != cfg.completion:
        rt.set_completion(cfg.completion)
    PinnedAccounting.install(rt)
    baseline = ResourceBaseline.take(rt)
    trouble = Trouble()
    t0 = time.perf_counter()
    # The cyclic GC finalizes gpuaio objects in whatever thread it runs on; the
    # storm found that an Event finalized in a sim worker thread deadlocked the
    # backend (test_event_finalizer_does_not_deadlock), so keep it on by default.
    gc_was_enabled = gc.isenabled()
    if not cfg.cyclic_gc:
        gc.disable()
    try:
        stats = await _storm(rt, cfg, trouble, baseline)
    finally:
        if gc_was_enabled:
            gc.enable()
    stats.elapsed_s = time.perf_counter() - t0
    return stats


async def _storm(
    rt: Any, cfg: StormConfig, trouble: Trouble, baseline: ResourceBaseline
) -> StormStats:
    import sniffio

    # Compiling (NVRTC, and on CUDA the first context) blocks for hundreds of
    # ms: off the loop, which the storm's watchdog watches.
    kernel = await anyio.to_thread.run_sync(add_one_kernel, device_of(rt, 0))
    with trouble.capture():
        trouble.watch_loop()
        storm = _Storm(rt, cfg, trouble, kernel)
        storm.stats.loop = _loop_name(sniffio.current_async_library())
        with poisoned_pool(rt) as poisoned:
            async with anyio.create_task_group() as tg:
                tg.start_soon(storm.chaos)
                async with anyio.create_task_group() as workers:
                    for i in range(cfg.workers):
                        workers.start_soon(storm.worker, i)
                storm.done = True
            if cfg.transient_fault_rate:
                rt.backend._fail_next.clear()  # none may hit the clean-up below
            for s in [*storm.streams, storm.verify_stream]:
                await s.aclose()
        stats = storm.stats
        stats.poisoned_blocks = poisoned[0]
        del storm
        await anyio.to_thread.run_sync(_leak_checks, rt, baseline, stats)
        stats.foreign_exceptions.extend(trouble.items)
    return stats


def _loop_name(lib: str) -> str:
    if lib == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()
        return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    return lib


def _leak_checks(rt: Any, baseline: ResourceBaseline, stats: StormStats) -> None:
    stats.leaks.extend(leak_problems(rt, baseline, grace_s=5.0))
    stats.pending_after, _ = pending_operations(rt)
    gc.collect()
    acct = PinnedAccounting.of(rt)
    stager = rt.stager
    if stager is not None:
        pool = stager.pool
        stats.pool_in_use_after = pool.stats().in_use
        pool.trim()
        stats.pool_reserved_after_trim = pool.stats().reserved
    if acct is not None:
        done = threading.Event()
        rt.reaper.submit(done.set)
        done.wait(5)
        stats.leaked_pinned_bytes = max(0, acct.user_pinned_bytes - baseline.user_pinned)


# -- soak ------------------------------------------------------------------------


@dataclass
class SoakStats:
    backend: str = ""
    loop: str = ""
    ops: int = 0
    elapsed_s: float = 0.0
    ops_per_s: float = 0.0
    samples: list[dict[str, float]] = field(default_factory=list)
    """Every ``sample_every`` ops: rss_mib, pool_reserved, pool_in_use, pending, threads."""
    rss_growth_mib: float = 0.0
    """Highest RSS after warm-up minus RSS at the end of warm-up."""
    pool_reserved_growth: int = 0
    """Highest pool reservation after warm-up minus the one at the end of warm-up."""
    pool_reserved_max: int = 0
    """The most the pool held beyond what it held before the soak."""
    pool_bound: int = 0
    """The most the pool may hold: two 64 KiB blocks per worker."""
    max_pending: int = 0
    """The most ops pending at a sample (the pending table); each worker has one."""
    workers: int = 0
    threads_growth: int = 0
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)
    foreign_exceptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    rss_limit_mib: float = 48.0

    def failures(self) -> list[str]:
        out = [*self.errors, *self.foreign_exceptions, *self.leaks]
        if self.mismatches:
            out.append(f"{self.mismatches} data mismatches")
        if self.rss_growth_mib > self.rss_limit_mib:
            out.append(f"RSS grew {self.rss_growth_mib:.1f} MiB after warm-up")
        if self.pool_reserved_max > self.pool_bound:
            out.append(
                f"pinned pool grew by {self.pool_reserved_max} bytes (bound {self.pool_bound})"
            )
        if self.max_pending > self.workers + 2:
            out.append(f"{self.max_pending} ops pending at once with {self.workers} workers")
        if self.threads_growth > 4:
            out.append(f"{self.threads_growth} more threads than after warm-up")
        return out

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = len(self.failures())
        d["failure_details"] = self.failures()[:20]
        d["samples"] = self.samples[:: max(1, len(self.samples) // 40)]
        for key in ("errors", "foreign_exceptions", "leaks"):
            d[key] = len(d[key])
        return d


async def run_soak(
    rt: Any,
    ops: int = 1_000_000,
    *,
    workers: int = 8,
    sample_every: int = 10_000,
    warmup: float = 0.1,
) -> SoakStats:
    """``ops`` small awaited ops (256 B - 4 KiB: memsets, staged and direct copies,
    launches) by ``workers`` tasks on their own streams; samples memory as it goes.
    """
    import sniffio

    PinnedAccounting.install(rt)
    baseline = ResourceBaseline.take(rt)
    dev = device_of(rt, 0)
    kernel = add_one_kernel(dev)
    stats = SoakStats(backend=rt.backend.name, loop=_loop_name(sniffio.current_async_library()))
    trouble = Trouble()
    counter = [0]
    next_sample = [0]
    # The pool may already hold blocks (a GPU test session shares one runtime):
    # bound what the soak adds to it.
    reserved_before = rt.stager.pool.stats().reserved if rt.stager is not None else 0

    def sample() -> None:
        stager = rt.stager
        ps = stager.pool.stats() if stager is not None else None
        stats.samples.append(
            {
                "ops": counter[0],
                "rss_mib": rss_bytes() / 2**20,
                "pool_reserved": ps.reserved if ps else 0,
                "pool_in_use": ps.in_use if ps else 0,
                "pending": pending_operations(rt)[0],
                "threads": threading.active_count(),
                "t": time.perf_counter() - t0,
            }
        )

    async def worker(i: int) -> None:
        s = dev.stream()
        n = 256 << (i % 5)
        d = dev.empty(n)
        host = np.empty(n, np.uint8)
        pinned = gpuaio.pinned_empty(n)
        src = pattern(n, i)
        k = 0
        while counter[0] < ops:
            k += 1
            step = k % 6
            if step == 0:
                await s.copy(d, src)
            elif step == 1:
                await s.launch(kernel, max(1, n // 256), 256, d, np.uint64(n))
            elif step == 2:
                await s.copy(host, d)
                if k % 600 == 2 and k > 6 and not np.array_equal(host, src + np.uint8(1)):
                    stats.mismatches += 1
            elif step == 3:
                await s.memset(d, k & 0xFF, width=1)
            elif step == 4:
                await s.copy(pinned, d)
                if k % 600 == 4 and not (pinned == (k - 1) & 0xFF).all():
                    stats.mismatches += 1
            else:
                await s.copy(d, pinned)
            counter[0] += 1
            if counter[0] >= next_sample[0]:
                next_sample[0] += sample_every
                sample()
        await s.aclose()

    t0 = time.perf_counter()
    with trouble.capture():
        trouble.watch_loop()
        try:
            async with anyio.create_task_group() as tg:
                for i in range(workers):
                    tg.start_soon(worker, i)
        except Exception as exc:  # pragma: no cover - recorded, not raised
            stats.errors.append(f"{type(exc).__name__}: {exc}")
        sample()
        stats.leaks.extend(
            await anyio.to_thread.run_sync(lambda: leak_problems(rt, baseline, grace_s=5.0))
        )
    stats.foreign_exceptions.extend(trouble.items)
    stats.ops = counter[0]
    stats.elapsed_s = time.perf_counter() - t0
    stats.ops_per_s = stats.ops / stats.elapsed_s if stats.elapsed_s else 0.0
    after = [s for s in stats.samples if s["ops"] >= warmup * ops] or stats.samples
    first, last = after[0], stats.samples[-1]
    stats.rss_growth_mib = round(max(s["rss_mib"] for s in after) - first["rss_mib"], 2)
    stats.pool_reserved_growth = int(
        max(s["pool_reserved"] for s in after) - first["pool_reserved"]
    )
    stats.pool_reserved_max = int(max(s["pool_reserved"] for s in stats.samples) - reserved_before)
    stats.pool_bound = workers * 2 * (64 << 10)
    stats.workers = workers
    stats.max_pending = int(max(s["pending"] for s in stats.samples))
    stats.threads_growth = int(max(s["threads"] for s in after) - first["threads"])
    del last
    return stats


# -- sticky fault -------------------------------------------------------------------


@dataclass
class FaultStats:
    backend: str = ""
    loop: str = ""
    completion: str = ""
    pending: int = 0
    """Awaits pending when the fault struck."""
    raised_fatal: int = 0
    other_outcomes: list[str] = field(default_factory=list)
    fault: str = ""
    """What faulted: ``illegal_address`` or ``trap`` (a kernel, CUDA), ``sim``."""
    latencies_ms: list[float] = field(default_factory=list)
    """From the driver first reporting the fault to each pending await raising."""
    driver_report_ms: float = 0.0
    """From the faulting launch to the driver first reporting the error (CUDA: a
    thread polls a never-recorded event's query; the sim timestamps the fault
    exactly). gpuaio cannot beat it: latencies are measured from it."""
    later_calls: int = 0
    later_fatal: int = 0
    later_latency_ms: float = 0.0
    limit_ms: float = 20.0
    """Every pending await raises within this of the driver's first report."""

    @property
    def max_latency_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    def failures(self) -> list[str]:
        out = list(self.other_outcomes)
        if self.raised_fatal != self.pending:
            out.append(
                f"{self.raised_fatal} of {self.pending} pending awaits raised DeviceFatalError"
            )
        if self.max_latency_ms > self.limit_ms:
            out.append(f"slowest pending await raised after {self.max_latency_ms:.1f} ms")
        if self.later_fatal != self.later_calls:
            out.append(
                f"{self.later_fatal} of {self.later_calls} later calls raised DeviceFatalError"
            )
        if self.later_latency_ms > self.limit_ms:
            out.append(f"later calls took {self.later_latency_ms:.1f} ms to raise")
        return out

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_latency_ms"] = round(self.max_latency_ms, 2)
        d["latencies_ms"] = [round(x, 2) for x in self.latencies_ms]
        d["failures"] = len(self.failures())
        d["failure_details"] = self.failures()
        return d


class _DriverReport:
    """When the driver first reports a sticky error: a thread polls it every 0.2 ms.

    The driver notices a faulting kernel some time after the launch (on an
    H200 about 150 ms for an illegal address, 340 ms for a trap); an await can
    only raise after that, so latencies are measured from this moment. It
    polls a never-recorded event of its own: the query that reports first.
    """

    def __init__(self, rt: Any) -> None:
        import threading

        self._backend = rt.backend
        self._event = rt.backend.event_create(0)  # never recorded: a query reports only errors
        self._thread = threading.Thread(target=self._poll, name="driver-report", daemon=True)
        self.at = 0.0

    def start(self) -> None:
        self._thread.start()

    def _poll(self) -> None:
        deadline = time.perf_counter() + 20
        while time.perf_counter() < deadline:
            try:
                self._backend.event_query(self._event)
            except gpuaio.CudaError:
                self.at = time.perf_counter()
                return
            time.sleep(0.0002)

    def join(self) -> float:
        self._thread.join(25)
        return self.at or time.perf_counter()


ILLEGAL_ADDRESS_SRC = r"""
extern "C" __global__ void illegal_address(unsigned long long n) {
    // Write through a pointer into the unmapped first page: CUDA_ERROR_ILLEGAL_ADDRESS.
    volatile int* p = (volatile int*)(0x10ull + 4ull * (threadIdx.x % 4));
    if (threadIdx.x < n) *p = 42;
}
"""

TRAP_SRC = r"""
extern "C" __global__ void trap_kernel(unsigned long long n) {
    // A trapped kernel: CUDA_ERROR_LAUNCH_FAILED, reported later than an illegal address.
    if (threadIdx.x < n) asm volatile("trap;");
}
"""

FAULT_KERNELS = {
    "illegal_address": (ILLEGAL_ADDRESS_SRC, "illegal_address"),
    "trap": (TRAP_SRC, "trap_kernel"),
}


MARKER_FAULT_DELAY_S = 0.25
"""On an H200 the queries of pending markers reported a trapped kernel about
250 ms after a never-recorded event's query did (SimConfig.marker_fault_delay_s)."""


def strike_after_probe(backend: Any, device: int = 0, fallback_s: float = 0.06) -> threading.Event:
    """Sim: sticky-fault ``device`` right after gpuaio next queries a never-recorded
    event (a fault probe), so the fault becomes visible just after the engine
    looked: the worst moment for it. If nothing probes within ``fallback_s``
    the fault strikes then. The sim timestamps it (``backend.fault_time``).
    Returns an event set once the fault has struck.
    """
    struck = threading.Event()
    lock = threading.Lock()
    query = backend.event_query

    def strike() -> None:
        with lock:
            if struck.is_set():
                return
            backend.__dict__.pop("event_query", None)
            backend.fault_now(device)
            struck.set()

    def probed_query(event: Any) -> bool:
        result: bool = query(event)
        if event.last is None and event.device == device:
            strike()
        return result

    def fallback() -> None:
        if not struck.wait(fallback_s):
            strike()

    backend.event_query = probed_query
    threading.Thread(target=fallback, name="strike-fallback", daemon=True).start()
    return struck


async def run_sticky_fault(
    rt: Any,
    *,
    streams: int = 3,
    per_stream: int = 4,
    completion: str | None = None,
    fault: str = "illegal_address",
) -> FaultStats:
    """Ops pending on several streams, then a sticky fault.

    On ``sim`` the device faults right after gpuaio's next fault probe
    (:func:`strike_after_probe`), with pending markers reporting it only
    ``SimConfig.marker_fault_delay_s`` later, as on an H200; on ``cuda`` a real
    kernel faults (``fault``: writing to address 0x10, or ``trap``). Every
    pending await must raise DeviceFatalError within ``limit_ms`` (20 ms) of the
    driver first reporting the fault, measured in the same run (the sim's own
    timestamp; on CUDA a thread polling the driver); every later call or await
    must raise it too.
    """
    import sniffio

    from .. import conftest

    if completion and rt.strategy != completion:
        rt.set_completion(completion)
    dev: gpuaio.Device = device_of(rt, 0)
    sim = rt.backend.name == "sim"
    stats = FaultStats(
        backend=rt.backend.name,
        completion=rt.strategy,
        loop=_loop_name(sniffio.current_async_library()),
        fault="sim" if sim else fault,
    )
    # Compile before any latch spins: loading a module may wait for running kernels.
    fault_kernel = None if sim else dev.compile(*FAULT_KERNELS[fault])
    ss = [dev.stream() for _ in range(streams)]
    bufs = [dev.empty(1 << 16) for _ in range(streams)]
    releases = [conftest.latch(dev, s) for s in ss]  # the streams can't drain
    ops = []
    for s, d in zip(ss, bufs, strict=True):
        for k in range(per_stream):
            # Device ops first: they wait on completion markers, which is what
            # the engines watch. A staged D2H last: a host job behind them.
            if k < per_stream - 1:
                ops.append(s.memset(d, k, width=1))
            else:
                ops.append(s.copy(np.empty(1 << 16, np.uint8), d))  # staged D2H
    fault_stream = dev.stream()
    outcome: list[tuple[float, BaseException | None]] = []

    async def waiter(op: gpuaio.Operation) -> None:
        try:
            await op
        except BaseException as exc:  # the outcome is what we measure
            outcome.append((time.perf_counter(), exc))
            if not isinstance(exc, Exception):
                raise
        else:
            outcome.append((time.perf_counter(), None))

    t_fault = 0.0
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for op in ops:
                tg.start_soon(waiter, op)
            await anyio.sleep(0.02)  # every waiter is parked on its op
            stats.pending = sum(not op.done() for op in ops)
            if sim:
                # Pending markers report the fault 250 ms late, as on an H200.
                rt.backend.config = dataclasses.replace(
                    rt.backend.config, marker_fault_delay_s=MARKER_FAULT_DELAY_S
                )
                t_fault = time.perf_counter()
                struck = strike_after_probe(rt.backend, 0)
            else:
                reported = _DriverReport(rt)
                fault_stream.launch(fault_kernel, 1, 32, np.uint64(32))
                t_fault = time.perf_counter()
                reported.start()
    if sim:
        struck.wait(5)
        t_report = rt.backend.fault_time(0) or time.perf_counter()
    else:
        t_report = reported.join()
    stats.driver_report_ms = (t_report - t_fault) * 1e3
    for t, exc in outcome:
        if isinstance(exc, gpuaio.DeviceFatalError):
            stats.raised_fatal += 1
            stats.latencies_ms.append((t - t_report) * 1e3)
        else:
            stats.other_outcomes.append(f"pending await ended with {exc!r}")
    # Later calls and awaits: every one raises the sticky error, at once.
    t0 = time.perf_counter()
    later: list[Callable[[], Any]] = [
        lambda: ss[0].memset(bufs[0], 1),
        lambda: ss[1].copy(np.empty(16, np.uint8), bufs[1][:16]),
        lambda: dev.stream(),
        lambda: dev.empty(64),
        lambda: ss[2].synchronize(),
    ]
    for call in later:
        stats.later_calls += 1
        try:
            result = call()
            if isinstance(result, gpuaio.Operation):
                with anyio.fail_after(5):
                    await result
        except gpuaio.DeviceFatalError:
            stats.later_fatal += 1
        except Exception as exc:
            stats.other_outcomes.append(f"later call raised {exc!r}")
        else:
            stats.other_outcomes.append("a later call succeeded on a faulted device")
    stats.later_latency_ms = (time.perf_counter() - t0) * 1e3
    for release in releases:
        release()
    return stats


# -- loop shutdown with ops in flight --------------------------------------------------


@dataclass
class ShutdownStats:
    loop: str = ""
    ops: int = 0
    posts_after_close: int = 0
    """Wake-ups gpuaio tried to post to the closed loop (refused there, quietly)."""
    callbacks_after_close: int = 0
    op_errors: list[str] = field(default_factory=list)
    foreign_exceptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    stuck: int = 0

    def failures(self) -> list[str]:
        out = [*self.op_errors, *self.foreign_exceptions, *self.leaks]
        if self.callbacks_after_close:
            out.append(f"{self.callbacks_after_close} callbacks ran on a closed loop")
        if self.stuck:
            out.append(f"{self.stuck} ops never completed after the loop closed")
        return out


def run_loop_shutdown(rt: Any, loop: str) -> ShutdownStats:
    """Start ops (staged, direct, host, launches, events) behind latches, await them
    from tasks, let the event loop end while they are pending, then release the
    latches.

    Checks: no exception anywhere, no callback run on the closed loop, every op
    completes, nothing leaked once they have.
    """
    from .. import conftest

    stats = ShutdownStats(loop=loop)
    trouble = Trouble()
    dev: gpuaio.Device = device_of(rt, 0)
    kernel = add_one_kernel(dev)
    PinnedAccounting.install(rt)
    baseline = ResourceBaseline.take(rt)
    ops: list[gpuaio.Operation] = []
    releases: list[Callable[[], None]] = []
    streams: list[gpuaio.Stream] = []
    ran_after_close = [0]

    def start_ops() -> None:
        for i in range(3):
            s = dev.stream()
            streams.append(s)
            releases.append(conftest.latch(dev, s))
            n = (2 << 20) if i == 0 else 4096 << i
            d = dev.empty(n)
            ops.append(s.copy(d, pattern(n, i)))  # staged (chunked when i == 0)
            ops.append(s.launch(kernel, max(1, n // 256), 256, d, np.uint64(n)))
            ops.append(s.copy(np.empty(n, np.uint8), d))  # staged D2H
            ops.append(s.memset(np.empty(n, np.uint8), 3, width=1))  # host job
            ops.append(s.copy(gpuaio.pinned_empty(n), d))  # direct
            ops.append(s.record())

    with trouble.capture():
        if loop in ("asyncio", "uvloop"):
            import asyncio

            base: type[Any] = asyncio.SelectorEventLoop
            if loop == "uvloop":
                import uvloop

                base = uvloop.Loop

            class Recording(base):  # type: ignore[misc, valid-type]
                def call_soon_threadsafe(self, callback: Any, *args: Any, **kw: Any) -> Any:
                    if self.is_closed():
                        stats.posts_after_close += 1

                        def late(*_a: Any) -> None:
                            ran_after_close[0] += 1

                        return super().call_soon_threadsafe(late, *args, **kw)
                    return super().call_soon_threadsafe(callback, *args, **kw)

            async def amain() -> None:
                trouble.watch_loop()
                start_ops()
                # Tasks still waiting when the loop ends (asyncio.Runner cancels them).
                tasks = [asyncio.ensure_future(op.wait()) for op in ops]
                await asyncio.sleep(0.01)
                assert not any(t.done() for t in tasks)

            with asyncio.Runner(loop_factory=Recording) as runner:
                runner.run(amain())
        else:
            import trio

            async def tmain() -> None:
                start_ops()
                with trio.move_on_after(0.01):
                    async with trio.open_nursery() as nursery:
                        for op in ops:
                            nursery.start_soon(op.wait)

            trio.run(tmain)
        for release in releases:
            release()
        stats.ops = len(ops)
        deadline = time.monotonic() + 10
        while not all(op.done() for op in ops) and time.monotonic() < deadline:
            time.sleep(0.005)
        stats.stuck = sum(not op.done() for op in ops)
        stats.op_errors.extend(f"{op!r}: {op.exception()!r}" for op in ops if op.exception())
        for s in streams:
            s.close()
        ops.clear()
        time.sleep(0.05)  # late wake-ups, if any, would land now
        stats.leaks.extend(leak_problems(rt, baseline, grace_s=5.0))
    stats.callbacks_after_close = ran_after_close[0]
    stats.foreign_exceptions.extend(trouble.items)
    return stats
