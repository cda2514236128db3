"""``tools/piece_probe.py`` on the simulator, with a fake driver whose DMAs land late.

The probe is for a GPU; here its driver calls go to a fake in which a DMA
lands only when an event recorded after it is found fired (or the stream is
synchronized). A copy-out that ran before its piece's event had fired would
copy stale bytes, and the probe's own check must then stop it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE = """
import ctypes, sys
import numpy as np
sys.path.insert(0, {tools!r})
import piece_probe as pp

keep = []
pending = []  # (dst, src, n) DMAs enqueued and not landed


class Event:
    def __init__(self):
        self.upto = 0  # the DMAs enqueued before its record
        self.queried = False


class FakeDriver:
    def _buf(self, n):
        b = np.zeros(n + 64, np.uint8)
        keep.append(b)
        return b.ctypes.data

    def _land(self, upto):
        for dst, src, n in pending[:upto]:
            if dst is not None:
                ctypes.memmove(dst, src, n)
        del pending[:upto]
        for ev in events:
            ev.upto = max(0, ev.upto - upto)

    def cuStreamCreate(self, flags):
        return (0, object())

    def cuEventCreate(self, flags):
        ev = Event()
        events.append(ev)
        return (0, ev)

    def cuMemAlloc(self, n):
        return (0, self._buf(n))

    def cuMemHostAlloc(self, n, flags):
        return (0, self._buf(n))

    def cuMemcpyHtoD(self, d, s, n):
        ctypes.memmove(int(d), s, n)
        return (0,)

    def cuMemcpyDtoHAsync(self, h, d, n, stream):
        pending.append((h, int(d), {short} if {short} else n))
        return (0,)

    def cuMemcpyAsync(self, dst, src, n, stream):
        self._land(len(pending))
        ctypes.memmove(dst, int(src), n)  # into pageable memory: done at return
        return (0,)

    def cuEventRecord(self, ev, stream):
        ev.upto, ev.queried = len(pending), False
        return (0,)

    def cuEventQuery(self, ev):
        if ev.upto and not ev.queried:
            ev.queried = True
            return (pp.CUDA_ERROR_NOT_READY,)  # not yet: they land at the next query
        self._land(ev.upto)
        return (0,)

    def cuStreamSynchronize(self, stream):
        self._land(len(pending))
        return (0,)

    def cuMemFreeHost(self, b):
        return (0,)

    def cuMemFree(self, b):
        return (0,)

    def cuEventDestroy(self, ev):
        return (0,)

    def cuStreamDestroy(self, stream):
        return (0,)


events = []
pp.driver_on_device0 = lambda: (FakeDriver(), None)
sys.argv = ["piece_probe", "--sizes", "64K,256K", "--reps", "2", "--out", {out!r}]
raise SystemExit(pp.main())
"""


def _run(tmp_path: Path, short: int = 0) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "fake_run.py"
    out = tmp_path / "out"
    script.write_text(FAKE.format(tools=str(REPO / "tools"), out=str(out), short=short))
    return subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "GPUAIO_BACKEND": "sim"},
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )


def test_every_way_lands_every_byte_and_the_json_names_them(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads((tmp_path / "out" / "piece_probe.json").read_text())
    assert list(got) == ["64K", "256K"]
    ways = ["whole", *(f"pieces{k}" for k in (2, 4, 8)), "drv", "gpuaio"]
    want = {f"{w}_{d}" for w in ways for d in ("np16", "a64")}
    for size in got.values():
        assert set(size["us"]) == want
        assert all(us > 0 for us in size["us"].values())


def test_a_copy_out_of_bytes_that_never_landed_stops_the_probe(tmp_path: Path) -> None:
    proc = _run(tmp_path, short=8)  # each DMA moves 8 bytes of its piece
    assert proc.returncode != 0
    assert "the destination is not the source" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "piece_probe.json").exists()
