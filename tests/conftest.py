"""Shared fixtures: every async test runs on asyncio, uvloop and trio."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

# Load CUDA modules when they are loaded, not at a kernel's first launch: with
# lazy loading that first launch may wait for the kernels already running, and
# a test that launches a kernel while a latch kernel holds another stream
# would then wait for itself. Set before any CUDA call of the test process.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._core.compiled import compiled_modules
from gpuaio._engine.completion import _events, _queue
from gpuaio._engine.hostwork import byte_view

_loops: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform == "win32":  # pragma: no cover
    _loops.pop(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (the 1,000,000-op soak and the like)",
    )


COMPILED = bool(compiled_modules())
"""Whether this gpuaio runs its hot path compiled (``hatch_build.py``; nox -s compiled)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.skip(reason="slow: run with --run-slow (or tools/reliability_report.py)")
    # A compiled module's classes and globals cannot be patched from outside
    # (a patched global may even crash it): such a test runs in the
    # pure-Python session only, which checks the same code.
    patches = pytest.mark.skip(reason="patches a module this install runs compiled (mypyc)")
    for item in items:
        if item.get_closest_marker("slow") is not None and not config.getoption("--run-slow"):
            item.add_marker(slow)
        if COMPILED and item.get_closest_marker("patches_compiled") is not None:
            item.add_marker(patches)


