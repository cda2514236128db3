"""Ownership: cancelled awaits, dropped buffers, freeing in flight, closed loops."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine.reaper import Reaper
from tests.conftest import add_one_kernel, latch
from tests.test_copy import pattern

pytestmark = pytest.mark.anyio


async def test_cancelled_await_does_not_cancel_op(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    n = 1 << 20
    data = pattern(n, 11)
    d = dev.empty(n)
    release = latch(dev, stream)
    op = stream.copy(d, data)
    with anyio.move_on_after(0.02) as scope:
        await op
    assert scope.cancelled_caught
    assert not op.done()
    release()
    await op
    out = np.empty(n, np.uint8)
    await stream.copy(out, d)
    np.testing.assert_array_equal(out, data)


async def test_op_keeps_dropped_buffers_alive(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    n = 1 << 16
    release = latch(dev, stream)
    d = dev.empty(n)
    host = gpuaio.pinned_empty(n)
    host[:] = 1
    op = stream.copy(host, d)
    wd, wh = weakref.ref(d), weakref.ref(host)
    del d, host
    gc.collect()
    assert wd() is not None and wh() is not None, "in-flight op must own its buffers"
    release()
    await op
    del op
    gc.collect()
    assert wd() is None and wh() is None, "a completed op must let its buffers go"


async def test_free_waits_for_inflight_ops(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    """``free()`` while an op uses the memory: later ops are refused at once, and
    the backend's free comes only after the op, then without delay.

    Watched at the backend's free call, not through the pointer's attributes:
    the CUDA backend frees with ``cuMemFreeAsync`` (round forty), after which
    ``cuPointerGetAttribute`` of the address is undefined (on an H100 it went
    on answering "device memory" for seconds: run ER)."""
    rt = dev._runtime
    n = 1 << 16
    d = dev.empty(n)
    ptr = d.ptr  # the address left gpuaio: its free waits for the device too
    release = latch(dev, stream)
    op = stream.memset(d, 1)
    frees = _Frees(rt.backend, ptr)
    try:
        d.free()
        with pytest.raises(gpuaio.BufferFreedError):
            stream.memset(d, 2)
        await anyio.sleep(0.02)
        assert not frees.started.is_set(), "freed while in use"
        assert not op.done()
        release()
        await op
        assert await frees.wait(10), "never freed"
        assert frees.calls == ["mem_free"]
    finally:  # (a latch left closed is opened by conftest's fixture)
        frees.restore()


async def test_registration_outlives_inflight_ops(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    n = 1 << 16
    arr = np.empty(n, np.uint8)
    arr[:] = 4
    reg = gpuaio.register_host(arr)
    assert gpuaio.memory_kind(arr) is gpuaio.MemoryKind.PINNED
    d = dev.empty(n)
    release = latch(dev, stream)
    op = stream.copy(d, arr)
    reg.unregister()
    await anyio.sleep(0.02)
    assert dev._runtime.backend.pointer_info(arr.ctypes.data).kind is gpuaio.MemoryKind.PINNED
    release()
    await op
    assert gpuaio.memory_kind(arr) is gpuaio.MemoryKind.PAGEABLE
    out = np.empty(n, np.uint8)
    await stream.copy(out, d)
    assert (out == 4).all()


def test_loop_closes_with_ops_in_flight(gpuaio_runtime: Any) -> None:
    """No callback on a closed loop, no exception in a foreign thread."""
    dev = device_of(gpuaio_runtime, 0)
    stream = dev.stream()
    errors: list[Any] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args)
    try:
        release_box: list[Any] = []
        d = dev.empty(1 << 16)

        async def main() -> gpuaio.Operation:
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
            release_box.append(latch(dev, stream))
            op = stream.memset(d, 1)
            task = asyncio.ensure_future(op.wait())
            await asyncio.sleep(0.01)
            task.cancel()
            return op

        op = asyncio.run(main())
        release_box[0]()
        deadline = time.perf_counter() + 2
        while not op.done():
            assert time.perf_counter() < deadline
            time.sleep(0.005)
        time.sleep(0.05)
    finally:
        threading.excepthook = old_hook
    assert errors == []
    assert op.exception() is None


def test_trio_run_ends_with_op_in_flight(gpuaio_runtime: Any) -> None:
    import trio

    dev = device_of(gpuaio_runtime, 0)
    stream = dev.stream()
    d = dev.empty(1 << 16)
    box: list[Any] = []

    async def main() -> None:
        box.append(latch(dev, stream))
        op = stream.memset(d, 1)
        box.append(op)
        with trio.move_on_after(0.01):
            await op

    trio.run(main)
    box[0]()
    op = box[1]
    deadline = time.perf_counter() + 2
    while not op.done():
        assert time.perf_counter() < deadline
        time.sleep(0.005)
    assert op.exception() is None


def _reaper_and_two_frees() -> tuple[Reaper, Callable[[str], None], list[str], threading.Event]:
    """A new reaper, a free that records its name, the names recorded, and
    an event set once two frees have run."""
    ran: list[str] = []
    both = threading.Event()

    def free(name: str) -> None:
        ran.append(name)
        if len(ran) == 2:
            both.set()

    return Reaper(), free, ran, both


def test_reaper_submit_nested_in_its_own_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """``__del__`` methods submit frees; the garbage collector may run one inside
    ``_Reaper.submit`` while it creates its thread. The nested submit must not
    deadlock on the reaper's lock (it hung the suite once), and both frees run."""
    from gpuaio._api import runtime as _runtime

    reaper, free, ran, both = _reaper_and_two_frees()
    real_thread = threading.Thread

    class FinalizerDuringInit(real_thread):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Only the reaper's thread, made on the worker: the patch is
            # process-wide, and other threads (a runtime an earlier test left
            # running) may be made meanwhile.
            if threading.current_thread() is worker:
                reaper.submit(lambda: free("nested"))  # as Allocation.__del__ would
            super().__init__(*args, **kwargs)

    worker = real_thread(target=lambda: reaper.submit(lambda: free("outer")), daemon=True)
    monkeypatch.setattr(_runtime.threading, "Thread", FinalizerDuringInit)
    worker.start()
    worker.join(5)
    monkeypatch.undo()
    assert not worker.is_alive(), "submit deadlocked"
    assert both.wait(5)
    assert sorted(ran) == ["nested", "outer"]
    reaper.close()


