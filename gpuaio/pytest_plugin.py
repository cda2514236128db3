"""pytest plugin: fixtures and markers for async GPU test suites.

Registered through the ``pytest11`` entry point, so installing gpuaio makes
it available. Fixtures:

``gpuaio_runtime``
    The gpuaio runtime under test: a fresh simulated backend per test on
    ``--gpuaio-backend=sim``, one CUDA runtime per session on ``cuda``.
``gpuaio_device``
    Device 0 of that runtime.
``gpuaio_stream``
    A fresh stream on it, closed after the test.

Markers: ``@pytest.mark.gpu`` skips a test unless the backend is ``cuda``;
``@pytest.mark.sim_only`` skips it unless the backend is ``sim``.

The backend comes from ``--gpuaio-backend`` or ``GPUAIO_TEST_BACKEND``
(``auto`` by default: CUDA where a device is present, else simulated).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._device import Device
    from ._runtime import Runtime
    from ._stream import Stream

_session_runtime: Runtime | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpuaio")
    group.addoption(
        "--gpuaio-backend",
        choices=("auto", "sim", "cuda"),
        default=None,
        help="backend for gpuaio fixtures (default: $GPUAIO_TEST_BACKEND or auto)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a real CUDA device (skipped elsewhere)")
    config.addinivalue_line("markers", "sim_only: needs gpuaio's simulated backend")
    config.addinivalue_line("markers", "sim_config(**kwargs): SimConfig fields for this test")


def _choice(config: pytest.Config) -> str:
    opt = config.getoption("--gpuaio-backend", default=None)
    choice = str(opt or os.environ.get("GPUAIO_TEST_BACKEND") or "auto")
    if choice == "auto":
        choice = "cuda" if _cuda_available() else "sim"
    return choice


_cuda_cache: bool | None = None


def _cuda_available() -> bool:
    global _cuda_cache
    if _cuda_cache is None:
        try:
            from .backends.cuda import CudaBackend

            CudaBackend().close()
            _cuda_cache = True
        except Exception:
            _cuda_cache = False
    return _cuda_cache


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    backend = _choice(config)
    for item in items:
        if backend != "cuda" and item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(
                reason="needs a CUDA GPU: run with --gpuaio-backend=cuda on a machine with one"
            ))
        if backend != "sim" and item.get_closest_marker("sim_only"):
            item.add_marker(pytest.mark.skip(
                reason="uses the simulated backend's fault injection (runs in CI)"
            ))


@pytest.fixture
def gpuaio_backend_name(request: pytest.FixtureRequest) -> str:
    """``"sim"`` or ``"cuda"``: the backend the gpuaio fixtures use."""
    return _choice(request.config)


@pytest.fixture
def gpuaio_runtime(request: pytest.FixtureRequest, gpuaio_backend_name: str) -> Iterator[Runtime]:
    """A runtime on the chosen backend (fresh per test when simulated)."""
    from ._runtime import use_backend

    global _session_runtime
    if gpuaio_backend_name == "sim":
        from .backends.sim import SimBackend, SimConfig

        marker = request.node.get_closest_marker("sim_config")
        kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
        rt = use_backend(SimBackend(SimConfig(**kwargs)))
        _session_runtime = None
        try:
            yield rt
        finally:
            rt.close()
        return
    if _session_runtime is None or _session_runtime.closed:
        _session_runtime = use_backend("cuda")
    yield _session_runtime


@pytest.fixture
def gpuaio_device(gpuaio_runtime: Runtime) -> Device:
    """Device 0 of :func:`gpuaio_runtime`."""
    return gpuaio_runtime.device(0)


@pytest.fixture
def gpuaio_stream(gpuaio_device: Device) -> Iterator[Stream]:
    """A fresh stream on :func:`gpuaio_device`, closed after the test."""
    s = gpuaio_device.stream()
    yield s
    s.close()
