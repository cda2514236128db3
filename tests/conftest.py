"""Shared fixtures: every async test runs on asyncio, uvloop and trio."""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

# Load CUDA modules when they are loaded, not at a kernel's first launch: with
# lazy loading that first launch may wait for the kernels already running, and
# a test that launches a kernel while a latch kernel holds another stream
# would then wait for itself. Set before any CUDA call of the test process.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import numpy as np
import pytest

import gpuaio

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (or tools/reliability_report.py)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(params=_loops)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(params=gpuaio.STRATEGIES)
def strategy_dev(request: pytest.FixtureRequest, gpuaio_runtime: Any) -> Iterator[gpuaio.Device]:
    """Device 0 with each completion strategy in turn."""
    gpuaio_runtime.set_completion(request.param)
    yield gpuaio_runtime.device(0)
    # Release the strategy's resources (the flag slab) before the leak check.
    deadline = time.perf_counter() + 5
    while gpuaio_runtime.engine(0).pending() and time.perf_counter() < deadline:
        time.sleep(0.01)
    gpuaio_runtime.set_completion("events")


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
    data.reshape(-1).view(np.uint8)[: int(n)] += 1


def add_one_kernel(dev: gpuaio.Device) -> gpuaio.Kernel:
    """A kernel adding 1 to each byte, on either backend."""
    return dev.compile(ADD_ONE_SRC, "add_one", sim=_add_one_sim)


_latch_kernels: weakref.WeakKeyDictionary[Any, dict[int, gpuaio.Kernel]] = (
    weakref.WeakKeyDictionary()
)


def _latch_kernel(dev: gpuaio.Device) -> gpuaio.Kernel:
    """The latch kernel of ``dev``, compiled and run once per runtime.

    Compiling (and first launching) a kernel while a latch holds another
    stream may wait for that latch; doing it once, up front, cannot.
    """
    per_device = _latch_kernels.setdefault(dev._runtime, {})
    k = per_device.get(dev.ordinal)
    if k is None:
        k = dev.compile(LATCH_SRC, "latch")
        flag = gpuaio.pinned_empty(1, np.int32)
        flag[0] = 1  # open: the warm-up launch returns at once
        s = dev.stream()
        s.launch(k, 1, 1, _FlagPtr(flag))
        dev._runtime.backend.stream_synchronize(s._native)
        s.close()
        per_device[dev.ordinal] = k
    return k


class _FlagPtr:
    """A latch flag in pinned memory, passed to the kernel as a pointer."""

    def __init__(self, flag: np.ndarray) -> None:
        self.flag = flag
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (1,),
            "typestr": "<i4",
            "data": (flag.ctypes.data, False),
            "version": 3,
        }


def latch(dev: gpuaio.Device, stream: gpuaio.Stream) -> Callable[[], None]:
    """Hold ``stream`` busy until the returned function is called."""
    rt = dev._runtime
    if rt.backend.name == "sim":
        return rt.backend.hold(stream._native)  # type: ignore[attr-defined, no-any-return]
    k = _latch_kernel(dev)
    flag = gpuaio.pinned_empty(1, np.int32)
    flag[0] = 0
    stream.launch(k, 1, 1, _FlagPtr(flag))

    def release() -> None:
        flag[0] = 1

    return release
