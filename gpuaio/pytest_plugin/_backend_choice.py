"""Which backend the gpuaio fixtures use, and whether CUDA is usable here.

The run's choice (``--gpuaio-backend``, else ``$GPUAIO_TEST_BACKEND``, else
``auto``) and where it came from, for the plugin's hooks and fixtures. CUDA is
probed at most once per process, and only when a choice needs the answer:
probing initialises the driver in the pytest process.
"""

from __future__ import annotations

import os

import pytest

_BACKENDS = ("sim", "cuda")


def _explicit(config: pytest.Config) -> bool:
    """Whether the run chose a gpuaio backend (option or environment)."""
    return bool(
        config.getoption("--gpuaio-backend", default=None) or os.environ.get("GPUAIO_TEST_BACKEND")
    )


def _source(config: pytest.Config) -> str:
    """Where the backend choice came from, as the user wrote it."""
    if os.environ.get("GPUAIO_TEST_BACKEND") and not config.getoption("--gpuaio-backend"):
        return "GPUAIO_TEST_BACKEND"
    return "--gpuaio-backend"


def _option(config: pytest.Config) -> str:
    opt = config.getoption("--gpuaio-backend", default=None)
    return str(opt or os.environ.get("GPUAIO_TEST_BACKEND") or "auto").lower()


def _choice(config: pytest.Config) -> str:
    """The single backend used by tests that are not parametrized over backends."""
    choice = _option(config)
    if choice in ("auto", "all"):
        return "cuda" if _cuda_available() else "sim"
    if choice not in _BACKENDS:
        raise pytest.UsageError(f"GPUAIO_TEST_BACKEND must be auto, sim, cuda or all: {choice!r}")
    return choice


def _backend_list(config: pytest.Config) -> list[str]:
    return list(_BACKENDS) if _option(config) == "all" else [_choice(config)]


_cuda_cache: bool | None = None
_cuda_reason = ""


def _cuda_available() -> bool:
    global _cuda_cache, _cuda_reason
    if _cuda_cache is None:
        try:
            from ..backends.cuda import CudaBackend

            CudaBackend().close()
            _cuda_cache = True
        except Exception as exc:
            _cuda_cache = False
            _cuda_reason = f"{type(exc).__name__}: {exc}"
    return _cuda_cache


def _no_gpu_reason() -> str:
    return f"no CUDA GPU found ({_cuda_reason or 'unknown reason'})"
