"""Opt-in build hook: compile gpuaio's per-operation hot path with mypyc.

An awaited 4 KiB copy spends most of its time in gpuaio's own Python, spread
over a few dozen functions (issue 13: about 12 us over a hand-written
awaitable on an H200 host, against a 10 us floor). Compiling the modules
that every operation runs through, unchanged, cuts that without a second
implementation to keep in step: the same source is the pure-Python
fallback, which stays the default and which the whole test suite runs.

Enabled by hatch's switch for hooks that are off by default::

    HATCH_BUILD_HOOKS_ENABLE=1 pip install .

It needs a C compiler and the Python headers; the build environment gets
mypy and setuptools from the ``dependencies`` of this hook in
``pyproject.toml``. ``python -m gpuaio info`` says which modules are compiled.
``python hatch_build.py DIR`` compiles in place in the copy of the source
tree at ``DIR`` (``noxfile.py``'s ``compiled`` session runs the suite there).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

COMPILED = (
    "gpuaio/_core/operation.py",
    "gpuaio/_api/describe.py",
    "gpuaio/_engine/completion/_engine.py",
    "gpuaio/_engine/completion/_events.py",
    "gpuaio/_engine/completion/_queue.py",
    "gpuaio/_engine/completion/_firstpoll.py",
    "gpuaio/_engine/sequencer.py",
    "gpuaio/_api/transfers.py",
    "gpuaio/_engine/staging.py",
    "gpuaio/_engine/lent.py",
    "gpuaio/_engine/early.py",
)
"""The modules compiled: what every awaited operation runs through, and that
nothing (tests included) patches or subclasses from outside. Keep in step
with ``gpuaio._core.compiled.MODULES``."""

NATIVE = (
    ("gpuaio._engine._copythreads", "gpuaio/_engine/_copythreads.c"),
    ("gpuaio.backends.cuda._fastcalls", "gpuaio/backends/cuda/_fastcalls.c"),
    ("gpuaio._api._address", "gpuaio/_api/_address.c"),
)
"""C, built beside the compiled modules on POSIX platforms: the copy threads
that never take the GIL (``gpuaio._engine.nativecopy``, pthreads), the
hot path's driver calls (``gpuaio.backends.cuda._fast``), and a host array's
address through the buffer protocol (``gpuaio._api.describe``)."""

# The type check mypyc bases its code on. The source is checked strictly in
# CI (mypy --strict, pyright); here stubs of whatever the build environment
# holds (numpy of another version, torch with its own stubs, or nothing) must
# not stop a build, and third-party packages are types of their own, not
# followed (following torch's took minutes).
_MYPY_CONFIG = """\
[mypy]
ignore_missing_imports = True
ignore_errors = True
warn_unused_configs = False

[mypy-cuda.*,cupy.*,torch.*,numba.*,trio.*,uvloop.*,tqdm.*,nvtx.*,anyio.*,sniffio.*]
follow_imports = skip
"""


def compile_in_place(root: Path, work: Path) -> list[Path]:
    """Compile :data:`COMPILED` under ``root``; the extension modules land next
    to their sources. Returns their paths. ``work`` holds the C sources and
    objects."""
    from mypyc.build import mypycify  # only here: a pure build needs no mypy
    from setuptools import Distribution

    config = work / "mypy.ini"
    config.write_text(_MYPY_CONFIG)
    cwd = Path.cwd()
    os.chdir(root)  # mypyc names modules by their paths from here
    try:
        extensions = mypycify(
            ["--config-file", str(config), *COMPILED],
            opt_level="3",
            target_dir=str(work / "c"),
            # The shared part, inside the package: gpuaio/_compiled__mypyc.
            group_name="gpuaio._compiled",
        )
        if os.name == "posix":
            from setuptools import Extension

            for name, source in NATIVE:
                extensions.append(Extension(name, [source], extra_compile_args=["-O2"]))
        dist = Distribution({"name": "gpuaio", "ext_modules": extensions})
        build = dist.get_command_obj("build_ext")
        build.build_temp = str(work / "obj")
        build.inplace = True
        build.ensure_finalized()
        build.run()
        return [root / build.get_ext_filename(ext.name) for ext in extensions]
    finally:
        os.chdir(cwd)


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script (compile_in_place), not as a hook
    pass
else:

    class CompileHook(BuildHookInterface):
        """Adds the compiled modules to a wheel (not to an editable install)."""

        def initialize(self, version: str, build_data: dict[str, Any]) -> None:
            if self.target_name != "wheel" or version == "editable":
                return
            root = Path(self.root)
            work = Path(tempfile.mkdtemp(prefix="gpuaio-mypyc-"))
            # A copy: the in-place build must not leave modules in the
            # source tree, where a later pure build would pick them up.
            tree = work / "src"
            shutil.copytree(root / "gpuaio", tree / "gpuaio")
            for built in compile_in_place(tree, work):
                build_data["force_include"][str(built)] = str(built.relative_to(tree))
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    def get_build_hook() -> type[BuildHookInterface]:
        return CompileHook


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    for path in compile_in_place(target, Path(tempfile.mkdtemp(prefix="gpuaio-mypyc-"))):
        print(path)
