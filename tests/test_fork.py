"""fork: a child forked after gpuaio initialized fails fast, never hangs (issue 14, item 6).

Each case runs ``tests/fork_child.py`` in a fresh interpreter: the parent uses
gpuaio (awaits a memset and staged copies), forks with ``os.fork`` or
``multiprocessing``'s ``fork`` start method, and reports what the child could
do. A child that hangs is killed after ``CHILD_DEADLINE_S`` and the test
fails, instead of hanging the suite.

Before the ``os.register_at_fork`` hooks, the child inherited dead worker
threads and waited on them forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpuaio import STRATEGIES
from tests.fork_child import CHILD_DEADLINE_S

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform has no fork")

LOOPS = ["asyncio", "uvloop", "trio"]
INHERITED_CALLS = [
    "memset",
    "staged_h2d",
    "staged_d2h",
    "synchronize",
    "empty",
    "stream",
    "Device",
    "pinned_empty",
    "reserve_pinned",
]
"""What the child tries on what it inherited: each must raise ForkedProcessError."""


def _run(
    backend: str, loop: str, how: str, case: str, completion: str = "events"
) -> dict[str, Any]:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    env = {k: v for k, v in os.environ.items() if k != "GPUAIO_BACKEND"}
    env["GPUAIO_COMPLETION"] = completion
    cmd = [sys.executable, "-m", "tests.fork_child", "--backend", backend, "--loop", loop]
    proc = subprocess.run(
        [*cmd, "--how", how, "--case", case],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_DEADLINE_S + 120,  # the parent's own work on a loaded machine
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(lines[-1])
    result["stderr"] = proc.stderr
    return result


def _check_child_exited(result: dict[str, Any]) -> dict[str, Any]:
    assert not result["hung"], (
        f"the forked child was still running after {CHILD_DEADLINE_S} s and was killed; "
        f"it reported {result['child']!r}\n{result['stderr']}"
    )
    assert result["child_exit"] == 0, result
    child = result["child"]
    assert child is not None, result
    return child  # type: ignore[no-any-return]


def _check_fails_fast(child: dict[str, Any], backend: str) -> None:
    outcomes = {name: child.get(name) for name in INHERITED_CALLS}
    assert outcomes == dict.fromkeys(INHERITED_CALLS, "ForkedProcessError"), child
    message = child["message"]
    assert "forked" in message and "'spawn'" in message and "'forkserver'" in message, message
    if backend == "cuda":
        assert "initialized CUDA" in message, message
    else:
        assert "initialized its sim backend" in message, message


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("how", ["os", "mp"])
def test_forked_child_fails_fast_and_parent_keeps_working(how: str, loop: str) -> None:
    """The child's every call on what it inherited raises ForkedProcessError at once; a
    new sim runtime in the child copies byte-exact; the child exits promptly; the
    parent's copies after the fork are byte-exact."""
    result = _run("sim", loop, how, "used")
    assert result["parent_before"] == "ok", result
    child = _check_child_exited(result)
    _check_fails_fast(child, "sim")
    assert child["fresh_sim"] == "ok", child
    assert result["parent_after"] == "ok", result


@pytest.mark.parametrize(
    ("how", "completion"), [*(("os", c) for c in STRATEGIES), ("mp", "events")]
)
def test_operations_pending_at_fork_fail_fast_in_child(how: str, completion: str) -> None:
    """Ops pending at the fork (a held stream: a memset, a staged copy queued behind it,
    with the stream's host thread busy) fail at once when the child awaits them, whatever
    the completion strategy; the parent completes them once the hold is released."""
    result = _run("sim", "asyncio", how, "pending", completion)
    child = _check_child_exited(result)
    _check_fails_fast(child, "sim")
    assert child["pending_0"] == child["pending_1"] == "ForkedProcessError", child
    assert child["fresh_sim"] == "ok", child
    assert result["parent_pending"] == "ok", result
    assert result["parent_after"] == "ok", result


@pytest.mark.parametrize("how", ["os", "mp"])
def test_fork_before_gpuaio_initialized_starts_fresh(how: str) -> None:
    """A parent that only imported gpuaio: the child uses it normally (byte-exact)."""
    result = _run("sim", "asyncio", how, "fresh")
    child = _check_child_exited(result)
    assert child == {"fresh": "ok"}, child
    assert result["parent_after"] == "ok", result


@pytest.mark.gpuaio_gpu
@pytest.mark.parametrize("how", ["os", "mp"])
def test_forked_cuda_child_fails_fast(how: str) -> None:
    """On a GPU: every call on the inherited CUDA runtime raises ForkedProcessError (no
    driver call is made in the child), CUDA cannot be chosen again in the child, the
    child exits promptly, and the parent keeps working."""
    result = _run("cuda", "asyncio", how, "used")
    assert result["parent_before"] == "ok", result
    child = _check_child_exited(result)
    _check_fails_fast(child, "cuda")
    assert child["cuda_again"] == "ForkedProcessError", child
    assert child["fresh_sim"] == "ok", child
    assert result["parent_after"] == "ok", result


def test_forked_process_error_is_a_fatal_device_error_and_pickles() -> None:
    import pickle

    import gpuaio
    from gpuaio._api.fork import forked_message

    exc = gpuaio.ForkedProcessError("cuMemAlloc", detail=forked_message("cuda", 12, 11))
    assert isinstance(exc, gpuaio.DeviceFatalError) and isinstance(exc, gpuaio.GpuaioError)
    assert (exc.code, exc.name) == (3, "CUDA_ERROR_NOT_INITIALIZED")
    assert str(exc).startswith("this process (pid 12) was forked from process 11 after gpuaio")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is gpuaio.ForkedProcessError and str(back) == str(exc)
    assert (back.call, back.code, back.detail) == (exc.call, exc.code, exc.detail)


def test_disabled_backend_refuses_calls_and_frees_nothing() -> None:
    """What the child hook does to the inherited backend, on a sim backend of its own."""
    import gpuaio
    from gpuaio._api.fork import disable_backend
    from gpuaio.backends.sim import SimBackend

    be = SimBackend()
    try:
        ptr = be.mem_alloc(0, 4096)
        pinned = be.host_alloc(4096)
        stream = be.stream_create(0)
        handle = be.stream_handle(stream)
        disable_backend(be, "forked")
        for call in (
            lambda: be.mem_alloc(0, 64),
            lambda: be.stream_create(0),
            lambda: be.memset_async(ptr, 0, 1, 64, stream),
            lambda: be.event_create(0),
            lambda: be.device_count(),
        ):
            with pytest.raises(gpuaio.ForkedProcessError, match="forked"):
                call()
        be.mem_free(ptr)  # a no-op: the memory stays the parent's
        be.mem_free_async(ptr)  # so is the stream-ordered free
        be.host_free_async(pinned)  # and the pool's pinned free
        be.stream_destroy(stream)
        be.close()
        assert be.stream_handle(stream) == handle
        # The class's own methods (the instance's are replaced) show it all still there.
        assert SimBackend.pointer_info(be, ptr).kind is gpuaio.MemoryKind.DEVICE
        assert SimBackend.pointer_info(be, pinned).kind is gpuaio.MemoryKind.PINNED
    finally:
        SimBackend.close(be)
