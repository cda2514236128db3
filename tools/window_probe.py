"""``completion.py``'s throughput case window by window, with what happened in each.

Runs the awaited-memset throughput of ``benchmarks/completion.py`` (``--tasks``
tasks, 16 streams, uvloop; its methods interleaved as it runs them, or only
``--only``) and prints one JSON line per window: ops/s; markers recorded,
queried and batch writes (deferred memsets) per op; the loop thread's CPU
share and the process's; context switches; collections and their time; the
CPU the loop ran on; with ``--counters``, gpuaio's per-op counts (polls,
sleeps, hand-offs, seals and drains by thread, sweeps, watcher passes). The
last line sums up the medians.

It answers why a figure moved: issue 13's runs AM-AN found collections of the
peers' heap (140-190 ms, now frozen by the benchmarks) and the host's speed,
not a mode of gpuaio, behind the swings of the 1,000-task figure. To compare
two trees, alternate processes, e.g.::

    for r in 1 2 3 4 5; do for t in . /tmp/base; do
        PYTHONPATH=$t python tools/window_probe.py --tag $t-$r --only events,raw_sync_on_loop
    done; done

The counters wrap gpuaio's methods (a few hundred ns a call): compare runs
with the same flags only.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _harness as H
import completion as C
import numpy as np

import gpuaio

_counts: dict[str, int] = {}
_gc = {"n": 0.0, "s": 0.0, "t0": 0.0}
_loop_thread = [0]


def _count(cls: type, name: str, key: str, by_thread: bool = False) -> None:
    """Count the calls of ``cls.name`` under ``key`` (``key@loop`` / ``key@thread``).

    A method the imported gpuaio lacks (an older tree, in an A/B run) is left
    uncounted: its count is then absent from every row.
    """
    real = getattr(cls, name, None)
    if real is None:
        return

    def counted(*args: Any, **kwargs: Any) -> Any:
        k = key
        if by_thread:
            k += "@loop" if threading.get_ident() == _loop_thread[0] else "@thread"
        _counts[k] = _counts.get(k, 0) + 1
        return real(*args, **kwargs)

    setattr(cls, name, counted)


def install(counters: bool) -> None:
    """Count the backend's marker calls (and with ``counters`` gpuaio's), and collections."""
    backend = type(H.runtime().backend)
    _count(backend, "event_record", "records")
    _count(backend, "event_query", "queries")
    _count(backend, "stream_write_words", "batch_writes")
    if counters:
        from gpuaio._core import operation
        from gpuaio._engine.completion import _events, _queue

        engine, queue = _events.EventEngine, _queue.StreamQueue
        _count(engine, "poll_for", "polls")
        _count(operation.Operation, "_wait_woken", "sleeps")
        _count(engine, "hand_off", "hand_offs")
        _count(queue, "_seal", "seals", by_thread=True)
        _count(queue, "drain", "drains", by_thread=True)
        _count(engine, "_sweep", "sweeps")
        _count(engine, "_pass", "watcher_passes")

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _gc["t0"] = time.perf_counter()
        else:
            _gc["n"] += 1
            _gc["s"] += time.perf_counter() - _gc["t0"]

    gc.callbacks.append(on_gc)


def _cpu() -> int:
    """The CPU the calling thread runs on (Linux), or -1."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return -1


async def windows(
    args: argparse.Namespace, peers: dict[str, Any], notes: dict[str, str]
) -> list[dict[str, Any]]:
    """Every window of every method, ``args.reps`` rounds after one warm-up round."""
    dev = gpuaio.Device(0)
    streams = [dev.stream() for _ in range(C.NSTREAMS)]
    d = dev.empty(args.tasks, np.uint32)
    slices = [d[i : i + 1] for i in range(args.tasks)]
    methods = [
        m
        for m in C.make_methods("uvloop", streams, slices, peers, notes)
        if m.one is not None and (not args.only or m.name in args.only)
    ]
    rows: list[dict[str, Any]] = []
    failed: set[str] = set()

    async def one(m: C.Method, rep: int) -> None:
        C.use_strategy(m.strategy)
        _loop_thread[0] = threading.get_ident()
        before = dict(_counts)
        g0, gs0 = _gc["n"], _gc["s"]
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, tt0, w0 = _cpu(), time.thread_time(), time.perf_counter()
        try:
            rate = await C.throughput_once(m, args.tasks, args.duration)
        except Exception as exc:  # a peer that cannot run: dropped, as completion.py does
            rows.append({"tag": args.tag, "rep": rep, "method": m.name, "error": repr(exc)[:300]})
            failed.add(m.name)
            return
        tt1, w1 = time.thread_time(), time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        ops = max(rate * args.duration, 1.0)
        wall = w1 - w0
        cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        per_op = {
            k: round((v - before.get(k, 0)) / ops, 4)
            for k, v in sorted(_counts.items())
            if v != before.get(k, 0)
        }
        rows.append(
            {
                "tag": args.tag,
                "rep": rep,
                "method": m.name,
                "ops_s": round(rate),
                "per_op": per_op,
                "loop_cpu_share": round((tt1 - tt0) / wall, 3),
                "proc_cpu_share": round(cpu / wall, 3),
                "nvcsw": ru1.ru_nvcsw - ru0.ru_nvcsw,
                "nivcsw": ru1.ru_nivcsw - ru0.ru_nivcsw,
                "collections": int(_gc["n"] - g0),
                "collection_ms": round(1e3 * (_gc["s"] - gs0), 2),
                "cpu": [cpu0, _cpu()],
            }
        )

    for rep in range(args.reps + 1):
        k = rep % len(methods)
        for m in methods[k:] + methods[:k]:
            if m.name not in failed:
                await one(m, rep)
    for s in streams:
        await s.aclose()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--tag", default="", help="a label for every line")
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=0.15, help="seconds per window")
    ap.add_argument("--reps", type=int, default=5, help="rounds after the warm-up round")
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--no-peers", action="store_true", help="skip numba, CuPy and torch")
    ap.add_argument("--counters", action="store_true", help="count gpuaio's calls per op")
    args = ap.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    card = H.detect_card()
    install(args.counters)
    peers, notes = C.load_peers(card.backend, not args.no_peers)
    H.freeze_heap()
    rows = H.run_on("uvloop", windows, args, peers, notes)
    for row in rows:
        print(json.dumps(row))
    summary: dict[str, Any] = {
        "tag": args.tag,
        "summary": True,
        "card": card.name,
        "gpuaio": str(Path(gpuaio.__file__).resolve().parent),  # which tree ran (A/B runs)
    }
    for name in dict.fromkeys(r["method"] for r in rows):
        kept = [r["ops_s"] for r in rows if r["method"] == name and r["rep"] > 0 and "ops_s" in r]
        if kept:
            summary[name] = round(statistics.median(kept))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
