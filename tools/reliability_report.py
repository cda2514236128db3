#!/usr/bin/env python
"""Run gpuaio's reliability checks at full size and write the figures to a report.

    python tools/reliability_report.py                  # simulated backend
    python tools/reliability_report.py --backend cuda   # on a GPU machine
    python tools/reliability_report.py --sanitizer      # + compute-sanitizer (GPU)

Writes ``tests/reliability/report-<backend>.json``: how many operations were
tried, cancellations, faults injected, inputs tried, and failures (which must
be 0), with one section per check:

* ``storm``: the cancellation storm (10,000 mixed ops per run on asyncio,
  uvloop and trio; 5,000 on the flags, thread and hostfunc completion
  strategies; 10,000 with transient driver faults on ``sim``);
* ``sticky_fault``: ops pending on several streams when the device faults
  (``fault_now`` right after a fault probe on sim, with pending markers
  reporting it 250 ms late; on cuda a kernel's illegal address access and a
  trap, in a subprocess, every strategy): every pending await raises
  DeviceFatalError within 20 ms of the driver first reporting the fault
  (measured in the same run: ``driver_report_ms``, ``latencies_ms``), and
  every later call raises it;
* ``loop_shutdown``: event loops ending with ops in flight;
* ``bad_input``: the hypothesis properties of tests/test_bad_input.py;
* ``soak``: 1,000,000 small awaited ops with memory sampled;
* ``negative_controls``: the checks catch what they claim to (a pool that
  reuses blocks early, an exception in a foreign thread);
* ``pool_eviction_lag``: the event loop's worst lateness and slowest
  ``copy()`` call while the pinned pool evicts blocks and the driver's free
  waits for a running kernel (issue 14);
* ``lifecycle``: issue 14's cases (streams closed on cancel, loops freed,
  budgets and eviction, fork, the current context, all-or-nothing gather,
  bad input) as their test files under pytest on this backend;
* ``sanitizer`` (``--sanitizer``, GPU only): compute-sanitizer memcheck and
  racecheck over the launch tests (``tests/test_memset_launch.py``); their
  summaries go to
  ``tests/reliability/sanitizer-<tool>.txt``.

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402

from gpuaio._api.device import device_of  # noqa: E402

LOOPS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


def _git_commit() -> str:
    given = os.environ.get("GPUAIO_GIT_COMMIT")  # a copied tree's git metadata may be stale
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Report:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.sections: dict[str, Any] = {}
        self.failures: list[str] = []
        self.t0 = time.perf_counter()

    def add(self, section: str, entry: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(entry)
        n = int(entry.get("failures", 0))
        if n:
            what = entry.get("name", section)
            details = entry.get("failure_details") or []
            self.failures.append(f"{section}/{what}: {n} failure(s): {details[:3]}")
        print(f"  {section}/{entry.get('name', '')}: {n} failure(s)", flush=True)

    def crash(self, section: str, name: str) -> None:
        tb = traceback.format_exc()
        self.add(section, {"name": name, "failures": 1, "failure_details": [tb[-2000:]]})


def _runtime(backend: str, **sim: Any) -> Any:
    import gpuaio

    if backend == "sim":
        from gpuaio.backends.sim import SimBackend, SimConfig

        return gpuaio.use_backend(SimBackend(SimConfig(**sim)))
    return gpuaio.use_backend("cuda")


def _run_async(loop: str, fn: Callable[[], Any]) -> Any:
    name, options = LOOPS[loop]
    return anyio.run(fn, backend=name, backend_options=options)


# -- sections ----------------------------------------------------------------------------


def storms(report: Report, ops: int) -> None:
    import gpuaio
    from tests.reliability.harness import FAST_SIM, StormConfig, run_storm

    sim_kw = FAST_SIM if report.backend == "sim" else {}
    runs: list[tuple[str, str, StormConfig]] = [
        (f"{loop}-events", loop, StormConfig(ops=ops, seed=i, completion="events"))
        for i, loop in enumerate(LOOPS)
    ]
    others = [c for c in gpuaio.STRATEGIES if c != "events"]
    runs += [
        (f"asyncio-{c}", "asyncio", StormConfig(ops=ops // 2, seed=10 + i, completion=c))
        for i, c in enumerate(others)
    ]
    if report.backend == "sim":
        runs.append(
            (
                "asyncio-transient-faults",
                "asyncio",
                StormConfig(ops=ops, seed=20, transient_fault_rate=0.01),
            )
        )
    for name, loop, cfg in runs:
        print(f"storm {name} ({cfg.ops} ops)", flush=True)
        rt = _runtime(report.backend, **sim_kw)
        try:
            stats = _run_async(loop, lambda rt=rt, cfg=cfg: run_storm(rt, cfg))
            entry = stats.summary()
            entry["name"] = name
            report.add("storm", entry)
        except Exception:
            report.crash("storm", name)
        finally:
            if report.backend == "sim":
                rt.close()


def sticky_faults(report: Report) -> None:
    import gpuaio
    from tests.reliability.harness import run_sticky_fault

    if report.backend == "sim":
        for loop in LOOPS:
            for completion in gpuaio.STRATEGIES:
                name = f"{loop}-{completion}"
                print(f"sticky fault {name}", flush=True)
                rt = _runtime("sim")
                try:
                    stats = _run_async(
                        loop, lambda rt=rt, c=completion: run_sticky_fault(rt, completion=c)
                    )
                    entry = stats.summary()
                    entry["name"] = name
                    entry["faults_injected"] = 1
                    report.add("sticky_fault", entry)
                except Exception:
                    report.crash("sticky_fault", name)
                finally:
                    rt.close()
    # In a subprocess, as on the GPU (where the context is lost for good).
    faults = ("illegal_address", "trap") if report.backend == "cuda" else ("illegal_address",)
    for completion, fault in itertools.product(gpuaio.STRATEGIES, faults):
        name = f"subprocess-{report.backend}-{completion}"
        if report.backend == "cuda":
            name += f"-{fault}"
        print(f"sticky fault {name}", flush=True)
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.reliability.fault_child",
                    "--backend",
                    report.backend,
                    "--completion",
                    completion,
                    "--fault",
                    fault,
                    "--timeout",
                    "50",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if not lines:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stdout} {proc.stderr}")
            entry = json.loads(lines[-1])
            entry["name"] = name
            entry["faults_injected"] = 1
            entry["returncode"] = proc.returncode
            if proc.returncode and not entry["failures"]:
                entry["failures"] = 1
            report.add("sticky_fault", entry)
        except Exception:
            report.crash("sticky_fault", name)


def loop_shutdowns(report: Report) -> None:
    from dataclasses import asdict

    from tests.reliability.harness import run_loop_shutdown

    for loop in LOOPS:
        print(f"loop shutdown {loop}", flush=True)
        rt = _runtime(report.backend)
        try:
            stats = run_loop_shutdown(rt, loop)
            entry = asdict(stats)
            entry.update(
                name=loop, failures=len(stats.failures()), failure_details=stats.failures()
            )
            for key in ("op_errors", "foreign_exceptions", "leaks"):
                entry[key] = len(entry[key])
            report.add("loop_shutdown", entry)
        except Exception:
            report.crash("loop_shutdown", loop)
        finally:
            if report.backend == "sim":
                rt.close()


def bad_input(report: Report, examples: int) -> None:
    """The hypothesis properties, on a simulated backend (they read its counters)."""
    os.environ["GPUAIO_BAD_INPUT_EXAMPLES"] = str(examples)
    from tests import test_bad_input as props

    rt = _runtime("sim", devices=2)
    stream = device_of(rt, 0).stream()
    maker = props.Maker(rt, stream)
    results: dict[str, Any] = {}
    failures: list[str] = []
    t0 = time.perf_counter()
    for name in (
        "test_copy",
        "test_memset",
        "test_launch",
        "test_allocation",
        "test_other_api_rejections",
    ):
        print(f"bad input {name}", flush=True)
        try:
            getattr(props, name)(maker=maker)
            results[name] = "passed"
        except Exception as exc:
            results[name] = "failed"
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:1500]}")
    maker.close()
    stream.close()
    rt.close()
    tried = dict(sorted(props.TRIED.items()))
    props_tried = {k: v for k, v in tried.items() if ":" not in k}
    report.add(
        "bad_input",
        {
            "name": "hypothesis",
            "examples_per_property": examples,
            "inputs_tried": sum(props_tried.values()),
            "rejected": sum(v for k, v in tried.items() if k.endswith(":rejected")),
            "valid_and_verified": sum(v for k, v in tried.items() if k.endswith(":valid")),
            "by_property": tried,
            "results": results,
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "failures": len(failures),
            "failure_details": failures,
        },
    )


def soak(report: Report, ops: int) -> None:
    from tests.reliability.harness import FAST_SIM, run_soak

    print(f"soak ({ops} ops)", flush=True)
    rt = _runtime(report.backend, **(FAST_SIM if report.backend == "sim" else {}))
    try:
        stats = _run_async(
            "asyncio", lambda: run_soak(rt, ops, workers=8, sample_every=max(1000, ops // 100))
        )
        entry = stats.summary()
        entry["name"] = f"asyncio-{ops}"
        report.add("soak", entry)
    except Exception:
        report.crash("soak", "asyncio")
    finally:
        if report.backend == "sim":
            rt.close()


def negative_controls(report: Report) -> None:
    """The checks must catch what they are for; a control that sees nothing fails."""
    import logging
    import threading

    from gpuaio._engine.pool import PinnedPool
    from tests.reliability.harness import Trouble, early_reuse_probe

    rt = _runtime("sim")
    try:
        clean = _run_async("asyncio", lambda: early_reuse_probe(rt))
        original = PinnedPool.release

        def careless(self: PinnedPool, block: Any, events: Any = ()) -> None:
            for ev in events:
                self.backend.event_destroy(ev)
            original(self, block)

        PinnedPool.release = careless  # type: ignore[method-assign]
        try:
            caught = _run_async("asyncio", lambda: early_reuse_probe(rt))
        finally:
            PinnedPool.release = original  # type: ignore[method-assign]
        report.add(
            "negative_controls",
            {
                "name": "early_reuse",
                "clean_pool": clean,
                "careless_pool": caught,
                "failures": int(bool(clean)) + int(not caught),
                "failure_details": ([f"clean pool: {clean}"] if clean else [])
                + ([] if caught else ["a pool reusing blocks early went unnoticed"]),
            },
        )
    except Exception:
        report.crash("negative_controls", "early_reuse")
    finally:
        rt.close()
    trouble = Trouble()
    with trouble.capture():
        t = threading.Thread(target=lambda: 1 / 0, name="control")
        t.start()
        t.join()
        logging.getLogger("gpuaio").error("control")
    report.add(
        "negative_controls",
        {
            "name": "foreign_exceptions",
            "caught": len(trouble.items),
            "failures": int(len(trouble.items) != 2),
            "failure_details": [] if len(trouble.items) == 2 else trouble.items,
        },
    )


SPIN_SRC = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    unsigned long long t = t0;
    while (t - t0 < ns) { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); }
}
"""