_TIMES = os.environ.get("GPUAIO_TEST_TIMES")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``GPUAIO_TEST_TIMES=FILE``: one line per test phase as it ends (and a
    failure's traceback), so a run cut short by a time limit still tells where its
    time went and what failed."""
    if _TIMES and (report.when == "call" or report.outcome != "passed"):
        with open(_TIMES, "a") as f:
            f.write(
                f"{report.duration:8.3f} {report.when:8s} {report.outcome:8s} {report.nodeid}\n"
            )
            if report.failed:  # the traceback now: a run that is killed prints no summary
                f.write(f"{report.longreprtext}\n{report.capstderr}\n")


@pytest.fixture(params=_loops)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(params=gpuaio.STRATEGIES)
def strategy_dev(request: pytest.FixtureRequest, gpuaio_runtime: Any) -> Iterator[gpuaio.Device]:
    """Device 0 with each completion strategy in turn."""
    gpuaio_runtime.set_completion(request.param)
    yield device_of(gpuaio_runtime, 0)
    # Release the strategy's resources (the flag slab) before the leak check.
    deadline = time.perf_counter() + 5
    while gpuaio_runtime.engine(0).pending() and time.perf_counter() < deadline:
        time.sleep(0.01)
    gpuaio_runtime.set_completion("events")


# -- completion batches (gpuaio._engine.completion._queue) -----------------
@pytest.fixture
def keep_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher drops no idle queue (a new one would probe anew) during the test."""
    monkeypatch.setattr(_queue, "RETIRE_S", 60.0)


@pytest.fixture
def long_stand_down(gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Device 0's completion engine, whose watcher stands down for 60 s at a
    time (as while loops poll) during the test. Woken at its end: where one
    runtime serves the session (CUDA), a watcher left in a 60 s stand-down
    kept the next test's ops nobody awaits pending, since a new op does not
    wake a standing-down watcher (run IA: ``test_marker_batches``). The engine
    woken is the one serving device 0 at the end: a test that switches the
    completion strategy (``set_completion``) replaces it."""
    monkeypatch.setattr(_events, "STAND_DOWN_S", 60.0)
    yield gpuaio_runtime.engine(0)
    monkeypatch.undo()
    engine = gpuaio_runtime._engines.get(0)
    if engine is not None:
        engine.hand_off()


@pytest.fixture
def always_batch(monkeypatch: pytest.MonkeyPatch, keep_queues: None) -> None:
    """Every short op joins a batch, lone or not (as under many tasks)."""
    monkeypatch.setattr(_queue, "BATCH_PROBE_S", 0.0)


@pytest.fixture
def dev(gpuaio_device: gpuaio.Device) -> gpuaio.Device:
    return gpuaio_device


@pytest.fixture
def stream(gpuaio_stream: gpuaio.Stream) -> gpuaio.Stream:
    return gpuaio_stream


ADD_ONE_SRC = r"""
extern "C" __global__ void add_one(unsigned char* data, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) data[i] += 1;
}
"""

LATCH_SRC = r"""
extern "C" __global__ void latch(volatile int* flag) {
    while (*flag == 0) { __nanosleep(1000); }
}
"""


def _add_one_sim(grid: Any, block: Any, data: np.ndarray, n: Any) -> None:
    # As the CUDA kernel: one thread a byte, along x only (a launch too small
    # for ``n`` leaves the rest, on the sim too).
    gx = grid if isinstance(grid, int) else grid[0]
    x = gx * (block if isinstance(block, int) else block[0])
    data.reshape(-1).view(np.uint8)[: min(int(n), x)] += 1


def add_one_kernel(dev: gpuaio.Device) -> gpuaio.Kernel:
    """A kernel adding 1 to each byte, on either backend."""
    return dev.compile(ADD_ONE_SRC, "add_one", sim=_add_one_sim)


class _Latches:
    """The latches of one CUDA runtime: a compiled latch kernel, a slab of flags,
    and a hold on the runtime's frees while any latch is closed.

    A latch kernel spins until the host opens its flag. ``cuMemFree`` and
    ``cuMemFreeHost`` wait for all of the device's work, and while they wait
    every other thread's driver calls wait too (seen on an H200): a free
    during a latch would stall the very thread that is to open it. So frees
    submitted to the reaper while a latch is closed run once the last one
    opens. The flags live in one pinned slab for the runtime's lifetime, so
    opening a latch frees nothing either.
    """

    SLOTS = 4096

    def __init__(self, dev: gpuaio.Device) -> None:
        rt = dev._runtime
        self.kernel = dev.compile(LATCH_SRC, "latch")
        # A kernel polls it (cuMemHostAlloc memory); the leak check does not count it.
        ptr = rt.backend.host_alloc_mapped(4 * self.SLOTS)
        self.flags = byte_view(ptr, 4 * self.SLOTS).view(np.int32)
        self.flags[:] = 1
        self.ptr = ptr
        self.next = 0
        self.closed: set[int] = set()
        self.deferred: list[Callable[[], None]] = []
        self.gc_was_enabled = True
        self.lock = threading.Lock()
        reaper = rt.reaper
        self._submit = reaper.submit
        reaper.submit = self._reaper_submit  # type: ignore[method-assign]
        # Run the kernel once (its flag open): its first launch may load it.
        s = dev.stream()
        s.launch(self.kernel, 1, 1, _FlagPtr(ptr))
        rt.backend.stream_synchronize(s._native)
        s.close()

    def _reaper_submit(self, fn: Callable[[], None]) -> None:
        with self.lock:
            if self.closed:
                self.deferred.append(fn)
                return
        self._submit(fn)

    def close(self, dev: gpuaio.Device, stream: gpuaio.Stream) -> Callable[[], None]:
        if not self.closed:
            # Frees already due must not run during the latch either: collect
            # garbage now (a finalizer of another library's CUDA object may
            # free or unload synchronously, on whatever thread the collector
            # runs), let the reaper's queue drain, and keep the collector off
            # until the last latch opens.
            gc.collect()
            drained = threading.Event()
            self._submit(drained.set)
            drained.wait(10)
            self.gc_was_enabled = gc.isenabled()
            gc.disable()
        with self.lock:
            slot = self.next
            self.next = (slot + 1) % self.SLOTS
            self.closed.add(slot)
        self.flags[slot] = 0
        stream.launch(self.kernel, 1, 1, _FlagPtr(self.ptr + 4 * slot))
        return functools.partial(self.open, slot)

    def open(self, slot: int) -> None:
        self.flags[slot] = 1
        with self.lock:
            if slot not in self.closed:
                return
            self.closed.discard(slot)
            if self.closed:
                return
            deferred, self.deferred = self.deferred, []
        if self.gc_was_enabled:
            gc.enable()
        for fn in deferred:
            self._submit(fn)

    def open_all(self) -> None:
        for slot in list(self.closed):
            self.open(slot)


class _FlagPtr:
    """A latch flag in pinned memory, passed to the kernel as a pointer."""

    def __init__(self, ptr: int) -> None:
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (1,),
            "typestr": "<i4",
            "data": (ptr, False),
            "version": 3,
        }


_T = TypeVar("_T")


def twice(attempt: Callable[[], _T]) -> _T:
    """``attempt()``, run once more if it failed an assertion.

    For checks that a loop was never blocked for more than a few ms: a loaded
    2-core CI VM now and then stalls the whole process for 50-150 ms (the CI
    of stop 45: a 73 ms and a 149 ms stall, 12 s apart, in two such tests). A
    block the code under test causes shows in both runs; a stall of the
    machine rarely twice in a row. A second failure carries the first as its
    ``__context__``, so both show in the report.
    """
    try:
        return attempt()
    except AssertionError:
        return attempt()


async def twice_async(attempt: Callable[[], Awaitable[_T]]) -> _T:
    """:func:`twice` for a check that runs on the event loop."""
    try:
        return await attempt()
    except AssertionError:
        return await attempt()


_latches: weakref.WeakKeyDictionary[Any, dict[int, _Latches]] = weakref.WeakKeyDictionary()


def latch(dev: gpuaio.Device, stream: gpuaio.Stream) -> Callable[[], None]:
    """Hold ``stream`` busy until the returned function is called."""
    rt = dev._runtime
    if rt.backend.name == "sim":
        # A hold is work enqueued behind gpuaio's back, as another library
        # would enqueue it: that needs the handle, and handing it out stops
        # gpuaio sharing markers among the stream's ops (Stream.handle).
        assert stream.handle
        return rt.backend.hold(stream._native)  # type: ignore[attr-defined, no-any-return]
    per_device = _latches.setdefault(rt, {})
    latches = per_device.get(dev.ordinal)
    if latches is None:
        latches = per_device[dev.ordinal] = _Latches(dev)
    return latches.close(dev, stream)


def open_latches() -> None:
    """Open every GPU latch a test left closed (sim holds end with their runtime)."""
    for per_device in list(_latches.values()):
        for latches in per_device.values():
            latches.open_all()


@pytest.fixture(autouse=True)
def _open_latches_left_closed() -> Iterator[None]:
    """A test that failed before opening its latches must not stall the next ones.

    This runs after the test's other fixtures are torn down; a fixture whose
    teardown may wait for the GPU (freeing pinned memory synchronizes) calls
    :func:`open_latches` first itself.
    """
    yield
    open_latches()


@contextlib.contextmanager
def fresh_stager(rt: Any) -> Iterator[None]:
    """Within the block ``rt`` makes a new stager when one is asked for (reading
    the staging settings from the environment again); the old one is back after."""
    old = rt.extras.pop("stager", None)
    try:
        yield
    finally:
        stager = rt.extras.pop("stager", None)
        if stager is not None:
            stager.close()
        if old is not None:
            rt.extras["stager"] = old


@pytest.fixture
def staged_only(gpuaio_runtime: Any) -> Iterator[Any]:
    """Pageable copies go through gpuaio's staging even on an idle stream, not
    the driver's own path (``driver_max=0``, ``direct_up_max=0``) nor the copy
    threads' gated one (``gpuaio._engine.gated``): for tests of the staging
    pipeline itself. Yields the stager."""
    import dataclasses

    stager = gpuaio_runtime.stager
    old, gated, direct = stager.config, stager.gated, stager.direct_up_max
    stager.config = dataclasses.replace(old, driver_max=0)
    stager.gated = None
    stager.direct_up_max = 0
    try:
        yield stager
    finally:
        stager.config = old
        stager.gated = gated
        stager.direct_up_max = direct
