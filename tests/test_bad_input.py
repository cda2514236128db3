"""Bad input, property-based: every invalid argument is rejected before anything is
enqueued, with a message that names the problem; every valid one works byte-exact.

Hypothesis draws shapes, dtypes, strides (C order, strided, Fortran order, offset
views, shared memory) and memory kinds (pageable, pinned, registered, device,
managed, device memory of another device, ``__cuda_array_interface__`` and DLPack
producers). An independent oracle lists the problems of each draw; the call must
raise :class:`gpuaio.InvalidArgumentError` naming one of them, and nothing may
reach the stream, or, with no problem, complete with the right bytes.

``TRIED`` counts the inputs per property (``tools/reliability_report.py`` reads
it); ``GPUAIO_BAD_INPUT_EXAMPLES`` sets the examples per property.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuaio
from gpuaio._api.device import device_of
from gpuaio._engine.hostwork import byte_view

EXAMPLES = int(os.environ.get("GPUAIO_BAD_INPUT_EXAMPLES", "120"))
TRIED: Counter[str] = Counter()
"""Inputs tried, per property and verdict (``copy``, ``copy:rejected``, ...)."""

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

pytestmark = [pytest.mark.gpuaio_sim_config(devices=2), pytest.mark.timeout(600)]

DTYPES = [np.uint8, np.int16, np.uint32, np.float32, np.float64, np.complex64, np.bool_]
HOST_KINDS = ["pageable", "pinned", "registered", "dlpack"]
DEVICE_KINDS = ["device", "managed", "device1", "cai"]
LAYOUTS = ["c", "strided", "fortran", "offset", "readonly"]


# -- buffers ---------------------------------------------------------------------------------


class CAI:
    """A foreign device array: ``__cuda_array_interface__`` over gpuaio device memory."""

    def __init__(
        self,
        owner: gpuaio.DeviceArray,
        shape: tuple[int, ...],
        dtype: Any,
        strides: tuple[int, ...] | None,
        readonly: bool,
        offset: int = 0,
    ) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": np.dtype(dtype).str,
            "data": (owner.ptr + offset, readonly),
            "version": 3,
            "strides": strides,
        }


class DLPackHost:
    """A foreign host array that only speaks DLPack."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.arr.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.arr.__dlpack_device__()  # type: ignore[no-any-return]


@dataclass
class Buf:
    obj: Any
    kind: str
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    ptr: int
    readonly: bool
    contiguous: bool
    keep: Any = None

    @property
    def bytes_like(self) -> bool:
        return self.dtype.itemsize == 1 and len(self.shape) <= 1

    def overlaps(self, other: Buf) -> bool:
        return bool(
            self.nbytes
            and other.nbytes
            and self.ptr < other.ptr + other.nbytes
            and other.ptr < self.ptr + self.nbytes
        )


