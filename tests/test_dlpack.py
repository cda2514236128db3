"""DLPack export and import: round trips through NumPy, ownership and consumption rules."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import sys
import threading
import weakref
from typing import Any

import numpy as np
import pytest

from gpuaio._core import dlpack as _dlpack
from gpuaio._core.dlpack import DLDeviceType, DLPackView, export_capsule, parse_dlpack
from gpuaio._core.errors import InvalidArgumentError

# -- helpers ---------------------------------------------------------------------


class Owner:
    """Stands in for a gpuaio array: owns the memory a capsule points into."""

    def __init__(self, array: np.ndarray[Any, Any]) -> None:
        self.array = array


def element_strides(array: np.ndarray[Any, Any]) -> tuple[int, ...]:
    assert all(s % array.itemsize == 0 for s in array.strides)
    return tuple(s // array.itemsize for s in array.strides)


class Exporter:
    """A DLPack producer over a NumPy buffer, built on export_capsule."""

    def __init__(
        self,
        array: np.ndarray[Any, Any],
        *,
        versioned: bool = True,
        readonly: bool = False,
        device_type: int = DLDeviceType.CPU,
        explicit_strides: bool = True,
    ) -> None:
        self.owner = Owner(array)
        self.versioned = versioned
        self.readonly = readonly
        self.device_type = device_type
        self.explicit_strides = explicit_strides
        self.calls: list[dict[str, Any]] = []

    def __dlpack_device__(self) -> tuple[int, int]:
        return (int(self.device_type), 0)

    def __dlpack__(
        self,
        *,
        stream: int | None = None,
        max_version: tuple[int, int] | None = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> object:
        self.calls.append({"stream": stream, "max_version": max_version})
        if self.versioned and (max_version is None or max_version[0] < 1):
            raise BufferError("this consumer does not accept versioned capsules")
        array = self.owner.array
        return export_capsule(
            ptr=array.ctypes.data,
            shape=array.shape,
            strides=element_strides(array) if self.explicit_strides else None,
            dtype=array.dtype,
            device_type=self.device_type,
            device_id=0,
            owner=self.owner,
            readonly=self.readonly,
            versioned=self.versioned,
        )


NUMPY_READS_VERSIONED = np.lib.NumpyVersion(np.__version__) >= "2.1.0"


def consume(exporter: Exporter) -> np.ndarray[Any, Any]:
    """``numpy.from_dlpack``, skipped where NumPy cannot read the capsule kind."""
    if exporter.versioned and not NUMPY_READS_VERSIONED:
        pytest.skip("NumPy < 2.1 cannot consume versioned capsules")
    return np.from_dlpack(exporter)


class LegacyOnlyExporter(Exporter):
    """A pre-DLPack-1.0 producer: ``__dlpack__`` takes no ``max_version``."""

    def __dlpack__(self, *, stream: int | None = None) -> object:  # type: ignore[override]
        return super().__dlpack__(stream=stream)


def collect() -> None:
    gc.collect()


_api = ctypes.pythonapi
_capsule_new = ctypes.PYFUNCTYPE(
    ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p
)(("PyCapsule_New", _api))
_capsule_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_IsValid", _api)
)


def capsule_name_is(capsule: object, name: bytes) -> bool:
    return bool(_capsule_is_valid(capsule, name))


@pytest.fixture(params=["default", "ctypes"])
def flavor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the default deleters (NumPy's) and with the ctypes fallback."""
    if request.param == "ctypes":
        monkeypatch.setattr(_dlpack, "_FLAVORS", dict(_dlpack._CTYPES_FLAVORS))
    return str(request.param)


# -- hand-written producer (independent of gpuaio's struct definitions) ------------


class HDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class HDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class HTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", HDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", HDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


HDeleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class HManaged(ctypes.Structure):
    _fields_ = [("dl_tensor", HTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", HDeleter)]


class HVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class HManagedVersioned(ctypes.Structure):
    _fields_ = [
        ("version", HVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", HDeleter),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", HTensor),
    ]


def test_struct_layouts_match_dlpack_h() -> None:
    assert ctypes.sizeof(_dlpack._DLTensor) == ctypes.sizeof(HTensor) == 48
    assert ctypes.sizeof(_dlpack._DLManagedTensor) == ctypes.sizeof(HManaged) == 64
    assert ctypes.sizeof(_dlpack._DLManagedTensorVersioned) == 80
    assert ctypes.sizeof(HManagedVersioned) == 80
    assert HManagedVersioned.dl_tensor.offset == 32


class HandMadeProducer:
    """Builds the C structs by hand and counts calls to its deleter."""

    def __init__(
        self,
        array: np.ndarray[Any, Any],
        *,
        versioned: bool,
        code: int,
        bits: int,
        lanes: int = 1,
        strides: tuple[int, ...] | None = None,
        byte_offset: int = 0,
        flags: int = 0,
        major: int = 1,
        with_deleter: bool = True,
        device_type: int = DLDeviceType.CPU,
    ) -> None:
        self.array = array
        self.deleted: list[int] = []
        self.capsule: object = None
        self.name = b"dltensor_versioned" if versioned else b"dltensor"
        self.managed: HManaged | HManagedVersioned
        if versioned:
            self.managed = HManagedVersioned()
            self.managed.version.major = major
            self.managed.flags = flags
        else:
            self.managed = HManaged()
        ndim = array.ndim
        self.shape = (ctypes.c_int64 * max(ndim, 1))(*array.shape)
        self.strides = (ctypes.c_int64 * max(ndim, 1))(*(strides or ()))
        tensor = self.managed.dl_tensor
        tensor.data = array.ctypes.data
        tensor.device.device_type = device_type
        tensor.ndim = ndim
        tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes = code, bits, lanes
        tensor.shape = ctypes.cast(self.shape, ctypes.POINTER(ctypes.c_int64))
        if strides is not None:
            tensor.strides = ctypes.cast(self.strides, ctypes.POINTER(ctypes.c_int64))
        tensor.byte_offset = byte_offset
        self._deleter = HDeleter(self._on_delete)
        if with_deleter:
            self.managed.deleter = self._deleter

    @property
    def address(self) -> int:
        return ctypes.addressof(self.managed)

    def _on_delete(self, address: int | None) -> None:
        assert address is not None
        self.deleted.append(address)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (int(self.managed.dl_tensor.device.device_type), 0)

    def __dlpack__(self, **kwargs: Any) -> object:
        # No capsule destructor: an unconsumed capsule simply keeps the struct.
        self.capsule = _capsule_new(self.address, self.name, None)
        return self.capsule


# -- exports consumed by numpy.from_dlpack -------------------------------------------

DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]


def sample(dtype: Any, shape: tuple[int, ...] = (3, 4)) -> np.ndarray[Any, Any]:
    n = int(np.prod(shape))
    values = np.arange(n) % 2 == 1 if dtype is np.bool_ else np.arange(n) * 3 - 5
    array = np.asarray(values).astype(dtype).reshape(shape)
    if np.dtype(dtype).kind == "c":
        array = array + 1j * array[::-1]
    return array


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_roundtrip_dtypes(dtype: Any, versioned: bool, flavor: str) -> None:
    array = sample(dtype)
    out = consume(Exporter(array, versioned=versioned))
    assert out.dtype == np.dtype(dtype)
    assert out.shape == array.shape
    assert out.ctypes.data == array.ctypes.data
    np.testing.assert_array_equal(out, sample(dtype))


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (7,), (2, 3, 4)], ids=str)
def test_numpy_roundtrip_shapes(shape: tuple[int, ...], versioned: bool, flavor: str) -> None:
    array = sample(np.float32, shape)
    for explicit in (True, False):
        out = consume(Exporter(array, versioned=versioned, explicit_strides=explicit))
        assert out.shape == shape
        np.testing.assert_array_equal(out, array)
        if array.size:  # an empty array's strides and address are arbitrary
            assert out.strides == array.strides
            assert out.ctypes.data == array.ctypes.data


def test_numpy_roundtrip_zero_d_value() -> None:
    array = np.array(7.25, dtype=np.float64)
    out = consume(Exporter(array, versioned=False))
    assert out.shape == ()
    assert out.ctypes.data == array.ctypes.data
    assert out[()] == 7.25


def strided_views() -> list[Any]:
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    return [
        pytest.param(base[::2, 1::3], id="step"),
        pytest.param(base.T, id="transposed"),
        pytest.param(base[::-1, ::-2], id="negative"),
        pytest.param(base[:, 4], id="column"),
        pytest.param(np.broadcast_to(base[0], (4, 10)), id="zero-stride"),
    ]