def test_reaper_submit_from_its_own_new_thread_before_start_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collector may run a ``__del__`` on the reaper's new thread while
    ``Thread.start()`` still waits for it on the submitting thread, which
    holds the reaper's lock: the nested submit must not wait for that lock
    (it hung a CI run), and both frees run."""
    from gpuaio._engine import reaper as _reaper

    reaper, free, ran, both = _reaper_and_two_frees()
    real_thread = threading.Thread
    nested_done = threading.Event()
    in_time: list[bool] = []

    class FinalizerOnTheNewThread(real_thread):
        def start(self) -> None:
            if threading.current_thread() is not worker:  # as above: not the reaper's
                super().start()
                return
            # As a __del__ run by the collector on the new thread would,
            # before start() returns here.
            other = real_thread(
                target=lambda: (reaper.submit(lambda: free("nested")), nested_done.set()),
                daemon=True,
            )
            other.start()
            in_time.append(nested_done.wait(3))
            super().start()

    monkeypatch.setattr(_reaper.threading, "Thread", FinalizerOnTheNewThread)
    worker = real_thread(target=lambda: reaper.submit(lambda: free("outer")), daemon=True)
    worker.start()
    worker.join(10)
    monkeypatch.undo()
    assert in_time == [True], "the nested submit waited for the starting thread's lock"
    assert not worker.is_alive(), "submit deadlocked"
    assert both.wait(5)
    assert sorted(ran) == ["nested", "outer"]
    reaper.close()


def _close_in_background(rt: Any) -> threading.Thread:
    """Start ``rt.close()`` on a thread; return once it has begun."""
    closer = threading.Thread(target=rt.close, daemon=True)
    closer.start()
    deadline = time.monotonic() + 10
    while not rt.closed and time.monotonic() < deadline:
        time.sleep(0.001)
    assert rt.closed, "close() did not start"
    return closer


SPIN_SRC = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(10000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""
SPIN_S = 2.0  # a kernel's length: far longer than a free that does not wait takes


def _spin_sim(grid: Any, block: Any, ns: Any) -> None:
    time.sleep(int(ns) / 1e9)


class _Frees:
    """Which backend call freed the device memory at ``ptr``, once it has returned."""

    NAMES = ("mem_free", "mem_free_async", "host_free", "host_free_async")

    def __init__(self, backend: Any, ptr: int, after: Callable[[], bool] | None = None) -> None:
        self.backend = backend
        self.ptr = ptr
        self.after = after
        self.after_done: list[bool] = []  # ``after()`` as each free of ``ptr`` returned
        self.calls: list[str] = []
        self.started = threading.Event()
        self.done = threading.Event()
        # Wrappers already on the instance (the leak check's pinned
        # accounting, on a session's runtime) are put back by restore().
        self.saved = {n: vars(backend)[n] for n in self.NAMES if n in vars(backend)}
        for name in self.NAMES:
            setattr(backend, name, self._watch(name, getattr(backend, name)))

    def _watch(self, name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def free(ptr: int) -> None:
            if ptr == self.ptr:
                self.started.set()
            real(ptr)
            if ptr == self.ptr:
                if self.after is not None:
                    self.after_done.append(self.after())
                self.calls.append(name)
                self.done.set()

        return free

    def restore(self) -> None:
        for name in self.NAMES:
            if name in self.saved:
                setattr(self.backend, name, self.saved[name])
            else:
                vars(self.backend).pop(name, None)

    async def wait(self, seconds: float) -> bool:
        """Whether the free returned within ``seconds`` (waited for on a thread)."""
        return await anyio.to_thread.run_sync(self.done.wait, seconds)

    async def begun(self, seconds: float) -> bool:
        """Whether the free was called within ``seconds``."""
        return await anyio.to_thread.run_sync(self.started.wait, seconds)


@pytest.mark.gpuaio_gpu
@pytest.mark.parametrize("case", ["own", "exported", "pinned"])
async def test_freed_memory_goes_back_to_the_driver(dev: gpuaio.Device, case: str) -> None:
    """Each of the CUDA backend's stream-ordered frees gives the memory back
    by the time it returns: device memory only gpuaio used (``cuMemFreeAsync``
    on the free stream, no wait for the device), an exported device array
    (after a synchronize), a pinned array from the host pool. Seen as the
    device's free memory (``cuMemGetInfo``) or the pool's reserved memory;
    without a synchronize after the free the driver kept 2 GiB for the 10 s
    this test waited (run ES). A pointer's attributes are no evidence
    (undefined after ``cuMemFreeAsync``)."""
    from cuda.bindings import driver as cu

    be = dev._runtime.backend

    def check(result: tuple[Any, ...]) -> Any:
        assert not result[0], f"{result[0]!r}"
        return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)

    if case == "pinned":
        pool = be._host_pool()
        if pool is None:
            pytest.skip("no host memory pool on this driver (or GPUAIO_HOST_POOL=0)")
        reserved = cu.CUmemPool_attribute.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT

        def taken() -> int:  # bytes the host pool holds
            return int(check(cu.cuMemPoolGetAttribute(pool, reserved)))

    else:
        ctx = cu.CUcontext(be.primary_context(dev.ordinal))

        def taken() -> int:  # bytes of the device in use
            check(cu.cuCtxPushCurrent(ctx))
            try:
                free, total = check(cu.cuMemGetInfo())
                return int(total) - int(free)
            finally:
                check(cu.cuCtxPopCurrent())

    n = 1 << 30 if case == "pinned" else 2 << 30
    least = n * 3 // 4  # the driver rounds, and others may allocate a little meanwhile
    before = taken()
    a: Any = gpuaio.pinned_empty(n) if case == "pinned" else dev.empty(n)
    held = taken()
    assert held - before >= least, "the allocation was not seen"
    ptr = a.ctypes.data if case == "pinned" else a._alloc.ptr
    frees = _Frees(be, ptr)
    try:
        if case == "exported":
            assert a.ptr
        del a
        gc.collect()
        assert await frees.wait(10), "never freed"
        call = {"own": "mem_free_async", "exported": "mem_free", "pinned": "host_free"}[case]
        assert frees.calls == [call]
        deadline = time.perf_counter() + 2
        while held - taken() < least:
            assert time.perf_counter() < deadline, "the freed memory never went back"
            await anyio.sleep(0.01)
    finally:
        frees.restore()


async def test_memory_only_gpuaio_used_is_freed_without_waiting_for_the_device(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    """Dropped while a kernel runs, a device array whose address never left
    gpuaio is freed at once (``cuMemFreeAsync``), and the loop's next driver
    calls go ahead: ``cuMemFree`` would wait for the kernel, and hold every
    other thread's driver calls meanwhile (run EI: 179 ms of a 200 ms kernel)."""
    rt = dev._runtime
    spin = dev.compile(SPIN_SRC, "spin", sim=_spin_sim)
    other = dev.stream()
    b = dev.empty(4096)  # set-up calls before the window the test watches
    d = dev.empty(1 << 20)
    await other.memset(d, 1)  # gpuaio's own use: done before the drop
    dropped: list[Any] = [d]
    ptr = d._alloc.ptr
    del d
    running = stream.launch(spin, 1, 1, np.uint64(int(SPIN_S * 1e9)))
    frees = _Frees(rt.backend, ptr)
    try:
        dropped.clear()
        gc.collect()
        assert await frees.wait(SPIN_S * 0.8), "the free waited for the kernel"
        assert frees.calls == ["mem_free_async"]
        await _work_meanwhile(b, other)
        assert not running.done(), "the kernel ended first: the test proves nothing"
    finally:
        frees.restore()
        with anyio.CancelScope(shield=True):
            await running
        other.close()


