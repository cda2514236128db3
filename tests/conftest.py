"""Shared fixtures: every async test runs on asyncio, uvloop and trio."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, ClassVar

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


def latch(dev: gpuaio.Device, stream: gpuaio.Stream) -> Callable[[], None]:
    """Hold ``stream`` busy until the returned function is called."""
    rt = dev._runtime
    if rt.backend.name == "sim":
        return rt.backend.hold(stream._native)  # type: ignore[attr-defined, no-any-return]
    flag = gpuaio.pinned_empty(1, np.int32)
    flag[0] = 0
    k = dev.compile(LATCH_SRC, "latch")

    class _Ptr:
        __cuda_array_interface__: ClassVar[dict[str, Any]] = {
            "shape": (1,),
            "typestr": "<i4",
            "data": (flag.ctypes.data, False),
            "version": 3,
        }

    stream.launch(k, 1, 1, _Ptr())

    def release() -> None:
        flag[0] = 1

    return release
