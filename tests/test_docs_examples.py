"""Every ```python block of README.md and docs/*.md runs, on the simulated backend.

How a page's blocks run (the conventions a docs writer follows):

* The blocks of one page run **in order, in one namespace, in one process**
  (``GPUAIO_BACKEND=sim``, a fresh temporary directory as the working
  directory), as if typed into one session: a block may use the names an
  earlier block of the same page defined (``dev``, ``s``, ``d``...). Pages do
  not share anything.
* A block may use ``await``, ``async with`` and ``async for`` at top level:
  it is then run as the body of a coroutine on the page's asyncio event loop,
  as if it were the inside of an ``async def``.
* HTML comments directly above a block's opening fence (blank lines between
  them allowed) are instructions to this runner; the site and GitHub do not
  show them:

  - ``<!-- requires: cupy, torch -->``: run only where every module named can
    be imported; otherwise the block is skipped, with that reason. The name
    ``gpu`` stands for a CUDA GPU: this runner uses the simulated backend, so
    a block that needs one (a CuPy kernel, a torch CUDA tensor) is skipped.
  - ``<!-- not run: REASON -->``: never run (keep these rare: say why).
  - ``<!-- setup: CODE -->`` (the comment may span lines): CODE runs just
    before the block, in the page's namespace. It defines what the prose
    around the block takes as given (a large array, a kernel's grid...).
  - ``<!-- run as: pytest -->``: the block is a test module. It is written
    to ``test_example.py`` in its own temporary directory and run with
    ``python -m pytest --gpuaio-backend=sim`` there; every test must pass or
    be skipped.

Each page gets one subprocess (60 s at most); each block is reported as its
own test, ``test_docs_example[quickstart.md:88]``, so a failure names the file
and line of the block, and tracebacks point into the Markdown file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_TIMEOUT_S = 60.0

# Pages whose blocks are known not to run yet, with why; remove an entry once
# its page is fixed (the failures are reported as xfail, not hidden).
KNOWN_BROKEN: dict[str, str] = {}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
_COMMENT = re.compile(r"<!--(.*?)-->", re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    code: str
    setup: str = ""
    requires: tuple[str, ...] = ()
    not_run: str = ""
    as_pytest: bool = False

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def _directives(lines: list[str], fence_index: int) -> list[str]:
    """The HTML comments that directly precede the fence at ``fence_index``."""
    text = "\n".join(lines[:fence_index]).rstrip()
    found: list[str] = []
    while text.endswith("-->"):
        start = text.rfind("<!--")
        if start < 0:
            break
        found.append(text[start + 4 : -3].strip())
        text = text[:start].rstrip()
    return found[::-1]


def extract(page: Path) -> list[Block]:
    """The ```python blocks of ``page`` with their directives."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        lang = m["info"].strip().split(" ")[0].lstrip("{.").rstrip("}")
        if lang == "python":
            code = "\n".join(line[indent:] for line in lines[i + 1 : j])
            kw: dict[str, Any] = {}
            for d in _directives(lines, i):
                key, _, value = d.partition(":")
                key, value = key.strip(), value.strip()
                if key == "requires":
                    kw["requires"] = tuple(v.strip() for v in value.split(",") if v.strip())
                elif key == "not run":
                    assert value, f"{page.name}:{i + 1}: 'not run' needs a reason"
                    kw["not_run"] = value
                elif key == "setup":
                    kw["setup"] = textwrap.dedent(value)
                elif key == "run as" and value == "pytest":
                    kw["as_pytest"] = True
                else:
                    raise AssertionError(f"{page.name}:{i + 1}: unknown directive {d!r}")
            blocks.append(Block(page, i + 2, code, **kw))
        i = j + 1
    return blocks


BLOCKS = [b for page in PAGES for b in extract(page)]


def _missing(modules: tuple[str, ...]) -> list[str]:
    out = []
    for name in modules:
        if name == "gpu":
            out.append("a CUDA GPU (the examples run on the simulated backend)")
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


# The driver run in each page's subprocess: reads the blocks as JSON on stdin,
# runs them in order in one namespace, prints one JSON line per block.
_DRIVER = r"""
import ast, asyncio, faulthandler, json, os, subprocess, sys, traceback, types

# A hang shows where it is: every thread's stack, shortly before the timeout.
faulthandler.dump_traceback_later(float(sys.argv[1]), exit=False)
blocks = json.load(sys.stdin)
ns = {"__name__": "__main__"}
loop = None
FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT

def run(src, filename, first_line):
    global loop
    code = compile("\n" * (first_line - 1) + src, filename, "exec", flags=FLAGS)
    if code.co_flags & 0x80:  # CO_COROUTINE: the block awaits at top level
        if loop is None:
            loop = asyncio.new_event_loop()
        loop.run_until_complete(types.FunctionType(code, ns)())
    else:
        exec(code, ns)

for b in blocks:
    try:
        if b["as_pytest"]:
            with open(b["dir"] + "/test_example.py", "w") as f:
                f.write(b["code"])
            p = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "--gpuaio-backend=sim", "-rs", "test_example.py"],
                cwd=b["dir"], capture_output=True, text=True,
            )
            if p.returncode != 0:
                raise AssertionError("pytest failed:\n" + p.stdout[-4000:] + p.stderr[-2000:])
        else:
            if b["setup"]:
                run(b["setup"], b["page"] + " (setup comment)", b["line"])
            run(b["code"], b["page"], b["line"])
        print(json.dumps({"line": b["line"], "ok": True}), flush=True)
    except BaseException:
        print(json.dumps({"line": b["line"], "ok": False, "error": traceback.format_exc()}),
              flush=True)
"""

_results: dict[Path, dict[int, dict[str, Any]]] = {}


def _run_page(page: Path) -> dict[int, dict[str, Any]]:
    """Run the runnable blocks of ``page`` (once per session) and map line -> result."""
    if page in _results:
        return _results[page]
    todo = [b for b in BLOCKS if b.page == page and not b.not_run and not _missing(b.requires)]
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpuaio-docs-") as tmp:
        payload = []
        for b in todo:
            bdir = tempfile.mkdtemp(dir=tmp) if b.as_pytest else tmp
            payload.append(
                {
                    "page": str(page),
                    "line": b.line,
                    "code": b.code,
                    "setup": b.setup,
                    "as_pytest": b.as_pytest,
                    "dir": bdir,
                }
            )
        env = dict(os.environ)
        env.pop("GPUAIO_TEST_BACKEND", None)
        env["GPUAIO_BACKEND"] = "sim"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _DRIVER, str(PAGE_TIMEOUT_S - 5)],
                input=json.dumps(payload),
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=PAGE_TIMEOUT_S,
            )
            out, err = proc.stdout, proc.stderr
            timed_out = False
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            err = f"the page's blocks ran past {PAGE_TIMEOUT_S:.0f} s:\n{stderr[-6000:]}"
            timed_out = True
    for line in out.splitlines():
        if line.startswith('{"line"'):
            r = json.loads(line)
            results[r["line"]] = r
    if todo and timed_out and all(b.line in results for b in todo):
        # Every block ran, but the process did not exit: blame the last one.
        results[todo[-1].line] = {"ok": False, "error": f"the process did not exit: {err}"}
    first_failure = min((ln for ln, r in results.items() if not r["ok"]), default=None)
    for b in todo:
        r = results.setdefault(b.line, {"ok": False, "error": f"not reached:\n{out}\n{err}"})
        if not r["ok"] and first_failure is not None and b.line > first_failure:
            r["error"] += f"\n(an earlier block of this page failed, at line {first_failure})"
    _results[page] = results
    return results


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_docs_example(block: Block) -> None:
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    missing = _missing(block.requires)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: not available")
    result = _run_page(block.page)[block.line]
    if not result["ok"] and block.page.name in KNOWN_BROKEN:
        pytest.xfail(f"{KNOWN_BROKEN[block.page.name]}:\n{result['error']}")
    if not result["ok"]:
        pytest.fail(f"{block.id}:\n{result['error']}", pytrace=False)


def test_the_runner_found_the_docs() -> None:
    """A guard against a parser change that silently finds no blocks."""
    pages = {b.page.name for b in BLOCKS}
    assert {"README.md", "quickstart.md", "interop.md", "testing.md"} <= pages
    assert len(BLOCKS) >= 30
