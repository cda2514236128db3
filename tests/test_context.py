"""The calling thread's current CUDA context (issue 14, item 11).

Code on the event-loop thread may leave another context current: PyTorch's
``torch.cuda.set_device(1)`` and CuPy's ``with cupy.cuda.Device(1)`` make
device 1's primary context current, PyCUDA and ``cuCtxCreate`` a context of
their own. gpuaio must still allocate, create streams and events, and
enqueue in its device's primary context, and leave the thread's current
context as it found it, so that the foreign code sees what it had set.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import pytest

import gpuaio
from gpuaio._api.device import device_of
from tests.conftest import add_one_kernel

N = 1 << 20


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def _work(
    dev: gpuaio.Device,
    current: Callable[[], int],
    owner_of: Callable[[Any], int | None],
    foreign: int,
    primary: int,
    ours: Collection[int] = (),
) -> tuple[gpuaio.Stream, Any, np.ndarray]:
    """Use gpuaio on this (the loop's) thread while ``foreign`` is current.

    After each call the foreign context must be current again, and every
    resource gpuaio made must belong to ``primary`` (host memory, which is
    portable, to ``primary`` or one of ``ours``). Returns a stream, a device
    array and the bytes it must hold.
    """

    def still_foreign(what: str) -> None:
        now = current()
        assert now == foreign, (
            f"after {what} the thread's current context is {now:#x}, "
            f"not {foreign:#x}, the one current before"
        )

    def owned(obj: Any, what: str) -> None:
        owner = owner_of(obj)
        if owner is not None:
            assert owner == primary, (
                f"{what} belongs to context {owner:#x}, not to the device's primary {primary:#x}"
            )

    src = _data(N, 1)
    s = dev.stream()
    still_foreign("Device.stream()")
    owned(s, "a stream")
    d = dev.empty(N)
    still_foreign("Device.empty()")
    owned(d, "device memory")
    await s.copy(d, src)  # pageable: staged through the pinned pool
    still_foreign("a pageable->device copy")
    expected = src.copy()
    await s.copy(d[:4096], src[4096:8192])  # small: staged on this thread
    expected[:4096] = src[4096:8192]
    still_foreign("a small pageable->device copy")
    await s.memset(d[8192:9216], 7)
    expected[8192:9216] = 7
    still_foreign("a memset")
    kernel = add_one_kernel(dev)
    still_foreign("Device.compile()")
    await s.launch(kernel, (N + 255) // 256, 256, d, np.uint64(N))
    expected += np.uint8(1)
    still_foreign("a launch")
    host = _data(4096, 2)
    reg = gpuaio.register_host(host)
    still_foreign("register_host()")
    owner = owner_of(host.ctypes.data)
    assert owner in (primary, *ours), f"host memory was registered in context {owner:#x}"
    await s.copy(d[9216 : 9216 + 4096], host)
    expected[9216 : 9216 + 4096] = host
    still_foreign("a registered->device copy")
    ev = s.record()
    still_foreign("Stream.record()")
    owned(ev, "an event")
    other = dev.stream()
    other.wait(ev)
    still_foreign("Stream.wait()")
    out = np.zeros(N, np.uint8)
    await other.copy(out, d)
    still_foreign("a device->pageable copy")
    np.testing.assert_array_equal(out, expected)
    other.close()
    reg.unregister()
    still_foreign("Stream.close() and unregister()")
    return s, d, expected


async def _still_works(s: gpuaio.Stream, d: Any, expected: np.ndarray) -> None:
    out = np.zeros(N, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, expected)
    await s.memset(d[:64], 9)
    await s.copy(out, d)
    expected[:64] = 9
    np.testing.assert_array_equal(out, expected)


# -- on the simulated backend -------------------------------------------------


@pytest.mark.anyio
@pytest.mark.gpuaio_sim_only
async def test_created_context_current_on_the_loop_thread(gpuaio_runtime: Any) -> None:
    # What PyCUDA's make_context() or cuCtxCreate leave current on the loop thread.
    be = gpuaio_runtime.backend
    dev = device_of(gpuaio_runtime, 0)
    primary = be.primary_context(0)
    dev.empty(16)  # gpuaio has worked on this thread before
    foreign = be.context_create(0)
    assert be.current_context() == foreign
    try:
        s, d, expected = await _work(dev, be.current_context, be.context_of, foreign, primary)
    finally:
        be.context_destroy(foreign)  # pops it: nothing is current here now
    assert be.current_context() == 0
    # Nothing gpuaio made went with the foreign context.
    await _still_works(s, d, expected)
    s.close()


@pytest.mark.anyio
@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(devices=2)
async def test_other_device_current_on_the_loop_thread(gpuaio_runtime: Any) -> None:
    # torch.cuda.set_device(1) / `with cupy.cuda.Device(1)`: device 1's primary
    # context is current while gpuaio works on device 0, and the other way round.
    be = gpuaio_runtime.backend
    p0, p1 = be.primary_context(0), be.primary_context(1)
    be.set_current_context(p1)
    dev0, dev1 = device_of(gpuaio_runtime, 0), device_of(gpuaio_runtime, 1)
    s, d, expected = await _work(dev0, be.current_context, be.context_of, p1, p0, (p1,))
    be.set_current_context(p0)
    s1, d1, expected1 = await _work(dev1, be.current_context, be.context_of, p0, p1, (p0,))
    be.set_current_context(0)
    await _still_works(s, d, expected)
    await _still_works(s1, d1, expected1)
    s.close()
    s1.close()


def _in_thread(name: str, fn: Callable[[], Any]) -> Any:
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if errors:
        raise errors[0]
    return result[0]


@pytest.mark.gpuaio_sim_only
@pytest.mark.gpuaio_sim_config(devices=2)
def test_what_each_thread_is_left_with(gpuaio_runtime: Any) -> None:
    be = gpuaio_runtime.backend
    p0, p1 = be.primary_context(0), be.primary_context(1)

    def use(device: int) -> int:
        s = be.stream_create(device)
        be.stream_destroy(s)
        return int(be.current_context())

    # A thread gpuaio does not own, with no context current: left with none after
    # device 1's work; device 0's primary context stays (what the CUDA runtime
    # makes current in a thread where none is, so torch and CuPy see no change).
    assert _in_thread("user-thread", lambda: use(1)) == 0
    assert _in_thread("user-thread", lambda: use(0)) == p0
    # gpuaio's own threads keep the context they bind (one check per call after).
    assert _in_thread("gpuaio-test-thread", lambda: use(1)) == p1


# -- the cuda backend's logic, against a stand-in driver (no GPU needed) -----


class _FakeDriver:
    """Just enough of ``cuda.bindings.driver`` for CudaBackend's context handling.

    Keeps a current context per thread, records the context each stream,
    event and allocation is created in and each enqueue runs in, and counts
    the context calls. Everything else is the real module's (types, enums).
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self._tls = threading.local()
        self._next = itertools.count(0x100000, 0x100)
        self.calls: collections.Counter[str] = collections.Counter()
        self.owners: dict[int, int] = {}
        self.ran_in: list[int] = []
        self.proc: dict[str, int] = {}
        """What ``cuGetProcAddress`` gives (none by default: the backend then
        makes every call through these methods; ``tests/test_fast_calls.py``)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _ok(self, *out: Any) -> tuple[Any, ...]:
        return (self._real.CUresult.CUDA_SUCCESS, *out)

    def current(self) -> int:
        return int(getattr(self._tls, "ctx", 0))

    def _made(self, cls: Any) -> tuple[Any, ...]:
        address = next(self._next)
        self.owners[address] = self.current()
        return self._ok(cls(address))

    def _ran(self) -> tuple[Any, ...]:
        self.ran_in.append(self.current())
        return self._ok()

    def cuInit(self, flags: int) -> tuple[Any, ...]:
        return self._ok()

    def cuDeviceGetCount(self) -> tuple[Any, ...]:
        return self._ok(2)

    def cuDeviceGet(self, ordinal: int) -> tuple[Any, ...]:
        return self._ok(self._real.CUdevice(ordinal))

    def cuDriverGetVersion(self) -> tuple[Any, ...]:
        return self._ok(13000)

    def cuDevicePrimaryCtxRetain(self, dev: Any) -> tuple[Any, ...]:
        return self._ok(self._real.CUcontext(0xC000 + int(dev)))

    def cuDevicePrimaryCtxRelease(self, dev: Any) -> tuple[Any, ...]:
        return self._ok()

    def cuGetProcAddress(self, symbol: bytes, version: int, flags: Any) -> tuple[Any, ...]:
        address = self.proc.get(symbol.decode())
        if address is None:
            return (self._real.CUresult.CUDA_ERROR_NOT_FOUND, 0, 0)
        return self._ok(address, 0)

    def cuCtxGetCurrent(self) -> tuple[Any, ...]:
        self.calls["cuCtxGetCurrent"] += 1
        return self._ok(self._real.CUcontext(self.current()))

    def cuCtxSetCurrent(self, ctx: Any) -> tuple[Any, ...]:
        self.calls["cuCtxSetCurrent"] += 1
        self._tls.ctx = int(ctx)
        return self._ok()

    def cuMemAlloc(self, nbytes: int) -> tuple[Any, ...]:
        return self._made(self._real.CUdeviceptr)

    def cuMemHostAlloc(self, nbytes: int, flags: int) -> tuple[Any, ...]:
        return self._made(int)

    def cuStreamCreateWithPriority(self, flags: int, priority: int) -> tuple[Any, ...]:
        return self._made(self._real.CUstream)

    def cuEventCreate(self, flags: int) -> tuple[Any, ...]:
        return self._made(self._real.CUevent)

    def cuMemcpyAsync(self, dst: Any, src: Any, nbytes: int, stream: Any) -> tuple[Any, ...]:
        return self._ran()

    def cuEventRecord(self, event: Any, stream: Any) -> tuple[Any, ...]:
        return self._ran()

    def cuEventQuery(self, event: Any) -> tuple[Any, ...]:
        return self._ran()

    def cuStreamDestroy(self, stream: Any) -> tuple[Any, ...]:
        return self._ran()

    def cuStreamWriteValue32(
        self, stream: Any, addr: int, value: int, flags: int
    ) -> tuple[Any, ...]:
        return self._ran()

    def cuStreamWaitValue32(
        self, stream: Any, addr: int, value: int, flags: int
    ) -> tuple[Any, ...]:
        return self._ran()


@pytest.mark.gpuaio_sim_only  # it patches the driver module a CUDA runtime's threads would use
def test_cuda_backend_checks_the_current_context(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = pytest.importorskip("gpuaio.backends.cuda")
    driver = pytest.importorskip("cuda.bindings.driver")
    fake = _FakeDriver(driver)
    # Every module of the backend calls through this one module object, whatever
    # name it binds it to: patching its functions reaches all of them.
    for name in vars(_FakeDriver):
        if name.startswith("cu") and name[2:3].isupper():  # the driver calls it stands in for
            monkeypatch.setattr(driver, name, getattr(fake, name))
    be = cuda.CudaBackend()
    p0, p1 = be.primary_context(0), be.primary_context(1)
    be.stream_create(0)  # gpuaio has worked on this thread before
    for foreign in (0xF00000, p1):  # a created context; device 1's (torch.cuda.set_device(1))
        be.set_current_context(foreign)
        s = be.stream_create(0)
        ev = be.event_create(0)
        ptr = be.mem_alloc(0, 64)
        pinned = be.host_alloc(64)
        assert fake.current() == foreign
        assert fake.owners[s.address] == p0
        assert fake.owners[int(ev.handle)] == p0
        assert fake.owners[ptr] == p0
        assert fake.owners[pinned] in (p0, p1)  # portable: any of gpuaio's contexts
        fake.ran_in.clear()
        be.memcpy_async(ptr, pinned, 64, s)
        be.event_record(ev, s)
        assert be.event_query(ev)
        be.stream_destroy(s)
        assert fake.ran_in == [p0] * 4
        assert fake.current() == foreign
    # Cheap when the context is current already: one cuCtxGetCurrent a call, no switch.
    be.set_current_context(p0)
    s = be.stream_create(0)
    ev = be.event_create(0)
    fake.calls.clear()
    for _ in range(10):
        be.memcpy_async(ptr, pinned, 64, s)
        be.event_record(ev, s)
        be.event_query(ev)
    assert fake.calls == {"cuCtxGetCurrent": 30}

    def use(device: int) -> int:
        be.stream_create(device)
        return fake.current()

    assert _in_thread("user-thread", lambda: use(1)) == 0
    assert _in_thread("user-thread", lambda: use(0)) == p0
    assert _in_thread("gpuaio-test-thread", lambda: use(1)) == p1
    assert _in_thread("gpuaio-prefetch", lambda: use(1)) == 0  # runs the user's iterator
    be.close()


# -- on a GPU --------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.gpuaio_gpu
async def test_created_context_current_on_the_loop_thread_cuda(gpuaio_runtime: Any) -> None:
    # The one-GPU version of torch.cuda.set_device(1): a second context on
    # device 0 (cuCtxCreate, as PyCUDA's make_context does) current on the loop
    # thread while gpuaio works there.
    from cuda.bindings import driver

    def check(result: tuple[Any, ...]) -> Any:
        assert not result[0], f"{result[0]!r}"
        return result[1] if len(result) == 2 else None

    def current() -> int:
        return int(check(driver.cuCtxGetCurrent()))

    def owner_of(obj: Any) -> int | None:
        if isinstance(obj, gpuaio.Stream):
            return int(check(driver.cuStreamGetCtx(obj._native.handle)))
        ptr = obj if isinstance(obj, int) else getattr(obj, "ptr", None)
        if ptr is None:
            return None  # events: the driver has no query for their context
        attribute = driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_CONTEXT
        return int(check(driver.cuPointerGetAttribute(attribute, ptr)))

    dev = device_of(gpuaio_runtime, 0)
    primary = gpuaio_runtime.backend.primary_context(0)
    dev.empty(16)  # gpuaio has worked on this thread before
    before = current()
    cu_device = check(driver.cuDeviceGet(0))
    try:
        created = driver.cuCtxCreate(None, 0, cu_device)  # CUDA 13: (params, flags, dev)
    except TypeError:
        created = driver.cuCtxCreate(0, cu_device)  # cuda-bindings 12: (flags, dev)
    foreign_ctx = check(created)
    foreign = int(foreign_ctx)
    assert foreign != primary
    try:
        assert current() == foreign  # cuCtxCreate pushed it
        s, d, expected = await _work(dev, current, owner_of, foreign, primary)
    finally:
        check(driver.cuCtxDestroy(foreign_ctx))  # pops it from this thread's stack
    assert current() == before
    # Nothing gpuaio made went with the foreign context.
    await _still_works(s, d, expected)
    s.close()
