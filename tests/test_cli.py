"""The ``gpuaio`` command (console script and ``python -m gpuaio``) on the sim."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import gpuaio
from gpuaio.__main__ import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUAIO_BACKEND": "sim"}
    return subprocess.run(
        [sys.executable, "-m", "gpuaio", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"gpuaio {gpuaio.__version__}"


def test_info_json_is_one_object_with_devices_and_kinds() -> None:
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    setup = json.loads(proc.stdout)
    assert setup["backend"] == "sim"
    assert setup["gpuaio"] == gpuaio.__version__
    assert setup["devices"] and setup["devices"][0]["ordinal"] == 0
    assert setup["memory_kinds"] == {
        "numpy array (pageable)": "pageable",
        "gpuaio.pinned_empty": "pinned",
        "Device.empty": "device",
        "Device.managed_empty": "managed",
    }


def test_json_goes_with_info_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--json"])
    assert exc.value.code == 2
    assert "--json goes with the info command" in capsys.readouterr().err


def test_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("gpuaio") == "gpuaio.__main__:main"
