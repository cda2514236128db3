"""DLPack import through cuda.core: who owns a consumed capsule, what is refused unconsumed."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from cuda.core.utils import StridedMemoryView

from gpuaio._core.dlpack import parse_dlpack
from gpuaio._core.errors import InvalidArgumentError
from tests.test_dlpack import HandMadeProducer, capsule_name_is


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_cuda_core_view_owns_the_consumed_tensor(versioned: bool) -> None:
    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    producer = HandMadeProducer(array, versioned=versioned, code=0, bits=64)
    view = parse_dlpack(producer)
    assert isinstance(view.keepalive, StridedMemoryView)
    assert (view.ptr, view.shape, view.strides_bytes) == (array.ctypes.data, (2, 3), (24, 8))
    used = b"used_dltensor_versioned" if versioned else b"used_dltensor"
    assert capsule_name_is(producer.capsule, used)
    keepalive = view.keepalive
    del view
    gc.collect()
    assert producer.deleted == [], "the cuda.core view alone keeps the tensor"
    del keepalive
    gc.collect()
    assert producer.deleted == [producer.address]


def test_foreign_device_type_rejected_without_consuming() -> None:
    # kDLROCM (10): neither host nor CUDA memory, which cuda.core also refuses.
    producer = HandMadeProducer(np.zeros(4, np.float32), versioned=True, code=2, bits=32)
    producer.managed.dl_tensor.device.device_type = 10
    with pytest.raises(InvalidArgumentError, match="neither CPU nor CUDA"):
        parse_dlpack(producer)
    assert capsule_name_is(producer.capsule, b"dltensor_versioned")
    gc.collect()
    assert producer.deleted == []
