"""Load test of the example service: gpuaio vs naive, on 127.0.0.1 only.

Starts both apps (``gpuaio_app.py`` and ``naive_app.py``) as subprocesses on
free ports of 127.0.0.1, then, alternating between them after a warm-up:

* **throughput**: a fixed number of ``POST /process`` requests of ``--size``
  bytes at each concurrency of ``--concurrency`` (default 1, 16, 64):
  requests/s and p50/p99 latency; every answer is checked byte for byte;
* **health during large transfers**: ``--large-clients`` clients send
  ``--large-requests`` requests of ``--large`` bytes while a probe sends
  ``GET /health`` every ``--probe-ms``: the probe's p50/p99/max latency
  (an idle baseline first). The probe runs in a process of its own, so
  that the load generator's own event loop, busy with the large bodies,
  does not delay it.

Everything is bounded: fixed request counts, a per-request timeout, and a
cap on each phase's duration; the servers are stopped at the end. Results go
to ``benchmarks/results/<date>-<card>-service.json`` (see
``shared/BENCHMARKS.md``) through ``benchmarks/_harness.py``.

GPU run (H100)::

    python examples/service/loadtest.py

Quick run on any machine (``GPUAIO_BACKEND=auto``: the simulated backend,
with a warning, where there is no GPU)::

    GPUAIO_BACKEND=auto python examples/service/loadtest.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import _harness as H  # noqa: E402

HOST = "127.0.0.1"  # the only address this tool ever talks to
APPS = {"gpuaio": HERE / "gpuaio_app.py", "naive": HERE / "naive_app.py"}
BASELINE = "naive handler: blocking cuMemcpyHtoDAsync/cuLaunchKernel/cuMemcpyDtoHAsync/sync"


@dataclass
class Server:
    name: str
    proc: asyncio.subprocess.Process
    url: str


@dataclass
class Phase:
    """Latencies (s) of one measured phase."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def ms(self, q: float) -> float:
        return H.percentile([x * 1e3 for x in self.latencies], q)


