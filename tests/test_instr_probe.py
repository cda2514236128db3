"""``tools/instr_probe.py``: the measured process runs its copies on the
simulator's fake GPU, and the counts are read per op from callgrind's
annotated output (valgrind itself is not needed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.test_overhead_probe import _run_tool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import instr_probe

sys.path.pop(0)

ANNOTATED = """\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
1,958,766,140 (100.0%)  PROGRAM TOTALS

 96,594,422 ( 4.93%)  /tmp/x/__native__compiled.c:CPyPy_transfers___Transfers___copy [/tmp/cb/a.so]
 95,990,264 ( 4.90%)  /tmp/x/__native__compiled.c:CPyDef_transfers___Transfers___copy [/tmp/cb/a.so]
 28,332,043 ( 1.45%)  /tmp/x/__native__compiled.c:CPyDef_describe___describe [/tmp/cb/a.so]
 22,995,645 ( 1.17%)  /tmp/x/__native__compiled.c:CPyDef_describe____from_numpy [/tmp/cb/a.so]
"""


def test_counts_are_each_functions_own_line_per_op() -> None:
    got = instr_probe.per_op(ANNOTATED, 3200)
    # The C function itself, not its Python wrapper (CPyPy_) nor a longer name.
    assert got == {"copy call": pytest.approx(95_990_264 / 3200), "describe": 28_332_043 / 3200}


@pytest.mark.parametrize("op", ["h2d-pinned", "d2h-pageable"])
def test_the_measured_process_runs_its_copies(op: str) -> None:
    _run_tool("instr_probe.py", "--child", "--op", op, "--ops", "20")
