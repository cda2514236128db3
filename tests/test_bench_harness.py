"""The benchmarks' harness imports the gpuaio it is given (``benchmarks/_harness.py``).

An A/B run puts another tree's gpuaio on ``PYTHONPATH`` and runs this
checkout's benchmark scripts: the harness must not put this checkout's
package ahead of it (it did, and issue 13's A/B runs of completion.py
compared a tree with itself), and the results must say which package ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The checkout off sys.path first, as on a GPU machine (an editable install
# of gpuaio here puts it there, which hid the bug).
_PROBE = """
import os, sys
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != {repo!r}]
sys.path.insert(0, {bench!r})
import _harness, gpuaio
print(gpuaio.__file__)
"""


def _imported(pythonpath: str) -> Path:
    """The gpuaio package a script of ``benchmarks/`` gets, run as the runs run it."""
    # Ahead of what the suite runs with (on a GPU machine, the test
    # requirements it installed).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    probe = _PROBE.format(repo=os.path.realpath(REPO), bench=str(REPO / "benchmarks"))
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd="/",  # not the checkout: python -c puts the working directory on sys.path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip().splitlines()[-1]).resolve().parent


def test_a_gpuaio_on_the_path_wins_over_the_checkout(tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(REPO / "gpuaio", other / "gpuaio", ignore=shutil.ignore_patterns("__pycache__"))
    assert _imported(str(other)) == other / "gpuaio"


def test_results_say_which_gpuaio_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUT", raising=False)  # no copy into a GPU run's output
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _harness as H
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    card = H.Card("probe", "none", "probe", "none")
    paths = H.write_results("probe", [], out_dir=tmp_path, card=card)
    doc = json.loads(paths[0].read_text())
    import gpuaio

    assert doc["environment"]["gpuaio_path"] == str(Path(gpuaio.__file__).resolve().parent)


def test_transfers_without_the_soak_measures_the_sizes_only(tmp_path: Path) -> None:
    # A/B runs of a few sizes start one process per variant and round: the
    # 8 GiB soak would take most of each.
    env = dict(os.environ, GPUAIO_BACKEND="sim")
    env.pop("OUT", None)
    script = REPO / "benchmarks" / "transfers.py"
    args = ["--sizes", "4K", "--reps", "5", "--no-peers", "--no-soak", "--out-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("*-transfers.json")
    doc = json.loads(path.read_text())
    records = doc["records"]
    names = {r["name"] for r in (records.values() if isinstance(records, dict) else records)}
    assert "h2d_pageable_4KiB" in names and "d2h_pageable_4KiB" in names
    # Without peers target 1 has no bar: its records say so instead of passing.
    by_name = {r["name"]: r for r in (records.values() if isinstance(records, dict) else records)}
    vs_peer = by_name["d2h_pageable_vs_best_peer_4KiB"]
    assert "target" not in vs_peer and "no peer ran" in vs_peer["note"]
    assert not names & {"loop_lag_8GiB_pageable", "memory_flat_10k", "pinned_peak_vs_budget"}
