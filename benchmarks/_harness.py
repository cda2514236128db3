"""Shared helpers for gpuaio's benchmark suites.

Card and driver detection, the result-file format of ``shared/BENCHMARKS.md``
(``record`` and ``write_results``), medians and percentiles, interleaved
measurement of a candidate against its baselines, a 1 ms event-loop ticker
that measures loop lag, and running one coroutine on asyncio, uvloop or trio.

Runs on the simulated backend too: its results go to the card slug ``sim``
so they are never mistaken for GPU figures.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Only where no gpuaio is importable (a checkout run without installing it):
# a gpuaio on PYTHONPATH, such as another tree's in an A/B run, must win.
# (Inserted unconditionally, this checkout's package shadowed the other tree
# in the A/B runs of issue 13's rounds four to ten: see docs/benchmarks.md.)
if importlib.util.find_spec("gpuaio") is None:
    sys.path.insert(0, str(REPO))

import anyio  # noqa: E402
import anyio.abc  # noqa: E402
import anyio.lowlevel  # noqa: E402
import numpy as np  # noqa: E402

import gpuaio  # noqa: E402
from gpuaio._api.runtime import Runtime, current_runtime  # noqa: E402

__all__ = [
    "LOOPS",
    "Card",
    "Interleaved",
    "LagStats",
    "Record",
    "Ticker",
    "banner",
    "card_slug",
    "checkpoint",
    "detect_card",
    "fmt_size",
    "git_commit",
    "interleave",
    "loop_lag",
    "loop_unavailable",
    "median",
    "parse_size",
    "percentile",
    "print_targets",
    "record",
    "run_on",
    "runtime",
    "watchdog",
    "write_results",
]

LOOPS: tuple[str, ...] = ("asyncio", "uvloop", "trio")
"""Event loops a suite may run on (``anyio.run`` backends)."""

Record = dict[str, Any]


# -- card, driver, commit -------------------------------------------------
@dataclass(frozen=True, slots=True)
class Card:
    """What the numbers were measured on."""

    name: str
    driver: str
    slug: str
    """Short lower-case name used in result file names (``h100``; ``sim`` on the sim)."""
    backend: str


def _smi(field_name: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={field_name}", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def _cuda_name_and_version() -> tuple[str | None, str | None]:
    try:
        from cuda.bindings import driver
    except ImportError:
        return None, None
    try:
        (err,) = driver.cuInit(0)
        if err:
            return None, None
        err, dev = driver.cuDeviceGet(0)
        name = None
        if not err:
            err, raw = driver.cuDeviceGetName(256, dev)
            if not err:
                name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace").strip()
        err, version = driver.cuDriverGetVersion()
        ver = None if err else f"CUDA {int(version) // 1000}.{(int(version) % 1000) // 10}"
        return name, ver
    except Exception:
        return None, None


def card_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; falls back to a slug of the whole name."""
    m = re.search(r"\b([A-Z]{1,4}\d{2,4}[A-Z]?)\b", name.upper().replace("NVIDIA", " "))
    if m:
        return m.group(1).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "unknown"


def detect_card() -> Card:
    """The card of device 0 and its driver; ``sim`` on the simulated backend."""
    backend = gpuaio.backend_name()
    if backend == "sim":
        return Card("sim", "sim", "sim", backend)
    name, cuda_version = _cuda_name_and_version()
    name = name or _smi("name") or gpuaio.Device(0).name
    driver = _smi("driver_version") or cuda_version or "unknown"
    return Card(name, driver, card_slug(name), backend)


