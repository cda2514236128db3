"""``gpuaio info | demo | bench`` (or ``python -m gpuaio ...``).

``info``  devices, driver, backend and how each kind of memory is classified
          (``--json``: the same as one JSON object).
``demo``  a short tour: copies, a memset and a kernel launch, each awaited
          while a 1 ms ticker measures how long the event loop was blocked.
``bench`` a quick transfer benchmark: gpuaio against the raw driver call.

The backend comes from ``GPUAIO_BACKEND`` as for any gpuaio program. With no
usable GPU, ``info`` prints a one-line error (exit status 1) unless
``GPUAIO_BACKEND=sim`` (or ``auto``) is set; ``demo`` and ``bench`` run on the
simulated backend, and their first line says so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

import gpuaio

from ._api.runtime import Runtime, current_runtime, use_backend
from ._core.compiled import MODULES, compiled_modules
from ._core.errors import GpuaioError
from ._engine import nativecopy

ADD_ONE = r"""
extern "C" __global__ void add_one(unsigned char* data, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) data[i] += 1;
}
"""


def _add_one_sim(grid: Any, block: Any, data: np.ndarray[Any, Any], n: Any) -> None:
    data.reshape(-1).view(np.uint8)[: int(n)] += 1


def _banner() -> None:
    rt = current_runtime()
    if rt.backend.name == "sim":
        # The first line says it, so nobody takes the figures for a GPU's.
        print(f"gpuaio {gpuaio.__version__}: no CUDA GPU in use, running on the SIMULATED backend")
        print(f"  why: {rt.reason}")
        print("  gpuaio's simulated backend models CUDA's stream ordering and blocking rules")
        print("  with real time passing; its 'device' memory is host memory.")
    else:
        print(f"gpuaio {gpuaio.__version__} on the {rt.backend.name} backend: {rt.reason}")


def _start(command: str) -> Runtime | None:
    """The runtime for ``command``, or None after printing a one-line error to stderr.

    ``demo`` and ``bench`` with ``GPUAIO_BACKEND`` unset fall back to the
    simulated backend (the banner's first line says so); every other case
    keeps the library's rule.
    """
    try:
        return current_runtime()
    except (GpuaioError, ValueError) as exc:
        if command in ("demo", "bench") and not os.environ.get("GPUAIO_BACKEND"):
            why = " ".join(str(exc.__cause__ or exc).split()).rstrip(".")
            rt = use_backend("sim")
            rt.reason = f"the {command} command's fallback, as no CUDA device can be used: {why}"
            return rt
        message = " ".join(str(exc).split())
        print(f"gpuaio {command}: {type(exc).__name__}: {message}", file=sys.stderr)
        return None


def _bindings_version() -> str | None:
    """The installed cuda-bindings version (``None`` if it is not installed)."""
    try:
        return importlib.metadata.version("cuda-bindings")
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_setup() -> dict[str, Any]:
    """Backend, driver, completion strategy, devices and memory-kind checks, as data."""
    rt = current_runtime()
    be = rt.backend
    devices = []
    for i in range(be.device_count()):
        p = be.device_properties(i)
        devices.append(
            {
                "ordinal": i,
                "name": p.name,
                "total_memory": p.total_memory,
                "compute_capability": list(p.compute_capability),
                "multiprocessors": p.multiprocessors,
                "pci_bus_id": p.pci_bus_id,
                "stream_mem_ops": p.stream_mem_ops,
            }
        )
    dev = gpuaio.Device(0)
    samples: dict[str, Any] = {
        "numpy array (pageable)": np.empty(4096, np.uint8),
        "gpuaio.pinned_empty": gpuaio.pinned_empty(4096),
        "Device.empty": dev.empty(4096),
        "Device.managed_empty": dev.managed_empty(4096),
    }
    return {
        "gpuaio": gpuaio.__version__,
        "backend": be.name,
        "reason": rt.reason,
        "driver": be.driver_version(),
        "cuda_bindings": _bindings_version(),
        "completion": rt.strategy,
        "compiled": compiled_modules(),
        "native_copy_threads": nativecopy.available(),
        "fast_driver_calls": bool(getattr(be, "fast_driver_calls", False)),
        "devices": devices,
        "memory_kinds": {k: gpuaio.memory_kind(v).value for k, v in samples.items()},
    }


def info(as_json: bool = False) -> int:
    """Print devices, driver, backend and memory-kind checks (one JSON object with ``as_json``)."""
    setup = describe_setup()
    if as_json:
        print(json.dumps(setup, indent=1))
        return 0
    _banner()
    print(f"driver: {setup['driver']} (cuda-bindings {setup['cuda_bindings']})")
    print(f"completion strategy: {setup['completion']}")
    compiled = setup["compiled"]
    hot_path = (
        f"compiled ({len(compiled)} of {len(MODULES)} modules)" if compiled else "pure Python"
    )
    print(f"hot path: {hot_path}")
    threads = "native (no GIL)" if setup["native_copy_threads"] else "Python"
    print(f"staging copy threads: {threads}")
    calls = "direct (C)" if setup["fast_driver_calls"] else "through cuda.bindings"
    print(f"hot-path driver calls: {calls}")
    for d in setup["devices"]:
        cc = d["compute_capability"]
        print(
            f"device {d['ordinal']}: {d['name']}, {d['total_memory'] / 2**30:.1f} GiB, "
            f"sm_{cc[0]}{cc[1]}, {d['multiprocessors']} SMs, PCI {d['pci_bus_id']}, "
            f"stream mem ops: {d['stream_mem_ops']}"
        )
    print("memory kinds:")
    for label, kind in setup["memory_kinds"].items():
        print(f"  {label:<24} -> {kind}")
    return 0


async def _timed(what: str, nbytes: int, fn: Callable[[], Awaitable[Any]]) -> float:
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    await fn()
    dt = time.perf_counter() - t0
    done.set()
    await t
    blocked = max(gaps[1:], default=0.0) * 1e3
    rate = f", {nbytes / dt / 1e9:6.2f} GB/s" if nbytes else ""
    print(f"  {what:<44} {dt * 1e3:8.1f} ms{rate}; longest loop gap {blocked:5.1f} ms")
    return blocked


async def _demo() -> int:
    _banner()
    dev = gpuaio.Device(0)
    print(f"device 0: {dev.name}")
    n = 256 << 20
    host = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    back = np.empty_like(host)
    pinned = gpuaio.pinned_empty(n)
    d = dev.empty(n)
    kernel = dev.compile(ADD_ONE, "add_one", sim=_add_one_sim)
    # Pin the staging blocks up front (on a worker thread), as a service
    # would at start-up, so the first transfer does not pay for pinning.
    stats = await gpuaio.reserve_pinned(n)
    print(f"reserved {stats.reserved >> 20} MiB of pinned staging blocks")
    worst = 0.0
    async with dev.stream() as s:
        print("each step is awaited while a 1 ms ticker runs on the same event loop:")
        worst = max(
            worst, await _timed("copy 256 MiB pageable host -> device", n, lambda: s.copy(d, host))
        )
        worst = max(
            worst,
            await _timed(
                "launch add_one over 256 MiB",
                0,
                lambda: s.launch(kernel, (n + 255) // 256, 256, d, np.uint64(n)),
            ),
        )
        worst = max(
            worst, await _timed("copy 256 MiB device -> pageable host", n, lambda: s.copy(back, d))
        )
        ok = bool(np.array_equal(back, host + np.uint8(1)))
        print(f"  round trip with the kernel applied is byte-exact: {ok}")
        worst = max(
            worst,
            await _timed("memset 256 MiB of device memory to 0x5A", n, lambda: s.memset(d, 0x5A)),
        )
        worst = max(
            worst, await _timed("copy 256 MiB device -> pinned host", n, lambda: s.copy(pinned, d))
        )
        ok = ok and bool((pinned == 0x5A).all())
        worst = max(
            worst,
            await _timed("memset 256 MiB of pageable host memory", n, lambda: s.memset(back, 7)),
        )
        worst = max(worst, await _timed("copy 256 MiB host -> host", n, lambda: s.copy(host, back)))
        ok = ok and bool((host == 7).all())
        # For contrast: the driver's own "Async" copy from pageable memory,
        # called on the loop thread as people often do.
        be = current_runtime().backend
        t0 = time.perf_counter()
        be.memcpy_async(d.ptr, host.ctypes.data, n, s._native)
        naive = (time.perf_counter() - t0) * 1e3
        await s.synchronize()
    print(f"the event loop was blocked at most {worst:.1f} ms during the tour;")
    print(
        f"the raw cuMemcpyAsync from pageable memory, called on the loop, blocked it {naive:.1f} ms"
    )
    print("all results byte-exact" if ok else "MISMATCH in results")
    return 0 if ok else 1


async def _bench() -> int:
    _banner()
    dev = gpuaio.Device(0)
    be = current_runtime().backend
    print(f"device 0: {dev.name}; median of 5, GB/s")
    async with dev.stream() as s:
        for n in (4 << 20, 64 << 20, 256 << 20):
            host = np.ones(n, np.uint8)
            d = dev.empty(n)
            ours: list[float] = []
            raw: list[float] = []
            for _ in range(5):
                t0 = time.perf_counter()
                await s.copy(d, host)
                ours.append(n / (time.perf_counter() - t0) / 1e9)
                t0 = time.perf_counter()
                be.memcpy_async(d.ptr, host.ctypes.data, n, s._native)
                be.stream_synchronize(s._native)
                raw.append(n / (time.perf_counter() - t0) / 1e9)
            o, r = float(np.median(ours)), float(np.median(raw))
            print(
                f"  H2D pageable {n >> 20:4d} MiB: gpuaio {o:6.2f}  raw driver {r:6.2f}"
                f"  ratio {o / r:4.2f}"
            )
    print("full suites: python benchmarks/transfers.py and benchmarks/completion.py (see docs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``gpuaio info | demo | bench`` (the console script, and ``python -m gpuaio``);
    returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="gpuaio",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gpuaio {gpuaio.__version__}")
    parser.add_argument("command", choices=("info", "demo", "bench"), nargs="?", default="demo")
    parser.add_argument("--json", action="store_true", help="info: print one JSON object")
    args = parser.parse_args(argv)
    if args.json and args.command != "info":
        parser.error("--json goes with the info command")
    if _start(args.command) is None:
        return 1
    if args.command == "info":
        return info(as_json=args.json)
    if args.command == "demo":
        return asyncio.run(_demo())
    return asyncio.run(_bench())


if __name__ == "__main__":
    sys.exit(main())
