"""Interop: foreign arrays, streams and kernels in and out of gpuaio.

The first part runs everywhere (simulated backend in CI); the tests marked
``gpu`` check torch, CuPy, numba-cuda and cuda.core on a real device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
import gpuaio.interop as interop
from gpuaio._core.dlpack import DLDeviceType, parse_dlpack
from gpuaio.backends.sim import SimKernel
from tests.conftest import ADD_ONE_SRC, add_one_kernel, latch

pytestmark = pytest.mark.anyio


class ArrayInterfaceOnly:
    """Host memory reachable only through ``__array_interface__``."""

    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr
        self.__array_interface__ = arr.__array_interface__


class CudaArrayOnly:
    """A foreign device array: ``__cuda_array_interface__`` and nothing else."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str, owner: Any) -> None:
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


class DLPackOnly:
    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._arr.__dlpack_device__()


def data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def to_host(stream: gpuaio.Stream, d: Any, dtype: Any = np.uint8) -> np.ndarray:
    # A gpuaio array's own shape: on the sim it refuses to export itself.
    shape = d.shape if isinstance(d, gpuaio.DeviceArray) else d.__cuda_array_interface__["shape"]
    out = np.empty(shape, dtype)
    await stream.copy(out, d)
    return out


# -- arrays in ------------------------------------------------------------------