def _spin_sim(grid: Any, block: Any, ns: Any) -> None:
    time.sleep(int(ns) / 1e9)


def pool_eviction_lag(report: Report, kernel_s: float = 0.5) -> None:
    """Loop lag while the pinned pool evicts under load (issue 14, r14).

    A 1 MiB budget holds two cached 64 KiB blocks; a kernel of ``kernel_s``
    runs on one stream; a 4 MiB pageable copy on another needs a 1 MiB block,
    so the pool evicts the small ones, and the driver's free waits for the
    kernel. Meanwhile the loop issues 64 KiB copies and a 2 ms heartbeat. The
    figure is the loop's worst lateness and the slowest copy() call.
    """
    import numpy as np

    import gpuaio
    from gpuaio._engine.staging import Stager, StagingConfig

    print("pool eviction lag", flush=True)
    rt = _runtime(report.backend)

    async def body() -> dict[str, Any]:
        dev = gpuaio.Device(0)
        old = rt.extras.get("stager")
        stager = Stager(rt, StagingConfig(), budget=1 << 20)
        rt.extras["stager"] = stager
        try:
            kernel = dev.compile(SPIN_SRC, "spin", sim=_spin_sim)
            sk, sb, ss = dev.stream(), dev.stream(), dev.stream()
            await sk.launch(kernel, 1, 1, np.uint64(1000))  # loaded before it counts
            await anyio.to_thread.run_sync(stager.pool.reserve, 64 << 10, 2)
            small = np.full(64 << 10, 3, np.uint8)
            d_small = dev.empty(small.nbytes)
            big = np.arange(4 << 20, dtype=np.uint32).view(np.uint8)[: 4 << 20].copy()
            d_big = dev.empty(big.nbytes)
            worst = 0.0
            calls: list[float] = []
            stop = False

            async def heartbeat() -> None:
                nonlocal worst
                last = time.perf_counter()
                while not stop:
                    await anyio.sleep(0.002)
                    now = time.perf_counter()
                    worst = max(worst, now - last - 0.002)
                    last = now

            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat)
                k = sk.launch(kernel, 1, 1, np.uint64(int(kernel_s * 1e9)))
                t_start = time.perf_counter()
                op_big = sb.copy(d_big, big)
                while time.perf_counter() - t_start < kernel_s + 0.2:
                    t0 = time.perf_counter()
                    op = ss.copy(d_small, small)
                    calls.append(time.perf_counter() - t0)
                    await op
                    await anyio.sleep(0.005)
                await gpuaio.wait_all([k, op_big])
                stop = True
            out = np.empty_like(big)
            await sb.copy(out, d_big)
            stats = stager.pool.stats()
            return {
                "evictions": stats.evictions,
                "worst_loop_lag_ms": round(worst * 1e3, 2),
                "slowest_copy_call_ms": round(max(calls) * 1e3, 2),
                "copy_calls": len(calls),
                "byte_exact": bool(np.array_equal(out, big)),
            }
        finally:
            rt.extras["stager"] = old if old is not None else rt.extras.pop("stager")
            await anyio.to_thread.run_sync(stager.close)

    try:
        entry = _run_async("asyncio", body)
        problems = []
        if not entry["byte_exact"]:
            problems.append("the copy made during the eviction is not byte-exact")
        if entry["evictions"] < 1:
            problems.append("the pool did not evict: the check measured nothing")
        if entry["worst_loop_lag_ms"] > 50 or entry["slowest_copy_call_ms"] > 50:
            problems.append(
                f"the loop was held {entry['worst_loop_lag_ms']} ms "
                f"(slowest copy() call {entry['slowest_copy_call_ms']} ms), limit 50"
            )
        entry.update(
            name=f"kernel-{kernel_s}s",
            kernel_s=kernel_s,
            failures=len(problems),
            failure_details=problems,
        )
        report.add("pool_eviction_lag", entry)
    except Exception:
        report.crash("pool_eviction_lag", "asyncio")
    finally:
        if report.backend == "sim":
            rt.close()