def _numpy_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """numpy's C-contiguity: what the strides of extents of 1 say does not matter."""
    if 0 in shape:
        return True
    probe = np.lib.stride_tricks.as_strided(np.zeros(1, f"V{itemsize}"), shape, strides)
    return bool(probe.flags.c_contiguous)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    out, acc = [], itemsize
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def _host_view(base: np.ndarray, shape: tuple[int, ...], dtype: Any, layout: str) -> np.ndarray:
    """A view of ``base`` (raw bytes, big enough) with the layout asked for."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) if shape else 1
    if layout == "strided" and shape:
        wide = (*shape[:-1], shape[-1] * 2)
        arr = base[: int(np.prod(wide)) * dt.itemsize].view(dt).reshape(wide)
        return arr[..., ::2]
    if layout == "fortran" and len(shape) >= 2:
        return base[: n * dt.itemsize].view(dt).reshape(shape[::-1]).T
    if layout == "offset":
        return base[dt.itemsize : dt.itemsize * (n + 1)].view(dt).reshape(shape)
    return base[: n * dt.itemsize].view(dt).reshape(shape)


class Maker:
    """Builds buffers of every kind, and reads their bytes back."""

    def __init__(self, rt: Any, stream: gpuaio.Stream) -> None:
        self.rt = rt
        self.dev = device_of(rt, 0)
        self.dev1 = device_of(rt, 1)
        self.stream = stream
        self.stream1 = self.dev1.stream()
        self.registrations: list[Any] = []

    def close(self) -> None:
        for reg in self.registrations:
            reg.unregister()
        self.registrations.clear()
        self.stream1.close()

    def make(
        self,
        kind: str,
        shape: tuple[int, ...],
        dtype: Any,
        layout: str,
        share: Buf | None = None,
        share_off: int = 0,
    ) -> Buf:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) if shape else 1
        # Every base is big enough for any view drawn here, also from an offset
        # into another buffer's base (shared memory).
        room = max((2 * n + 2) * dt.itemsize + 64, 8192)
        if kind in DEVICE_KINDS:
            if kind == "cai":
                return self._cai(shape, dt, layout, share, share_off, room)
            if share is not None and share.kind == kind:
                base = share.keep
                start = share_off
                obj = base[start : start + n * dt.itemsize].view(dt).reshape(shape)
            else:
                maker = {
                    "device": self.dev.empty,
                    "managed": self.dev.managed_empty,
                    "device1": self.dev1.empty,
                }[kind]
                base = maker(max(room, 1), np.uint8)
                obj = base[: n * dt.itemsize].view(dt).reshape(shape)
            return Buf(
                obj, kind, obj.nbytes, shape, dt, obj.ptr if obj.nbytes else 0, False, True, base
            )
        # host kinds
        if share is not None and share.kind in ("pageable", "pinned"):
            base = share.keep[share_off:]
        elif kind == "pinned":
            base = gpuaio.pinned_empty(room)
        else:
            base = np.empty(room, np.uint8)
        arr = _host_view(base, shape, dt, layout)
        if layout == "readonly":
            arr.flags.writeable = False
        obj: Any = arr
        if kind == "registered" and share is None:
            self.registrations.append(gpuaio.register_host(base))
        elif kind == "dlpack":
            if not arr.flags.writeable:
                arr = arr.copy()  # numpy won't export read-only arrays
            obj = DLPackHost(arr)
        contiguous = bool(arr.flags.c_contiguous)
        ptr = int(arr.__array_interface__["data"][0]) if arr.size else 0
        return Buf(
            obj,
            kind,
            arr.nbytes,
            arr.shape,
            arr.dtype,
            ptr,
            not arr.flags.writeable,
            contiguous,
            base,
        )

    def _cai(
        self,
        shape: tuple[int, ...],
        dt: np.dtype[Any],
        layout: str,
        share: Buf | None,
        share_off: int,
        room: int,
    ) -> Buf:
        if share is not None and share.kind == "cai":
            owner = share.keep
            offset = share_off
        else:
            owner = self.dev.empty(room)
            offset = 0
        c = _c_strides(shape, dt.itemsize)
        strides: tuple[int, ...] | None = None
        if layout == "strided" and shape:
            strides = tuple(st * 2 for st in c)
        elif layout == "fortran" and len(shape) >= 2:
            f, acc = [], dt.itemsize
            for d in shape:
                f.append(acc)
                acc *= max(d, 1)
            strides = tuple(f)
        elif layout == "offset" and shape:
            # C order, with made-up strides on extents of 1 (they mean nothing).
            strides = tuple(st if d != 1 else 12345 for st, d in zip(c, shape, strict=True))
        contiguous = strides is None or _numpy_contiguous(shape, strides, dt.itemsize)
        n = int(np.prod(shape)) if shape else 1
        obj = CAI(owner, shape, dt, strides, layout == "readonly", offset)
        return Buf(
            obj,
            "cai",
            n * dt.itemsize,
            shape,
            dt,
            owner.ptr + offset,
            layout == "readonly",
            contiguous,
            owner,
        )

    def fill(self, buf: Buf, data: np.ndarray) -> None:
        """Write ``data`` (raw bytes) into contiguous ``buf`` (read-only ones too)."""
        if buf.kind in DEVICE_KINDS:
            s = self.stream1 if buf.kind == "device1" else self.stream
            wait(s.copy(self._device_bytes(buf), data))
        else:
            byte_view(buf.ptr, buf.nbytes)[:] = data

    def read(self, buf: Buf) -> np.ndarray:
        """The bytes of contiguous ``buf``."""
        if buf.kind in DEVICE_KINDS:
            out = np.empty(buf.nbytes, np.uint8)
            s = self.stream1 if buf.kind == "device1" else self.stream
            wait(s.copy(out, self._device_bytes(buf)))
            return out
        return byte_view(buf.ptr, buf.nbytes).copy()

    @staticmethod
    def _device_bytes(buf: Buf) -> gpuaio.DeviceArray:
        base = buf.keep  # the uint8 allocation behind the buffer
        start = buf.ptr - base.ptr
        return base[start : start + buf.nbytes]  # type: ignore[no-any-return]


def wait(op: gpuaio.Operation, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not op.done():
        assert time.monotonic() < deadline, f"{op!r} never completed"
        time.sleep(0.0002)
    if op.exception() is not None:
        raise op.exception()  # type: ignore[misc]


def enqueued(rt: Any, stream: gpuaio.Stream) -> tuple[int, int, int, bool]:
    """What has reached the device: submitted stream work, executed ops, pending ops."""
    be = rt.backend
    submitted = sum(s.submitted for d in be._devices for s in list(d.streams))
    pending = sum(e.pending() for e in rt._engines.values())
    return submitted, be.ops_executed(0), pending, not stream._seq.idle


def assert_rejected(
    rt: Any,
    stream: gpuaio.Stream,
    call: Any,
    problems: list[tuple[str, ...]],
    label: str,
    case: str = "",
) -> None:
    before = enqueued(rt, stream)
    with pytest.raises(gpuaio.InvalidArgumentError) as info:
        call()
    msg = str(info.value)
    what = f"{label} {case}".strip()
    assert any(all(word in msg for word in p) for p in problems), (
        f"{what}: message {msg!r} names none of the problems {problems}"
    )
    assert enqueued(rt, stream) == before, f"{what}: rejected, yet something was enqueued"
    TRIED[f"{label}:rejected"] += 1


@pytest.fixture
def maker(gpuaio_runtime: Any) -> Any:
    if gpuaio_runtime.backend.name != "sim":
        pytest.skip("reads the simulated backend's counters to prove nothing was enqueued")
    s = device_of(gpuaio_runtime, 0).stream()
    m = Maker(gpuaio_runtime, s)
    yield m
    m.close()
    s.close()


# -- strategies ------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
specs = st.tuples(
    st.sampled_from(HOST_KINDS + DEVICE_KINDS),
    shapes,
    st.sampled_from(DTYPES),
    st.sampled_from(LAYOUTS),
)


def _same_size_shape(shape: tuple[int, ...]) -> st.SearchStrategy[tuple[int, ...]]:
    return st.sampled_from([shape, tuple(reversed(shape)), (int(np.prod(shape)),)])


# -- copy -------------------------------------------------------------------------------------


def copy_problems(d: Buf, s: Buf) -> list[tuple[str, ...]]:
    p: list[tuple[str, ...]] = []
    if d.readonly:
        p.append(("destination", "read-only"))
    if not d.contiguous:
        p.append(("destination", "not C-contiguous"))
    if not s.contiguous:
        p.append(("source", "not C-contiguous"))
    if d.nbytes != s.nbytes:
        p.append(("size mismatch",))
    if not (d.bytes_like or s.bytes_like):
        if d.dtype != s.dtype:
            p.append(("dtype mismatch",))
        if d.shape != s.shape:
            p.append(("shape mismatch",))
    if d.overlaps(s):
        p.append(("overlap",))
    host = {"pageable", "pinned", "registered", "dlpack"}
    if (d.kind == "device1" and s.kind in host) or (s.kind == "device1" and d.kind in host):
        p.append(("device 1",))
    return p


@SETTINGS
@given(
    dst=specs,
    src=specs,
    same_size=st.booleans(),
    share=st.integers(0, 3),
    share_off=st.integers(0, 64),
    data=st.data(),
)
def test_copy(
    maker: Maker,
    dst: Any,
    src: Any,
    same_size: bool,
    share: int,
    share_off: int,
    data: st.DataObject,
) -> None:
    TRIED["copy"] += 1
    rt, stream = maker.rt, maker.stream
    d = maker.make(*dst)
    skind, sshape, sdtype, slayout = src
    if same_size:  # most draws should get past the size check
        sdtype = dst[2]
        sshape = data.draw(_same_size_shape(dst[1]))
    share_with = d if share == 0 else None  # a quarter of the draws share memory
    s = maker.make(
        d.kind if share_with is not None else skind,
        sshape,
        sdtype,
        slayout,
        share=share_with,
        share_off=share_off,
    )
    problems = copy_problems(d, s)
    if problems:
        assert_rejected(rt, stream, lambda: stream.copy(d.obj, s.obj), problems, "copy")
        return
    payload = np.random.default_rng(share_off).integers(0, 256, s.nbytes, dtype=np.uint8)
    if s.nbytes:
        maker.fill(s, payload)
    wait(stream.copy(d.obj, s.obj))
    if s.nbytes:
        assert np.array_equal(maker.read(d), payload), "a valid copy moved the wrong bytes"
    TRIED["copy:valid"] += 1


# -- memset -----------------------------------------------------------------------------------

values = st.one_of(
    st.integers(-(1 << 33), 1 << 33),
    st.integers(-300, 300),
    st.booleans(),
    st.floats(-10, 10),
    st.sampled_from([np.uint8(7), np.int32(-1), np.bool_(True)]),
)


def memset_problems(d: Buf, value: Any, width: Any) -> list[tuple[str, ...]]:
    p: list[tuple[str, ...]] = []
    if d.readonly:
        p.append(("read-only",))
    if not d.contiguous:
        p.append(("not C-contiguous",))
    if width is not None and (isinstance(width, bool) or not isinstance(width, int)):
        p.append(("width must be 1, 2 or 4",))
        return p
    w = d.dtype.itemsize if width is None else width
    if width is None and w not in (1, 2, 4):
        p.append(("cannot infer a memset width",))
    if w not in (1, 2, 4):
        p.append(("width must be 1, 2 or 4",))
        return p
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        p.append(("must be an int",))
    elif not -(1 << (8 * w - 1)) <= int(value) < (1 << (8 * w)):
        p.append(("does not fit",))
    if d.nbytes % w:
        p.append(("whole number",))
    if d.kind == "device1":
        p.append(("device 1",))
    return p


@SETTINGS
@given(dst=specs, value=values, width=st.sampled_from([None, 1, 2, 4, 3, 8, 0, True, 1.0, "4"]))
def test_memset(maker: Maker, dst: Any, value: Any, width: Any) -> None:
    TRIED["memset"] += 1
    rt, stream = maker.rt, maker.stream
    d = maker.make(*dst)
    problems = memset_problems(d, value, width)
    call = (
        (lambda: stream.memset(d.obj, value))
        if width is None
        else (lambda: stream.memset(d.obj, value, width=width))
    )
    if problems:
        assert_rejected(rt, stream, call, problems, "memset")
        return
    wait(call())
    w = width or d.dtype.itemsize
    if d.nbytes:
        expected = np.full(d.nbytes // w, int(value) & ((1 << (8 * w)) - 1), f"<u{w}")
        assert np.array_equal(maker.read(d), expected.view(np.uint8))
    TRIED["memset:valid"] += 1


# -- launch -----------------------------------------------------------------------------------

junk = st.sampled_from(["8", 2.0, None, [], (1, "2"), object(), True, (4, False)])
numpy_ints = st.sampled_from([np.int64(3), np.int32(2), np.uint16(5)])
grid_dims = st.one_of(
    st.integers(-2, 2**31 + 2),
    st.lists(st.integers(-1, 66000), min_size=0, max_size=4).map(tuple),
    st.tuples(numpy_ints, st.integers(1, 4)),
    numpy_ints,
    junk,
)
block_dims = st.one_of(
    st.integers(-2, 1100),
    st.tuples(st.integers(-1, 1030), st.integers(1, 32), st.integers(1, 70)),
    st.lists(st.integers(-1, 40), min_size=0, max_size=4).map(tuple),
    numpy_ints,
    junk,
)
shared = st.one_of(
    st.integers(-5, 48 << 10),
    st.integers((228 << 10) - 2, (228 << 10) + 2),
    st.sampled_from([1.5, "0", None, True, np.int64(1024)]),
)
GRID_MAX = (2**31 - 1, 65535, 65535)
BLOCK_MAX = (1024, 1024, 64)
SHARED_MAX = 228 << 10


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _dims(v: Any) -> tuple[int, ...] | None:
    """The extents of an int or a 1-3 tuple of ints, all >= 1 (limits aside); else None."""
    items = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(items) <= 3 or not all(_is_int(x) and x >= 1 for x in items):
        return None
    return tuple(int(x) for x in items)


def launch_problems(grid: Any, block: Any, shared_mem: Any) -> list[tuple[str, ...]]:
    p: list[tuple[str, ...]] = []
    for what, value, limits in (("grid", grid, GRID_MAX), ("block", block, BLOCK_MAX)):
        dims = _dims(value)
        if dims is None or any(d > lim for d, lim in zip(dims, limits, strict=False)):
            p.append((what,))
        elif what == "block" and int(np.prod(dims)) > 1024:
            p.append(("1024 threads",))
    if not _is_int(shared_mem) or not 0 <= shared_mem <= SHARED_MAX:
        p.append(("shared_mem",))
    return p


@SETTINGS
@given(grid=grid_dims, block=block_dims, shared_mem=shared)
def test_launch(maker: Maker, grid: Any, block: Any, shared_mem: Any) -> None:
    TRIED["launch"] += 1
    rt, stream = maker.rt, maker.stream
    ran: list[tuple[Any, Any]] = []
    k = maker.dev.compile("", "probe", sim=lambda g, b, *a: ran.append((g, b)))
    problems = launch_problems(grid, block, shared_mem)
    call = lambda: stream.launch(k, grid, block, shared_mem=shared_mem)  # noqa: E731
    if problems:
        assert_rejected(rt, stream, call, problems, "launch")
        assert ran == []
        return
    wait(call())
    g, b = _dims(grid), _dims(block)
    assert g is not None
    assert b is not None
    assert ran == [((*g, 1, 1)[:3], (*b, 1, 1)[:3])]
    TRIED["launch:valid"] += 1


# -- allocation -------------------------------------------------------------------------------

alloc_shapes = st.one_of(
    st.integers(-3, 1 << 12),
    st.lists(st.integers(-2, 64), min_size=0, max_size=3).map(tuple),
    st.just((1 << 20, 1 << 20, 1 << 4)),
    st.sampled_from([2.5, "12", (2.0, 3), (np.int64(3), 2), [4, 2], None]),
)
alloc_dtypes = st.sampled_from(
    [np.uint8, np.float64, np.complex128, "i4", object, np.dtype([("a", "i4"), ("b", "f8")])]
)


@SETTINGS
@given(shape=alloc_shapes, dtype=alloc_dtypes, where=st.sampled_from(["device", "pinned"]))
def test_allocation(maker: Maker, shape: Any, dtype: Any, where: str) -> None:
    TRIED["alloc"] += 1
    items = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    dt = np.dtype(dtype)
    alloc = maker.dev.empty if where == "device" else gpuaio.pinned_empty
    problems: list[tuple[str, ...]] = []
    if not all(_is_int(x) for x in items):
        problems.append(("integers",))
    elif any(x < 0 for x in items):
        problems.append(("negative",))
    elif dt.hasobject:
        problems.append(("Python objects",))
    if problems:
        assert_rejected(maker.rt, maker.stream, lambda: alloc(shape, dtype), problems, "alloc")
        return
    dims = tuple(int(x) for x in items)
    nbytes = int(np.prod(dims)) * dt.itemsize
    if where == "device" and nbytes > maker.dev.properties.total_memory:
        with pytest.raises(gpuaio.CudaError, match="OUT_OF_MEMORY"):
            alloc(shape, dtype)
        TRIED["alloc:rejected"] += 1
        return
    if where == "pinned" and nbytes > 1 << 30:
        return  # would really pin (and zero) that much host memory
    arr = alloc(shape, dtype)
    assert tuple(arr.shape) == dims
    assert np.dtype(arr.dtype) == dt
    assert arr.nbytes == nbytes
    TRIED["alloc:valid"] += 1


# -- the rest of the API, one table ----------------------------------------------------------


def _other_api_cases(m: Maker) -> list[tuple[str, Any, tuple[str, ...]]]:
    dev, s = m.dev, m.stream
    d = dev.empty(16)
    op = s.synchronize()
    wait(op)
    return [
        ("device ordinal", lambda: gpuaio.Device("0"), ("ordinal",)),
        ("device bool", lambda: gpuaio.Device(True), ("ordinal",)),
        ("priority", lambda: dev.stream(priority=7), ("priority",)),
        ("priority type", lambda: dev.stream(priority="high"), ("priority",)),
        ("wait on junk", lambda: s.wait(3), ("Event or a Stream",)),
        ("wait on an op", lambda: s.wait(op), ("Event or a Stream",)),
        ("reshape", lambda: d.reshape(5), ("reshape",)),
        ("view", lambda: d.view(np.dtype("V3")), ("multiple",)),
        ("slice step", lambda: d[::2], ("step",)),
        ("index type", lambda: d[1.5], ("indices",)),
        ("register pinned", lambda: gpuaio.register_host(gpuaio.pinned_empty(16)), ("pageable",)),
        ("register empty", lambda: gpuaio.register_host(np.zeros(0, np.uint8)), ("empty",)),
        (
            "kernel on other device",
            lambda: s.launch(m.dev1.compile("", "k", sim=lambda *a: None), 1, 1),
            ("device 1",),
        ),
        (
            "kernel arg on other device",
            lambda: s.launch(dev.compile("", "k", sim=lambda *a: None), 1, 1, m.dev1.empty(8)),
            ("device 1",),
        ),
    ]


def test_other_api_rejections(maker: Maker) -> None:
    for label, call, words in _other_api_cases(maker):
        TRIED["api"] += 1
        assert_rejected(maker.rt, maker.stream, call, [words], "api", label)


# -- gaps these tests found (fixed in bdf49e9; kept as regression tests) ---------------------


@pytest.mark.parametrize("shape", [2.5, "12", (2.7, 3)], ids=["float", "str", "tuple-float"])
def test_allocation_rejects_non_integer_extents(maker: Maker, shape: Any) -> None:
    """Device.empty/pinned_empty took float and str extents and truncated them."""
    assert_rejected(
        maker.rt,
        maker.stream,
        lambda: maker.dev.empty(shape),
        [("integers",)],
        "alloc",
        "non-integer extent",
    )


@pytest.mark.parametrize(
    ("grid", "block", "shared_mem", "word"),
    [
        ((1, 70000), 1, 0, "grid"),
        (2**31, 1, 0, "grid"),
        (1, (1, 1, 128), 0, "block"),
        (1, 1, 1 << 20, "shared_mem"),
    ],
    ids=["grid-y", "grid-x", "block-z", "shared-mem"],
)
def test_launch_checks_hardware_limits(
    maker: Maker, grid: Any, block: Any, shared_mem: int, word: str
) -> None:
    """Launches beyond CUDA's grid/block/shared-memory limits ran on the sim and got a
    bare CUDA_ERROR_INVALID_VALUE from the driver."""
    k = maker.dev.compile("", "k", sim=lambda *a: None)
    assert_rejected(
        maker.rt,
        maker.stream,
        lambda: maker.stream.launch(k, grid, block, shared_mem=shared_mem),
        [(word, "limit"), (word, "exceeds")],
        "launch",
        "limits",
    )


@pytest.mark.parametrize("case", ["grid", "shared_mem", "width-bool", "width-float"])
def test_bools_and_floats_are_not_ints(maker: Maker, case: str) -> None:
    """grid=True and shared_mem=True ran; width=True / 1.0 failed inside with a numpy
    TypeError that did not name the argument."""
    s, d = maker.stream, maker.dev.empty(8)
    k = maker.dev.compile("", "k", sim=lambda *a: None)
    calls = {
        "grid": (lambda: s.launch(k, True, 1), ("grid",)),
        "shared_mem": (lambda: s.launch(k, 1, 1, shared_mem=True), ("shared_mem",)),
        "width-bool": (lambda: s.memset(d, 1, width=True), ("width",)),
        "width-float": (lambda: s.memset(d, 1, width=1.0), ("width",)),
    }
    call, words = calls[case]
    assert_rejected(maker.rt, s, call, [words], "api", case)


def test_launch_accepts_numpy_integers(maker: Maker) -> None:
    """A numpy integer grid (np.int64(n) // 256, the usual way to size one) was rejected."""
    ran: list[Any] = []
    k = maker.dev.compile("", "k", sim=lambda g, b: ran.append((g, b)))
    wait(maker.stream.launch(k, np.int64(4), np.int32(32)))
    assert ran == [((4, 1, 1), (32, 1, 1))]


def test_contiguous_cai_with_any_stride_on_unit_extent(maker: Maker) -> None:
    """A contiguous foreign array with a made-up stride on an extent of 1 was rejected
    as not C-contiguous (a numpy array with the same layout was accepted)."""
    d = maker.dev.empty(8)
    wait(maker.stream.memset(d, 0x3C))
    cai = CAI(d, (1, 8), np.uint8, strides=(64, 1), readonly=False)
    out = np.zeros((1, 8), np.uint8)
    wait(maker.stream.copy(out, cai))
    assert (out == 0x3C).all()


def test_pinned_empty_rejects_object_dtype(maker: Maker) -> None:
    """pinned_empty pinned the memory, then failed with numpy's TypeError."""
    assert_rejected(
        maker.rt,
        maker.stream,
        lambda: gpuaio.pinned_empty(4, object),
        [("Python objects",)],
        "alloc",
        "object dtype",
    )


# -- malformed foreign arrays, progress callbacks, sizes beyond size_t (issue 14) ------------


_DROP = object()


class RawCAI:
    """An object whose ``__cuda_array_interface__`` is whatever the test says."""

    def __init__(self, cai: Any) -> None:
        self.__cuda_array_interface__ = cai


def _cai_cases(d: gpuaio.DeviceArray) -> dict[str, tuple[Any, tuple[str, ...]]]:
    ok = {"shape": (64,), "typestr": "|u1", "data": (d.ptr, False), "version": 3}

    def but(**kw: Any) -> dict[str, Any]:
        out = {**ok, **kw}
        return {k: v for k, v in out.items() if v is not _DROP}

    return {
        "no typestr": (but(typestr=_DROP), ("typestr",)),
        "no shape": (but(shape=_DROP), ("shape",)),
        "no data": (but(data=_DROP), ("data",)),
        "data None": (but(data=None), ("data",)),
        "data one item": (but(data=(d.ptr,)), ("data",)),
        "pointer str": (but(data=("0x10", False)), ("pointer",)),
        "pointer negative": (but(data=(-1, False)), ("pointer",)),
        "pointer beyond 64 bits": (but(data=(1 << 64, False)), ("pointer",)),
        "null pointer": (but(data=(0, False)), ("null pointer",)),
        "bad typestr": (but(typestr="<x9"), ("typestr",)),
        "typestr not str": (but(typestr=5), ("typestr",)),
        "object typestr": (but(typestr="|O"), ("typestr",)),
        "shape float": (but(shape=(64.0,)), ("shape",)),
        "shape int": (but(shape=64), ("shape",)),
        "shape None item": (but(shape=(None,)), ("shape",)),
        "shape negative": (but(shape=(-64,)), ("negative",)),
        "strides too long": (but(strides=(1, 1)), ("strides",)),
        "strides floats": (but(strides=(1.0,)), ("strides",)),
        "strides int": (but(strides=1), ("strides",)),
        "mask": (but(mask=object()), ("mask",)),
        "not a dict": ([64, "|u1"], ("dict",)),
    }


def test_malformed_cuda_array_interface(maker: Maker) -> None:
    """A malformed ``__cuda_array_interface__`` raised a bare KeyError, TypeError or
    ValueError from deep inside; now an InvalidArgumentError naming the argument and
    the field, before anything is enqueued, wherever a buffer is taken."""
    s, dev = maker.stream, maker.dev
    d = dev.empty(64)
    host = np.zeros(64, np.uint8)
    k = dev.compile("", "k", sim=lambda *a: None)
    for name, (cai, words) in _cai_cases(d).items():
        bad = RawCAI(cai)
        calls = {
            "src": lambda bad=bad: s.copy(host, bad),
            "dst": lambda bad=bad: s.copy(bad, host),
            "memset": lambda bad=bad: s.memset(bad, 1),
            "argument 0": lambda bad=bad: s.launch(k, 1, 1, bad),
        }
        for arg, call in calls.items():
            named = arg if arg != "memset" else "dst"
            assert_rejected(
                maker.rt,
                s,
                call,
                [(named, "__cuda_array_interface__", w) for w in words],
                "cai",
                f"{name} as {arg}",
            )
        with pytest.raises(gpuaio.InvalidArgumentError, match="buffer: malformed"):
            gpuaio.memory_kind(bad)


@pytest.mark.parametrize(
    "progress", [5, "cb", object(), [print]], ids=["int", "str", "obj", "list"]
)
def test_copy_rejects_a_progress_that_is_not_callable(maker: Maker, progress: Any) -> None:
    """``progress=5`` was accepted, and the copy only logged a TypeError once it was done."""
    d = maker.dev.empty(1 << 20)
    src = np.ones(1 << 20, np.uint8)
    assert_rejected(
        maker.rt,
        maker.stream,
        lambda: maker.stream.copy(d, src, progress=progress),
        [("progress", "callable")],
        "api",
        "progress",
    )


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [(2**64, np.uint8), ((2**40, 2**40), np.uint8), (2**61, np.complex128), ((2**32, 2**32), "i2")],
    ids=["2**64", "2**80", "2**65-complex", "2**65-i2"],
)
@pytest.mark.parametrize("where", ["device", "managed", "pinned"])
def test_sizes_beyond_size_t_are_rejected(maker: Maker, shape: Any, dtype: Any, where: str) -> None:
    """``Device.empty(2**64)`` raised OverflowError from the CUDA bindings (the sim said
    out of memory): no driver takes a size that does not fit its size_t."""
    alloc = {
        "device": maker.dev.empty,
        "managed": maker.dev.managed_empty,
        "pinned": gpuaio.pinned_empty,
    }[where]
    assert_rejected(
        maker.rt, maker.stream, lambda: alloc(shape, dtype), [("shape", "size_t")], "alloc"
    )
    with pytest.raises(gpuaio.InvalidArgumentError, match="negative"):
        alloc(-(2**64), dtype)
