"""The ``gpuaio`` command (console script and ``python -m gpuaio``) on the sim."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpuaio
from gpuaio.__main__ import main
from gpuaio._core.compiled import MODULES, compiled_modules
from gpuaio._engine import nativecopy

ROOT = Path(__file__).resolve().parents[1]


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
    # which CUDA major the bindings are (12.x or 13.x both supported) decides the driver needed
    import cuda.bindings

    assert setup["cuda_bindings"] == cuda.bindings.__version__
    assert setup["devices"] and setup["devices"][0]["ordinal"] == 0
    assert setup["memory_kinds"] == {
        "numpy array (pageable)": "pageable",
        "gpuaio.pinned_empty": "pinned",
        "Device.empty": "device",
        "Device.managed_empty": "managed",
    }


def test_info_says_which_modules_run_compiled() -> None:
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compiled"] == compiled_modules()
    assert "hot path: " in _run("info").stdout


def test_the_build_hook_compiles_the_modules_info_names() -> None:
    spec = importlib.util.spec_from_file_location("hatch_build", ROOT / "hatch_build.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)  # without hatchling: the hook class is left out
    assert tuple(p.removesuffix(".py").replace("/", ".") for p in hook.COMPILED) == MODULES
    for path in hook.COMPILED:
        assert (ROOT / path).is_file(), path


@pytest.mark.skipif(
    not os.environ.get("GPUAIO_EXPECT_COMPILED"),
    reason="GPUAIO_EXPECT_COMPILED unset: set by runs that built the hot path compiled",
)
def test_a_compiled_build_runs_every_module_compiled() -> None:
    # Else nox -s compiled (or a GPU run) would pass on the pure-Python fallback.
    assert compiled_modules() == list(MODULES)
    assert nativecopy.available(), "the compiled build has no native copy threads"
    # A numpy argument's address through the buffer protocol in C (_address.c).
    address = importlib.import_module("gpuaio._api._address").writable_address
    assert importlib.import_module("gpuaio._api.describe")._writable_address is address
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    setup = json.loads(proc.stdout)
    assert setup["native_copy_threads"] is True
    out = _run("info").stdout
    assert "staging copy threads: native (no GIL)" in out
    # On CUDA the driver calls of every operation go through _fastcalls.c.
    assert setup["fast_driver_calls"] is (setup["backend"] == "cuda")
    assert ("hot-path driver calls: direct (C)" in out) is (setup["backend"] == "cuda")


def test_json_goes_with_info_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--json"])
    assert exc.value.code == 2
    assert "--json goes with the info command" in capsys.readouterr().err


def test_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("gpuaio") == "gpuaio.__main__:main"


# -- no GPU: one-line errors, and a demo that says it is simulated ----------------


@pytest.mark.parametrize("setting", [None, "cuda"], ids=["unset", "cuda"])
def test_info_without_a_gpu_is_a_one_line_error(
    setting: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpuaio._api import runtime as _runtime
    from tests.test_backend_choice import fail_like_no_driver

    if setting is None:
        monkeypatch.delenv("GPUAIO_BACKEND", raising=False)
    else:
        monkeypatch.setenv("GPUAIO_BACKEND", setting)
    monkeypatch.setattr(_runtime, "_current", None)
    fail_like_no_driver(monkeypatch)
    assert main(["info"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gpuaio info: NoDeviceError: no usable CUDA device")
    assert "GPUAIO_BACKEND=sim" in lines[0]
    assert "Traceback" not in err
    assert _runtime._current is None


def test_info_with_cuda_and_no_gpu_in_a_fresh_process() -> None:
    """What a user types: no traceback, exit status 1 (skipped where a GPU is present)."""
    try:
        from gpuaio.backends.cuda import CudaBackend

        CudaBackend().close()
    except gpuaio.NoDeviceError:
        pass
    else:
        pytest.skip("a CUDA GPU is present here")
    proc = subprocess.run(
        [sys.executable, "-m", "gpuaio", "info"],
        capture_output=True,
        text=True,
        env={**os.environ, "GPUAIO_BACKEND": "cuda"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "NoDeviceError" in proc.stderr and "GPUAIO_BACKEND=sim" in proc.stderr


DEMO_WITHOUT_DRIVER = """
import sys
from tests.test_backend_choice import fail_like_no_driver
import pytest
mp = pytest.MonkeyPatch()
fail_like_no_driver(mp)
from gpuaio.__main__ import main
sys.exit(main(["demo"]))
"""


def test_demo_falls_back_and_its_first_line_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPUAIO_BACKEND"}
    proc = subprocess.run(
        [sys.executable, "-c", DEMO_WITHOUT_DRIVER],
        cwd=ROOT,  # the child imports tests.test_backend_choice
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "SIMULATED backend" in lines[0], lines[:3]
    assert "no CUDA GPU in use" in lines[0]
    assert "all results byte-exact" in proc.stdout


def test_demo_on_the_sim_says_so_first() -> None:
    proc = _run("demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIMULATED backend" in proc.stdout.splitlines()[0]
