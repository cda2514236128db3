"""``tools/copyout_probe.py`` on the simulator: every step of the ladder runs,
lands every byte, and is named in the JSON; the pool and the stager's
setting are left as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_step_lands_every_byte_and_the_json_names_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "copyout_probe.py", "--sizes", "256K", "--reps", "1", "--out", str(out)],
        cwd=REPO / "tools",
        env={**os.environ, "GPUAIO_BACKEND": "sim"},
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads((out / "copyout_probe.json").read_text())
    assert list(got) == ["256K"]
    steps = {"spin", "aw_yield", "aw_copy", "aw_pool", "gpuaio_one", "gpuaio"}
    assert set(got["256K"]["us"]) == steps
    assert all(us > 0 for us in got["256K"]["us"].values())
