#!/usr/bin/env python
"""Smoke test of ``gpuaio.backends.cuda.CudaBackend`` on a real GPU.

Exercises every backend method on device 0 (and the peer methods when a
second device exists), printing one ``PASS``/``FAIL``/``SKIP`` line per check
and exiting with status 1 if any check failed. Run from the repository root::

    python tools/cuda_backend_smoke.py

Copies are checked byte for byte for every pair of memory kinds (pageable,
pinned, registered, device, managed); memsets for item sizes 1, 2 and 4; a
compiled kernel for pointer/int/float32 (and every other scalar) arguments;
events, stream waits, host functions, stream memory operations and pointer
classification. A watchdog ends the run if anything hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import importlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from gpuaio._core.errors import (
    CudaError,
    DeviceFatalError,
    InvalidArgumentError,
    NoDeviceError,
)
from gpuaio.backends._base import MemoryKind
from gpuaio.backends.cuda import CudaBackend

PAGE = 4096
NBYTES = (1 << 20) + 13  # odd on purpose: no copy may round to whole words
TIMEOUT_S = 20.0


class Failed(Exception):
    """A check's expectation did not hold."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        """``with report.check(name):`` passes unless the block raises."""
        try:
            yield
        except Skip as exc:
            self.skipped += 1
            print(f"SKIP {name}: {exc}", flush=True)
        except Failed as exc:
            self.failed += 1
            print(f"FAIL {name}: {exc}", flush=True)
        except Exception as exc:
            self.failed += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            print(
                f"FAIL {name}: {type(exc).__name__}: {exc} "
                f"(at {Path(where.filename).name}:{where.lineno})",
                flush=True,
            )
        else:
            self.passed += 1
            print(f"PASS {name}", flush=True)


class Skip(Exception):
    """A check that cannot run here."""


def host_view(ptr: int, nbytes: int) -> np.ndarray:
    """A uint8 numpy view of host-accessible memory at ``ptr``."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


def u32_at(ptr: int) -> ctypes.c_uint32:
    return ctypes.c_uint32.from_address(ptr)


def pattern(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.001)
    return predicate()


class DeviceArray:
    """The smallest object exposing ``__cuda_array_interface__``."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


