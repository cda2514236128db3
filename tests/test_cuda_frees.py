"""The CUDA backend's frees, against a stand-in driver (no GPU needed).

``cuMemFree`` and ``cuMemFreeHost`` wait for the device's work while they
hold a lock of the driver's, so every other thread's driver calls, the event
loop's too, wait until running kernels end (issue 13, run EI: 179-186 ms of
a 200 ms kernel). The backend frees memory nothing uses any more with
``cuMemFreeAsync`` on a stream of its own, and memory other libraries' work
may still use after a ``cuCtxSynchronize``, which holds nothing up (run EL).
These tests pin down which driver calls each free makes, in which context:
the GPU suite shows what they do on a card.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_context import _FakeDriver

pytestmark = pytest.mark.gpuaio_sim_only  # it patches the driver module a CUDA runtime would use


class _FreeDriver(_FakeDriver):
    """``_FakeDriver`` plus the memory calls, each recorded as ``(name, context)``."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.log: list[tuple[str, int]] = []
        self.streams: list[tuple[str, int]] = []  # (call, stream) of frees and stream waits
        self.refuse_free_async = False
        self.failed: set[int] = set()  # contexts with a sticky error

    def _note(self, name: str) -> None:
        self.log.append((name, self.current()))

    def names(self) -> list[str]:
        return [name for name, _ in self.log]

    def cuCtxSynchronize(self) -> tuple[Any, ...]:
        self._note("cuCtxSynchronize")
        if self.current() in self.failed:
            return (self._real.CUresult.CUDA_ERROR_ILLEGAL_ADDRESS,)
        return self._ok()

    def cuMemFree(self, ptr: Any) -> tuple[Any, ...]:
        self._note("cuMemFree")
        return self._ok()

    def cuMemFreeAsync(self, ptr: Any, stream: Any) -> tuple[Any, ...]:
        if self.refuse_free_async:
            return (self._real.CUresult.CUDA_ERROR_NOT_SUPPORTED,)
        self._note("cuMemFreeAsync")
        self.streams.append(("cuMemFreeAsync", int(stream)))
        return self._ok()

    def cuMemFreeHost(self, ptr: Any) -> tuple[Any, ...]:
        self._note("cuMemFreeHost")
        return self._ok()

    def cuMemHostUnregister(self, ptr: Any) -> tuple[Any, ...]:
        self._note("cuMemHostUnregister")
        return self._ok()

    def cuMemAllocManaged(self, nbytes: int, flags: int) -> tuple[Any, ...]:
        return self._made(self._real.CUdeviceptr)

    def cuStreamCreate(self, flags: int) -> tuple[Any, ...]:
        return self._made(self._real.CUstream)

    def cuStreamSynchronize(self, stream: Any) -> tuple[Any, ...]:
        self._note("cuStreamSynchronize")
        self.streams.append(("cuStreamSynchronize", int(stream)))
        if self.current() in self.failed:
            return (self._real.CUresult.CUDA_ERROR_ILLEGAL_ADDRESS,)
        return self._ok()

    def cuMemPoolCreate(self, props: Any) -> tuple[Any, ...]:
        return self._ok(self._real.CUmemoryPool(0xB00000))

    def cuMemPoolSetAccess(self, pool: Any, access: Any, count: int) -> tuple[Any, ...]:
        return self._ok()

    def cuMemPoolDestroy(self, pool: Any) -> tuple[Any, ...]:
        return self._ok()

    def cuMemAllocFromPoolAsync(self, nbytes: int, pool: Any, stream: Any) -> tuple[Any, ...]:
        self._note("cuMemAllocFromPoolAsync")
        return self._made(self._real.CUdeviceptr)


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, _FreeDriver]]:
    cuda = pytest.importorskip("gpuaio.backends.cuda")
    driver = pytest.importorskip("cuda.bindings.driver")
    fake = _FreeDriver(driver)
    for name in {**vars(_FakeDriver), **vars(_FreeDriver)}:
        if name.startswith("cu") and name[2:3].isupper():  # the driver calls it stands in for
            monkeypatch.setattr(driver, name, getattr(fake, name))
    be = cuda.CudaBackend()
    yield be, fake
    be.close()


def test_device_memory_is_freed_stream_ordered_after_a_synchronize_if_it_was_shared(
    patched: tuple[Any, _FreeDriver],
) -> None:
    be, fake = patched
    p0 = be.primary_context(0)
    unshared, shared = be.mem_alloc(0, 64), be.mem_alloc(0, 64)
    be.set_current_context(0xF00000)  # another library's context is current
    fake.log.clear()
    be.mem_free_async(unshared)
    # Nothing to wait for: no synchronize of the device; the free stream's
    # synchronize is the driver's cue to give the memory back (run ET).
    assert fake.log == [("cuMemFreeAsync", p0), ("cuStreamSynchronize", p0)]
    _released_on_the_free_stream(fake)
    fake.log.clear()
    be.mem_free(shared)
    # What cuMemFree waits for, waited for without its lock; then the free.
    assert fake.log == [
        ("cuCtxSynchronize", p0),
        ("cuMemFreeAsync", p0),
        ("cuStreamSynchronize", p0),
    ]
    _released_on_the_free_stream(fake)
    assert fake.current() == 0xF00000, "the thread's context was left changed"


def _released_on_the_free_stream(fake: _FreeDriver) -> None:
    """The last free was followed by a synchronize of the stream it was
    enqueued on, and that stream is not the legacy one (which would wait for
    every blocking stream's work)."""
    (free, stream), (wait, waited) = fake.streams[-2:]
    assert (free, wait) == ("cuMemFreeAsync", "cuStreamSynchronize")
    assert waited == stream != 0


