"""Which of gpuaio's modules run compiled (mypyc), for ``gpuaio info`` and benchmarks.

The hot path may be compiled at install time (``hatch_build.py``); the same
source is the pure-Python fallback. A compiled module is an extension module:
its ``__file__`` is a shared library, not a ``.py`` file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

__all__ = ["MODULES", "compiled_modules", "mypyc_attr"]

_T = TypeVar("_T")

try:
    # Read by mypyc as it compiles; at run time a no-op either way.
    from mypy_extensions import mypyc_attr
except ImportError:  # a pure-Python install need not have mypy_extensions

    def mypyc_attr(*_attrs: str, **_flags: object) -> Callable[[_T], _T]:
        """``mypy_extensions.mypyc_attr`` without mypy_extensions: changes nothing."""
        return lambda cls: cls


MODULES = (
    "gpuaio._core.operation",
    "gpuaio._api.describe",
    "gpuaio._engine.completion._events",
    "gpuaio._engine.completion._queue",
    "gpuaio._engine.completion._firstpoll",
    "gpuaio._engine.sequencer",
    "gpuaio._api.transfers",
    "gpuaio._engine.staging",
)
"""The modules a compiled install compiles: ``hatch_build.COMPILED``, by module name."""


def compiled_modules() -> list[str]:
    """The modules of :data:`MODULES` that were imported from a compiled extension."""
    found = []
    for name in MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if not path.endswith(".py"):
            found.append(name)
    return found
