"""``tools/copyout_probe.py`` on the simulator: every step of the ladder runs,
lands every byte (the probe stops where one does not), and is named in the
JSON."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_overhead_probe import _run_tool


def test_every_step_lands_every_byte_and_the_json_names_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run_tool("copyout_probe.py", "--sizes", "256K", "--reps", "1", "--out", str(out))
    got = json.loads((out / "copyout_probe.json").read_text())
    assert list(got) == ["256K"]
    steps = {"spin", "aw_yield", "aw_copy", "aw_pool", "gpuaio_one", "gpuaio"}
    assert set(got["256K"]["us"]) == steps
    assert all(us > 0 for us in got["256K"]["us"].values())