def test_managed_memory_and_refused_stream_ordered_frees_use_cu_mem_free_after_a_synchronize(
    patched: tuple[Any, _FreeDriver],
) -> None:
    """``cuMemFree`` still waits for the device holding the driver's lock:
    waited for first with a synchronize, it holds the lock for the free only."""
    be, fake = patched
    p0 = be.primary_context(0)
    managed = be.mem_alloc_managed(0, 64)
    fake.log.clear()
    be.mem_free_async(managed)  # CUDA's pools hold no managed memory
    assert fake.log == [("cuCtxSynchronize", p0), ("cuMemFree", p0)]
    a, b = be.mem_alloc(0, 64), be.mem_alloc(0, 64)
    fake.refuse_free_async = True
    fake.log.clear()
    be.mem_free_async(a)
    assert fake.names() == ["cuCtxSynchronize", "cuMemFree"]
    fake.log.clear()
    be.mem_free(b)
    assert fake.names()[-2:] == ["cuCtxSynchronize", "cuMemFree"]


def test_unregistering_waits_for_the_device_first(patched: tuple[Any, _FreeDriver]) -> None:
    be, fake = patched
    p0, p1 = be.primary_context(0), be.primary_context(1)
    fake.log.clear()
    be.host_unregister(0x7000)
    assert sorted(fake.log[:2]) == sorted([("cuCtxSynchronize", p0), ("cuCtxSynchronize", p1)])
    assert fake.names()[2:] == ["cuMemHostUnregister"]


def test_pinned_memory_comes_from_the_host_pool_and_waits_only_when_it_may_be_shared(
    patched: tuple[Any, _FreeDriver],
) -> None:
    be, fake = patched
    p0, p1 = be.primary_context(0), be.primary_context(1)
    block, array = be.host_alloc(64), be.host_alloc(64)
    assert fake.names() == ["cuMemAllocFromPoolAsync", "cuStreamSynchronize"] * 2
    # Wrappers on the instance (the leak check's accounting) see each free once.
    seen: list[str] = []
    for name in ("host_free", "host_free_async"):
        real = getattr(be, name)
        setattr(be, name, lambda ptr, real=real, name=name: (seen.append(name), real(ptr)))
    fake.log.clear()
    be.host_free_async(block)  # a staging block: only gpuaio used it
    assert fake.log == [("cuMemFreeAsync", p0), ("cuStreamSynchronize", p0)]
    _released_on_the_free_stream(fake)
    fake.log.clear()
    be.host_free(array)  # a pinned array: another library's copy may still read it
    assert sorted(fake.log[:2]) == sorted([("cuCtxSynchronize", p0), ("cuCtxSynchronize", p1)])
    assert fake.log[2:] == [("cuMemFreeAsync", p0), ("cuStreamSynchronize", p0)]
    _released_on_the_free_stream(fake)
    assert seen == ["host_free_async", "host_free"]
    words = be.host_alloc_mapped(64)  # streams write and wait on these: not pool memory
    fake.log.clear()
    be.host_free(words)
    assert fake.names() == ["cuCtxSynchronize", "cuCtxSynchronize", "cuMemFreeHost"]


def test_without_the_host_pool_pinned_memory_is_cu_mem_host_alloc_memory(
    patched: tuple[Any, _FreeDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    be, fake = patched
    be.primary_context(0), be.primary_context(1)  # pinned memory serves every device
    monkeypatch.setenv("GPUAIO_HOST_POOL", "0")
    ptr = be.host_alloc(64)
    assert "cuMemAllocFromPoolAsync" not in fake.names()
    fake.log.clear()
    be.host_free(ptr)
    assert fake.names() == ["cuCtxSynchronize", "cuCtxSynchronize", "cuMemFreeHost"]


def test_a_failed_device_does_not_keep_host_memory_from_being_freed(
    patched: tuple[Any, _FreeDriver],
) -> None:
    """A device with a sticky error runs nothing more: host memory any device
    may use is still freed (and unlocked), while the failed device's own
    memory fails to free with its error, as ``cuMemFree`` would."""
    cuda_error = pytest.importorskip("gpuaio._core.errors").CudaError
    be, fake = patched
    p0, p1 = be.primary_context(0), be.primary_context(1)
    pinned, dev1 = be.host_alloc(64), be.mem_alloc(1, 64)
    fake.failed.add(p1)
    fake.log.clear()
    be.host_free(pinned)
    be.host_unregister(0x7000)
    assert fake.names().count("cuMemFreeAsync") == 1
    assert fake.names()[-1] == "cuMemHostUnregister"
    with pytest.raises(cuda_error, match="ILLEGAL_ADDRESS"):
        be.mem_free(dev1)
    assert ("cuCtxSynchronize", p0) in fake.log


def test_a_free_whose_stream_wait_fails_still_counts_as_freed(
    patched: tuple[Any, _FreeDriver],
) -> None:
    """The free was enqueued, so the memory is the driver's again: the
    synchronize's (sticky) error is raised, naming it, and the backend
    forgets the address, which a later allocation may get back."""
    cuda_error = pytest.importorskip("gpuaio._core.errors").CudaError
    be, fake = patched
    p0 = be.primary_context(0)
    ptr = be.mem_alloc(0, 64)
    fake.failed.add(p0)
    with pytest.raises(cuda_error, match="cuStreamSynchronize"):
        be.mem_free_async(ptr)
    assert fake.names()[-2:] == ["cuMemFreeAsync", "cuStreamSynchronize"]
    assert ptr not in be._allocations
