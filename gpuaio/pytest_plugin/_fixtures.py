"""The runtime, device and stream fixtures, and the backend they run on.

``gpuaio_runtime`` is a fresh simulated runtime per test (or, with
``--gpuaio-sim-runtime=session``, the session's one for every test that could
run on CUDA too), or the session's one CUDA runtime; when the test ends it
runs the leak check (``_leakcheck.py``) on it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from ._backend_choice import _choice, _cuda_available, _no_gpu_reason
from ._leakcheck import (
    PinnedAccounting,
    ResourceBaseline,
    _leak_mode,
    _pending_grace_s,
    leak_problems,
    pending_operations,
)

if TYPE_CHECKING:
    from .._api.device import Device, Stream
    from .._api.runtime import Runtime

_session_runtime: Runtime | None = None
_session_sim: Runtime | None = None


def _sim_per_session(config: pytest.Config) -> bool:
    """Whether simulated tests share one runtime (``--gpuaio-sim-runtime``)."""
    choice = config.getoption("--gpuaio-sim-runtime", None)
    choice = choice or os.environ.get("GPUAIO_TEST_SIM_RUNTIME") or "test"
    if choice not in ("test", "session"):
        raise pytest.UsageError(f"GPUAIO_TEST_SIM_RUNTIME must be test or session: {choice!r}")
    return choice == "session"


@pytest.fixture
def gpuaio_backend_name(request: pytest.FixtureRequest) -> str:
    """``"sim"`` or ``"cuda"``: the backend the gpuaio fixtures use."""
    param = getattr(request, "param", None)
    if param is not None:
        return str(param)
    return _choice(request.config)


@pytest.fixture
def gpuaio_runtime(request: pytest.FixtureRequest, gpuaio_backend_name: str) -> Iterator[Runtime]:
    """A runtime on the chosen backend (fresh per test when simulated, unless
    ``--gpuaio-sim-runtime=session``), leak-checked."""
    from .._api.runtime import _drop_current, use_backend

    global _session_runtime, _session_sim
    if gpuaio_backend_name == "sim":
        from ..backends.sim import SimBackend, SimConfig

        marker = request.node.get_closest_marker("gpuaio_sim_config")
        kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
        _session_runtime = None
        # A test with a configuration of its own gets a fresh runtime even
        # where the session shares one (and the shared one starts again after),
        # and so does a sim-only test: it never runs on CUDA, and its faults and
        # latches would be left in the runtime the CUDA-able tests share.
        fresh = (
            marker is not None
            or request.node.get_closest_marker("gpuaio_sim_only") is not None
            or not _sim_per_session(request.config)
        )
        if fresh:
            rt = use_backend(SimBackend(SimConfig(**kwargs)))
        else:
            if _session_sim is None or _session_sim.closed:
                _session_sim = use_backend(SimBackend(SimConfig()))
            rt = _session_sim
    else:
        if not _cuda_available():
            pytest.skip(f"needs a CUDA GPU: {_no_gpu_reason()}")
        if _session_runtime is None or _session_runtime.closed:
            _session_runtime = use_backend("cuda")
        rt = _session_runtime
        fresh = False
    PinnedAccounting.install(rt)
    baseline = ResourceBaseline.take(rt)
    problems: list[str] = []
    try:
        yield rt
    finally:
        mode = _leak_mode(request)
        if mode != "off" and not rt.closed:
            problems = leak_problems(rt, baseline, grace_s=_pending_grace_s(request.config))
        if fresh:
            if not rt.closed and pending_operations(rt)[0]:
                # Work that never ends (a latch never released) would keep
                # Runtime.close() waiting for its pinned blocks: stop the
                # simulated device first, which drops it.
                rt.backend.close()
            rt.close()
            _drop_current(rt)
    if problems:
        msg = "gpuaio leak check: " + "; ".join(problems)
        if mode == "error":
            pytest.fail(msg, pytrace=False)
        warnings.warn(msg, pytest.PytestWarning, stacklevel=1)


@pytest.fixture
def gpuaio_device(gpuaio_runtime: Runtime) -> Device:
    """Device 0 of :func:`gpuaio_runtime`."""
    from .._api.device import device_of

    return device_of(gpuaio_runtime, 0)


@pytest.fixture
def gpuaio_stream(gpuaio_device: Device) -> Iterator[Stream]:
    """A fresh stream on :func:`gpuaio_device`, closed after the test."""
    s = gpuaio_device.stream()
    yield s
    s.close()
