"""pytest plugin: fixtures, markers and checks for async GPU test suites.

Registered through the ``pytest11`` entry point, so installing gpuaio makes it
available; nothing to configure. It works with pytest-asyncio (strict and
auto modes) and with anyio's pytest plugin, on asyncio, uvloop and trio.

It acts only on its own fixtures, markers and options, all named ``gpuaio...``:
a test that uses none of them runs as if gpuaio were not installed, and CUDA
is not touched (no driver initialisation in the pytest process) unless a test
uses them or the run chooses a backend with ``--gpuaio-backend`` (or
``$GPUAIO_TEST_BACKEND``); only then does the report header get a gpuaio line.

Fixtures
--------

``gpuaio_runtime``
    The gpuaio runtime under test: a fresh simulated backend per test on
    ``sim``, one CUDA runtime per session on ``cuda``. When the test ends it
    is checked for leaks (below).
``gpuaio_device``
    Device 0 of that runtime.
``gpuaio_stream``
    A fresh stream on it, closed after the test.
``gpuaio_backend_name``
    ``"sim"`` or ``"cuda"``: the backend the fixtures above use.
``gpuaio_loop_watchdog``
    A :class:`LoopWatchdog`: the ``async def`` test that requests it fails
    if its event loop was blocked longer than ``max_block_ms`` (default
    ``--gpuaio-max-loop-block-ms``, else 20 ms), with the stack of the loop
    thread at the moment it was blocked. Catches blocking calls
    (``time.sleep``, synchronous CUDA calls, big host copies) in your code.

Markers
-------

``@pytest.mark.gpuaio_gpu``
    Skip unless the backend is ``cuda``; the reason says why (no device found
    and the driver's answer, or the backend chosen).
``@pytest.mark.gpuaio_sim_only``
    Skip unless the backend is ``sim`` (fault injection, latches).
``@pytest.mark.gpuaio_sim_config(**fields)``
    :class:`~gpuaio.backends.sim.SimConfig` fields for this test's machine.
``@pytest.mark.gpuaio_backends("sim", "cuda")``
    Run the test once per backend named (``cuda`` skips where there is no GPU).
``@pytest.mark.gpuaio_max_loop_block_ms(ms)``
    Watch the loop of this ``async def`` test with limit ``ms`` (``None``: don't).
``@pytest.mark.gpuaio_no_leak_check(reason=...)``
    Skip the end-of-test leak check for this test.

Options (command line, or the ini key in brackets)
--------------------------------------------------

``--gpuaio-backend=auto|sim|cuda|all`` (``$GPUAIO_TEST_BACKEND``)
    ``auto`` (default): CUDA where a device is present, else simulated;
    ``all`` runs every test that uses the fixtures on both. ``cuda`` where CUDA
    is not usable is a usage error that gives the reason.
``--gpuaio-max-loop-block-ms=MS`` [``gpuaio_max_loop_block_ms``]
    Watch every ``async def`` test's loop with this limit (0: only tests that
    ask for it).
``--gpuaio-leak-check=error|warn|off`` [``gpuaio_leak_check``]
    What a leak found at the end of a test does (default ``error``).
``--gpuaio-pending-grace-ms=MS`` [``gpuaio_pending_grace_ms``]
    How long operations may take to finish after the test (default 100).

The leak check
--------------

When a test that used ``gpuaio_runtime`` ends (after the fixtures that
depend on it are torn down), the plugin fails it at teardown if

* an operation is still pending ``gpuaio_pending_grace_ms`` after the test
  (the test forgot an ``await``; the op may still write its buffers), or
* a staging block of the pinned pool was not handed back, or
* pinned memory allocated or host memory registered during the test is still
  allocated or registered (a ``pinned_empty`` array kept alive by a global,
  a ``register_host`` never undone).

Worked example
--------------

``tests/test_pipeline.py`` of a project using gpuaio. anyio's pytest plugin
(installed with anyio) runs the ``async def`` tests here; with pytest-asyncio,
mark them ``@pytest.mark.asyncio`` instead and drop the ``anyio_backend``
fixture. The plugin's own tests run this example and check each comment::

    import time

    import numpy as np
    import pytest

    import gpuaio

    pytestmark = pytest.mark.anyio          # anyio's plugin runs the tests


    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(request):
        return request.param


    async def test_roundtrip(gpuaio_stream, gpuaio_device, gpuaio_loop_watchdog):
        host = np.arange(1 << 20, dtype=np.float32)
        d = gpuaio_device.empty(host.shape, host.dtype)
        await gpuaio_stream.copy(d, host)
        out = np.empty_like(host)
        await gpuaio_stream.copy(out, d)
        assert (out == host).all()           # runs on sim in CI, on the GPU elsewhere


    async def test_blocking_is_caught(gpuaio_loop_watchdog):
        time.sleep(0.05)                     # fails: "event loop blocked for 50.1 ms ..."


    @pytest.mark.gpuaio_sim_only
    async def test_sticky_fault(gpuaio_stream, gpuaio_device, gpuaio_runtime):
        gpuaio_runtime.backend.inject_fault(0, after_ops=0, code=700)
        with pytest.raises(gpuaio.DeviceFatalError):
            await gpuaio_stream.memset(gpuaio_device.empty(64), 0)


    @pytest.mark.gpuaio_gpu
    async def test_on_the_card(gpuaio_device):
        assert gpuaio_device.backend == "cuda"   # skipped: "needs a CUDA GPU: ..."

``pytest --gpuaio-backend=sim`` runs everything but ``test_on_the_card`` on
the simulated backend; ``pytest --gpuaio-max-loop-block-ms=20`` watches every
async test, not only those that ask for ``gpuaio_loop_watchdog``. A test that
leaves an operation pending (``gpuaio_stream.copy(d, host)`` without
``await``, on a busy stream) errors at teardown with ``gpuaio leak check:
1 operation(s) still pending 100 ms after the test: copy pageable->device ...``.
"""

