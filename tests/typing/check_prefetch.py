"""Static checks of gpuaio's public types: pyright reads this file in CI (nox's
typecheck session); it is never run. (mypy infers ``Any`` for these batches:
where an argument's type contains ``Any``, as NumPy's array types do, and
several overloads match, mypy gives up on the overload's return type.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, assert_type

import numpy as np

import gpuaio


def _batches() -> Iterator[np.ndarray[Any, Any]]:
    yield np.zeros(4)


async def prefetched_arrays_are_device_arrays() -> None:
    async with gpuaio.prefetch(_batches()) as batches:
        async for batch in batches:
            assert_type(batch, gpuaio.DeviceArray)


async def a_converter_sets_the_batch_type() -> None:
    async for n in gpuaio.prefetch(_batches(), to=lambda d: d.nbytes):
        assert_type(n, int)


async def other_structures_are_any() -> None:
    async for batch in gpuaio.prefetch([{"x": np.zeros(4)}]):
        assert_type(batch, Any)
