"""Does a driver call made on a worker thread stall the main thread (the GIL)?

For each call, a worker thread makes it while the main thread sleeps in 1 ms
steps and records the longest gap. A call that releases the GIL leaves gaps
near 1 ms; one that holds it shows a gap as long as the call. Each call is
made through cuda.bindings and through ctypes (which always releases the
GIL), so the two can be compared. Needs a CUDA GPU.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

import numpy as np
from cuda.bindings import driver as cu

N = 256 << 20


def check(res: object) -> object:
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:  # type: ignore[call-overload]
        raise RuntimeError(f"CUDA error {err}")
    return res[1] if isinstance(res, tuple) and len(res) > 1 else None


def gap_during(fn: Callable[[], object]) -> tuple[float, float]:
    box: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        fn()
        box.append(time.perf_counter() - t0)

    t = threading.Thread(target=run)
    gaps = [0.0]
    last = time.perf_counter()
    t.start()
    while t.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    t.join()
    return box[0] * 1e3, max(gaps) * 1e3


def main() -> None:
    check(cu.cuInit(0))
    dev = check(cu.cuDeviceGet(0))
    ctx = check(cu.cuDevicePrimaryCtxRetain(dev))
    check(cu.cuCtxSetCurrent(ctx))
    lib = ctypes.CDLL("libcuda.so.1")
    raw_ctx = ctypes.c_void_p(int(ctx))

    def bind() -> None:
        check(cu.cuCtxSetCurrent(ctx))
        lib.cuCtxSetCurrent(raw_ctx)

    stream = check(cu.cuStreamCreate(1))
    dptr = check(cu.cuMemAlloc(N))
    host = np.ones(N, np.uint8)
    out = np.empty(N, np.uint8)
    out[:] = 0
    flag = np.zeros(1, np.int32)
    check(cu.cuMemHostRegister(flag.ctypes.data, 4, 0))
    spin_src = r"""
    extern "C" __global__ void spin(long long cycles) {
        long long t0 = clock64(); while (clock64() - t0 < cycles) {}
    }"""
    from cuda.core import Device, Program, ProgramOptions

    d = Device(0)
    d.set_current()
    cc = d.compute_capability
    prog = Program(
        spin_src, code_type="c++", options=ProgramOptions(arch=f"sm_{cc.major}{cc.minor}")
    )
    kern = prog.compile("cubin").get_kernel("spin")
    func = cu.CUfunction(int(kern.handle))

    def spin_ms(ms: float) -> None:
        cycles = int(ms * 1e-3 * 1.98e9)
        check(
            cu.cuLaunchKernel(
                func, 1, 1, 1, 1, 1, 1, 0, stream, ((cycles,), (ctypes.c_longlong,)), 0
            )
        )

    ev = check(
        cu.cuEventCreate(
            cu.CUevent_flags.CU_EVENT_BLOCKING_SYNC | cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        )
    )

    def with_bind(f: Callable[[], object]) -> Callable[[], object]:
        def g() -> object:
            bind()
            return f()

        return g

    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = []

    def hostalloc_b() -> None:
        p = check(cu.cuMemHostAlloc(N, 0))
        check(cu.cuMemFreeHost(p))

    def hostalloc_c() -> None:
        p = ctypes.c_void_p()
        assert lib.cuMemHostAlloc(ctypes.byref(p), ctypes.c_size_t(N), 0) == 0
        assert lib.cuMemFreeHost(p) == 0

    cases.append(("cuMemHostAlloc+Free 256MiB", hostalloc_b, hostalloc_c))

    buf = np.ones(N, np.uint8)

    def reg_b() -> None:
        check(cu.cuMemHostRegister(buf.ctypes.data, N, 0))
        check(cu.cuMemHostUnregister(buf.ctypes.data))

    def reg_c() -> None:
        p = ctypes.c_void_p(buf.ctypes.data)
        assert lib.cuMemHostRegister_v2(p, ctypes.c_size_t(N), 0) == 0
        assert lib.cuMemHostUnregister(p) == 0

    cases.append(("cuMemHostRegister+Unreg 256MiB", reg_b, reg_c))

    def h2d_b() -> None:
        check(cu.cuMemcpyHtoDAsync(dptr, host.ctypes.data, N, stream))
        check(cu.cuStreamSynchronize(stream))

    def h2d_c() -> None:
        s = ctypes.c_void_p(int(stream))
        assert (
            lib.cuMemcpyHtoDAsync_v2(
                ctypes.c_uint64(int(dptr)), ctypes.c_void_p(host.ctypes.data), ctypes.c_size_t(N), s
            )
            == 0
        )
        assert lib.cuStreamSynchronize(s) == 0

    cases.append(("cuMemcpyHtoDAsync pageable 256MiB", h2d_b, h2d_c))

    def d2h_b() -> None:
        check(cu.cuMemcpyDtoHAsync(out.ctypes.data, dptr, N, stream))

    def d2h_c() -> None:
        s = ctypes.c_void_p(int(stream))
        assert (
            lib.cuMemcpyDtoHAsync_v2(
                ctypes.c_void_p(out.ctypes.data), ctypes.c_uint64(int(dptr)), ctypes.c_size_t(N), s
            )
            == 0
        )

    cases.append(("cuMemcpyDtoHAsync pageable 256MiB", d2h_b, d2h_c))

    def evsync_b() -> None:
        spin_ms(100)
        check(cu.cuEventRecord(ev, stream))
        check(cu.cuEventSynchronize(ev))

    def evsync_c() -> None:
        spin_ms(100)
        check(cu.cuEventRecord(ev, stream))
        assert lib.cuEventSynchronize(ctypes.c_void_p(int(ev))) == 0

    cases.append(("cuEventSynchronize (100 ms kernel)", evsync_b, evsync_c))

    def ssync_b() -> None:
        spin_ms(100)
        check(cu.cuStreamSynchronize(stream))

    def ssync_c() -> None:
        spin_ms(100)
        assert lib.cuStreamSynchronize(ctypes.c_void_p(int(stream))) == 0

    cases.append(("cuStreamSynchronize (100 ms kernel)", ssync_b, ssync_c))

    print(f"{'call':<38} {'bindings ms':>12} {'max gap':>8} {'ctypes ms':>10} {'max gap':>8}")
    for name, fb, fc in cases:
        fb2, fc2 = with_bind(fb), with_bind(fc)
        fb2()
        fc2()
        tb, gb = gap_during(fb2)
        tc, gc = gap_during(fc2)
        print(f"{name:<38} {tb:12.1f} {gb:8.1f} {tc:10.1f} {gc:8.1f}")


if __name__ == "__main__":
    main()
