"""Sticky-fault scenario in a process of its own (a faulted CUDA context is gone for good).

Run by ``tests/test_reliability.py`` and ``tools/reliability_report.py``::

    python -m tests.reliability.fault_child --backend cuda --completion events --fault trap

Prints one JSON line (:meth:`FaultStats.summary`) and exits 0 when every
pending await raised DeviceFatalError within 20 ms of the driver first
reporting the fault (measured in this run) and every later call raised it,
1 otherwise. On ``cuda`` the fault is a kernel writing to address 0x10
(``--fault illegal_address``: ``CUDA_ERROR_ILLEGAL_ADDRESS``) or trapping
(``--fault trap``: ``CUDA_ERROR_LAUNCH_FAILED``); on ``sim`` it is
``SimBackend.fault_now`` right after gpuaio's next fault probe.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys

import anyio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=("sim", "cuda"), default="sim")
    parser.add_argument("--completion", default="events")
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "trio"), default="asyncio")
    parser.add_argument("--fault", choices=("illegal_address", "trap"), default="illegal_address")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    # A hang is a failure too: dump every thread and exit 2.
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    import gpuaio

    from .harness import run_sticky_fault

    rt = gpuaio.use_backend(args.backend, completion=args.completion)

    async def run() -> dict[str, object]:
        stats = await run_sticky_fault(rt, fault=args.fault)
        return stats.summary()

    backend, options = args.loop, {}
    if args.loop == "uvloop":
        backend, options = "asyncio", {"use_uvloop": True}
    summary = anyio.run(run, backend=backend, backend_options=options)
    print(json.dumps(summary))
    sys.stdout.flush()
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
