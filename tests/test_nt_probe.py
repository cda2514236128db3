"""``tools/nt_probe.py``: the rule its runs were judged by, and a run on the simulator.

The thresholds ``NT_MIN`` and ``D2H_NT_MIN`` were picked by the probe's
``judge`` (issue 13, runs DC and DE): from the smallest size at which, from
there up, every size held at least 0.97x in each process and at least one
size 1.03x or more in each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import nt_probe  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20


def _rows(ratios: dict[int, float], kind: str = "h2d") -> list[dict[str, Any]]:
    return [{"bytes": n, f"{kind}_ratio": r, "toggled": kind} for n, r in ratios.items()]


def test_the_rule_picks_the_size_from_which_every_process_gains_and_none_loses() -> None:
    a = _rows({64 * KiB: 0.94, 256 * KiB: 1.10, MiB: 1.30, 4 * MiB: 1.04})
    b = _rows({64 * KiB: 0.99, 256 * KiB: 1.01, MiB: 1.25, 4 * MiB: 1.00})
    assert nt_probe.judge([a, b]) == 256 * KiB
    # One process losing more than 3% at a larger size moves the start past it.
    c = _rows({64 * KiB: 0.99, 256 * KiB: 1.01, MiB: 0.96, 4 * MiB: 1.05})
    assert nt_probe.judge([a, c]) == 4 * MiB
    # No gain of 3% anywhere in one process: rejected.
    flat = _rows({64 * KiB: 1.0, 256 * KiB: 1.01, MiB: 1.02, 4 * MiB: 1.0})
    assert nt_probe.judge([a, flat]) == 0
    assert nt_probe.judge([]) == 0 and nt_probe.judge([a, []]) == 0
    # Downloads are judged by their own ratios, never below 64 KiB.
    d = _rows({4 * KiB: 1.2, 16 * MiB: 0.81, 256 * MiB: 1.09}, "d2h")
    assert nt_probe.judge([d]) == 256 * MiB
    assert nt_probe.judge([_rows({4 * KiB: 1.2, 16 * KiB: 1.1}, "d2h")]) == 64 * KiB


def _run_probe(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run the probe on the simulator with ``--quick`` and these arguments:
    its output and its JSON."""
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "nt_probe.py"), "--quick", *args, "--json", str(out)],
        env={**os.environ, "GPUAIO_BACKEND": "sim"},
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.timeout(240)
def test_the_probe_runs_on_the_simulator_and_writes_its_json(tmp_path: Path) -> None:
    stdout, got = _run_probe(tmp_path)
    assert got["backend"] == "sim"
    assert [r["bytes"] for r in got["dma"]] == [64 * KiB, 16 * MiB]
    for row in got["dma"]:
        assert row["memmove_dma_us"] > 0
    assert "NT_MIN by the rule" in stdout


def _gated_rows(cells: dict[int, tuple[float, float, int]]) -> list[dict[str, Any]]:
    """Rows of a ``--toggle gated`` run: size -> (H2D ratio, D2H ratio, rounds faster both)."""
    return [
        {
            "bytes": n,
            "rounds": 4,
            "toggled": "gated",
            "h2d_ratio": up,
            "d2h_ratio": down,
            "h2d_nt_faster_rounds": faster,
            "d2h_nt_faster_rounds": faster,
        }
        for n, (up, down, faster) in cells.items()
    ]


def test_the_gated_rule_keeps_each_direction_where_every_process_gains_5_percent() -> None:
    a = _gated_rows({MiB: (1.30, 1.02, 4), 4 * MiB: (1.60, 1.40, 4), 16 * MiB: (1.05, 1.10, 3)})
    b = _gated_rows({MiB: (1.20, 1.20, 4), 4 * MiB: (1.50, 1.04, 4), 16 * MiB: (1.08, 1.20, 2)})
    assert nt_probe.judge_gated([a, b]) == {"h2d": [MiB, 4 * MiB], "d2h": []}
    assert nt_probe.judge_gated([a]) == {
        "h2d": [MiB, 4 * MiB, 16 * MiB],
        "d2h": [4 * MiB, 16 * MiB],
    }
    assert nt_probe.judge_gated([]) == {"h2d": [], "d2h": []}
    assert nt_probe.judge_gated([a, []]) == {"h2d": [], "d2h": []}


@pytest.mark.timeout(240)
def test_the_probe_toggles_gated_copies_on_the_simulator(tmp_path: Path) -> None:
    """With the native copy threads (a compiled install) the gated path is
    toggled per call and every round trip is byte-exact; without them the
    probe says it has none."""
    stdout, got = _run_probe(tmp_path, "--toggle", "gated", "--sections", "e2e")
    assert "gated copies kept by the rule" in stdout
    if got["native"]:
        assert [r["bytes"] for r in got["e2e"]] == [64 * KiB, 16 * MiB]
        assert all(r["toggled"] == "gated" for r in got["e2e"])
        # Every copy of the "on" arm took the path (none did while the probe set
        # GATED_MIN/_MAX, which the path no longer read).
        for r in got["e2e"]:
            assert r["gated_up"] >= r["per_arm"] * r["rounds"], r
            assert r["gated_down"] >= r["per_arm"] * r["rounds"], r
        assert "gated so far" in stdout
    else:
        assert got["e2e"] == [] and "no gated path" in stdout
