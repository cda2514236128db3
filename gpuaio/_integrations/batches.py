"""Batches: the nested structures of arrays that :func:`gpuaio.prefetch` moves.

A batch is any nesting of dicts, lists, tuples and named tuples whose leaves
are buffers (NumPy arrays, gpuaio arrays, anything with the array, CUDA array
or DLPack protocol, or a buffer object); other leaves pass through unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._api.memory import DeviceArray

__all__ = ["is_buffer", "is_device_array", "map_leaves", "needs_prepare", "prepare"]


def is_buffer(obj: object) -> bool:
    """Whether ``obj`` is a leaf to copy (rather than pass through)."""
    if obj is None or isinstance(obj, (str, bool, int, float, complex)):
        return False
    if isinstance(obj, (np.ndarray, np.generic, DeviceArray)):
        return True
    cls = type(obj)
    if hasattr(cls, "__array_interface__") or hasattr(cls, "__dlpack__"):
        return True
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    try:
        with memoryview(obj):  # type: ignore[arg-type]
            return True
    except TypeError:
        return False


def map_leaves(obj: Any, fn: Callable[[Any], Any], is_leaf: Callable[[Any], bool]) -> Any:
    """``obj`` with ``fn`` applied to each leaf, rebuilding dicts, lists and tuples."""
    if isinstance(obj, dict):
        items = {k: map_leaves(v, fn, is_leaf) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        new = copy.copy(obj)  # keeps OrderedDict / defaultdict and their settings
        new.clear()
        new.update(items)
        return new
    if isinstance(obj, Mapping):
        return {k: map_leaves(v, fn, is_leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        values = [map_leaves(v, fn, is_leaf) for v in obj]
        cls = type(obj)
        if cls is list:
            return values
        if cls is tuple:
            return tuple(values)
        if hasattr(obj, "_fields"):  # a named tuple
            return cls(*values)
        try:
            return cls(values)
        except Exception:
            return tuple(values) if isinstance(obj, tuple) else values
    if is_leaf(obj):
        return fn(obj)
    return obj


def _is_strided(leaf: Any) -> bool:
    """True for a host leaf that must be made C-contiguous before its copy."""
    if isinstance(leaf, np.ndarray):
        return not leaf.flags.c_contiguous
    check = getattr(leaf, "is_contiguous", None)  # torch tensors
    if callable(check):
        try:
            return not bool(check())
        except Exception:
            return False
    return False


def _contiguous(leaf: Any) -> Any:
    if isinstance(leaf, np.ndarray):
        return np.ascontiguousarray(leaf)
    return leaf.contiguous()


def needs_prepare(batch: Any) -> bool:
    found: list[bool] = []

    def visit(leaf: Any) -> Any:
        if _is_strided(leaf):
            found.append(True)
        return leaf

    map_leaves(batch, visit, is_buffer)
    return bool(found)


def prepare(batch: Any) -> Any:
    """Host-side work off the loop: make strided leaves C-contiguous (a copy)."""
    if not needs_prepare(batch):
        return batch
    return map_leaves(batch, lambda x: _contiguous(x) if _is_strided(x) else x, is_buffer)


def is_device_array(obj: object) -> bool:
    return isinstance(obj, DeviceArray)
