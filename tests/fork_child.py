"""A process that uses gpuaio, forks, and reports what the child could do (tests/test_fork.py).

    python -m tests.fork_child --backend sim|cuda --loop asyncio|uvloop|trio
        --how os|mp --case used|pending|fresh

``used``: the parent awaits a memset and staged copies, then forks.
``pending``: the same, plus, on the sim, operations still pending at the fork
(a held stream with a memset and a staged copy queued behind the hold).
``fresh``: the parent has only imported gpuaio when it forks.

Prints one JSON line: what each of the child's attempts raised (``"ok"``,
``"ForkedProcessError"``, another error, or ``"timeout"``), whether the child
was reaped within ``CHILD_DEADLINE_S``, and whether the parent's copies after
the fork were byte-exact. A child that hangs is killed, not waited for.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np

import gpuaio

CHILD_DEADLINE_S = 30.0
"""How long the child has to finish (a loaded 2-core machine; a hang is forever)."""
ATTEMPT_S = 10.0
N = 3 << 20  # a pageable copy of this size is staged in several chunks
# Also runs against a gpuaio without the error, to show what the child did before.
ForkedError: type[BaseException] = getattr(gpuaio, "ForkedProcessError", None) or type(
    "NoForkedProcessError", (Exception,), {}
)

_args: argparse.Namespace


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    loop = _args.loop
    if loop == "trio":
        return anyio.run(fn, backend="trio")
    return anyio.run(fn, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


def roundtrip(dev: gpuaio.Device, s: gpuaio.Stream, seed: int) -> str:
    """A memset and staged copies both ways; "ok" if byte-exact."""

    async def go() -> str:
        src = np.random.default_rng(seed).integers(0, 256, N, dtype=np.uint8)
        d = dev.empty(N)
        await s.memset(d, 7)
        back = np.zeros(N, np.uint8)
        await s.copy(back, d)
        if not (back == 7).all():
            return "memset not exact"
        await s.copy(d, src)
        await s.copy(back, d)
        return "ok" if np.array_equal(back, src) else "copy not exact"

    try:
        return str(run(go))
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"


class Inherited:
    """What the parent made before the fork."""

    def __init__(self) -> None:
        self.dev = gpuaio.Device(0)
        self.s = self.dev.stream()
        self.d = self.dev.empty(N)
        self.pending: list[gpuaio.Operation] = []
        self.release: Callable[[], None] | None = None


def attempt(report: dict[str, Any], name: str, fn: Callable[[], Awaitable[Any]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(ATTEMPT_S):
            await fn()

    try:
        run(bounded)
        report[name] = "ok"
    except ForkedError as exc:
        report[name] = "ForkedProcessError"
        report["message"] = str(exc)
    except TimeoutError:
        report[name] = "timeout"
    except BaseException as exc:
        report[name] = f"{type(exc).__name__}: {exc}"


def child_report(inh: Inherited | None) -> dict[str, Any]:
    """Every use of what the child inherited, then a fresh runtime where allowed."""
    report: dict[str, Any] = {}
    if inh is None:  # the parent never initialized gpuaio: a fresh start
        dev = gpuaio.Device(0)
        report["fresh"] = roundtrip(dev, dev.stream(), seed=3)
        return report
    dev, s, d = inh.dev, inh.s, inh.d

    async def memset() -> None:
        await s.memset(d, 1)

    async def staged_h2d() -> None:
        await s.copy(d, np.ones(N, np.uint8))

    async def staged_d2h() -> None:
        await s.copy(np.empty(N, np.uint8), d)

    async def synchronize() -> None:
        await s.synchronize()

    async def empty() -> None:
        dev.empty(64)

    async def new_stream() -> None:
        dev.stream()

    async def device() -> None:
        gpuaio.Device(0)

    async def pinned() -> None:
        gpuaio.pinned_empty(64)

    async def reserve() -> None:
        await gpuaio.reserve_pinned(1 << 20)

    for name, fn in [
        ("memset", memset),
        ("staged_h2d", staged_h2d),
        ("staged_d2h", staged_d2h),
        ("synchronize", synchronize),
        ("empty", empty),
        ("stream", new_stream),
        ("Device", device),
        ("pinned_empty", pinned),
        ("reserve_pinned", reserve),
    ]:
        attempt(report, name, fn)
    for i, op in enumerate(inh.pending):

        async def wait(op: gpuaio.Operation = op) -> None:
            await op

        attempt(report, f"pending_{i}", wait)
    # Nothing inherited is freed: dropping and collecting it must not hang or crash.
    s.close()
    inh.pending.clear()
    inh.__dict__.clear()
    gc.collect()
    if _args.backend == "cuda":  # CUDA cannot be initialized again in the child
        report["cuda_again"] = "ok"
        try:
            gpuaio.use_backend("cuda")
        except ForkedError:
            report["cuda_again"] = "ForkedProcessError"
        except BaseException as exc:
            report["cuda_again"] = f"{type(exc).__name__}: {exc}"
    try:
        gpuaio.use_backend("sim")
        dev2 = gpuaio.Device(0)
        report["fresh_sim"] = roundtrip(dev2, dev2.stream(), seed=4)
    except BaseException as exc:
        report["fresh_sim"] = f"{type(exc).__name__}: {exc}"
    return report


def child_main(inh: Inherited | None, path: str) -> None:
    # The hooks under test must keep the child from hanging; should they not,
    # the parent kills it at CHILD_DEADLINE_S, and the child's stack goes to
    # stderr a little before, for the test's message (CI's compiled session
    # saw one child hang, round 37).
    faulthandler.dump_traceback_later(CHILD_DEADLINE_S - 5, exit=False)
    report = child_report(inh)
    gc.collect()  # what the attempts above still held: inherited arrays and streams
    with open(path, "w") as f:
        json.dump(report, f)


def wait_child_os(pid: int) -> tuple[bool, int]:
    """Reap ``pid`` within the deadline, else kill it. Returns (hung, exit status)."""
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return False, status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True, os.waitpid(pid, 0)[1]


def main() -> None:
    global _args
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="sim")
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--how", choices=("os", "mp"), default="os")
    parser.add_argument("--case", choices=("used", "pending", "fresh"), default="used")
    _args = parser.parse_args()
    os.environ["GPUAIO_BACKEND"] = _args.backend
    result: dict[str, Any] = {}
    inh: Inherited | None = None
    if _args.case != "fresh":
        inh = Inherited()
        result["parent_before"] = roundtrip(inh.dev, inh.s, seed=1)
        if _args.case == "pending":
            rt = gpuaio.current_runtime()
            inh.release = rt.backend.hold(inh.s)  # type: ignore[attr-defined]
            inh.pending.append(inh.s.memset(inh.d, 5))
            inh.pending.append(inh.s.copy(np.empty(N, np.uint8), inh.d))  # staged, queued
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    t0 = time.monotonic()
    if _args.how == "os":
        pid = os.fork()
        if pid == 0:
            child_main(inh, path)
            sys.exit(0)  # a normal exit: atexit hooks and collection run in the child
        hung, status = wait_child_os(pid)
        result["child_exit"] = os.waitstatus_to_exitcode(status) if not hung else None
    else:
        proc = mp.get_context("fork").Process(target=child_main, args=(inh, path))
        proc.start()
        proc.join(CHILD_DEADLINE_S)
        hung = proc.is_alive()
        if hung:
            proc.kill()
            proc.join()
        result["child_exit"] = None if hung else proc.exitcode
    result["child_s"] = round(time.monotonic() - t0, 2)
    result["hung"] = hung
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    result["child"] = json.loads(text) if text else None
    # The parent keeps working after the fork.
    if inh is not None:
        if inh.release is not None:
            inh.release()

            async def settle() -> None:
                await gpuaio.wait_all(inh.pending)

            try:
                run(settle)
                result["parent_pending"] = "ok"
            except BaseException as exc:
                result["parent_pending"] = f"{type(exc).__name__}: {exc}"
        result["parent_after"] = roundtrip(inh.dev, inh.s, seed=2)
    else:
        dev = gpuaio.Device(0)
        result["parent_after"] = roundtrip(dev, dev.stream(), seed=2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
