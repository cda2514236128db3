"""nox sessions: ``nox`` runs tests, lint, typecheck and docs (what CI runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "compiled", "lint", "typecheck", "docs"]

# Tools pinned: a new release must not break CI on its own (bump them on purpose).
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
PYRIGHT = "pyright[nodejs]==1.1.414"

nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on the simulated backend, on asyncio, uvloop and trio.

    With the ``ray`` extra, so that the Ray Serve and Ray Data examples
    (tests/test_ray.py) and the service example run too.
    """
    session.install("-e", ".[test,ray]")
    _pytest(session)


GATED_TESTS = (
    "tests/test_gated.py",
    "tests/test_direct_upload.py",
    "tests/test_staged_alignment.py",
    "tests/test_early_download.py",
    "tests/test_staging.py",
    "tests/test_copy.py",
    "tests/test_ordering.py",
    "tests/test_stream_order.py",
    "tests/test_order_property.py",
    "tests/test_reliability.py",
    "tests/test_trace.py",
    "tests/test_first_poll.py",
    "tests/test_marker_batches.py",
    "tests/test_deferred_memsets.py",
    "tests/test_completion.py",
    "tests/test_prewake.py",
    "tests/test_overhead_paths.py",
)
"""What the compiled session runs again with gated copies on from 512 KiB to
16 MiB both ways and direct uploads up to 256 KiB, one simulated runtime for
the session as on CUDA (the gated path is primed once, and what one test
leaves in it shows in the next: the pool's cached blocks, the completion
watcher's sleep; on CUDA two such leaks failed tests of another file, run IA
and IB of issue 13)."""


def _pytest(session: nox.Session, **env: str) -> None:
    """The suite, on ``GPUAIO_TEST_BACKEND`` (default: the simulated backend)."""
    backend = session.env.get("GPUAIO_TEST_BACKEND", "sim")
    run = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)
    session.run(*run, env={"GPUAIO_TEST_BACKEND": backend, **env})


@nox.session
def compiled(session: nox.Session) -> None:
    """The test suite again, with the hot path compiled by mypyc (``hatch_build.py``).

    In a copy of the tree, compiled in place: the modules must not land in
    this tree, where every other session would import them. Tests that patch
    a compiled module are skipped (``patches_compiled``); the ``tests``
    session runs them.
    """
    session.install("-e", ".[test]", MYPY, "setuptools>=70")
    root = Path(__file__).parent
    tree = Path(session.create_tmp()) / "compiled"
    shutil.rmtree(tree, ignore_errors=True)
    for part in ("gpuaio", "tests", "docs", "examples", "benchmarks", "tools"):
        shutil.copytree(root / part, tree / part, ignore=shutil.ignore_patterns("*.so"))
    for name in ("pyproject.toml", "hatch_build.py", "README.md", "mkdocs.yml"):
        shutil.copy2(root / name, tree / name)
    session.run("python", str(tree / "hatch_build.py"), str(tree))
    session.chdir(tree)  # ``python -m pytest`` imports gpuaio from here
    _pytest(session, GPUAIO_EXPECT_COMPILED="1")
    if not session.posargs:
        # Gated copies (gpuaio._engine.gated) are on by default for uploads of
        # 2-8 MiB and downloads of 2-16 MiB, and direct uploads
        # (stagingconfig.DIRECT_UP_MAX) up to 64 KiB: the ordering, staging,
        # copy and trace tests again with both on over wider ranges.
        session.run(
            "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
            *GATED_TESTS,
            env={
                "GPUAIO_TEST_BACKEND": session.env.get("GPUAIO_TEST_BACKEND", "sim"),
                "GPUAIO_EXPECT_COMPILED": "1",
                "GPUAIO_GATED_MIN": "512K",
                "GPUAIO_GATED_MAX": "16M",
                "GPUAIO_DIRECT_UP_MAX": "256K",
                "GPUAIO_TEST_SIM_RUNTIME": "session",
            },
        )  # fmt: skip


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package; pyright --verifytypes over the public API.

    The package is installed as a wheel, not editable: pyright cannot follow
    an editable install's import hook and would see no package at all.
    """
    session.install(".[test]", MYPY, PYRIGHT)
    session.run("mypy")
    # The public types as a user's editor sees them (tests/typing is never run).
    session.run("pyright", "tests/typing", env={"PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"})
    session.run(
        "pyright",
        "--verifytypes",
        "gpuaio",
        "--ignoreexternal",
        env={"PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings are errors."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Say how to run the benchmarks (they need a CUDA GPU)."""
    session.log(
        "Benchmarks need a CUDA GPU: on such a machine run "
        "`python benchmarks/transfers.py` and `python benchmarks/completion.py`; "
        "each writes benchmarks/results/<date>-<card>-<suite>.json. "
        "`python -m gpuaio bench` gives a quick figure on any machine."
    )
