"""Spreading one batch over several devices, and bringing results back.

:func:`scatter` splits a host array along its first axis and copies each
part to one device; :func:`gather` copies device arrays back into one host
array. Every part is enqueued at once on its device's own stream, so the
transfers run concurrently; pageable parts are staged by the shared host
threads, which serve the parts in the order they are enqueued.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._device import Device
from ._errors import InvalidArgumentError
from ._memory import DeviceArray
from ._operation import Operation, wait_all
from ._runtime import current_runtime

__all__ = ["gather", "scatter", "split_sizes"]


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``n`` rows, as even as possible."""
    if parts < 1:
        raise InvalidArgumentError("need at least one device")
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _devices(devices: Sequence[Device | int] | None) -> list[Device]:
    if devices is None:
        rt = current_runtime()
        return [rt.device(i) for i in range(rt.backend.device_count())]
    out = [d if isinstance(d, Device) else Device(d) for d in devices]
    if not out:
        raise InvalidArgumentError("need at least one device")
    return out


async def scatter(host: Any, devices: Sequence[Device | int] | None = None) -> list[DeviceArray]:
    """Split ``host`` along axis 0 over ``devices`` (default: all) and copy each part.

    Returns one device array per device, in order. Rows are spread as evenly
    as possible. When the await returns every part is on its device and
    ``host`` may be reused.
    """
    arr = np.asarray(host)
    if arr.ndim == 0:
        raise InvalidArgumentError("scatter needs an array with at least one axis")
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError("scatter needs a C-contiguous array")
    devs = _devices(devices)
    parts: list[DeviceArray] = []
    ops: list[Operation] = []
    start = 0
    for dev, rows in zip(devs, split_sizes(arr.shape[0], len(devs)), strict=True):
        piece = arr[start : start + rows]
        start += rows
        d = dev.empty(piece.shape, piece.dtype)
        parts.append(d)
        ops.append(dev.default_stream.copy(d, piece))
    await wait_all(ops)
    return parts


async def gather(parts: Sequence[DeviceArray], out: Any) -> Any:
    """Copy ``parts`` (on any devices) back into consecutive rows of ``out``.

    ``out`` must be a writable C-contiguous host array whose first axis has
    the parts' total length. Returns ``out`` once every byte is in it.
    """
    dst = np.asarray(out)
    if not dst.flags.writeable or not dst.flags.c_contiguous:
        raise InvalidArgumentError("gather needs a writable C-contiguous output array")
    total = sum(p.shape[0] if p.shape else 1 for p in parts)
    if dst.ndim == 0 or dst.shape[0] != total:
        raise InvalidArgumentError(
            f"output has {dst.shape[0] if dst.ndim else 0} rows, the parts have {total}"
        )
    rt = current_runtime()
    ops: list[Operation] = []
    start = 0
    for p in parts:
        rows = p.shape[0] if p.shape else 1
        ops.append(rt.device(p.device).default_stream.copy(dst[start : start + rows], p))
        start += rows
    await wait_all(ops)
    return out