@pytest.mark.parametrize("view", strided_views())
@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_numpy_roundtrip_non_contiguous(
    view: np.ndarray[Any, Any], versioned: bool, flavor: str
) -> None:
    readonly = not view.flags.writeable
    if readonly and not versioned:
        pytest.skip("read-only views need a versioned capsule")
    out = consume(Exporter(view, versioned=versioned, readonly=readonly))
    assert out.ctypes.data == view.ctypes.data
    assert out.strides == view.strides
    np.testing.assert_array_equal(out, view)


def test_zero_copy_writes_are_shared(flavor: str) -> None:
    array = np.zeros((4, 4), dtype=np.float64)
    out = consume(Exporter(array, versioned=True))
    assert out.flags.writeable
    out[1, 2] = 42.0
    assert array[1, 2] == 42.0
    array[3, 0] = -1.5
    assert out[3, 0] == -1.5


def test_readonly_flag_reaches_numpy() -> None:
    array = np.arange(5, dtype=np.int64)
    out = consume(Exporter(array, versioned=True, readonly=True))
    assert not out.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        out[0] = 1
    assert consume(Exporter(array, versioned=True, readonly=False)).flags.writeable


def test_readonly_needs_versioned_capsule() -> None:
    array = np.arange(5, dtype=np.int64)
    with pytest.raises(InvalidArgumentError, match=r"read-only.*versioned"):
        np.from_dlpack(Exporter(array, versioned=False, readonly=True))


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_owner_released_after_consumer_drops(versioned: bool, flavor: str) -> None:
    array = np.arange(10, dtype=np.float32)
    exporter = Exporter(array, versioned=versioned)
    owner_ref = weakref.ref(exporter.owner)
    out = consume(exporter)
    del exporter, array
    collect()
    assert owner_ref() is not None, "the consumer's array must keep the owner alive"
    np.testing.assert_array_equal(out, np.arange(10, dtype=np.float32))
    del out
    collect()
    assert owner_ref() is None


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_unconsumed_capsule_releases_owner(versioned: bool, flavor: str) -> None:
    array = np.arange(3, dtype=np.uint8)
    owner = Owner(array)
    owner_ref = weakref.ref(owner)
    refs = sys.getrefcount(owner)
    capsule = export_capsule(
        ptr=array.ctypes.data,
        shape=array.shape,
        strides=None,
        dtype=array.dtype,
        device_type=DLDeviceType.CPU,
        device_id=0,
        owner=owner,
        versioned=versioned,
    )
    name = b"dltensor_versioned" if versioned else b"dltensor"
    assert capsule_name_is(capsule, name)
    assert sys.getrefcount(owner) == refs + 1
    del owner
    collect()
    assert owner_ref() is not None
    del capsule
    collect()
    assert owner_ref() is None


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_consumer_drops_exactly_one_reference(versioned: bool, flavor: str) -> None:
    exporter = Exporter(np.arange(4, dtype=np.int16), versioned=versioned)
    owner = exporter.owner
    refs = sys.getrefcount(owner)
    out = consume(exporter)
    assert sys.getrefcount(owner) == refs + 1
    del out
    collect()
    assert sys.getrefcount(owner) == refs


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_release_from_another_thread(versioned: bool, flavor: str) -> None:
    exporter = Exporter(np.arange(8, dtype=np.float64), versioned=versioned)
    owner_ref = weakref.ref(exporter.owner)
    holder = [consume(exporter)]
    del exporter
    worker = threading.Thread(target=holder.clear)
    worker.start()
    worker.join()
    collect()
    assert owner_ref() is None


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_numpy_rejection_keeps_its_error(versioned: bool) -> None:
    # numpy.from_dlpack drops a capsule it rejects while its exception is set;
    # the capsule destructor must neither replace that exception nor leak.
    exporter = Exporter(np.arange(4.0), versioned=versioned, device_type=DLDeviceType.CUDA)
    owner_ref = weakref.ref(exporter.owner)
    with pytest.raises((RuntimeError, BufferError), match="Unsupported device") as info:
        consume(exporter)
    assert not isinstance(info.value, SystemError)
    del exporter, info
    collect()
    assert owner_ref() is None


def test_numpy_accepts_cuda_host_memory() -> None:
    # NumPy treats CUDA_HOST (pinned) like CPU memory and keeps the device type.
    array = np.arange(6, dtype=np.int32)
    out = consume(Exporter(array, versioned=False, device_type=DLDeviceType.CUDA_HOST))
    assert out.ctypes.data == array.ctypes.data
    assert out.__dlpack_device__() == (DLDeviceType.CUDA_HOST, 0)
    np.testing.assert_array_equal(out, array)