async def start_server(name: str, args: argparse.Namespace) -> Server:
    cmd = [
        sys.executable,
        str(APPS[name]),
        "--port",
        "0",
        "--rounds",
        str(args.rounds),
        "--slots",
        str(args.slots),
        "--max-mib",
        str(max(1, -(-max(args.size, args.large) // (1 << 20)))),
        "--exit-with-parent",
    ]
    if args.uvloop:
        cmd.append("--uvloop")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, env=dict(os.environ)
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"{name} server did not start within 120 s") from None
    text = line.decode().strip()
    prefix = f"READY http://{HOST}:"
    if not text.startswith(prefix):
        proc.kill()
        raise RuntimeError(f"{name} server failed to start (said {text!r})")
    return Server(name, proc, text.removeprefix("READY "))


async def stop_server(server: Server) -> None:
    if server.proc.returncode is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.proc.wait(), timeout=30)
        except TimeoutError:
            server.proc.kill()
            await server.proc.wait()


async def run_requests(
    url: str,
    payload: bytes,
    answer: bytes,
    concurrency: int,
    total: int,
    max_s: float,
    timeout_s: float,
) -> Phase:
    """``total`` POSTs with ``concurrency`` clients (each its own connection)."""
    phase = Phase()
    issued = 0
    deadline = time.perf_counter() + max_s
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal issued
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/process", data=payload) as resp:
                        body = await resp.read()
                        ok = resp.status == 200 and body == answer
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    phase.latencies.append(time.perf_counter() - t0)
                else:
                    phase.errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        phase.wall = time.perf_counter() - t0
    return phase


class HealthProbe:
    """``GET /health`` every ``period`` s, sent from a process of its own.

    A probe on the load generator's event loop would time that loop too:
    the large clients' sends, reads and checks of 64 MiB bodies block it for
    tens of milliseconds at a time, and a probe waiting behind them looks
    like a slow server. In its own process the probe measures the server.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def start(cls, url: str, args: argparse.Namespace) -> HealthProbe:
        cmd = [sys.executable, str(SCRIPT), "--probe-url", url]
        cmd += ["--probe-ms", str(args.probe_ms)] + (["--uvloop"] if args.uvloop else [])
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        probe = cls(proc)
        try:
            line = await probe._line()
        except BaseException:
            await probe.close()
            raise
        if line != b"PROBING":
            await probe.close()
            raise RuntimeError(f"health probe failed to start (said {line!r})")
        return probe

    async def _line(self) -> bytes:
        assert self._proc.stdout is not None
        return (await asyncio.wait_for(self._proc.stdout.readline(), timeout=60)).strip()

    async def cut(self) -> Phase:
        """The probes since the last cut (or the start); probing goes on."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"cut\n")
        await self._proc.stdin.drain()
        done = json.loads(await self._line())
        return Phase(done["latencies"], done["errors"], done["wall"])

    async def close(self) -> None:
        """Stop the probe process (it also stops by itself if this process dies)."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), timeout=10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


async def probe_main(url: str, period: float) -> None:
    """The probe process: probe until stdin closes; each line read answers a :class:`Phase`."""
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    phase, since = Phase(), time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        idle = asyncio.Event()  # set while no probe is in flight
        idle.set()
        kick = asyncio.Event()  # a new phase began: probe at once

        async def probe_forever() -> None:
            nonlocal phase
            while True:
                t0 = time.perf_counter()
                # A probe counts in the phase it was sent in: a server that
                # blocks its loop answers late, and that lateness is the point.
                sent_in = phase
                idle.clear()
                try:
                    async with session.get(f"{url}/health") as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                finally:
                    idle.set()
                if ok:
                    sent_in.latencies.append(time.perf_counter() - t0)
                else:
                    sent_in.errors += 1
                # Every phase gets a probe at its start, however short it is.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        kick.wait(), max(0.0, period - (time.perf_counter() - t0))
                    )
                kick.clear()

        prober = asyncio.ensure_future(probe_forever())
        print("PROBING", flush=True)
        try:
            while await commands.readline():
                now = time.perf_counter()
                ending = phase
                phase, since, wall = Phase(), now, now - since
                await idle.wait()  # the probe sent before the cut lands in its phase
                kick.set()
                done = {"latencies": ending.latencies, "errors": ending.errors, "wall": wall}
                print(json.dumps(done), flush=True)
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober


async def health_during_large(
    url: str, payload: bytes, answer: bytes, args: argparse.Namespace
) -> tuple[Phase, Phase, Phase]:
    """(idle probe, probe during large requests, the large requests)."""
    probe = await HealthProbe.start(url, args)
    try:
        await asyncio.sleep(min(1.0, 50 * args.probe_ms / 1e3))
        idle = await probe.cut()
        large = await run_requests(
            url,
            payload,
            answer,
            args.large_clients,
            args.large_requests,
            args.max_phase_s,
            args.timeout_s,
        )
        during = await probe.cut()
    finally:
        await probe.close()
    return idle, during, large


def payload_of(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


async def run(args: argparse.Namespace) -> list[H.Record]:
    names = [a for a in args.apps.split(",") if a]
    for name in names:
        if name not in APPS:
            raise SystemExit(f"unknown app {name!r}; choose from {sorted(APPS)}")
    small = payload_of(args.size, 1)
    small_answer = _common.expected(small, args.rounds)
    large = payload_of(args.large, 2)
    large_answer = _common.expected(large, args.rounds)
    servers = {}
    try:
        for name in names:
            servers[name] = await start_server(name, args)
            print(f"{name}: {servers[name].url}")
        for srv in servers.values():  # warm-up: kernels, buffers, connections
            await run_requests(srv.url, small, small_answer, 2, 4, 60, args.timeout_s)
            await run_requests(srv.url, large, large_answer, 1, 2, 120, args.timeout_s)
        results: dict[tuple[str, int], list[Phase]] = {}
        health: dict[str, list[tuple[Phase, Phase, Phase]]] = {n: [] for n in names}
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for c in args.concurrency:
                total = max(args.requests, 4 * c)
                for name in order:
                    ph = await run_requests(
                        servers[name].url,
                        small,
                        small_answer,
                        c,
                        total,
                        args.max_phase_s,
                        args.timeout_s,
                    )
                    results.setdefault((name, c), []).append(ph)
                    print(
                        f"rep {rep} {name:>6} c={c:<3} {ph.rps:8.1f} req/s  "
                        f"p50 {ph.ms(50):7.2f} ms  p99 {ph.ms(99):7.2f} ms  errors {ph.errors}"
                    )
            for name in order:
                idle, probe, big = await health_during_large(
                    servers[name].url, large, large_answer, args
                )
                health[name].append((idle, probe, big))
                print(
                    f"rep {rep} {name:>6} /health idle p99 {idle.ms(99):6.2f} ms; during "
                    f"{H.fmt_size(args.large)} x{args.large_clients}: p50 {probe.ms(50):7.2f} "
                    f"p99 {probe.ms(99):7.2f} max {probe.ms(100):7.2f} ms "
                    f"({len(probe.latencies)} probes; {big.rps:.1f} large req/s, "
                    f"errors {big.errors + probe.errors})"
                )
    finally:
        for srv in servers.values():
            await stop_server(srv)
    return make_records(args, names, results, health)


def _med(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v == v]  # drop NaN
    return H.median(vals) if vals else None


def make_records(
    args: argparse.Namespace,
    names: list[str],
    results: dict[tuple[str, int], list[Phase]],
    health: dict[str, list[tuple[Phase, Phase, Phase]]],
) -> list[H.Record]:
    size = H.fmt_size(args.size)
    large = H.fmt_size(args.large)
    have_naive = "naive" in names
    note = None if have_naive else "naive app not run (--apps)"
    records: list[H.Record] = []
    for c in args.concurrency:
        ours = results.get(("gpuaio", c), [])
        base = results.get(("naive", c), [])
        errors = sum(p.errors for p in ours + base)
        extra: dict[str, Any] = {"concurrency": c, "requests": max(args.requests, 4 * c)}
        extra["errors"] = errors
        records.append(
            H.record(
                f"service_rps_c{c}_{size}",
                "req/s",
                _med([p.rps for p in ours]),
                BASELINE,
                _med([p.rps for p in base]),
                "higher",
                note=note,
                **extra,
            )
        )
        records.append(
            H.record(
                f"service_p99_c{c}_{size}",
                "ms",
                _med([p.ms(99) for p in ours]),
                BASELINE,
                _med([p.ms(99) for p in base]),
                "lower",
                note=note,
                p50_ms=_med([p.ms(50) for p in ours]),
                baseline_p50_ms=_med([p.ms(50) for p in base]),
                **extra,
            )
        )
    ours_h = health.get("gpuaio", [])
    base_h = health.get("naive", [])
    for q, label in ((99, "p99"), (100, "max")):
        records.append(
            H.record(
                f"service_health_{label}_during_{large}",
                "ms",
                _med([probe.ms(q) for _, probe, _ in ours_h]),
                BASELINE,
                _med([probe.ms(q) for _, probe, _ in base_h]),
                "lower",
                note=note,
                idle_ms=_med([idle.ms(q) for idle, _, _ in ours_h]),
                baseline_idle_ms=_med([idle.ms(q) for idle, _, _ in base_h]),
                large_clients=args.large_clients,
                large_requests=args.large_requests,
                probe_ms=args.probe_ms,
            )
        )
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and counts (CI, sim)")
    p.add_argument("--apps", default="gpuaio,naive")
    p.add_argument("--size", type=H.parse_size, default=None, help="body of throughput requests")
    p.add_argument("--large", type=H.parse_size, default=None, help="body during health probing")
    p.add_argument("--concurrency", default=None, help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=None, help="requests per level (>= 4 x c)")
    p.add_argument("--large-clients", type=int, default=4)
    p.add_argument("--large-requests", type=int, default=None)
    p.add_argument("--probe-ms", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=None, help="kernel work per byte")
    p.add_argument("--slots", type=int, default=8, help="gpuaio app: requests on the GPU at once")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--uvloop", action="store_true", help="serve (and load) on uvloop")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    p.add_argument("--max-phase-s", type=float, default=300.0, help="cap per phase")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--probe-url", default=None, help=argparse.SUPPRESS)  # the probe process
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "size": (256 << 10) if quick else (4 << 20),
        "large": (4 << 20) if quick else (64 << 20),
        "concurrency": "1,4,16" if quick else "1,16,64",
        "requests": 16 if quick else 256,
        "large_requests": 4 if quick else 32,
        "rounds": 2 if quick else 256,
        "reps": 1 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_url:
        probe = probe_main(args.probe_url, args.probe_ms / 1e3)
        if args.uvloop:
            import uvloop

            uvloop.run(probe)
        else:
            asyncio.run(probe)
        return 0
    H.watchdog()  # a hang ends with tracebacks; the servers then exit too
    card = H.detect_card()
    H.banner("service", card)
    if args.uvloop:
        import uvloop

        records = uvloop.run(run(args))
    else:
        records = asyncio.run(run(args))
    for rec in records:
        print(
            f"  {rec['name']:<36} {rec['value']} {rec['metric']}  "
            f"(naive {rec['baseline_value']}, ratio {rec['ratio']})"
        )
    if not args.no_write:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "no_write")}
        H.write_results("service", records, args.out, card=card, config={"loadtest": config})
    return 0


if __name__ == "__main__":
    sys.exit(main())