from __future__ import annotations

import pytest

# pytest takes hooks and fixtures from the plugin object only, this module: the
# submodules' are imported here, and no submodule is registered as a plugin of
# its own, so that each is found, and listed by ``pytest --fixtures``, once.
from ._backend_choice import (
    _BACKENDS,
    _backend_list,
    _choice,
    _explicit,
    _no_gpu_reason,
    _option,
    _source,
)
from ._backend_choice import _cuda_available as _cuda_available
from ._fixtures import _sim_per_session
from ._fixtures import gpuaio_backend_name as gpuaio_backend_name
from ._fixtures import gpuaio_device as gpuaio_device
from ._fixtures import gpuaio_runtime as gpuaio_runtime
from ._fixtures import gpuaio_stream as gpuaio_stream
from ._leakcheck import (
    DEFAULT_PENDING_GRACE_MS,
    PinnedAccounting,
    ResourceBaseline,
    leak_problems,
    pending_operations,
)
from ._watchdog import DEFAULT_MAX_LOOP_BLOCK_MS, LoopBlock, LoopWatchdog
from ._watchdog import gpuaio_loop_watchdog as gpuaio_loop_watchdog
from ._watchdog import pytest_runtest_call as pytest_runtest_call

__all__ = [
    "DEFAULT_MAX_LOOP_BLOCK_MS",
    "LoopBlock",
    "LoopWatchdog",
    "PinnedAccounting",
    "ResourceBaseline",
    "leak_problems",
    "pending_operations",
]