class Memory:
    """Buffers of every memory kind, with host-side read/write helpers."""

    KINDS = ("pageable", "pinned", "registered", "device", "managed")

    def __init__(self, backend: CudaBackend, stream: Any, device: int = 0) -> None:
        self.backend = backend
        self.stream = stream
        self.device = device
        self._keep: list[Any] = []
        self._frees: list[Callable[[], None]] = []

    def page_aligned(self, nbytes: int) -> int:
        """Pageable memory on whole pages of its own (registration works per page)."""
        size = -(-nbytes // PAGE) * PAGE
        raw = np.zeros(size + PAGE, dtype=np.uint8)
        self._keep.append(raw)
        return raw.ctypes.data + (-raw.ctypes.data) % PAGE

    def alloc(self, kind: str, nbytes: int) -> int:
        b = self.backend
        if kind == "pageable":
            return self.page_aligned(nbytes)
        if kind == "pinned":
            ptr = b.host_alloc(nbytes)
            self._frees.append(lambda: b.host_free(ptr))
            return ptr
        if kind == "registered":
            ptr = self.page_aligned(nbytes)
            size = -(-nbytes // PAGE) * PAGE
            b.host_register(ptr, size)
            self._frees.append(lambda: b.host_unregister(ptr))
            return ptr
        if kind == "device":
            ptr = b.mem_alloc(self.device, nbytes)
            self._frees.append(lambda: b.mem_free(ptr))
            return ptr
        if kind == "managed":
            ptr = b.mem_alloc_managed(self.device, nbytes)
            self._frees.append(lambda: b.mem_free(ptr))
            return ptr
        raise ValueError(kind)

    def write(self, kind: str, ptr: int, data: np.ndarray) -> None:
        """Fill ``ptr`` with ``data``: directly for host-accessible kinds, else by copy."""
        self.backend.stream_synchronize(self.stream)
        if kind == "device":
            src = np.ascontiguousarray(data)
            self.backend.memcpy_async(ptr, src.ctypes.data, src.nbytes, self.stream)
            self.backend.stream_synchronize(self.stream)
        else:
            host_view(ptr, data.nbytes)[:] = data

    def read(self, kind: str, ptr: int, nbytes: int) -> np.ndarray:
        self.backend.stream_synchronize(self.stream)
        if kind == "device":
            out = np.empty(nbytes, dtype=np.uint8)
            self.backend.memcpy_async(out.ctypes.data, ptr, nbytes, self.stream)
            self.backend.stream_synchronize(self.stream)
            return out
        return host_view(ptr, nbytes).copy()

    def free_all(self) -> None:
        self.backend.stream_synchronize(self.stream)
        for free in reversed(self._frees):
            free()
        self._frees.clear()
        self._keep.clear()


KERNEL_SOURCE = r"""
extern "C" __global__ void scale_add(float* data, int n, float a, float b)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        data[i] = data[i] * a + b;
    }
}

extern "C" __global__ void record(unsigned long long* out,
                                  signed char i8, unsigned char u8,
                                  short i16, unsigned short u16,
                                  int i32, unsigned int u32,
                                  long long i64, unsigned long long u64,
                                  float f32, double f64, bool flag,
                                  unsigned short half_bits)
{
    out[0] = (unsigned long long)(long long)i8;
    out[1] = u8;
    out[2] = (unsigned long long)(long long)i16;
    out[3] = u16;
    out[4] = (unsigned long long)(long long)i32;
    out[5] = u32;
    out[6] = (unsigned long long)i64;
    out[7] = u64;
    out[8] = __float_as_uint(f32);
    out[9] = (unsigned long long)__double_as_longlong(f64);
    out[10] = flag ? 1ull : 0ull;
    out[11] = half_bits;
}
"""

RECORD_NUMPY = (
    np.int8(-5),
    np.uint8(250),
    np.int16(-30000),
    np.uint16(65000),
    np.int32(-2_000_000_000),
    np.uint32(4_000_000_000),
    np.int64(-(2**62)),
    np.uint64(2**63 + 12345),
    np.float32(3.25),
    np.float64(-1.0e300),
    np.bool_(True),
    np.float16(-2.5),
)
RECORD_PYTHON = (
    -5,
    250,
    -30000,
    65000,
    -2_000_000_000,
    4_000_000_000,
    -(2**62),
    2**63 + 12345,
    3.25,  # a Python float for a float parameter: sent as float when the layout is known
    -1.0e300,
    True,
    int(np.float16(-2.5).view(np.uint16)),
)


def record_expected() -> np.ndarray:
    m = 2**64
    return np.array(
        [
            -5 % m,
            250,
            -30000 % m,
            65000,
            -2_000_000_000 % m,
            4_000_000_000,
            -(2**62) % m,
            2**63 + 12345,
            int(np.float32(3.25).view(np.uint32)),
            int(np.float64(-1.0e300).view(np.uint64)),
            1,
            int(np.float16(-2.5).view(np.uint16)),
        ],
        dtype=np.uint64,
    )


def main() -> int:
    faulthandler.dump_traceback_later(540, exit=True)
    report = Report()
    log_records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log_records.append(record)

    logging.getLogger("gpuaio").addHandler(Collect())
    logging.getLogger("gpuaio").setLevel(logging.DEBUG)

    try:
        backend = CudaBackend()
    except NoDeviceError as exc:
        print(f"FAIL construct CudaBackend: {exc}")
        return 1
    print(f"PASS construct CudaBackend ({backend.device_count()} device(s))")
    b = backend
    dev = 0

    # -- devices -----------------------------------------------------------
    with report.check("device_count / driver_version"):
        expect(b.device_count() >= 1, "no devices")
        version = b.driver_version()
        major, _, minor = version.partition(".")
        expect(major.isdigit() and minor.isdigit(), f"odd driver version {version!r}")
        print(f"     driver {version}")
    with report.check("device_properties"):
        p = b.device_properties(dev)
        expect(p.ordinal == dev and p.name and p.total_memory > 0, repr(p))
        expect(p.compute_capability[0] >= 3 and p.multiprocessors > 0, repr(p))
        expect(p.pci_bus_id.count(":") == 2, f"pci bus id {p.pci_bus_id!r}")
        expect(p.can_map_host_memory, "device cannot map host memory")
        expect(isinstance(p.stream_mem_ops, bool), "stream_mem_ops is not a bool")
        expect(b.device_properties(dev) is p, "properties are not cached")
        print(f"     {p}")
    with report.check("invalid device -> NoDeviceError"):
        try:
            b.mem_alloc(b.device_count() + 5, 16)
        except NoDeviceError:
            pass
        else:
            raise Failed("no error")

    # -- streams -----------------------------------------------------------
    with report.check("stream_priority_range / stream_create"):
        least, greatest = b.stream_priority_range(dev)
        expect(greatest <= least, f"range {(least, greatest)}")
        hi = b.stream_create(dev, greatest)
        expect(isinstance(b.stream_handle(hi), int) and b.stream_handle(hi) != 0, "handle")
        b.stream_synchronize(hi)
        b.stream_destroy(hi)
        b.stream_destroy(hi)  # idempotent
    s1 = b.stream_create(dev)
    s2 = b.stream_create(dev)
    mem = Memory(b, s1, dev)

    # -- memory + pointer_info ---------------------------------------------
    ptrs: dict[str, int] = {}
    with report.check("allocate every memory kind"):
        for kind in Memory.KINDS:
            ptrs[kind] = mem.alloc(kind, NBYTES)
    expected_kinds = {
        "pageable": (MemoryKind.PAGEABLE, None),
        "pinned": (MemoryKind.PINNED, None),
        "registered": (MemoryKind.PINNED, None),
        "device": (MemoryKind.DEVICE, dev),
        "managed": (MemoryKind.MANAGED, dev),
    }
    for kind, (want_kind, want_dev) in expected_kinds.items():
        with report.check(f"pointer_info {kind}"):
            if kind not in ptrs:
                raise Skip("not allocated")
            for offset in (0, 4097):
                info = b.pointer_info(ptrs[kind] + offset)
                expect(
                    info.kind is want_kind and info.device == want_dev,
                    f"+{offset}: got {info}, want {want_kind} on {want_dev}",
                )
    with report.check("pointer_info of a Python bytes object"):
        blob = b"x" * 64
        addr = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0
        expect(b.pointer_info(addr).kind is MemoryKind.PAGEABLE, "not pageable")
    with report.check("mem_alloc errors"):
        try:
            b.mem_alloc(dev, 0)
        except InvalidArgumentError:
            pass
        else:
            raise Failed("size 0 accepted")
        try:
            b.mem_alloc(dev, 1 << 60)
        except DeviceFatalError as exc:
            raise Failed(f"out of memory reported as fatal: {exc}") from exc
        except CudaError as exc:
            expect(exc.call == "cuMemAlloc", f"call {exc.call}")
            expect(exc.name == "CUDA_ERROR_OUT_OF_MEMORY", f"name {exc.name} ({exc.code})")
            print(f"     {exc}")
        else:
            raise Failed("1 EiB allocation succeeded")

    # -- copies: every kind pair, byte exact -------------------------------
    if len(ptrs) == len(Memory.KINDS):
        seed = 0
        for src_kind in Memory.KINDS:
            for dst_kind in Memory.KINDS:
                seed += 1
                with report.check(f"memcpy_async {src_kind} -> {dst_kind}"):
                    src, dst = ptrs[src_kind], ptrs[dst_kind]
                    if src_kind == dst_kind:
                        dst = mem.alloc(dst_kind, NBYTES)  # a second buffer of the kind
                    data = pattern(seed, NBYTES)
                    mem.write(src_kind, src, data)
                    mem.write(dst_kind, dst, np.full(NBYTES, 0xEE, dtype=np.uint8))
                    b.memcpy_async(dst, src, NBYTES, s1)
                    got = mem.read(dst_kind, dst, NBYTES)
                    expect(np.array_equal(got, data), "whole-buffer copy differs")
                    # unaligned sub-range: bytes outside it must stay untouched
                    b.memcpy_async(dst + 5, src + 3, 1000, s1)
                    b.memcpy_async(dst + 2000, src, 0, s1)  # zero bytes: no-op
                    got = mem.read(dst_kind, dst, NBYTES)
                    want = data.copy()
                    want[5:1005] = data[3:1003]
                    expect(np.array_equal(got, want), "offset copy differs")
    else:
        print("SKIP memcpy matrix: allocation failed")

    # -- memsets -------------------------------------------------------------
    for kind in ("device", "managed"):
        with report.check(f"memset_async widths 1/2/4 on {kind}"):
            ptr = ptrs[kind]
            b.memset_async(ptr, 0xAB, 1, NBYTES, s1)
            b.memset_async(ptr + 2, 0xBEEF, 2, 100, s1)
            b.memset_async(ptr + 404, 0xDEADBEEF, 4, 50, s1)
            b.memset_async(ptr + 1000, -1, 2, 4, s1)  # -1 sets every bit
            b.memset_async(ptr + 2000, 0x11, 1, 0, s1)  # count 0: no-op
            got = mem.read(kind, ptr, NBYTES)
            want = np.full(NBYTES, 0xAB, dtype=np.uint8)
            want[2:202] = np.tile(np.array([0xEF, 0xBE], dtype=np.uint8), 100)
            want[404:604] = np.tile(np.array([0xEF, 0xBE, 0xAD, 0xDE], dtype=np.uint8), 50)
            want[1000:1008] = 0xFF
            expect(np.array_equal(got, want), f"first mismatch at {np.argmax(got != want)}")
    with report.check("memset_async item size 3 -> InvalidArgumentError"):
        try:
            b.memset_async(ptrs["device"], 0, 3, 4, s1)
        except InvalidArgumentError:
            pass
        else:
            raise Failed("accepted")

    # -- stream_from_handle ------------------------------------------------
    with report.check("stream_from_handle"):
        wrapped = b.stream_from_handle(dev, b.stream_handle(s1))
        expect(b.stream_handle(wrapped) == b.stream_handle(s1), "handle differs")
        data = pattern(99, 4096)
        dst = ptrs["device"]
        b.memcpy_async(dst, data.ctypes.data, data.nbytes, wrapped)
        b.stream_synchronize(wrapped)
        expect(np.array_equal(mem.read("device", dst, 4096), data), "copy via wrapper")
        b.stream_destroy(wrapped)  # foreign: must not destroy s1
        b.memset_async(dst, 0, 1, 16, s1)
        b.stream_synchronize(s1)

    # -- worker threads ------------------------------------------------------
    with report.check("enqueue from worker threads"):
        data = pattern(7, 1 << 16)
        dst = ptrs["device"]

        def work(i: int) -> None:
            chunk = data[i * 4096 : (i + 1) * 4096]
            b.memcpy_async(dst + i * 4096, chunk.ctypes.data, 4096, s2)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(16)))
        b.stream_synchronize(s2)
        expect(np.array_equal(mem.read("device", dst, 1 << 16), data), "data differs")

    # -- kernels -------------------------------------------------------------
    kernels: dict[str, Any] = {}
    with report.check("compile scale_add and record"):
        for name in ("scale_add", "record"):
            kernels[name] = b.compile(
                dev, KERNEL_SOURCE, name, ["--fmad=false", "-std=c++17"], None
            )
        print(f"     param sizes: {kernels['record'].param_sizes}")
    n = 1000
    x = (np.arange(n, dtype=np.float32) - 500) / np.float32(7)
    want_scale = x * np.float32(1.5) + np.float32(0.1)
    with report.check("launch scale_add(pointer, int, np.float32, np.float32)"):
        if "scale_add" not in kernels:
            raise Skip("compile failed")
        ptr = ptrs["device"]
        mem.write("device", ptr, x.view(np.uint8))
        args = [DeviceArray(ptr, (n,), "<f4"), n, np.float32(1.5), np.float32(0.1)]
        b.launch(kernels["scale_add"], (4, 1, 1), (256, 1, 1), args, 0, s1)
        got = mem.read("device", ptr, n * 4).view(np.float32)
        expect(np.array_equal(got, want_scale), f"max diff {np.max(np.abs(got - want_scale))}")
    with report.check("launch scale_add with Python floats for float parameters"):
        if "scale_add" not in kernels:
            raise Skip("compile failed")
        if kernels["scale_add"].param_sizes is None:
            raise Skip("driver gave no parameter sizes: Python floats go as double")
        ptr = ptrs["device"]
        mem.write("device", ptr, x.view(np.uint8))
        args = [DeviceArray(ptr, (n,), "<f4"), np.int32(n), 1.5, 0.1]
        b.launch(kernels["scale_add"], (4, 1, 1), (256, 1, 1), args, 0, s1)
        got = mem.read("device", ptr, n * 4).view(np.float32)
        expect(np.array_equal(got, want_scale), f"max diff {np.max(np.abs(got - want_scale))}")
    with report.check("launch a cuda.core Kernel directly"):
        if "scale_add" not in kernels:
            raise Skip("compile failed")
        core_kernel = kernels["scale_add"].owner[0]
        ptr = ptrs["device"]
        mem.write("device", ptr, x.view(np.uint8))
        args = [DeviceArray(ptr, (n,), "<f4"), np.int32(n), np.float32(1.5), np.float32(0.1)]
        b.launch(core_kernel, (4, 1, 1), (256, 1, 1), args, 0, s1)
        got = mem.read("device", ptr, n * 4).view(np.float32)
        expect(np.array_equal(got, want_scale), "results differ")
    for label, values in (("numpy scalars", RECORD_NUMPY), ("Python scalars", RECORD_PYTHON)):
        with report.check(f"launch record with {label}"):
            if "record" not in kernels:
                raise Skip("compile failed")
            if label == "Python scalars" and kernels["record"].param_sizes is None:
                raise Skip("driver gave no parameter sizes")
            ptr = ptrs["device"]
            b.memset_async(ptr, 0, 1, 12 * 8, s1)
            out = DeviceArray(ptr, (12,), "<u8")
            b.launch(kernels["record"], (1, 1, 1), (1, 1, 1), [out, *values], 0, s1)
            got = mem.read("device", ptr, 12 * 8).view(np.uint64)
            want = record_expected()
            bad = [i for i in range(12) if got[i] != want[i]]
            expect(not bad, f"params {bad}: got {[hex(got[i]) for i in bad]}")
    with report.check("launch with a cuda.core Buffer pointer"):
        if "scale_add" not in kernels:
            raise Skip("compile failed")
        core = importlib.import_module("cuda.core")
        core_dev = core.Device(dev)
        try:
            core_dev.set_current()  # the same primary context the backend uses
            buf = core_dev.allocate(n * 4, stream=core_dev.default_stream)
        except Exception as exc:
            raise Skip(f"cannot allocate a cuda.core Buffer: {exc}") from exc
        core_dev.sync()
        mem.write("device", int(buf.handle), x.view(np.uint8))
        args = [buf, n, np.float32(1.5), np.float32(0.1)]
        b.launch(kernels["scale_add"], (4, 1, 1), (256, 1, 1), args, 0, s1)
        got = mem.read("device", int(buf.handle), n * 4).view(np.float32)
        expect(np.array_equal(got, want_scale), "results differ")
        buf.close()
    with report.check("launch argument errors -> InvalidArgumentError"):
        if "scale_add" not in kernels:
            raise Skip("compile failed")
        arr = DeviceArray(ptrs["device"], (n,), "<f4")
        bad_calls: list[list[Any]] = [[arr, n, np.float32(1.0), "text"], [arr, 2**70, 1.0, 1.0]]
        if kernels["scale_add"].param_sizes is not None:  # checks that need the layout
            bad_calls += [
                [arr, n, np.float32(1.0)],
                [arr, n, np.float64(1.0), 1.0],
                [arr, 2**40, 1.0, 1.0],
            ]
        for call in bad_calls:
            try:
                b.launch(kernels["scale_add"], (1, 1, 1), (1, 1, 1), call, 0, s1)
            except InvalidArgumentError as exc:
                print(f"     ok: {exc}")
            else:
                raise Failed(f"accepted {call!r}")
        b.stream_synchronize(s1)
    with report.check("compile errors -> InvalidArgumentError"):
        for source, name, options in (
            ('extern "C" __global__ void k() { this is not C++ }', "k", []),
            (KERNEL_SOURCE, "no_such_kernel", []),
            (KERNEL_SOURCE, "scale_add", ["--no-such-option"]),
        ):
            try:
                b.compile(dev, source, name, options, None)
            except InvalidArgumentError as exc:
                print(f"     ok: {str(exc).splitlines()[0][:150]}")
            else:
                raise Failed(f"compiled {name!r} with {options!r}")

    # -- stream memory operations through mapped pinned memory -------------
    flag = mem.alloc("pinned", 64)
    flag_dev = 0
    with report.check("host_device_pointer of pinned memory"):
        flag_dev = b.host_device_pointer(flag)
        expect(flag_dev != 0, "null device pointer")
        print(f"     host {flag:#x} -> device {flag_dev:#x}")
    with report.check("stream_write_value32 to pinned and registered memory"):
        if not b.device_properties(dev).stream_mem_ops:
            raise Skip("stream memory operations unsupported")
        u32_at(flag).value = 0
        b.stream_write_value32(s1, flag_dev, 42)
        b.stream_synchronize(s1)
        expect(u32_at(flag).value == 42, f"pinned word is {u32_at(flag).value}")
        reg = ptrs["registered"]
        reg_dev = b.host_device_pointer(reg)
        u32_at(reg).value = 0
        b.stream_write_value32(s1, reg_dev + 0, 0xFFFFFFFF)
        b.stream_synchronize(s1)
        expect(u32_at(reg).value == 0xFFFFFFFF, f"registered word is {u32_at(reg).value}")
        try:
            b.stream_write_value32(s1, flag_dev, 2**32)
        except CudaError:
            pass
        else:
            raise Failed("2**32 accepted")
    with report.check("stream_wait_value32 already satisfied (GEQ)"):
        if not b.device_properties(dev).stream_mem_ops:
            raise Skip("stream memory operations unsupported")
        u32_at(flag).value = 5
        ev = b.event_create(dev)
        b.stream_wait_value32(s1, flag_dev, 3)
        b.event_record(ev, s1)
        expect(wait_until(lambda: b.event_query(ev)), "stream stuck on a satisfied wait")
        b.event_destroy(ev)

    # -- events, stream waits and host functions behind a gate -------------
    with report.check("event_query of a never-recorded event is True"):
        ev = b.event_create(dev)
        expect(b.event_query(ev), "False")
        b.event_destroy(ev)
        b.event_destroy(ev)  # idempotent
    with report.check("gate: events, stream_wait_event, host function order"):
        if not b.device_properties(dev).stream_mem_ops:
            raise Skip("stream memory operations unsupported")
        ran: list[str] = []
        done = threading.Event()

        def second() -> None:
            ran.append("second")
            done.set()

        u32_at(flag).value = 0
        ev1 = b.event_create(dev)
        ev2 = b.event_create(dev, blocking_sync=True)
        b.stream_wait_value32(s1, flag_dev, 1)  # s1 blocks until the host writes 1
        b.launch_host_func(s1, lambda: ran.append("first"))
        b.launch_host_func(s1, second)
        b.event_record(ev1, s1)
        b.stream_wait_event(s2, ev1)
        b.memset_async(ptrs["device"], 0x5A, 1, 64, s2)
        b.event_record(ev2, s2)
        time.sleep(0.2)
        expect(not b.event_query(ev1), "ev1 complete while the gate is closed")
        expect(not b.event_query(ev2), "ev2 complete while s2 waits on ev1")
        expect(not ran, f"host functions ran early: {ran}")
        u32_at(flag).value = 1  # open the gate
        expect(done.wait(TIMEOUT_S) and ran == ["first", "second"], f"host functions: {ran}")
        expect(wait_until(lambda: b.event_query(ev1)), "ev1 never completed")
        b.event_synchronize(ev1)
        b.event_synchronize(ev2)  # blocking-sync event
        expect(b.event_query(ev2), "ev2 not complete after synchronize")
        expect(np.all(mem.read("device", ptrs["device"], 64) == 0x5A), "s2 work missing")
        b.event_destroy(ev1)
        b.event_destroy(ev2)
    with report.check("host function that raises is logged, stream continues"):
        before = len(log_records)
        after = threading.Event()

        def boom() -> None:
            raise RuntimeError("boom from a host function")

        b.launch_host_func(s1, boom)
        b.launch_host_func(s1, after.set)
        expect(after.wait(TIMEOUT_S), "second host function never ran")
        b.stream_synchronize(s1)
        errors = [r for r in log_records[before:] if r.levelno >= logging.ERROR]
        expect(errors and errors[0].exc_info, "no logged exception")
    with report.check("event across streams without a gate"):
        ev = b.event_create(dev)
        b.memset_async(ptrs["device"], 0x33, 1, NBYTES, s1)
        b.event_record(ev, s1)
        b.stream_wait_event(s2, ev)
        b.memcpy_async(ptrs["pageable"], ptrs["device"], NBYTES, s2)
        b.stream_synchronize(s2)
        expect(np.all(host_view(ptrs["pageable"], NBYTES) == 0x33), "s2 ran before s1")
        b.event_destroy(ev)

    # -- peers ---------------------------------------------------------------
    if b.device_count() >= 2:
        peer = 1
        with report.check("can_access_peer / enable_peer_access"):
            expect(b.can_access_peer(dev, dev) is False, "a device is its own peer")
            ok = b.can_access_peer(dev, peer) and b.can_access_peer(peer, dev)
            print(f"     peer access 0<->1: {ok}")
            if ok:
                for _ in range(2):  # idempotent
                    b.enable_peer_access(dev, peer)
                    b.enable_peer_access(peer, dev)
        with report.check("memcpy_peer_async both ways, pointer_info on device 1"):
            p1 = b.mem_alloc(peer, NBYTES)
            sp = b.stream_create(peer)
            info = b.pointer_info(p1)
            expect(info.kind is MemoryKind.DEVICE and info.device == peer, f"{info}")
            data = pattern(1234, NBYTES)
            mem.write("device", ptrs["device"], data)
            b.memcpy_peer_async(p1, peer, ptrs["device"], dev, NBYTES, s1)
            b.stream_synchronize(s1)
            back = np.empty(NBYTES, dtype=np.uint8)
            b.memcpy_async(back.ctypes.data, p1, NBYTES, sp)
            b.stream_synchronize(sp)
            expect(np.array_equal(back, data), "0 -> 1 differs")
            b.memset_async(ptrs["device"], 0, 1, NBYTES, s1)
            b.stream_synchronize(s1)
            b.memcpy_peer_async(ptrs["device"], dev, p1, peer, NBYTES, sp)
            ev = b.event_create(peer)
            b.event_record(ev, sp)
            b.stream_wait_event(s1, ev)  # cross-device wait
            expect(np.array_equal(mem.read("device", ptrs["device"], NBYTES), data), "1 -> 0")
            b.event_destroy(ev)
            b.stream_destroy(sp)
            b.mem_free(p1)
    else:
        print("SKIP peer checks: one device")

    # -- teardown --------------------------------------------------------------
    with report.check("free everything, destroy streams, close twice"):
        mem.free_all()
        b.stream_destroy(s1)
        b.stream_destroy(s2)
        b.close()
        b.close()

    faulthandler.cancel_dump_traceback_later()
    total = report.passed + report.failed
    print(f"{report.passed}/{total} checks passed, {report.skipped} skipped")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