async def _work_meanwhile(b: gpuaio.DeviceArray, other: gpuaio.Stream) -> None:
    """Another stream's memset of ``b`` (4 KiB) and download, awaited, byte-exact."""
    await other.memset(b, 7)
    out = np.zeros(4096, np.uint8)
    await other.copy(out, b)
    assert (out == 7).all()


@pytest.mark.parametrize(
    "share",
    [
        "ptr",
        "allocation",
        "cuda_array_interface",
        "dlpack",
        "pinned",
    ],
)
async def test_memory_other_libraries_may_use_is_freed_after_the_device_work(
    stream: gpuaio.Stream, dev: gpuaio.Device, share: str
) -> None:
    """Other libraries' work, which gpuaio cannot see, may still use an
    exported device array or any pinned array (its host address is always
    out): its free waits for the device's work, as ``cuMemFree`` and
    ``cuMemFreeHost`` do. Meanwhile the loop's driver calls go ahead (the CUDA
    backend waits with ``cuCtxSynchronize``, which holds nothing up, then
    frees stream-ordered; ``cuMemFree`` would hold every other thread's calls
    until the kernel ended). A launch of gpuaio's own does not count as an
    export."""
    rt = dev._runtime
    if share in ("cuda_array_interface", "dlpack") and rt.backend.name == "sim":
        pytest.skip("the simulator's device memory is not exported (TypeError)")
    pool = getattr(rt.backend, "_host_pool", None)
    if share == "pinned" and pool is not None and pool() is None:
        pytest.skip("no host memory pool (GPUAIO_HOST_POOL=0): cuMemFreeHost holds up the loop")
    spin = dev.compile(SPIN_SRC, "spin", sim=_spin_sim)
    other = dev.stream()
    b = dev.empty(4096)  # set-up calls before the window the test watches
    kernel = add_one_kernel(dev)
    a = dev.empty(1 << 20)
    await stream.launch(kernel, 1 << 10, 1 << 10, a, np.uint64(a.nbytes))
    assert not a._alloc.shared, "gpuaio's own launch counted as an export"
    exported: Any
    if share == "ptr":
        exported = a.ptr
    elif share == "allocation":
        exported = a.allocation
    elif share == "cuda_array_interface":
        exported = a.__cuda_array_interface__
    elif share == "dlpack":
        exported = a.__dlpack__()  # a capsule, dropped unconsumed below
    else:
        a = gpuaio.pinned_empty(1 << 20)
        await other.copy(a, dev.empty(1 << 20))
    if share != "pinned":
        del exported
        assert a._alloc.shared
    ptr, call = (a.ctypes.data, "host_free") if share == "pinned" else (a._alloc.ptr, "mem_free")
    be = rt.backend
    running = stream.launch(spin, 1, 1, np.uint64(int(SPIN_S * 1e9)))
    ended = be.event_create(dev.ordinal)  # the device's own word on when the kernel ended
    be.event_record(ended, stream._native)
    frees = _Frees(be, ptr, after=lambda: be.event_query(ended))
    try:
        del a
        gc.collect()
        assert await frees.begun(SPIN_S / 2), "the free did not begin"
        await anyio.sleep(0.05)  # into the driver's free (or its wait)
        await _work_meanwhile(b, other)
        assert not be.event_query(ended), "the loop's calls waited for the kernel (or it was short)"
        assert await frees.wait(SPIN_S * 5)
        assert frees.calls == [call]
        assert frees.after_done == [True], "freed before the kernel ended"
    finally:
        frees.restore()
        with anyio.CancelScope(shield=True):
            await running
        be.event_destroy(ended)
        other.close()