LIFECYCLE_TESTS = {
    "streams_loops_gather_register": "tests/test_lifecycle_api.py",
    "bad_input_at_the_call": "tests/test_bad_input.py",
    "pool_budget_and_eviction": "tests/test_pool_budget.py",
    "fork": "tests/test_fork.py",
    "current_context": "tests/test_context.py",
}
"""Issue 14's cases and the test files that check them (those present are run)."""


def lifecycle(report: Report) -> None:
    """Issue 14's lifecycle cases: each test file under pytest, on this backend."""
    import xml.etree.ElementTree as ET

    for name, path in LIFECYCLE_TESTS.items():
        if not (ROOT / path).exists():
            continue
        print(f"lifecycle {name} ({path})", flush=True)
        junit = ROOT / "tests" / "reliability" / f".junit-{name}.xml"
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--gpuaio-backend={report.backend}", "--timeout", "90",
            "--junitxml", str(junit), path,
        ]  # fmt: skip
        if report.backend == "cuda":
            cmd[-1:-1] = ["-m", "not gpuaio_sim_only"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        try:
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root[0]
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            failed = [
                f"{case.get('name')}: {(case[0].get('message') or '')[:300]}"
                for case in suite.iter("testcase")
                if len(case) and case[0].tag in ("failure", "error")
            ]
        except (OSError, ET.ParseError, IndexError):
            n = {"tests": 0, "failures": 1, "errors": 0, "skipped": 0}
            failed = [(proc.stdout + proc.stderr)[-1500:]]
        finally:
            junit.unlink(missing_ok=True)
        report.add(
            "lifecycle",
            {
                "name": name,
                "file": path,
                "tests": n["tests"],
                "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                "skipped": n["skipped"],
                "exit_code": proc.returncode,
                "failures": n["failures"] + n["errors"] + int(proc.returncode not in (0, 5)),
                "failure_details": failed,
            },
        )


def sanitizers(report: Report) -> None:
    """compute-sanitizer memcheck and racecheck over the GPU tests (GPU machines only)."""
    import shutil

    exe = shutil.which("compute-sanitizer")
    if exe is None:
        report.add(
            "sanitizer",
            {
                "name": "compute-sanitizer",
                "failures": 1,
                "failure_details": ["compute-sanitizer not on PATH"],
            },
        )
        return
    for tool in ("memcheck", "racecheck"):
        print(f"compute-sanitizer --tool {tool}", flush=True)
        # memcheck: driver API errors are not reported. The only ones are
        # cuda.core finding a kernel's parameter count by asking for one
        # index past the last (cuKernelGetParamInfo -> CUDA_ERROR_INVALID_VALUE,
        # tests/gpu-results/2026-11-25-h100-memcheck.log): a probe, not a bug.
        api = ["--report-api-errors", "no"] if tool == "memcheck" else []
        cmd = [
            exe,
            "--tool",
            tool,
            *api,
            "--error-exitcode",
            "86",
            "--target-processes",
            "all",
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--gpuaio-backend=cuda",
            "-k",
            "asyncio",
            "tests/test_memset_launch.py",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        text = proc.stdout + proc.stderr
        out = ROOT / "tests" / "reliability" / f"sanitizer-{tool}.txt"
        summary = [
            x for x in text.splitlines() if "ERROR SUMMARY" in x or "passed" in x or "failed" in x
        ]
        hits = [x for x in text.splitlines() if "=========" in x and "ERROR SUMMARY" not in x]
        out.write_text(
            f"$ {' '.join(cmd[: 8 + len(api)])} ... {' '.join(cmd[-4:])}\n"
            + "\n".join(hits[:40] + summary[-20:])
            + "\n"
        )
        errors = sum(
            int(x.split("ERROR SUMMARY:")[1].split()[0]) for x in summary if "ERROR SUMMARY:" in x
        )
        report.add(
            "sanitizer",
            {
                "name": tool,
                "exit_code": proc.returncode,
                "errors": errors,
                "summary_file": str(out.relative_to(ROOT)),
                "failures": int(proc.returncode != 0 or errors > 0),
                "failure_details": summary[-5:],
            },
        )


# -- main --------------------------------------------------------------------------------


def totals(report: Report) -> dict[str, int]:
    s = report.sections
    storms_ = s.get("storm", [])
    faults = s.get("sticky_fault", [])
    shutdowns = s.get("loop_shutdown", [])
    soaks = s.get("soak", [])
    bad = s.get("bad_input", [])
    return {
        "ops_tried": sum(int(x.get("ops", 0)) for x in storms_ + soaks + shutdowns)
        + sum(int(x.get("pending", 0)) + int(x.get("later_calls", 0)) for x in faults),
        "cancellations": sum(int(x.get("cancelled_awaits", 0)) for x in storms_),
        "aborts": sum(int(x.get("aborts_requested", 0)) for x in storms_),
        "faults_injected": sum(int(x.get("faults_injected", 0)) for x in faults)
        + sum(int(x.get("transient_faults_injected", 0)) for x in storms_),
        "inputs_tried": sum(int(x.get("inputs_tried", 0)) for x in bad),
        "bytes_verified": sum(int(x.get("bytes_verified", 0)) for x in storms_),
        "failures": len(report.failures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sim", "cuda"), default="sim")
    parser.add_argument("--storm-ops", type=int, default=10_000)
    parser.add_argument("--soak-ops", type=int, default=1_000_000)
    parser.add_argument(
        "--examples", type=int, default=2_000, help="hypothesis examples per bad-input property"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=(
            "storm",
            "fault",
            "shutdown",
            "bad_input",
            "soak",
            "controls",
            "eviction",
            "lifecycle",
        ),
    )
    parser.add_argument(
        "--sanitizer",
        action="store_true",
        help="also run compute-sanitizer memcheck and racecheck (GPU)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or ROOT / "tests" / "reliability" / f"report-{args.backend}.json"
    report = Report(args.backend)
    started = datetime.datetime.now(datetime.UTC)
    if "controls" not in args.skip:
        negative_controls(report)
    if "storm" not in args.skip:
        storms(report, args.storm_ops)
    if "fault" not in args.skip:
        sticky_faults(report)
    if "shutdown" not in args.skip:
        loop_shutdowns(report)
    if "bad_input" not in args.skip:
        bad_input(report, args.examples)
    if "soak" not in args.skip:
        soak(report, args.soak_ops)
    if "eviction" not in args.skip:
        pool_eviction_lag(report)
    if "lifecycle" not in args.skip:
        lifecycle(report)
    if args.sanitizer:
        sanitizers(report)
    import gpuaio

    doc = {
        "report": "gpuaio reliability",
        "backend": args.backend,
        "generated": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - report.t0, 1),
        "gpuaio": gpuaio.__version__,
        "commit": _git_commit(),
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "command": " ".join(["python", "tools/reliability_report.py", *(argv or sys.argv[1:])]),
        "totals": totals(report),
        "failure_list": report.failures,
        **report.sections,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(json.dumps(doc["totals"], indent=1))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