def git_commit() -> str:
    """``$GPUAIO_GIT_COMMIT``, else ``git rev-parse HEAD`` of the project, else ``"unknown"``.

    The variable comes first: a copy of the tree on a GPU machine may carry a
    stale ``.git``.
    """
    env = os.environ.get("GPUAIO_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return env or "unknown"
    return out.stdout.strip() or env or "unknown"


def _git_dirty() -> bool | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions (a module's own ``__version__`` when it was imported)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        mod = sys.modules.get(name.replace("-", "_"))
        version = getattr(mod, "__version__", None) if mod is not None else None
        if version is None:
            with contextlib.suppress(metadata.PackageNotFoundError):
                version = metadata.version(name)
        out[name] = str(version) if version is not None else None
    return out


def runtime() -> Runtime:
    """gpuaio's current runtime (backend, stager, host pool, completion engines)."""
    return current_runtime()


# -- statistics -----------------------------------------------------------
def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation); NaN for no values."""
    if not len(values):
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _clean(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.5g}")


# -- records --------------------------------------------------------------
def record(
    name: str,
    metric: str,
    value: float | None,
    baseline: str | None = None,
    baseline_value: float | None = None,
    better: str = "higher",
    *,
    note: str | None = None,
    target: float | None = None,
    target_of: str = "ratio",
    **extra: Any,
) -> Record:
    """One result record in the format of ``shared/BENCHMARKS.md``.

    ``ratio`` is value / baseline_value where higher is better, baseline /
    value where lower is better (None when either is missing or zero).
    With ``target``, ``pass`` says whether ``target_of`` ("ratio" or
    "value") meets it in the direction of ``better``.
    """
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    v, b = _clean(value), _clean(baseline_value)
    ratio: float | None = None
    if v is not None and b is not None:
        num, den = (v, b) if better == "higher" else (b, v)
        ratio = _clean(num / den) if den else None
    rec: Record = {
        "name": name,
        "metric": metric,
        "value": v,
        "baseline": baseline,
        "baseline_value": b,
        "ratio": ratio,
        "better": better,
    }
    if target is not None:
        got = rec[target_of]
        rec["target"] = target
        rec["target_of"] = target_of
        if got is None:
            rec["pass"] = None
        else:
            rec["pass"] = bool(got >= target if better == "higher" else got <= target)
    if note:
        rec["note"] = note
    for key, val in extra.items():
        rec[key] = _clean(val) if isinstance(val, float) else val
    return rec


def print_targets(records: Iterable[Record]) -> tuple[int, int]:
    """Print one PASS/MISS line per record with a target; returns (passed, missed)."""
    passed = missed = 0
    lines: list[str] = []
    for rec in records:
        if "target" not in rec:
            continue
        ok = rec.get("pass")
        field_name = rec["target_of"]
        got = rec.get(field_name)
        op = ">=" if rec["better"] == "higher" else "<="
        if ok is None:
            verdict = "N/A "
        elif ok:
            verdict, passed = "PASS", passed + 1
        else:
            verdict, missed = "MISS", missed + 1
        shown = "null" if got is None else f"{got:.4g}"
        unit = "" if field_name == "ratio" else f" {rec['metric']}"
        lines.append(
            f"  {verdict}  {rec['name']:<44} {field_name} {shown}{unit} "
            f"(target {op} {rec['target']:.4g}{unit})"
        )
    if lines:
        print("targets:")
        print("\n".join(lines))
        print(f"  {passed} passed, {missed} missed")
    return passed, missed


def write_results(
    suite: str,
    records: Sequence[Record],
    out_dir: Path | str | None = None,
    *,
    card: Card | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<YYYY-MM-DD>-<card>-<suite>.json`` (and a copy under ``$OUT``).

    ``out_dir`` defaults to ``benchmarks/results``. Returns the paths written.
    """
    card = card or detect_card()
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
    doc: dict[str, Any] = {
        "suite": suite,
        "card": card.name,
        "driver": card.driver,
        "date": now.isoformat().replace("+00:00", "Z"),
        "git": git_commit(),
        "records": list(records),
        "backend": card.backend,
        "environment": {
            "git_dirty": _git_dirty(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpuaio": gpuaio.__version__,
            "gpuaio_path": str(Path(gpuaio.__file__).resolve().parent),
            "gpuaio_compiled": compiled(),
            "versions": _versions(
                (
                    "numpy",
                    "anyio",
                    "uvloop",
                    "trio",
                    "cuda-bindings",
                    "cuda-core",
                    "torch",
                    "cupy",
                    "numba",
                    "numba-cuda",
                )
            ),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GPUAIO_")},
            "argv": sys.argv[1:],
            **(dict(config) if config else {}),
        },
    }
    fname = f"{now:%Y-%m-%d}-{card.slug}-{suite}.json"
    dirs = [Path(out_dir) if out_dir is not None else RESULTS_DIR]
    extra_out = os.environ.get("OUT")
    if extra_out:
        dirs.append(Path(extra_out))
    text = json.dumps(doc, indent=1) + "\n"
    written: list[Path] = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / fname
        if path.exists() and path.resolve() not in {p.resolve() for p in written}:
            print(f"note: replacing {path}")
        path.write_text(text)
        written.append(path)
    for p in written:
        print(f"wrote {p}")
    return written


def compiled() -> list[str] | None:
    """The modules the measured gpuaio runs compiled (``hatch_build.py``); None
    for a gpuaio older than that build option (an A/B baseline)."""
    try:
        from gpuaio._core.compiled import compiled_modules
    except ImportError:
        return None
    return compiled_modules()


async def profile_awaits(fn: Callable[[], Awaitable[Any]], count: int, title: str, top: int) -> str:
    """A cProfile of this (the loop's) thread over ``count`` awaits of ``fn()``,
    by own time, the ``top`` lines under a ``title`` line."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(count):
        await fn()
    prof.disable()
    text = io.StringIO()
    text.write(f"\n===== {title}\n")
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


# -- measurement ----------------------------------------------------------
Timer = Callable[[], Awaitable[float]]
"""One sample of a method: seconds per call (see :func:`interleave`)."""


def sync_timer(fn: Callable[[], Any], inner: int) -> Timer:
    """A sample: seconds per call of ``fn``, averaged over ``inner`` calls."""

    async def run() -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    return run


def async_timer(fn: Callable[[], Awaitable[Any]], inner: int) -> Timer:
    """A sample: seconds per awaited ``fn()``, averaged over ``inner`` awaits."""

    async def run() -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            await fn()
        return (time.perf_counter() - t0) / inner

    return run


@dataclass(slots=True)
class Interleaved:
    """Samples per method from :func:`interleave`, and the methods that failed."""

    samples: dict[str, list[float]]
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        s = self.samples.get(name)
        return median(s) if s else None


async def interleave(
    methods: Mapping[str, Callable[[], Awaitable[float]]],
    *,
    reps: int,
    warmup: int = 1,
    before: Callable[[str], None] | None = None,
) -> Interleaved:
    """Measure every method ``reps`` times, alternating between them.

    Each method returns one sample (e.g. seconds per op). ``warmup`` rounds
    run first and are discarded; the order rotates every round so no method
    always goes first. ``before(name)`` runs ahead of each call (switching a
    strategy or a pool). A method that raises is dropped, its error kept.
    """
    names = list(methods)
    out = Interleaved({n: [] for n in names})

    async def one(name: str, keep: bool) -> None:
        if name in out.errors:
            return
        try:
            if before is not None:
                before(name)
            sample = await methods[name]()
        except Exception as exc:
            out.errors[name] = f"{type(exc).__name__}: {exc}"
            out.samples[name] = []
            return
        if keep:
            out.samples[name].append(float(sample))

    for _ in range(warmup):
        for name in names:
            await one(name, False)
    for r in range(reps):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            await one(name, True)
    return out


# -- loop lag -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LagStats:
    """Lateness of a periodic ticker, in milliseconds."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    samples: int


class Ticker:
    """A task that sleeps ``period`` seconds in a loop and records how late it wakes."""

    def __init__(self, period: float = 1e-3) -> None:
        self.period = period
        self.lateness: list[float] = []

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        last = time.perf_counter()
        task_status.started()
        while True:
            await anyio.sleep(self.period)
            now = time.perf_counter()
            self.lateness.append(max(0.0, now - last - self.period))
            last = now

    def stats(self) -> LagStats:
        ms = [x * 1e3 for x in self.lateness]
        if not ms:
            return LagStats(0.0, 0.0, 0.0, 0)
        return LagStats(percentile(ms, 50), percentile(ms, 99), max(ms), len(ms))


@contextlib.asynccontextmanager
async def loop_lag(period: float = 1e-3) -> AsyncIterator[Ticker]:
    """Run a ``period`` ticker on the current loop (asyncio, uvloop or trio) around a block.

    ``ticker.stats()`` afterwards gives p50/p99/max lateness in ms. The block
    should last many periods; the tick in progress when it ends is counted.
    """
    ticker = Ticker(period)
    async with anyio.create_task_group() as tg:
        await tg.start(ticker.run)
        yield ticker
        # Let the tick in progress when the block ended land (a block that
        # blocked the loop shows up in that tick).
        await anyio.sleep(period * 1.5)
        tg.cancel_scope.cancel()


# -- event loops ----------------------------------------------------------
def loop_unavailable(loop: str) -> str | None:
    """Why ``loop`` cannot run here, or None."""
    if loop not in LOOPS:
        return f"unknown loop {loop!r}; choose from {LOOPS}"
    if loop == "asyncio":
        return None
    try:
        importlib.import_module(loop)
    except Exception as exc:
        return f"{loop} is not importable ({type(exc).__name__}: {exc})"
    return None


def run_on(loop: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``anyio.run(fn, *args)`` on ``loop``: ``asyncio``, ``uvloop`` or ``trio``."""
    if loop == "asyncio":
        return anyio.run(fn, *args, backend="asyncio")
    if loop == "uvloop":
        return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})
    if loop == "trio":
        return anyio.run(fn, *args, backend="trio")
    raise ValueError(f"unknown loop {loop!r}; choose from {LOOPS}")


def freeze_heap() -> None:
    """Collect, then exempt what survives from later collections (``gc.freeze``).

    Call it once the peers are imported, before measuring. Their imports leave
    a heap whose full collection took 140-190 ms on an H200 host (run AN,
    torch, CuPy and numba loaded), longer than one 0.15 s throughput window:
    whichever method it landed in lost that window. Frozen objects are never
    freed, so only call it on what stays alive anyway; every method's own
    garbage is still collected as before.
    """
    gc.collect()
    gc.freeze()


async def checkpoint() -> None:
    """Yield to the event loop once."""
    await anyio.lowlevel.checkpoint()


# -- sizes ----------------------------------------------------------------
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"64K"``, ``"16MiB"``, ``"1G"`` or ``"4096"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot read a size from {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_size(n: int) -> str:
    """Bytes as used in record names: ``4KiB``, ``16MiB``, ``1GiB``, ``1500B``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def watchdog(seconds: float | None = None) -> None:
    """Dump every thread's stack and exit if the run is still going after ``seconds``.

    Default ``$GPUAIO_BENCH_WATCHDOG_S`` or 540 s: a hang on the GPU machine
    then ends with tracebacks instead of a silent timeout.
    """
    import faulthandler

    if seconds is None:
        seconds = float(os.environ.get("GPUAIO_BENCH_WATCHDOG_S", "540"))
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True)


def banner(suite: str, card: Card) -> None:
    """Print what the suite runs on."""
    rt = current_runtime()
    print(f"gpuaio {gpuaio.__version__} benchmark suite {suite!r} on {card.name} ({card.backend})")
    print(f"  backend: {rt.reason}; driver: {card.driver}; git {git_commit()[:12]}")
    print(f"  gpuaio from {Path(gpuaio.__file__).resolve().parent}")
    if card.backend == "sim":
        print("  SIMULATED backend: these numbers describe the simulator, not a GPU.")