# -- options and markers ---------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``--gpuaio-*`` options and the ``gpuaio_max_loop_block_ms`` ini key."""
    group = parser.getgroup("gpuaio")
    group.addoption(
        "--gpuaio-backend",
        choices=("auto", "sim", "cuda", "all"),
        default=None,
        help="backend for gpuaio fixtures: auto (CUDA if present, else sim), sim, cuda, "
        "or all (every test on both); default $GPUAIO_TEST_BACKEND or auto",
    )
    group.addoption(
        "--gpuaio-max-loop-block-ms",
        type=float,
        default=None,
        help="fail any async test whose event loop was blocked longer than this "
        "(0: only tests using the gpuaio_loop_watchdog fixture or marker)",
    )
    group.addoption(
        "--gpuaio-leak-check",
        choices=("error", "warn", "off"),
        default=None,
        help="what a pending op or leaked pinned memory at the end of a test does",
    )
    group.addoption(
        "--gpuaio-pending-grace-ms",
        type=float,
        default=None,
        help="how long ops may take to finish after a test before they count as leaked",
    )
    group.addoption(
        "--gpuaio-sim-runtime",
        choices=("test", "session"),
        default=None,
        help="simulated runtimes: a fresh one per test (default), or one for the session "
        "as on CUDA, so state one test leaves in the runtime shows in the next; "
        "default $GPUAIO_TEST_SIM_RUNTIME or test",
    )
    parser.addini(
        "gpuaio_max_loop_block_ms",
        "watch every async test's event loop with this limit in ms (0 or empty: off)",
        default="",
    )
    parser.addini("gpuaio_leak_check", "error, warn or off", default="error")
    parser.addini(
        "gpuaio_pending_grace_ms",
        "ms that ops may take to finish after a test",
        default=str(DEFAULT_PENDING_GRACE_MS),
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register gpuaio's markers; refuse ``--gpuaio-backend=cuda`` where CUDA is unusable.

    Nothing else happens here: the plugin loads wherever gpuaio is installed,
    so it touches CUDA only when the run asked for gpuaio (a gpuaio option,
    or a test that uses a gpuaio fixture or marker).
    """
    for line in (
        "gpuaio_gpu: needs a real CUDA device under gpuaio's fixtures (skipped elsewhere, "
        "with the reason)",
        "gpuaio_sim_only: needs gpuaio's simulated backend",
        "gpuaio_sim_config(**kwargs): SimConfig fields for this test's simulated machine",
        "gpuaio_backends(*names): run the test on each named gpuaio backend (sim, cuda)",
        "gpuaio_max_loop_block_ms(ms): fail the async test if its event loop was blocked "
        "longer than ms (None: don't watch)",
        "gpuaio_no_leak_check(reason=None): skip gpuaio's end-of-test leak check",
    ):
        config.addinivalue_line("markers", line)
    if _explicit(config) and _option(config) == "cuda" and not _cuda_available():
        # As GPUAIO_BACKEND=cuda does for the library: asking for CUDA where
        # there is none is a mistake to report, not a reason to skip every test.
        raise pytest.UsageError(
            f"{_source(config)}=cuda, but CUDA is not usable here: {_no_gpu_reason()}"
        )
    _sim_per_session(config)  # a bad choice is a usage error now, not one per test


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say which backend the tests run on, and why; only when the run chose a gpuaio backend.

    A run that did not choose one (``--gpuaio-backend`` or ``$GPUAIO_TEST_BACKEND``)
    gets no line, and CUDA is not probed for it: probing initialises the driver in
    the pytest process, which a project that forks CUDA workers cannot afford.
    """
    if not _explicit(config):
        return None
    choice = _option(config)
    names = _backend_list(config)
    if choice in ("auto", "all") or "cuda" in names:
        gpu = "a CUDA GPU is present" if _cuda_available() else _no_gpu_reason()
    else:
        gpu = "CUDA not probed"
    return f"gpuaio: backend {'+'.join(names)} ({_source(config)}={choice}); {gpu}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``gpuaio_backend_name`` over the backends chosen by ``--gpuaio-backend``."""
    if "gpuaio_backend_name" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "gpuaio_backend_name" in names:
            return  # the test chose its backends itself
    marker = metafunc.definition.get_closest_marker("gpuaio_backends")
    if marker is not None:
        backends = [str(b) for b in marker.args] or list(_BACKENDS)
        bad = [b for b in backends if b not in _BACKENDS]
        if bad:
            raise pytest.UsageError(f"gpuaio_backends: unknown backend(s) {bad}; use sim, cuda")
    elif _option(metafunc.config) == "all":
        backends = list(_BACKENDS)
    else:
        return
    metafunc.parametrize("gpuaio_backend_name", backends, indirect=True, ids=backends)


def _item_backend(item: pytest.Item, default: str) -> str:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "gpuaio_backend_name" in callspec.params:
        return str(callspec.params["gpuaio_backend_name"])
    return default


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpuaio_gpu`` and ``gpuaio_sim_only`` tests that cannot run here, saying why.

    Only gpuaio's own markers and tests parametrized over gpuaio backends are
    looked at; other tests (a plain ``gpu`` marker of another project, say) are
    left alone, and no backend is chosen (no CUDA probe) unless one is needed.
    """
    choice = _option(config)
    default: str | None = None
    for item in items:
        parametrized = _item_backend(item, "") != ""
        wants_gpu = item.get_closest_marker("gpuaio_gpu") is not None
        wants_sim = item.get_closest_marker("gpuaio_sim_only") is not None
        if not (wants_gpu or wants_sim or parametrized):
            continue
        if default is None:
            default = _choice(config)
        backend = _item_backend(item, default)
        chosen_by_auto = not parametrized and choice in ("auto", "all")
        if (backend == "cuda" and (wants_gpu or parametrized) and not _cuda_available()) or (
            wants_gpu and backend != "cuda" and chosen_by_auto
        ):
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU: {_no_gpu_reason()}"))
        elif wants_gpu and backend != "cuda":
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs a CUDA GPU: the gpuaio backend is {backend!r} "
                    f"({_source(config)}={choice}); run with --gpuaio-backend=cuda "
                    "on a machine with one"
                )
            )
        if wants_sim and backend != "sim":
            item.add_marker(
                pytest.mark.skip(
                    reason="uses gpuaio's simulated backend (fault injection, latches): "
                    f"the backend is {backend!r}"
                )
            )
