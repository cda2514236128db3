"""The public API: ``__all__`` is what the reference documents, and it is all typed."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import gpuaio
from gpuaio._core.compiled import compiled_modules

ROOT = Path(__file__).resolve().parents[1]


def test_all_matches_the_documented_api() -> None:
    text = (ROOT / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: gpuaio\.(\w+)\s*$", text, flags=re.M)) - {"__version__"}
    exported = {name for name in gpuaio.__all__ if not name.startswith("__")}
    assert exported - documented == set(), "exported but missing from docs/reference.md"
    assert documented - exported == set(), "documented but not exported"


def test_all_is_unique_and_resolvable() -> None:
    assert len(gpuaio.__all__) == len(set(gpuaio.__all__))
    for name in gpuaio.__all__:
        assert hasattr(gpuaio, name), name


def test_package_is_typed() -> None:
    assert (ROOT / "gpuaio" / "py.typed").exists()
    # mypyc keeps no docstrings of the classes it compiles (gpuaio.Operation, in
    # a compiled install): their source, checked by the pure-Python run, has them.
    compiled = set(compiled_modules())
    for name in gpuaio.__all__:
        obj = getattr(gpuaio, name)
        if getattr(obj, "__module__", None) in compiled:
            continue
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"
