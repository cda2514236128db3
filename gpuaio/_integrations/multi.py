"""Spreading one batch over several devices, and bringing results back.

:func:`scatter` splits a host array along its first axis and copies each
part to one device; :func:`gather` copies device arrays back into one host
array. Every part is enqueued at once on its device's own stream, so the
transfers run concurrently; pageable parts are staged by the shared host
threads, which serve the parts in the order they are enqueued.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np

from .._api.describe import describe
from .._api.device import Device, device_of
from .._api.memory import DeviceArray
from .._api.runtime import current_runtime
from .._api.transfers import check_copy
from .._core.errors import InvalidArgumentError
from .._core.operation import Operation, wait_all
from .._engine.buffers import BufferInfo

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
        return [device_of(rt, i) for i in range(rt.backend.device_count())]
    out = [d if isinstance(d, Device) else Device(d) for d in devices]
    if not out:
        raise InvalidArgumentError("need at least one device")
    return out


async def scatter(host: Any, devices: Sequence[Device | int] | None = None) -> list[DeviceArray]:
    """Split ``host`` along axis 0 over ``devices`` (default: all) and copy each part.

    Returns one device array per device, in order. Rows are spread as evenly
    as possible. When the await returns every part is on its device and
    ``host`` may be reused.

    All or nothing: every part is checked and allocated before any copy is
    enqueued. If an allocation or an enqueue fails, or the await is
    cancelled, the copies already enqueued are waited for (shielded from
    cancellation) and the parts are freed before the error is raised, so
    ``host`` may be reused then too.
    """
    arr = np.asarray(host)
    if arr.ndim == 0:
        raise InvalidArgumentError("scatter needs an array with at least one axis")
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError("scatter needs a C-contiguous array")
    if arr.dtype.hasobject:
        raise InvalidArgumentError("scatter cannot copy an array of Python objects to a GPU")
    devs = _devices(devices)
    rt = current_runtime()
    pieces: list[np.ndarray[Any, Any]] = []
    start = 0
    for rows in split_sizes(arr.shape[0], len(devs)):
        pieces.append(arr[start : start + rows])
        start += rows
    for dev in devs:
        rt.check_device(dev.ordinal)
    streams = [dev.default_stream for dev in devs]
    parts: list[DeviceArray] = []
    ops: list[Operation] = []
    try:
        for dev, piece in zip(devs, pieces, strict=True):
            parts.append(dev.empty(piece.shape, piece.dtype))
        for i, (d, piece) in enumerate(zip(parts, pieces, strict=True)):
            _check_part(i, describe(d, rt, f"parts[{i}]"), describe(piece, rt, "host"))
        for s, d, piece in zip(streams, parts, pieces, strict=True):
            ops.append(s.copy(d, piece))
        await wait_all(ops)
    except BaseException:
        await _settle(ops)
        for d in parts:
            d.free()
        raise
    return parts


async def gather(parts: Sequence[DeviceArray], out: Any) -> Any:
    """Copy ``parts`` (on any devices) back into consecutive rows of ``out``.

    ``out`` must be a writable C-contiguous host array whose first axis has
    the parts' total length. Returns ``out`` once every byte is in it.

    All or nothing: every part is checked against its rows of ``out`` before
    any copy is enqueued, and a bad one raises
    :class:`~gpuaio.InvalidArgumentError` with ``out`` untouched. If an
    enqueue fails midway, or the await is cancelled, the copies already
    enqueued are waited for (shielded from cancellation) before the error is
    raised: nothing writes into ``out`` after gather has returned or raised.
    """
    dst = np.asarray(out)
    if not dst.flags.writeable or not dst.flags.c_contiguous:
        raise InvalidArgumentError("gather needs a writable C-contiguous output array")
    rt = current_runtime()
    for i, p in enumerate(parts):
        if not isinstance(p, DeviceArray):
            raise InvalidArgumentError(
                f"parts[{i}] is a {type(p).__name__}, not a gpuaio DeviceArray"
            )
    total = sum(p.shape[0] if p.shape else 1 for p in parts)
    if dst.ndim == 0 or dst.shape[0] != total:
        raise InvalidArgumentError(
            f"output has {dst.shape[0] if dst.ndim else 0} rows, the parts have {total}"
        )
    plan: list[tuple[DeviceArray, np.ndarray[Any, Any]]] = []
    start = 0
    for i, p in enumerate(parts):
        rows = p.shape[0] if p.shape else 1
        piece = dst[start : start + rows]
        start += rows
        _check_part(i, describe(piece, rt, "out"), describe(p, rt, f"parts[{i}]"))
        rt.check_device(p.device)
        plan.append((p, piece))
    streams = [device_of(rt, p.device).default_stream for p, _ in plan]
    ops: list[Operation] = []
    try:
        for s, (p, piece) in zip(streams, plan, strict=True):
            ops.append(s.copy(piece, p))
        await wait_all(ops)
    except BaseException:
        await _settle(ops)
        raise
    return out


def _check_part(i: int, d: BufferInfo, s: BufferInfo) -> None:
    """The checks of :meth:`Stream.copy` for part ``i``, before anything is enqueued."""
    try:
        check_copy(d, s)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"parts[{i}]: {exc}") from None


async def _settle(ops: Sequence[Operation]) -> None:
    """Wait, shielded from cancellation, until every op in ``ops`` has finished.

    Their errors are not raised: the caller re-raises the error that stopped it.
    """
    with anyio.CancelScope(shield=True):
        for op in reversed(ops):  # last first: see wait_all
            with contextlib.suppress(Exception):
                await op