async def test_array_interface_source_and_destination(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    src = data(10_000, 1)
    d = dev.empty(10_000)
    await stream.copy(d, ArrayInterfaceOnly(src))
    back = np.zeros(10_000, np.uint8)
    await stream.copy(ArrayInterfaceOnly(back), d)
    np.testing.assert_array_equal(back, src)


@pytest.mark.parametrize("make", [bytes, lambda b: memoryview(bytes(b))], ids=["bytes", "ro-mv"])
async def test_readonly_buffer_sources(
    stream: gpuaio.Stream, dev: gpuaio.Device, make: Any
) -> None:
    raw = data(5000, 2)
    d = dev.empty(5000)
    await stream.copy(d, make(raw.tobytes()))
    np.testing.assert_array_equal(await to_host(stream, d), raw)


@pytest.mark.parametrize("make", [bytearray, lambda b: memoryview(bytearray(b))], ids=["ba", "mv"])
async def test_writable_buffer_source_and_destination(
    stream: gpuaio.Stream, dev: gpuaio.Device, make: Any
) -> None:
    raw = data(5000, 3)
    d = dev.empty(5000)
    await stream.copy(d, make(raw.tobytes()))
    back = make(bytes(5000))
    await stream.copy(back, d)
    assert bytes(back) == raw.tobytes()


async def test_readonly_destinations_rejected(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    d = dev.empty(16)
    frozen = np.zeros(16, np.uint8)
    frozen.flags.writeable = False
    for dst in (bytes(16), memoryview(bytes(16)), frozen, ArrayInterfaceOnly(frozen)):
        with pytest.raises(gpuaio.InvalidArgumentError, match="read-only"):
            stream.copy(dst, d)
    with pytest.raises(gpuaio.InvalidArgumentError, match="read-only"):
        stream.memset(frozen, 0)
    with pytest.raises(gpuaio.BufferTypeError):
        stream.copy(d, object())


async def test_foreign_cuda_array_interface(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    """A foreign object whose ``__cuda_array_interface__`` points into a gpuaio array."""
    owner = dev.empty(4096)
    foreign = CudaArrayOnly(owner.ptr, (4096,), "|u1", owner)
    assert gpuaio.memory_kind(foreign) is gpuaio.MemoryKind.DEVICE
    src = data(4096, 4)
    await stream.copy(foreign, src)  # into the foreign view
    np.testing.assert_array_equal(await to_host(stream, owner), src)
    await stream.launch(add_one_kernel(dev), 16, 256, foreign, np.uint64(4096))
    out = np.empty(4096, np.uint8)
    await stream.copy(out, foreign)  # out of it
    np.testing.assert_array_equal(out, src + np.uint8(1))
    await stream.memset(foreign, 9)
    assert (await to_host(stream, owner) == 9).all()
    # A view of part of it, typed.
    typed = CudaArrayOnly(owner.ptr + 1024, (256,), "<u4", owner)
    ints = np.arange(256, dtype=np.uint32)
    await stream.copy(typed, ints)
    np.testing.assert_array_equal(await to_host(stream, typed, np.uint32), ints)


async def test_dlpack_import_from_numpy(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    src = np.arange(1000, dtype=np.float32)
    d = dev.empty(1000, np.float32)
    await stream.copy(d, DLPackOnly(src))
    back = np.zeros(1000, np.float32)
    await stream.copy(DLPackOnly(back), d)  # a writable DLPack tensor as the destination
    np.testing.assert_array_equal(back, src)
    assert gpuaio.memory_kind(DLPackOnly(src)) is gpuaio.MemoryKind.PAGEABLE


async def test_pinned_arrays_keep_their_kind_through_dlpack(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    pinned = gpuaio.pinned_empty(4096)
    pinned[:] = data(4096, 5)
    exported = np.from_dlpack(pinned)
    assert exported.ctypes.data == pinned.ctypes.data
    assert gpuaio.memory_kind(exported) is gpuaio.MemoryKind.PINNED
    assert gpuaio.memory_kind(DLPackOnly(pinned)) is gpuaio.MemoryKind.PINNED
    d = dev.empty(4096)
    await stream.copy(d, DLPackOnly(pinned))
    np.testing.assert_array_equal(await to_host(stream, d), pinned)


async def test_device_array_exports(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    d = dev.empty((8, 16), np.float32)
    if dev.backend == "sim":
        pytest.skip("the sim refuses to export (test_sim_arrays_are_not_exported_as_cuda_memory)")
    cai = d.__cuda_array_interface__
    assert cai["shape"] == (8, 16)
    assert cai["typestr"] == "<f4"
    assert cai["version"] == 3
    assert cai["data"] == (d.ptr, False)
    assert cai["strides"] is None
    assert d.__dlpack_device__() == (int(DLDeviceType.CUDA), dev.ordinal)
    view = parse_dlpack(d)
    assert view.ptr == d.ptr
    assert view.shape == (8, 16)
    assert view.dtype == np.float32
    # A consumer that only speaks CAI sees the same memory.
    vals = np.arange(128, dtype=np.float32).reshape(8, 16)
    await stream.copy(CudaArrayOnly(cai["data"][0], (8, 16), "<f4", d), vals)
    np.testing.assert_array_equal(await to_host(stream, d, np.float32), vals)


async def test_sim_arrays_are_not_exported_as_cuda_memory(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    """The sim's device memory is host memory: CuPy or torch would crash on its pointer."""
    if dev.backend != "sim":
        pytest.skip("checks the simulated backend's refusal")
    for d in (dev.empty((8, 16), np.float32), dev.managed_empty(64)):
        exports: list[Callable[[gpuaio.DeviceArray], object]] = [
            lambda a: a.__cuda_array_interface__,
            lambda a: hasattr(a, "__cuda_array_interface__"),  # how CuPy and numba probe
            lambda a: a.__dlpack_device__(),
            lambda a: a.__dlpack__(),
            lambda a: a.__dlpack__(max_version=(1, 0)),
            np.from_dlpack,
            parse_dlpack,
        ]
        for export in exports:
            with pytest.raises(TypeError, match=r"simulated backend.*GPUAIO_BACKEND=cuda"):
                export(d)
        assert d.allocation._users == 0
    # gpuaio's own calls still take them: a copy, and a sim kernel's array argument.
    d = dev.empty((8, 16), np.float32)
    vals = np.arange(128, dtype=np.float32).reshape(8, 16)
    await stream.copy(d, vals)

    def double(grid: Any, block: Any, buf: np.ndarray) -> None:
        buf *= 2

    await stream.launch(gpuaio.Kernel.wrap(SimKernel(double, "double")), 1, 1, d)
    np.testing.assert_array_equal(await to_host(stream, d, np.float32), vals * 2)


# -- streams ----------------------------------------------------------------------


async def test_cuda_stream_round_trip(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    version, handle = stream.__cuda_stream__()
    assert version == 0
    assert handle == stream.handle

    class CoreLike:
        def __cuda_stream__(self) -> tuple[int, int]:
            return (0, handle)

    class TorchLike:
        cuda_stream = handle

    class CupyLike:
        ptr = handle

    wrapped = [dev.wrap_stream(x) for x in (stream, CoreLike(), TorchLike(), CupyLike(), handle)]
    assert {w.handle for w in wrapped} == {handle}
    # Work enqueued through one handle is awaited through another.
    n = 1 << 20
    d = dev.empty(n)
    release = latch(dev, stream)
    op = stream.memset(d, 3)
    sync = wrapped[1].synchronize()
    await anyio.sleep(0.02)
    assert not sync.done(), "the wrapper waits for work another owner enqueued"
    release()
    await sync
    assert op.done()
    for w in wrapped:
        w.close()
    assert not stream.closed, "closing a wrapper leaves the stream alone"
    await stream.memset(d, 4)


async def test_enqueue_runs_in_gpuaio_order(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    """Foreign work submitted with ``enqueue`` follows earlier host jobs of the stream."""
    be = dev._runtime.backend
    host = np.zeros(4096, np.uint8)
    d = dev.empty(4096)
    seen: list[int] = []
    threads: list[str] = []
    release = latch(dev, stream)
    stream.memset(host, 1)  # a host job: waits in gpuaio's executor for the held stream

    def submit(handle: int) -> None:
        seen.append(int(host[0]))  # the memset ran before this was called
        threads.append(threading.current_thread().name)
        native = be.stream_from_handle(dev.ordinal, handle)
        be.memset_async(d.ptr, 7, 1, 4096, native)  # "another library" enqueues work

    op = interop.enqueue(stream, submit, label="foreign memset", keep=(d,))
    await anyio.sleep(0.02)
    assert not seen
    assert not op.done()
    release()
    await op
    assert seen == [1], "submit ran after the earlier host job"
    assert threads[0] != threading.current_thread().name
    assert (await to_host(stream, d) == 7).all(), "the op completed after the foreign work"
    # With nothing pending, submit runs once, in order (at once on the calling
    # thread, or on the executor while its last job is still winding down).
    ran: list[str] = []
    await interop.enqueue(stream, lambda h: ran.append(threading.current_thread().name))
    assert len(ran) == 1


async def test_enqueue_failure_releases_buffers(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    d = dev.empty(64)

    def submit(handle: int) -> None:
        raise RuntimeError("the other library refused")

    with pytest.raises(RuntimeError, match="refused"):
        interop.enqueue(stream, submit, keep=(d,))
    assert d.allocation._users == 0, "nothing stays marked in use"
    stream.close()
    with pytest.raises(gpuaio.StreamClosedError):
        interop.enqueue(stream, lambda h: None)


async def test_kernel_wrap_native(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    if dev.backend != "sim":
        pytest.skip("wraps a simulated kernel")

    def add_two(grid: Any, block: Any, buf: np.ndarray) -> None:
        buf += 2

    k = gpuaio.Kernel.wrap(SimKernel(add_two, "add_two"))
    assert k.name == "add_two"
    d = dev.empty(100)
    await stream.memset(d, 5)
    await stream.launch(k, 1, 1, d)
    assert (await to_host(stream, d) == 7).all()


async def test_library_helpers_need_cuda(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    if dev.backend != "sim":
        pytest.skip("checks the simulated backend's refusal")
    for call in (
        lambda: interop.launch_cupy(stream, object(), 1, 1, ()),
        lambda: interop.launch_numba(stream, object(), 1, 1, ()),
        lambda: interop.as_cupy_stream(stream),
        lambda: interop.as_torch_stream(stream),
    ):
        with pytest.raises(gpuaio.InvalidArgumentError, match="cuda backend"):
            call()


def test_converter_choices() -> None:
    assert interop.converter("gpuaio")(42) == 42  # type: ignore[arg-type]

    def fn(d: gpuaio.DeviceArray) -> str:
        return "x"

    assert interop.converter(fn) is fn
    with pytest.raises(gpuaio.InvalidArgumentError, match="to must be"):
        interop.converter("numpy")
    for lib in ("cupy", "torch"):
        try:
            __import__(lib)
        except ImportError:
            with pytest.raises(gpuaio.InvalidArgumentError, match="cannot be imported"):
                interop.converter(lib)
        else:
            assert callable(interop.converter(lib))


# -- on a GPU: torch ----------------------------------------------------------------


@pytest.mark.gpuaio_gpu
async def test_torch_tensors_in_and_out(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    torch = pytest.importorskip("torch")
    n = 1 << 20
    cpu = torch.arange(n, dtype=torch.int32)
    pinned = cpu.clone().pin_memory()
    d = dev.empty(n, np.int32)
    await stream.copy(d, cpu)  # pageable torch tensor, through DLPack
    assert gpuaio.memory_kind(pinned) is gpuaio.MemoryKind.PINNED
    await stream.copy(d, pinned)
    back = torch.zeros(n, dtype=torch.int32)
    await stream.copy(back, d)  # into a torch CPU tensor
    assert torch.equal(back, cpu)
    t = interop.to_torch(d)  # zero-copy export
    assert t.is_cuda
    assert t.data_ptr() == d.ptr
    assert t.dtype == torch.int32
    cuda_dst = torch.empty(n, dtype=torch.int32, device=f"cuda:{dev.ordinal}")
    await stream.copy(cuda_dst, d)  # a torch CUDA tensor through CAI
    assert torch.equal(cuda_dst.cpu(), cpu)


@pytest.mark.gpuaio_gpu
async def test_await_work_torch_enqueued(dev: gpuaio.Device) -> None:
    torch = pytest.importorskip("torch")
    ts = torch.cuda.Stream(device=dev.ordinal)
    with torch.cuda.stream(ts):
        a = torch.randn(4096, 4096, device=f"cuda:{dev.ordinal}")
        for _ in range(20):
            a = a @ a
            a = a / a.norm()
    wrapped = dev.wrap_stream(ts)
    await wrapped.synchronize()
    assert ts.query(), "the torch stream's work is done when the await returns"
    wrapped.close()


@pytest.mark.gpuaio_gpu
async def test_torch_work_in_gpuaio_order(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    torch = pytest.importorskip("torch")
    n = 1 << 22
    host = np.full(n, 3, np.uint8)
    d = dev.empty(n)
    stream.copy(d, host)  # staged: may still wait in gpuaio's executor
    t = interop.to_torch(d)
    result: list[Any] = []

    def submit(handle: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(handle, device=t.device)):
            result.append(t.to(torch.int64).sum())

    await interop.enqueue(stream, submit, keep=(d,))
    assert int(result[0].item()) == 3 * n


@pytest.mark.gpuaio_gpu
async def test_prefetch_to_torch(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    torch = pytest.importorskip("torch")
    batches = [
        {"x": torch.full((256, 256), i, dtype=torch.float32), "y": [torch.arange(i + 1)]}
        for i in range(4)
    ]
    i = 0
    async with gpuaio.prefetch(batches, depth=2, to="torch") as it:
        async for b in it:
            assert b["x"].is_cuda
            assert b["y"][0].is_cuda
            assert torch.equal(b["x"].cpu(), batches[i]["x"])
            assert torch.equal(b["y"][0].cpu(), batches[i]["y"][0])
            i += 1
    assert i == 4


# -- on a GPU: CuPy -------------------------------------------------------------------


@pytest.mark.gpuaio_gpu
async def test_cupy_arrays_streams_and_raw_kernels(
    stream: gpuaio.Stream, dev: gpuaio.Device
) -> None:
    cupy = pytest.importorskip("cupy")
    n = 1 << 20
    src = data(n, 6)
    with cupy.cuda.Device(dev.ordinal):
        c = cupy.empty(n, dtype=cupy.uint8)
    await stream.copy(c, src)  # into a CuPy array (CAI)
    np.testing.assert_array_equal(cupy.asnumpy(c), src)
    d = dev.empty(n)
    await stream.copy(d, c)  # out of one
    view = interop.to_cupy(d)
    assert view.data.ptr == d.ptr
    kernel = cupy.RawKernel(ADD_ONE_SRC, "add_one")
    await interop.launch_cupy(stream, kernel, (n + 255) // 256, 256, (d, np.uint64(n)))
    np.testing.assert_array_equal(await to_host(stream, d), src + np.uint8(1))
    await interop.launch_cupy(stream, kernel, (n + 255) // 256, 256, (view, np.uint64(n)))
    np.testing.assert_array_equal(await to_host(stream, d), src + np.uint8(2))
    # A CuPy stream wrapped by its handle: gpuaio awaits CuPy's work.
    with cupy.cuda.Device(dev.ordinal):
        cs = cupy.cuda.Stream(non_blocking=True)
        with cs:
            big = cupy.ones((4096, 4096), dtype=cupy.float32)
            for _ in range(10):
                big = big @ big / 4096
    await dev.wrap_stream(cs).synchronize()
    assert cs.done


@pytest.mark.gpuaio_gpu
async def test_prefetch_to_cupy(dev: gpuaio.Device) -> None:
    cupy = pytest.importorskip("cupy")
    batches = [np.full(1000, i, np.int16) for i in range(3)]
    got = [b async for b in gpuaio.prefetch(batches, to="cupy")]
    assert all(isinstance(b, cupy.ndarray) for b in got)
    assert [int(b[0]) for b in got] == [0, 1, 2]


# -- on a GPU: numba-cuda and cuda.core ---------------------------------------------


@pytest.mark.gpuaio_gpu
async def test_numba_kernels(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    numba_cuda = pytest.importorskip("numba.cuda")

    @numba_cuda.jit
    def add_one(arr: Any) -> None:  # pragma: no cover - runs on the GPU
        i = numba_cuda.grid(1)
        if i < arr.size:
            arr[i] += 1

    n = 1 << 20
    src = data(n, 7)
    d = dev.empty(n)
    await stream.copy(d, src)
    try:
        op = interop.launch_numba(stream, add_one, (n + 255) // 256, 256, (d,))
    except AttributeError as exc:  # numba-cuda built against an older numpy
        pytest.skip(f"numba-cuda cannot compile in this environment: {exc}")
    await op
    np.testing.assert_array_equal(await to_host(stream, d), src + np.uint8(1))
    nd = numba_cuda.to_device(src)  # a numba device array as a copy source (CAI)
    await stream.copy(d, nd)
    np.testing.assert_array_equal(await to_host(stream, d), src)


@pytest.mark.gpuaio_gpu
async def test_cuda_core_kernel(stream: gpuaio.Stream, dev: gpuaio.Device) -> None:
    core = pytest.importorskip("cuda.core")
    cdev = core.Device(dev.ordinal)
    cdev.set_current()
    major, minor = cdev.compute_capability
    prog = core.Program(
        ADD_ONE_SRC, code_type="c++", options=core.ProgramOptions(arch=f"sm_{major}{minor}")
    )
    kernel = prog.compile("cubin").get_kernel("add_one")
    n = 1 << 16
    src = data(n, 8)
    d = dev.empty(n)
    await stream.copy(d, src)
    await stream.launch(kernel, (n + 255) // 256, 256, d, np.uint64(n))  # native kernel
    await stream.launch(
        gpuaio.Kernel.wrap(kernel, dev.ordinal), (n + 255) // 256, 256, d, np.uint64(n)
    )
    np.testing.assert_array_equal(await to_host(stream, d), src + np.uint8(2))
