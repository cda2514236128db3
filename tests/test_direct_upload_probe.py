"""``tools/direct_upload_probe.py``: the rule a GPU run is judged by, and a run on the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import direct_upload_probe as probe  # noqa: E402

KiB = 1 << 10


def _proc(
    ratio: dict[int, float], beside_p99: float = 10.0, idle_max: float = 30.0, bad: int = 0
) -> dict[str, Any]:
    """One process's results: every size measured, calls quick unless told."""
    calls = [
        {
            "bytes": n,
            "bad": bad,
            "idle_p99_us": 9.0,
            "idle_max_us": idle_max,
            "beside_p99_us": beside_p99,
            "beside_max_us": 40.0,
        }
        for n in probe.SIZES
    ]
    e2e = [
        {"bytes": n, "ratio": ratio.get(n, 0.9), "faster_rounds": 4 if ratio.get(n, 0) > 1 else 0}
        for n in probe.SIZES
    ]
    for row in e2e:
        row["rounds"] = 4
    return {"calls": calls, "e2e": e2e}


def test_the_rule_keeps_sizes_up_to_the_first_that_fails_in_any_process() -> None:
    fast = {4 * KiB: 1.3, 16 * KiB: 1.2, 64 * KiB: 1.05, 256 * KiB: 0.9}
    assert probe.judge([_proc(fast), _proc(fast)]) == 64 * KiB
    # A size that gains in one process only is not kept, nor anything above it.
    slower = {**fast, 16 * KiB: 1.01}
    assert probe.judge([_proc(fast), _proc(slower)]) == 4 * KiB
    # Calls that wait (often, or once for a millisecond), or a wrong byte: rejected.
    assert probe.judge([_proc(fast), _proc(fast, beside_p99=80.0)]) == 0
    assert probe.judge([_proc(fast, idle_max=1500.0)]) == 0
    assert probe.judge([_proc(fast, bad=1)]) == 0
    # Nothing measured, or a process without the rows: nothing kept.
    assert probe.judge([]) == 0
    assert probe.judge([_proc(fast), {"calls": [], "e2e": []}]) == 0


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    """The probe on the simulator with these arguments (it must succeed)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "direct_upload_probe.py"), *args],
        env={**os.environ, "GPUAIO_BACKEND": "sim"},
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_the_probe_runs_on_the_simulator_and_its_rule_reads_the_json(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    _probe("--quick", "--json", str(out))
    got = json.loads(out.read_text())
    assert [r["bytes"] for r in got["calls"]] == list(probe.SIZES)
    assert [r["bytes"] for r in got["e2e"]] == list(probe.SIZES)
    assert all(r["bad"] == 0 for r in got["calls"])
    # The simulated driver waits for a busy stream, as CUDA may: the probe sees it.
    small = [r for r in got["calls"] if r["bytes"] <= 64 * KiB]
    assert all(r["busy_p50_us"] > 2 * r["idle_p50_us"] for r in small), small
    judged = _probe("--judge", str(out)).stdout
    assert judged.startswith("rule: GPUAIO_DIRECT_UP_MAX="), judged
