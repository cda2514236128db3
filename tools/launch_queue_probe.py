"""How many ops a CUDA stream queues before an enqueue blocks the calling thread.

A latch kernel holds the stream; a thread enqueues ops of one kind until an
enqueue has not returned for 0.3 s, then the latch opens. Prints one line per
kind: ``memset`` (cuMemsetD8Async), ``memset+record`` (each followed by a
cuEventRecord, as gpuaio's markers are), ``record``. gpuaio sizes the share of
the queue its event-loop thread may fill (``Backend.launch_queue``) from this.

    GPUAIO_BACKEND=cuda python tools/launch_queue_probe.py
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpuaio
from tests.conftest import latch


def probe(kind: str, limit: int = 20000) -> int:
    dev = gpuaio.Device(0)
    rt = dev._runtime
    be = rt.backend
    s = dev.stream()
    d = dev.empty(4)
    events = [be.event_create(0) for _ in range(limit)] if "record" in kind else []
    release = latch(dev, s)
    count = [0]
    progress = [time.perf_counter()]

    def enqueue() -> None:
        for i in range(limit):
            if kind.startswith("memset"):
                be.memset_async(d.ptr, 1, 1, 4, s._native)
            if "record" in kind:
                be.event_record(events[i], s._native)
            count[0] += 1
            progress[0] = time.perf_counter()

    t = threading.Thread(target=enqueue, daemon=True)
    t.start()
    while t.is_alive() and time.perf_counter() - progress[0] < 0.3:
        time.sleep(0.01)
    blocked = t.is_alive()
    n = count[0]
    release()
    t.join(30)
    be.stream_synchronize(s._native)
    for ev in events:
        be.event_destroy(ev)
    s.close()
    return n if blocked else -1


def main() -> None:
    out = {}
    for kind in ("memset", "memset+record", "record"):
        n = probe(kind)
        out[kind] = n
        print(
            f"{kind:15s} enqueued before blocking: {n if n >= 0 else 'never blocked'}", flush=True
        )
    print(json.dumps({"card": gpuaio.Device(0).name, "launch_queue": out}))


if __name__ == "__main__":
    main()
