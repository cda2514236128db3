"""gpuaio never runs on the simulator unless asked to.

With ``GPUAIO_BACKEND`` unset and no usable driver, the first device use raises
``NoDeviceError`` (one line, naming ``GPUAIO_BACKEND=sim``); ``GPUAIO_BACKEND=auto``
falls back, but logs a WARNING saying so. Each test makes the cuda backend fail
as it does on a machine without a driver, so they mean the same on a GPU host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import gpuaio
from gpuaio._api import runtime as _runtime
from gpuaio.backends import create_backend

DRIVER_MISSING = (
    'the CUDA driver library could not be loaded: "cuda" is an NVIDIA driver library\n'
    "and can only be found via system search."
)


def fail_like_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make creating the cuda backend fail as it does where no driver is installed."""
    from gpuaio.backends import cuda

    def no_driver(self: object) -> None:
        raise gpuaio.NoDeviceError(DRIVER_MISSING)

    monkeypatch.setattr(cuda.CudaBackend, "__init__", no_driver)


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No runtime yet, no backend chosen, no driver; the runtime made here is closed after."""
    monkeypatch.delenv("GPUAIO_BACKEND", raising=False)
    monkeypatch.setattr(_runtime, "_current", None)
    fail_like_no_driver(monkeypatch)
    yield
    rt = _runtime._current
    if rt is not None:
        rt.close()


def test_unset_backend_without_a_driver_raises_no_device_error(fresh_process: None) -> None:
    with pytest.raises(gpuaio.NoDeviceError) as exc:
        gpuaio.Device(0)
    message = str(exc.value)
    assert "\n" not in message
    assert "GPUAIO_BACKEND=sim" in message
    assert "not set" in message  # says why a GPU was required
    assert "could not be loaded" in message  # and why none can be used
    assert _runtime._current is None  # nothing half made: a later call tries again


def test_explicit_cuda_without_a_driver_raises_one_line(
    fresh_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUAIO_BACKEND", "cuda")
    with pytest.raises(gpuaio.NoDeviceError) as exc:
        gpuaio.current_runtime()
    message = str(exc.value)
    assert "\n" not in message
    assert "GPUAIO_BACKEND=cuda" in message and "GPUAIO_BACKEND=sim" in message


def test_auto_falls_back_to_the_sim_with_a_warning(
    fresh_process: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GPUAIO_BACKEND", "auto")
    with caplog.at_level(logging.WARNING, logger="gpuaio"):
        rt = gpuaio.current_runtime()
    assert rt.backend.name == "sim"
    warnings = [r for r in caplog.records if r.name == "gpuaio" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.records
    text = warnings[0].getMessage()
    assert "simulated backend" in text and "could not be loaded" in text
    assert "auto" in rt.reason


def test_explicit_choices_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUAIO_BACKEND", raising=False)
    fail_like_no_driver(monkeypatch)
    be, _ = create_backend("sim")
    try:
        assert be.name == "sim"
    finally:
        be.close()
    with pytest.raises(gpuaio.NoDeviceError, match="GPUAIO_BACKEND=sim"):
        create_backend("cuda")
    with pytest.raises(ValueError, match="auto, cuda or sim"):
        create_backend("simulated")


@pytest.mark.parametrize(("bindings", "driver_version"), [("13.3.0", 12040), ("13.0.0", 12090)])
def test_bindings_newer_than_the_driver_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, bindings: str, driver_version: int
) -> None:
    """cuda-bindings 13 on a CUDA 12 driver: a NoDeviceError that names gpuaio[cu12]."""
    import cuda.bindings
    import cuda.bindings.driver as driver

    from gpuaio.backends.cuda import CudaBackend

    def no_init(flags: int) -> object:
        raise AssertionError("cuInit called although the driver is too old for the bindings")

    ok = driver.CUresult.CUDA_SUCCESS
    monkeypatch.setattr(cuda.bindings, "__version__", bindings)
    monkeypatch.setattr(driver, "cuDriverGetVersion", lambda: (ok, driver_version))
    monkeypatch.setattr(driver, "cuInit", no_init)
    with pytest.raises(gpuaio.NoDeviceError) as exc:
        CudaBackend()
    message = str(exc.value)
    assert "\n" not in message
    assert f"cuda-bindings {bindings}" in message and "CUDA 12." in message
    assert "'gpuaio[cu12]'" in message and "R580" in message


def test_bindings_the_driver_supports_go_on_to_cuinit(monkeypatch: pytest.MonkeyPatch) -> None:
    import cuda.bindings
    import cuda.bindings.driver as driver

    from gpuaio.backends.cuda import CudaBackend

    called: list[int] = []

    def init(flags: int) -> tuple[object]:
        called.append(flags)
        return (driver.CUresult.CUDA_ERROR_NO_DEVICE,)

    ok = driver.CUresult.CUDA_SUCCESS
    monkeypatch.setattr(cuda.bindings, "__version__", "12.9.10")
    monkeypatch.setattr(driver, "cuDriverGetVersion", lambda: (ok, 13000))
    monkeypatch.setattr(driver, "cuInit", init)
    with pytest.raises(gpuaio.NoDeviceError, match="cuInit failed"):
        CudaBackend()
    assert called == [0]
