"""Does the driver's own pageable copy scale when several threads run it at once?

gpuaio hands 1-4 MiB pageable copies to the driver's own path on the
stream's host thread (one thread: the driver copies into its staging
buffers and DMAs them, pipelined), and stages larger ones through its pinned
pool with copy threads, where every slice costs a hand-off under the GIL.
If the driver's path ran in parallel, one copy could be split into ``k``
slices, each run by the driver on its own thread and stream: one hand-off
per thread, the whole call outside the GIL, the DMA pipelined by the driver.

For each size, direction and ``k`` this probe measures, with raw
``cuda.bindings`` and ``k`` persistent threads (each with its own
non-blocking stream):

* ``hop``: one copy split ``k`` ways, from the main thread's dispatch to the
  last slice's completion (thread hand-offs included), median of ``--reps``;
* ``here``: the same, but the main thread runs the first slice itself and
  hands the other ``k - 1`` to the threads;
* ``rate``: each thread copies its slice back to back for ``--seconds``: the
  aggregate rate with no hand-off cost;

and, on the main thread, ``cuMemcpyAsync`` + ``cuStreamSynchronize`` (the
naive call, ``k`` = 1 with no thread), torch's ``.to("cuda")`` and
``copy_`` into pageable memory where torch is installed, and the latency of a
``cuEventQuery`` on the main thread while ``k`` threads copy (does the
driver's path hold a lock the event loop would wait for?).

Writes ``parallel-copy-probe.json`` (one record per measurement) with
``--out``. GPU only.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _rawcuda import driver_on_device0, load_torch, ok, parse_size, probe_parser, write_records


class Worker(threading.Thread):
    """A thread with the context current and a stream of its own, running jobs."""

    def __init__(self, cu: Any, ctx: Any) -> None:
        super().__init__(daemon=True)
        self.cu, self.ctx = cu, ctx
        self.go = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.job: Callable[[Any], None] | None = None
        self.ready = threading.Event()
        self.stream: Any = None
        self.start()
        self.ready.wait()

    def run(self) -> None:
        cu = self.cu
        ok(cu.cuCtxSetCurrent(self.ctx))
        self.stream = ok(cu.cuStreamCreate(1))  # CU_STREAM_NON_BLOCKING
        self.ready.set()
        while True:
            self.go.acquire()
            job = self.job
            if job is None:
                return
            job(self.stream)
            self.done.release()


def main() -> int:
    p = probe_parser(__doc__, "1M,2M,4M,8M,16M,64M", 40)
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=0.25)
    args = p.parse_args()
    found = driver_on_device0()
    if found is None:
        return 2
    cu, ctx = found
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    big = max(sizes)
    main_stream = ok(cu.cuStreamCreate(1))
    dev = ok(cu.cuMemAlloc(big))
    src = np.full(big, 0x5A, np.uint8)  # pageable, touched
    dst = np.zeros(big, np.uint8)
    src_p, dst_p = src.ctypes.data, dst.ctypes.data
    workers = [Worker(cu, ctx) for _ in range(max(ks))]
    ev = ok(cu.cuEventCreate(2))  # CU_EVENT_DISABLE_TIMING
    ok(cu.cuEventRecord(ev, main_stream))
    ok(cu.cuStreamSynchronize(main_stream))
    records: list[dict[str, Any]] = []
    torch = load_torch()

    def record(**kw: Any) -> None:
        records.append(kw)
        n = kw["bytes"]
        us = kw.get("us")
        extra = f"{n / us / 1e3:7.2f} GB/s" if us else ""
        if "gbps" in kw:
            extra = (
                f"{kw['gbps']:7.2f} GB/s aggregate, cuEventQuery p50 "
                f"{kw['query_p50_us']:.1f} us, p99 {kw['query_p99_us']:.1f} us"
            )
        print(
            f"  {kw['what']:>10} {kw['dir']} {n >> 20:>4} MiB k={kw.get('k', 1)}: "
            f"{us if us is None else round(us, 1)} us {extra}",
            flush=True,
        )

    def slices(n: int, k: int) -> list[tuple[int, int]]:
        per = -(-n // k)
        per = (per + 4095) // 4096 * 4096
        return [(o, min(per, n - o)) for o in range(0, n, per)]

    def copier(h2d: bool, off: int, ln: int, reps: int = 1) -> Callable[[Any], None]:
        d, s = (int(dev) + off, src_p + off) if h2d else (dst_p + off, int(dev) + off)

        def job(stream: Any) -> None:
            for _ in range(reps):
                ok(cu.cuMemcpyAsync(d, s, ln, stream))
            ok(cu.cuStreamSynchronize(stream))

        return job

    def check(h2d: bool, n: int) -> None:
        if h2d:
            back = np.zeros(n, np.uint8)
            ok(cu.cuMemcpyDtoH(back.ctypes.data, dev, n))
            assert (back == 0x5A).all(), "H2D slices did not land"
        else:
            assert (dst[:n] == 0x5A).all(), "D2H slices did not land"

    ok(cu.cuMemcpyHtoD(dev, src_p, big))
    for n in sizes:
        for h2d in (True, False):
            dirn = "h2d" if h2d else "d2h"
            dst[:] = 0
            # naive, on the main thread
            job = copier(h2d, 0, n)
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                job(main_stream)
                ts.append(time.perf_counter() - t0)
            record(what="naive", dir=dirn, bytes=n, us=statistics.median(ts) * 1e6)
            check(h2d, n)
            if torch is not None:
                t_src = torch.from_numpy(src[:n])
                t_dev = t_src.to("cuda")
                t_dst = torch.from_numpy(dst[:n])
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    if h2d:
                        t_src.to("cuda", non_blocking=True)
                    else:
                        t_dst.copy_(t_dev)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                record(what="torch", dir=dirn, bytes=n, us=statistics.median(ts) * 1e6)
                del t_src, t_dev, t_dst
            for k in ks:
                parts = slices(n, k)
                for what in ("hop", "here") if k > 1 else ("hop",):
                    dst[:] = 0
                    first = 1 if what == "here" else 0
                    used = workers[: len(parts) - first]
                    for w, (o, ln) in zip(used, parts[first:], strict=True):
                        w.job = copier(h2d, o, ln)
                    own = copier(h2d, *parts[0]) if first else None
                    ts = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        for w in used:
                            w.go.release()
                        if own is not None:
                            own(main_stream)
                        for w in used:
                            w.done.acquire()
                        ts.append(time.perf_counter() - t0)
                    check(h2d, n)
                    record(what=what, dir=dirn, bytes=n, k=k, us=statistics.median(ts) * 1e6)
                # Aggregate rate, no hand-offs: each thread repeats its slice.
                reps = max(1, int(args.seconds * 10e9 / n))
                used = workers[: len(parts)]
                for w, (o, ln) in zip(used, parts, strict=True):
                    w.job = copier(h2d, o, ln, reps)
                t0 = time.perf_counter()
                for w in used:
                    w.go.release()
                lat = []
                left = list(used)
                while left:
                    q0 = time.perf_counter()
                    cu.cuEventQuery(ev)
                    lat.append(time.perf_counter() - q0)
                    left = [w for w in left if not w.done.acquire(blocking=False)]
                    time.sleep(50e-6)
                el = time.perf_counter() - t0
                lat.sort()
                record(
                    what="rate",
                    dir=dirn,
                    bytes=n,
                    k=k,
                    us=None,
                    gbps=reps * n / el / 1e9,
                    query_p50_us=lat[len(lat) // 2] * 1e6,
                    query_p99_us=lat[int(len(lat) * 0.99)] * 1e6,
                )
    for w in workers:
        w.job = None
        w.go.release()
    write_records(args.out, "parallel-copy-probe.json", records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