def test_numpy_deleters_are_reused() -> None:
    if not NUMPY_READS_VERSIONED:
        pytest.skip("versioned DLPack export needs NumPy >= 2.1")
    assert {f.origin for f in _dlpack._FLAVORS.values()} == {"numpy"}


# -- export argument checks --------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [
        np.dtype(object),
        np.dtype([("a", "<i4"), ("b", "<f8")]),
        np.dtype(np.float32).newbyteorder(),
        np.dtype("M8[ns]"),
        np.dtype("U3"),
        np.dtype("V4"),
        np.dtype((np.int32, (2,))),
    ],
    ids=["object", "structured", "byteswapped", "datetime", "unicode", "void", "subarray"],
)
def test_unsupported_dtype_rejected(dtype: np.dtype[Any]) -> None:
    array = np.zeros(3, dtype=dtype)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        export_capsule(
            ptr=array.ctypes.data,
            shape=array.shape,
            strides=None,
            dtype=dtype,
            device_type=DLDeviceType.CPU,
            device_id=0,
            owner=array,
        )


def test_longdouble_rejected_where_not_float64() -> None:
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is float64 here")
    with pytest.raises(InvalidArgumentError, match=r"longdouble|float128|float96"):
        export_capsule(
            ptr=1,
            shape=(1,),
            strides=None,
            dtype=np.dtype(np.longdouble),
            device_type=DLDeviceType.CPU,
            device_id=0,
            owner=None,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (2, 3), "strides": (1,)}, "strides"),
        ({"shape": (-1,)}, "negative extent"),
        ({"shape": (4,), "ptr": 0}, "null data pointer"),
        ({"device_type": 0}, "device_type"),
        ({"shape": (2, "x")}, "integers"),
    ],
)
def test_export_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "ptr": 0x1000,
        "shape": (4,),
        "strides": None,
        "dtype": np.dtype(np.float32),
        "device_type": DLDeviceType.CPU,
        "device_id": 0,
        "owner": None,
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        export_capsule(**args)


def test_empty_tensor_may_have_null_pointer() -> None:
    capsule = export_capsule(
        ptr=0,
        shape=(0, 5),
        strides=None,
        dtype=np.dtype(np.float64),
        device_type=DLDeviceType.CUDA,
        device_id=1,
        owner=None,
        versioned=True,
    )

    class Holder:
        def __dlpack_device__(self) -> tuple[int, int]:
            return (DLDeviceType.CUDA, 1)

        def __dlpack__(self, **kwargs: Any) -> object:
            return capsule

    view = parse_dlpack(Holder())
    assert (view.ptr, view.shape, view.device_type, view.device_id) == (0, (0, 5), 2, 1)
    assert view.strides_bytes == (40, 8)


# -- parse_dlpack ---------------------------------------------------------------------


def numpy_arrays() -> list[Any]:
    base = np.arange(120, dtype=np.float64).reshape(4, 5, 6)
    return [
        pytest.param(base, id="contiguous"),
        pytest.param(base[1:3, ::2, ::-3], id="strided"),
        pytest.param(base.transpose(2, 0, 1), id="transposed"),
        pytest.param(np.array(3, dtype=np.uint16), id="0-d"),
        pytest.param(np.empty((0, 3), dtype=np.complex64), id="empty"),
        pytest.param(np.array([True, False, True]), id="bool"),
        pytest.param(np.arange(9, dtype=np.float16)[::4], id="float16"),
    ]


@pytest.mark.parametrize("array", numpy_arrays())
def test_parse_numpy_array(array: np.ndarray[Any, Any]) -> None:
    view = parse_dlpack(array)
    assert isinstance(view, DLPackView)
    assert view.ptr == array.ctypes.data
    assert view.shape == array.shape
    if array.size:  # an empty array's strides are arbitrary
        assert view.strides_bytes == array.strides
    assert view.dtype == array.dtype
    assert (view.device_type, view.device_id) == (DLDeviceType.CPU, 0)
    assert view.readonly is False


def test_parse_numpy_readonly_array() -> None:
    if not NUMPY_READS_VERSIONED:
        pytest.skip("NumPy < 2.1 refuses to export read-only arrays")
    array = np.arange(4, dtype=np.int32)
    array.flags.writeable = False
    assert parse_dlpack(array).readonly is True