@pytest.mark.gpuaio_sim_only  # it closes the runtime (fresh per test on the sim)
def test_frees_queued_before_close_still_run(gpuaio_runtime: Any) -> None:
    """Arrays freed just before ``Runtime.close()`` are freed by it, even when
    the reaper thread gets to them only once close has begun: with a shared
    primary context (torch's), memory skipped then would stay allocated.
    Nothing is freed twice, and no free runs after the backend is released."""
    rt = gpuaio_runtime
    dev = device_of(rt, 0)
    arrays = [dev.empty(1 << 20) for _ in range(8)]
    ptrs = sorted(a.ptr for a in arrays)
    freed: list[int] = []
    late: list[int] = []
    real_free = rt.backend.mem_free

    def counting_free(ptr: int) -> None:
        (late if rt.released else freed).append(ptr)
        real_free(ptr)

    rt.backend.mem_free = counting_free
    gate = threading.Event()
    rt.reaper.submit(lambda: gate.wait(10))  # busy: the frees below queue behind it
    for a in arrays:
        a.free()
    closer = _close_in_background(rt)
    gate.set()  # the reaper reaches the queued frees after close has begun
    closer.join(10)
    assert not closer.is_alive(), "close() hung"
    assert sorted(freed) == ptrs, f"{len(freed)} of {len(ptrs)} queued frees ran"
    assert not late


