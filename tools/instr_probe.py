"""Instructions per awaited small copy, function by function, under callgrind.

    python tools/instr_probe.py [--op h2d-pinned] [--ops 3000] [--out FILE]

Runs ``--ops`` awaited copies (``tools/overhead_probe.py``'s fake GPU, whose
driver calls are a few Python statements) under ``valgrind --tool=callgrind``
and prints, per op, the instructions each of gpuaio's hot functions ran,
callees included. Unlike a timing, the count barely moves from run to run
or machine to machine, so a change to the copy call's path can be judged on
the CPU machine before any GPU run (issue 13: a compiled 4 KiB pinned upload's
call went from 29,555 to 27,096 instructions with 78b6e55). The fake GPU's
own Python is in the counts of the functions that call it: compare builds,
not these figures with a real driver's.

Point ``PYTHONPATH`` at a compiled tree (``hatch_build.py``) to count what
users run; a pure tree's functions are counted as the interpreter's, and
none of the names below appear. ``--child`` is the measured process itself.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HOT = {
    "copy call": "CPyDef_transfers___Transfers___copy",
    "await": "CPyDef_operation_____await___3_Operation_gen_____mypyc_generator_helper__",
    "describe": "CPyDef_describe___describe",
    "sequencer gpu": "CPyDef_sequencer___Sequencer___gpu",
    "engine watch": "CPyDef__events___EventEngine___watch",
    "poll_for": "CPyDef__events___EventEngine___poll_for",
    "queue drain": "CPyDef__queue___StreamQueue___drain",
    "early issue": "CPyDef_early___issue",
    "early adopt": "CPyDef_early___adopt",
}
"""Row label -> the compiled (mypyc) C function whose inclusive count is shown."""
WARMUP = 200


def per_op(annotated: str, ops: int) -> dict[str, float]:
    """Inclusive instructions per op of each ``HOT`` function found in
    ``callgrind_annotate --inclusive=yes`` output, over ``ops`` ops."""
    out: dict[str, float] = {}
    for label, symbol in HOT.items():
        m = re.search(
            r"^\s*([\d,]+) \([ \d.%]+\)\s+\S*:" + re.escape(symbol) + r" ", annotated, re.M
        )
        if m:
            out[label] = int(m.group(1).replace(",", "")) / ops
    return out


def child(op: str, ops: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import overhead_probe as probe

    import gpuaio

    gpuaio.use_backend(probe.fake_gpu(gpuaio, 0.0, 0.0), completion="events")

    async def run() -> None:
        dev = gpuaio.Device(0)
        s = dev.stream()
        start = probe.op_factory(gpuaio, dev, op, 1)
        for _ in range(WARMUP + ops):
            await start(s, 0)
        s.close()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--op", default="h2d-pinned", help="h2d-pinned, d2h-pinned, h2d-pageable, d2h-pageable"
    )
    p.add_argument("--ops", type=int, default=3000)
    p.add_argument("--out", help="keep callgrind's file here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.op, args.ops)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        raise SystemExit("instr_probe needs valgrind (callgrind) and callgrind_annotate")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "callgrind.out")
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            "--op",
            args.op,
            "--ops",
            str(args.ops),
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        text = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", out],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    counts = per_op(text, WARMUP + args.ops)
    if not counts:
        raise SystemExit(
            "no compiled gpuaio function in the profile: is PYTHONPATH a compiled tree?"
        )
    print(f"{args.op}, {args.ops} ops after {WARMUP}: instructions per op, callees included")
    for label, n in counts.items():
        print(f"  {label:14s} {n:9,.0f}")


if __name__ == "__main__":
    main()