def test_parse_keepalive_keeps_memory_valid() -> None:
    array = np.arange(4096, dtype=np.float64) * 1.5
    expected = array.copy()
    array_ref = weakref.ref(array)
    view = parse_dlpack(array)
    del array
    collect()
    assert array_ref() is not None
    data = np.ctypeslib.as_array((ctypes.c_double * 4096).from_address(view.ptr))
    np.testing.assert_array_equal(data, expected)
    keepalive = view.keepalive
    del view, data
    collect()
    assert array_ref() is not None, "keepalive alone must hold the producer's memory"
    del keepalive
    collect()
    assert array_ref() is None


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_parse_own_export(versioned: bool, flavor: str) -> None:
    base = np.arange(48, dtype=np.complex64).reshape(6, 8)
    array = base[::-2, 1::3]
    exporter = Exporter(array, versioned=versioned, readonly=versioned)
    owner = exporter.owner
    owner_ref = weakref.ref(owner)
    refs = sys.getrefcount(owner)
    view = parse_dlpack(exporter)
    assert view.ptr == array.ctypes.data
    assert view.shape == array.shape
    assert view.strides_bytes == array.strides
    assert view.dtype == np.complex64
    assert view.readonly is versioned
    assert exporter.calls == [{"stream": None, "max_version": (1, 0)}]
    assert sys.getrefcount(owner) == refs + 1
    del view
    collect()
    assert sys.getrefcount(owner) == refs
    del exporter, owner
    collect()
    assert owner_ref() is None


def test_parse_falls_back_to_legacy_call() -> None:
    array = np.arange(6, dtype=np.uint32)
    exporter = LegacyOnlyExporter(array, versioned=False)
    view = parse_dlpack(exporter)
    assert exporter.calls == [{"stream": None, "max_version": None}]
    assert view.ptr == array.ctypes.data
    assert view.readonly is False


@pytest.mark.parametrize(
    ("device_type", "forwarded"),
    [
        (DLDeviceType.CUDA, 7),
        (DLDeviceType.CUDA_MANAGED, 7),
        (DLDeviceType.CPU, None),
        (DLDeviceType.CUDA_HOST, None),
    ],
)
def test_parse_forwards_stream_to_cuda_producers(
    device_type: DLDeviceType, forwarded: int | None
) -> None:
    exporter = Exporter(np.arange(3, dtype=np.int8), device_type=device_type)
    view = parse_dlpack(exporter, stream=7)
    assert exporter.calls == [{"stream": forwarded, "max_version": (1, 0)}]
    assert view.device_type == device_type
    assert parse_dlpack(exporter).device_type == device_type
    assert exporter.calls[-1] == {"stream": None, "max_version": (1, 0)}


def test_parse_legacy_producer_still_gets_stream() -> None:
    exporter = LegacyOnlyExporter(
        np.arange(3, dtype=np.int8), versioned=False, device_type=DLDeviceType.CUDA
    )
    parse_dlpack(exporter, stream=2)
    assert exporter.calls == [{"stream": 2, "max_version": None}]


def test_parse_rejects_stream_zero() -> None:
    exporter = Exporter(np.arange(3, dtype=np.int8), device_type=DLDeviceType.CUDA)
    with pytest.raises(InvalidArgumentError, match="stream=0"):
        parse_dlpack(exporter, stream=0)
    assert exporter.calls == []


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_parse_calls_deleter_exactly_once(versioned: bool) -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    producer = HandMadeProducer(
        array, versioned=versioned, code=0, bits=32, strides=element_strides(array)
    )
    view = parse_dlpack(producer)
    used = b"used_dltensor_versioned" if versioned else b"used_dltensor"
    assert capsule_name_is(producer.capsule, used)
    assert view.ptr == array.ctypes.data
    assert view.shape == (3, 4)
    assert view.strides_bytes == (16, 4)
    assert view.dtype == np.int32
    collect()
    assert producer.deleted == []
    del view
    collect()
    assert producer.deleted == [producer.address]
    collect()
    assert producer.deleted == [producer.address]


