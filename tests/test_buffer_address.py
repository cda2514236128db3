"""A numpy argument's address: the C of a compiled install and the ctypes fallback agree.

``describe`` takes a host array's address from its writable, C-contiguous
buffer, and a failure to lend one sends it down the slow path that reads the
flags (read-only, strided, empty arrays). A compiled install does this in C
(``gpuaio/_api/_address.c``); the pure-Python install with ctypes. Both must
give the same address and fail on the same arrays.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gpuaio import MemoryKind
from gpuaio._api import describe as _describe
from gpuaio._api.describe import describe


def _c_address() -> Callable[[Any], int] | None:
    try:
        return importlib.import_module("gpuaio._api._address").writable_address  # type: ignore[no-any-return]
    except ImportError:
        return None


_IMPLEMENTATIONS = ["ctypes", "c"]


@pytest.fixture(params=_IMPLEMENTATIONS)
def address(request: pytest.FixtureRequest) -> Callable[[Any], int]:
    if request.param == "ctypes":
        return _describe._ctypes_address
    found = _c_address()
    if found is None:
        pytest.skip("no _address extension: it is built by a compiled install (hatch_build.py)")
    return found


def _lendable() -> list[np.ndarray[Any, Any]]:
    base = np.arange(4096, dtype=np.uint8)
    return [
        base,
        base[100:],  # an offset view
        base.view(np.float32).reshape(16, 64),
        np.zeros((3, 5, 7), np.complex128),
        np.ones(1, np.uint8),
        np.ones(7, np.int16),
    ]


@pytest.mark.parametrize("index", range(6))
def test_a_writable_contiguous_array_gives_its_data_address(
    address: Callable[[Any], int], index: int
) -> None:
    arr = _lendable()[index]
    assert address(arr) == arr.ctypes.data


def _not_lendable() -> dict[str, Any]:
    ro = np.arange(64, dtype=np.uint8)
    ro.flags.writeable = False
    return {
        "read-only": ro,
        "read-only bytes": np.frombuffer(b"0123456789abcdef", np.uint8),
        "strided": np.arange(64, dtype=np.uint8)[::2],
        "fortran": np.zeros((4, 8), np.float64, order="F"),
        "transposed": np.zeros((4, 8), np.float64).T,
        "empty": np.empty(0, np.uint8),
        "no buffer": 3,
    }


@pytest.mark.parametrize("case", list(_not_lendable()))
def test_anything_else_fails_where_from_buffer_does(
    address: Callable[[Any], int], case: str
) -> None:
    # With one of the errors describe takes for "no": ctypes says TypeError of
    # a read-only array, numpy's exporter ValueError.
    with pytest.raises((TypeError, ValueError, BufferError)):
        address(_not_lendable()[case])


def test_the_buffer_is_not_held_after_the_call(address: Callable[[Any], int]) -> None:
    # A bytearray refuses to change size while a buffer of it is lent (numpy
    # does not check): the address is taken and the buffer given back.
    data = bytearray(4096)
    held = memoryview(data)
    with pytest.raises(BufferError):
        data.extend(b"x")  # the check works here
    held.release()
    view = np.frombuffer(data, np.uint8)
    expected = view.ctypes.data
    del view
    assert address(data) == expected
    data.extend(b"x")
    assert len(data) == 4097


def _host_arrays() -> dict[str, tuple[np.ndarray[Any, Any], bool, bool]]:
    """Arrays, each with whether describe must call it read-only and contiguous."""
    ro = np.arange(256, dtype=np.uint8)
    ro.flags.writeable = False
    return {
        "plain": (np.arange(256, dtype=np.uint8), False, True),
        "read-only": (ro, True, True),
        "strided": (np.arange(256, dtype=np.uint8)[::2], False, False),
        "view": (np.arange(256, dtype=np.uint8)[16:].view(np.uint32), False, True),
    }


@pytest.mark.parametrize("case", list(_host_arrays()))
def test_describe_reads_each_kind_of_host_array_right(gpuaio_runtime: Any, case: str) -> None:
    arr, readonly, contiguous = _host_arrays()[case]
    info = describe(arr, gpuaio_runtime)
    got = (info.ptr, info.nbytes, info.readonly, info.contiguous, info.kind)
    want = (arr.ctypes.data, arr.nbytes, readonly, contiguous, MemoryKind.PAGEABLE)
    assert got == want


def test_an_empty_array_has_no_address(gpuaio_runtime: Any) -> None:
    info = describe(np.empty(0, np.uint8), gpuaio_runtime)
    assert (info.ptr, info.nbytes) == (0, 0)
