"""What a compiled install adds: which modules run compiled (mypyc), and the C
libraries it builds beside them (``hatch_build.NATIVE``).

The hot path may be compiled at install time (``hatch_build.py``); the same
source is the pure-Python fallback. A compiled module is an extension module:
its ``__file__`` is a shared library, not a ``.py`` file. The native
libraries are extension modules too, driven through ctypes
(:func:`native_library`, :func:`c_function`).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["MODULES", "c_function", "compiled_modules", "mypyc_attr", "native_library"]

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
    "gpuaio._engine.completion._engine",
    "gpuaio._engine.completion._events",
    "gpuaio._engine.completion._queue",
    "gpuaio._engine.completion._firstpoll",
    "gpuaio._engine.sequencer",
    "gpuaio._api.transfers",
    "gpuaio._engine.staging",
    "gpuaio._engine.lent",
    "gpuaio._engine.early",
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


def native_library(module: str) -> str | None:
    """The shared library of the native extension ``module``, or None where this
    install did not build it (a pure-Python install, or another platform)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or spec.origin.endswith(".py"):
        return None
    return spec.origin


def c_function(dll: ctypes.CDLL, name: str, argtypes: list[Any], restype: Any) -> Any:
    """``dll``'s function ``name``, its argument and result types set."""
    fn = getattr(dll, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