def test_parse_byte_offset_and_null_strides() -> None:
    array = np.arange(32, dtype=np.float32)
    producer = HandMadeProducer(array[:24].reshape(2, 3, 4), versioned=True, code=2, bits=32)
    producer.managed.dl_tensor.byte_offset = 8
    view = parse_dlpack(producer)
    assert view.ptr == array.ctypes.data + 8
    assert view.strides_bytes == (48, 16, 4)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((2, 0, 3), (12, 12, 4)), ((0, 4), (16, 4)), ((3, 1, 5), (20, 20, 4)), ((), ())],
    ids=str,
)
def test_null_strides_mean_row_major(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    # Zero extents count as 1, as in torch's contiguous strides.
    producer = HandMadeProducer(np.empty(shape, np.float32), versioned=True, code=2, bits=32)
    assert parse_dlpack(producer).strides_bytes == expected
    exported = parse_dlpack(Exporter(np.empty(shape, np.float32), explicit_strides=False))
    assert exported.strides_bytes == expected


@pytest.mark.parametrize(
    ("versioned", "flags", "readonly"),
    [(True, 1, True), (True, 0, False), (True, 2, False), (False, 0, False)],
)
def test_parse_readonly_flag(versioned: bool, flags: int, readonly: bool) -> None:
    producer = HandMadeProducer(np.zeros(2), versioned=versioned, code=2, bits=64, flags=flags)
    assert parse_dlpack(producer).readonly is readonly


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"code": 2, "bits": 32, "lanes": 4}, "4 lanes"),
        ({"code": 2, "bits": 8}, "no NumPy equivalent"),
        ({"code": 6, "bits": 1}, "no NumPy equivalent"),
        ({"code": 0, "bits": 32, "major": 2}, "DLPack 2.0"),
    ],
)
def test_parse_rejects_without_consuming(options: dict[str, int], match: str) -> None:
    producer = HandMadeProducer(np.zeros(4, dtype=np.float32), versioned=True, **options)
    with pytest.raises(InvalidArgumentError, match=match):
        parse_dlpack(producer)
    assert capsule_name_is(producer.capsule, b"dltensor_versioned")
    collect()
    assert producer.deleted == []


def test_parse_bfloat16() -> None:
    producer = HandMadeProducer(np.zeros(4, dtype=np.uint16), versioned=True, code=4, bits=16)
    if importlib.util.find_spec("ml_dtypes") is None:
        with pytest.raises(InvalidArgumentError, match="ml_dtypes"):
            parse_dlpack(producer)
    else:
        import ml_dtypes

        view = parse_dlpack(producer)
        assert view.dtype == np.dtype(ml_dtypes.bfloat16)
        assert view.strides_bytes == (2,)


def test_bfloat16_export_roundtrip() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    array = np.arange(5).astype(ml_dtypes.bfloat16)
    view = parse_dlpack(Exporter(array))
    assert view.dtype == array.dtype
    assert view.ptr == array.ctypes.data


def test_parse_without_deleter_keeps_producer() -> None:
    producer = HandMadeProducer(np.ones(3), versioned=False, code=2, bits=64, with_deleter=False)
    producer_ref = weakref.ref(producer)
    view = parse_dlpack(producer)
    del producer
    collect()
    assert producer_ref() is not None
    del view
    collect()
    assert producer_ref() is None


def test_parse_rejects_consumed_capsule() -> None:
    producer = HandMadeProducer(np.ones(3), versioned=False, code=2, bits=64)
    view = parse_dlpack(producer)
    capsule = producer.capsule

    class Replay:
        def __dlpack_device__(self) -> tuple[int, int]:
            return (DLDeviceType.CPU, 0)

        def __dlpack__(self, **kwargs: Any) -> object:
            return capsule

    with pytest.raises(InvalidArgumentError, match="already consumed"):
        parse_dlpack(Replay())
    del view
    collect()
    assert producer.deleted == [producer.address]


def test_parse_rejects_non_producers() -> None:
    with pytest.raises(InvalidArgumentError, match="does not support DLPack"):
        parse_dlpack(object())

    class BadDevice:
        def __dlpack_device__(self) -> object:
            return "cuda:0"

        def __dlpack__(self, **kwargs: Any) -> object:
            raise AssertionError("must not be called")

    with pytest.raises(InvalidArgumentError, match="device_type, device_id"):
        parse_dlpack(BadDevice())

    class NotACapsule:
        def __dlpack_device__(self) -> tuple[int, int]:
            return (DLDeviceType.CPU, 0)

        def __dlpack__(self, **kwargs: Any) -> object:
            return b"dltensor"

    with pytest.raises(InvalidArgumentError, match="returned bytes"):
        parse_dlpack(NotACapsule())