@pytest.mark.gpuaio_sim_only  # it closes the runtime (fresh per test on the sim)
def test_a_stream_dropped_as_the_runtime_closes_is_destroyed_before_the_release(
    gpuaio_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A dropped stream is destroyed on its host thread, behind the stream's
    earlier jobs. ``Runtime.close()`` lets that run before it releases the
    backend. It used to release it first, and the destroy then failed and
    logged a traceback at exit (on an H200: ``CUDA_ERROR_CONTEXT_IS_DESTROYED``).
    With a primary context torch also holds, the stream would stay allocated."""
    rt = gpuaio_runtime
    s = device_of(rt, 0).stream()
    destroyed: list[bool] = []  # whether the backend was released by then
    real = rt.backend.stream_destroy

    def spy(native: Any) -> None:
        destroyed.append(rt.released)
        real(native)

    rt.backend.stream_destroy = spy
    gate = threading.Event()
    s._seq.executor.submit(lambda: gate.wait(10))  # its thread busy: the release queues
    s._closed = True  # as Stream.__del__ and aclose() do, then release:
    s._seq.release(destroy_stream=True)
    closer = _close_in_background(rt)
    time.sleep(0.05)
    assert not rt.released, "the backend was released before the stream's queued release ran"
    gate.set()
    closer.join(10)
    assert not closer.is_alive(), "close() hung"
    assert destroyed == [False]
    assert "failed to destroy" not in caplog.text


@pytest.mark.gpuaio_sim_only  # it closes the runtime (fresh per test on the sim)
def test_a_stream_release_stuck_past_close_is_skipped_not_failed(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream whose thread is stuck (a hung kernel, here a held job) does not
    hold up ``Runtime.close()`` for more than its bounded wait. When the release
    runs at last, the backend is gone with its context: it makes no driver call
    and logs no failure."""
    from gpuaio._api import runtime as _runtime

    monkeypatch.setattr(_runtime, "_RELEASE_WAIT_S", 0.2, raising=False)
    rt = gpuaio_runtime
    s = device_of(rt, 0).stream()
    calls: list[str] = []
    real_event, real_stream = rt.backend.event_destroy, rt.backend.stream_destroy
    rt.backend.event_destroy = lambda ev: (calls.append("event"), real_event(ev))
    rt.backend.stream_destroy = lambda native: (calls.append("stream"), real_stream(native))
    gate = threading.Event()
    ran = threading.Event()
    s._seq.executor.submit(lambda: gate.wait(10))
    s._closed = True
    s._seq.release(destroy_stream=True)
    s._seq.executor.submit(ran.set)
    t0 = time.monotonic()
    closer = _close_in_background(rt)
    closer.join(10)
    assert not closer.is_alive(), "close() hung"
    assert time.monotonic() - t0 < 5, "close() waited past its bound"
    assert rt.released
    gate.set()
    assert ran.wait(10), "the stream's thread never got past its release"
    assert calls == []
    assert "failed to destroy" not in caplog.text


def test_numpy_refuses_a_device_array(gpuaio_runtime: Any) -> None:
    """np.asarray(device_array) raises TypeError, as CuPy's arrays do (it used to
    build an object array of 0-d device arrays)."""
    import numpy as np

    d = device_of(gpuaio_runtime, 0).empty(16)
    with pytest.raises(TypeError, match="device memory"):
        np.asarray(d)
    with pytest.raises(TypeError, match="device memory"):
        np.array(d[4:8])


@pytest.mark.gpuaio_sim_only  # starts runtimes of its own on the simulated backend
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
def test_opening_the_first_device_leaves_the_loop_running(
    gpuaio_runtime: Any, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """The first Device of a process starts the runtime: the driver's start-up
    (here a stand-in that takes 300 ms) blocks the loop when ``Device(0)`` runs
    on it; ``await Device.open(0)`` runs it on a worker thread instead."""
    import time

    import anyio

    from gpuaio._api import runtime as _runtime
    from gpuaio.pytest_plugin import LoopWatchdog

    real_create = _runtime.create_backend

    def slow_driver_start(name: Any) -> Any:
        time.sleep(0.3)
        return real_create("sim")

    monkeypatch.setattr(_runtime, "create_backend", slow_driver_start)
    started: list[Any] = []

    def first_device(opener: str) -> LoopWatchdog:
        monkeypatch.setattr(_runtime, "_current", None)  # as in a fresh process
        dog = LoopWatchdog(max_block_ms=150)

        async def main() -> None:
            with dog.watch():
                await anyio.sleep(0.01)
                if opener == "open":
                    dev = await gpuaio.Device.open(0)
                else:
                    dev = gpuaio.Device(0)
                assert dev.ordinal == 0
                started.append(dev._runtime)
                await anyio.sleep(0.01)

        anyio.run(main, backend=anyio_backend)
        return dog

    try:
        on_the_loop = first_device("call")
        opened = first_device("open")
    finally:
        for rt in started:
            rt.close()
    assert on_the_loop.failures(), "the stand-in start-up did not block a loop: no control"
    assert opened.failures() == [], opened.report()
    with pytest.raises(gpuaio.InvalidArgumentError):
        anyio.run(gpuaio.Device.open, True)  # type: ignore[arg-type]


_EXIT_WITH_LIVE_EVENT = """
import anyio, gpuaio
dev = gpuaio.Device(0)
async def main():
    global ev
    async with dev.stream() as s:
        ev = s.record()  # kept alive by a global until the interpreter exits
        await ev
anyio.run(main)
print("end of script", flush=True)
"""


def test_process_exits_with_an_event_alive() -> None:
    """An event still referenced at interpreter exit is collected during
    finalization; its ``__del__`` hands the destroy to the reaper, which must
    not try to start its thread then (``Thread.start`` never returned, and the
    process hung after its last line: found running the quickstart's blocks)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GPUAIO_BACKEND": "sim"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.pop("GPUAIO_TEST_BACKEND", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _EXIT_WITH_LIVE_EVENT],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit within 30 s after its last line: {exc.stdout!r}")
    assert "end of script" in proc.stdout
    assert proc.returncode == 0, proc.stderr


async def test_an_op_holds_its_allocations_until_done_and_a_failed_hold_takes_none(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    """Each gpuaio allocation an op uses counts one user until the op completes
    (it may not be freed before). If one of them cannot be held (freed in the
    meantime by another thread), the others are let go again: the op is never
    enqueued, and a count left behind would keep that memory forever."""
    n = 1 << 12
    d = dev.empty(n)
    pin = gpuaio.pinned_empty(n)
    alloc = d.allocation
    release = latch(dev, stream)
    op = stream.copy(d, pin)
    assert alloc._users == 1
    release()
    await op
    assert alloc._users == 0

    from gpuaio._core.operation import Operation
    from gpuaio._engine.buffers import BufferInfo

    class Freed:
        def acquire(self) -> None:
            raise gpuaio.BufferFreedError("freed meanwhile")

        def release(self) -> None:
            raise AssertionError("never held")

    def info(a: Any) -> BufferInfo:
        return BufferInfo(
            0, 0, (), np.dtype(np.uint8), gpuaio.MemoryKind.DEVICE, 0, False, True, a, a
        )

    op2 = Operation("test", stream)
    with pytest.raises(gpuaio.BufferFreedError):
        stream._track(op2, (info(alloc), info(Freed())))
    assert alloc._users == 0, "the allocation held before the failure was not let go"
    assert op2._allocs is None

    # The copies' and memsets' own two-allocation path, the same way.
    from gpuaio._api.transfers import _hold

    op3 = Operation("test", stream)
    with pytest.raises(gpuaio.BufferFreedError):
        _hold(op3, alloc, Freed())
    assert alloc._users == 0, "the allocation held before the failure was not let go"
    assert op3._allocs is None
    _hold(op3, None, alloc)
    assert alloc._users == 1 and list(op3._allocs or ()) == [alloc]
    op3._resolve(None)
    assert alloc._users == 0


@pytest.mark.patches_compiled
async def test_a_copy_whose_op_cannot_be_made_after_its_dma_lets_its_buffers_go_once_drained(
    stream: gpuaio.Stream, dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy between device and pinned memory is enqueued before its op is
    made (issue 13: the op no longer delays the DMA). Should making the op
    fail then (out of memory), the call raises, the copy still runs, and both
    allocations stay held until the stream has drained, then are let go:
    neither freed under the DMA nor held for good."""
    from gpuaio._api import transfers
    from gpuaio._api.describe import describe

    n = 1 << 12
    d = dev.empty(n)
    pin = gpuaio.pinned_empty(n)
    pin[:] = 7
    allocs = [d.allocation, describe(pin, dev._runtime).alloc]
    assert allocs[1] is not None
    release = latch(dev, stream)

    def no_memory(*args: Any) -> Any:
        raise MemoryError("no memory for the op")

    with monkeypatch.context() as m:
        m.setattr(transfers, "Operation", no_memory)
        with pytest.raises(MemoryError):
            stream.copy(d, pin)
    await anyio.sleep(0.05)
    assert [a._users for a in allocs] == [1, 1], "let go while the copy may still run"
    release()
    with anyio.fail_after(30):
        while any(a._users for a in allocs):  # noqa: ASYNC110  (released by the host thread)
            await anyio.sleep(0.005)
    out = np.zeros(n, np.uint8)
    await stream.copy(out, d)
    assert (out == 7).all()


def test_a_resolver_holds_nothing_of_the_op_once_it_counts_as_done() -> None:
    """A task returns from its await as soon as it sees the op done, and may then
    drop the last reference to a buffer the op used: the resolving thread must
    not keep that buffer (or a callback's) alive while it finishes. Checked at
    the first moment the op counts as done (its tracer's report). On the GPU,
    trio once saw a device allocation outlive its last reference that way."""
    from gpuaio._core.operation import Operation

    class Held:
        def acquire(self) -> None:
            pass

        def release(self) -> None:
            pass

    class Cargo:
        pass

    alive: dict[str, bool] = {}
    op = Operation("test", None)
    held, cargo = Held(), Cargo()
    refs = {"allocation": weakref.ref(held), "callback's buffer": weakref.ref(cargo)}
    op._allocs = [held]
    op._add_done_callback(lambda cargo=cargo: None)  # type: ignore[misc]

    class Tracer:
        def op_done(self, *args: Any) -> None:
            assert op._done
            alive.update({name: ref() is not None for name, ref in refs.items()})

    op._tracer = Tracer()
    del held, cargo
    done = threading.Thread(target=op._resolve)
    done.start()
    done.join()
    assert alive == {"allocation": False, "callback's buffer": False}


class _ChainedWork:
    """A host step's body that, when dropped, submits another host step on
    the same sequencer, as a finalizer dropping a user's buffer may run code
    that enqueues (and as another thread may, while a finalizer runs)."""

    def __init__(self, seq: Any, then: gpuaio.Operation | None) -> None:
        self._seq = seq
        self._then = then

    def __call__(self) -> bool:
        return False

    def __del__(self) -> None:
        if self._then is not None:
            self._seq.host(self._then, _ChainedWork(self._seq, None), after_gpu=False)


def test_a_host_step_submitted_while_another_is_dropped_runs_whole(
    gpuaio_runtime: Any, dev: gpuaio.Device
) -> None:
    """The second step is submitted from the first's finalizer, while the
    first step's closure is being freed. A compiled build that reused the
    freed closure's storage for the new step and then went on clearing it
    lost the new step's state: it failed with "attribute 'copy_out' of
    'host_Sequencer_env' undefined" (a CI run of the compiled session)."""
    s = dev.stream()
    seq = s._seq
    for _ in range(3):  # the first may find the freed storage taken
        first = gpuaio.Operation("first", None)
        second = gpuaio.Operation("second", None)
        seq.host(first, _ChainedWork(seq, second), after_gpu=False)
        del first
        seq.executor.wait_for(seq.executor.submitted, timeout=10)
        deadline = time.monotonic() + 10
        while not second.done():
            assert time.monotonic() < deadline, "the chained step never ran"
            time.sleep(0.001)
        assert second.exception() is None
