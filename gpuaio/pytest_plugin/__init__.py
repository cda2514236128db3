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

import contextlib
import functools
import gc
import inspect
import os
import sys
import threading
import time
import traceback
import types
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

if TYPE_CHECKING:
    from .._device import Device
    from .._runtime import Runtime
    from .._stream import Stream

__all__ = [
    "DEFAULT_MAX_LOOP_BLOCK_MS",
    "LoopBlock",
    "LoopWatchdog",
    "PinnedAccounting",
    "ResourceBaseline",
    "leak_problems",
    "pending_operations",
]

DEFAULT_MAX_LOOP_BLOCK_MS = 20.0
"""The loop watchdog's limit when neither an option nor a marker sets one."""
DEFAULT_PENDING_GRACE_MS = 100.0

_BACKENDS = ("sim", "cuda")
_session_runtime: Runtime | None = None


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


def _explicit(config: pytest.Config) -> bool:
    """Whether the run chose a gpuaio backend (option or environment)."""
    return bool(
        config.getoption("--gpuaio-backend", default=None) or os.environ.get("GPUAIO_TEST_BACKEND")
    )


def _source(config: pytest.Config) -> str:
    """Where the backend choice came from, as the user wrote it."""
    if os.environ.get("GPUAIO_TEST_BACKEND") and not config.getoption("--gpuaio-backend"):
        return "GPUAIO_TEST_BACKEND"
    return "--gpuaio-backend"


def _option(config: pytest.Config) -> str:
    opt = config.getoption("--gpuaio-backend", default=None)
    return str(opt or os.environ.get("GPUAIO_TEST_BACKEND") or "auto").lower()


def _choice(config: pytest.Config) -> str:
    """The single backend used by tests that are not parametrized over backends."""
    choice = _option(config)
    if choice in ("auto", "all"):
        return "cuda" if _cuda_available() else "sim"
    if choice not in _BACKENDS:
        raise pytest.UsageError(f"GPUAIO_TEST_BACKEND must be auto, sim, cuda or all: {choice!r}")
    return choice


def _backend_list(config: pytest.Config) -> list[str]:
    return list(_BACKENDS) if _option(config) == "all" else [_choice(config)]


_cuda_cache: bool | None = None
_cuda_reason = ""


def _cuda_available() -> bool:
    global _cuda_cache, _cuda_reason
    if _cuda_cache is None:
        try:
            from ..backends.cuda import CudaBackend

            CudaBackend().close()
            _cuda_cache = True
        except Exception as exc:
            _cuda_cache = False
            _cuda_reason = f"{type(exc).__name__}: {exc}"
    return _cuda_cache


def _no_gpu_reason() -> str:
    return f"no CUDA GPU found ({_cuda_reason or 'unknown reason'})"


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


# -- runtime, device and stream fixtures -----------------------------------


@pytest.fixture
def gpuaio_backend_name(request: pytest.FixtureRequest) -> str:
    """``"sim"`` or ``"cuda"``: the backend the gpuaio fixtures use."""
    param = getattr(request, "param", None)
    if param is not None:
        return str(param)
    return _choice(request.config)


@pytest.fixture
def gpuaio_runtime(request: pytest.FixtureRequest, gpuaio_backend_name: str) -> Iterator[Runtime]:
    """A runtime on the chosen backend (fresh per test when simulated), leak-checked."""
    from .._runtime import _drop_current, use_backend

    global _session_runtime
    if gpuaio_backend_name == "sim":
        from ..backends.sim import SimBackend, SimConfig

        marker = request.node.get_closest_marker("gpuaio_sim_config")
        kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
        rt = use_backend(SimBackend(SimConfig(**kwargs)))
        _session_runtime = None
        fresh = True
    else:
        if not _cuda_available():
            pytest.skip(f"needs a CUDA GPU: {_no_gpu_reason()}")
        if _session_runtime is None or _session_runtime.closed:
            _session_runtime = use_backend("cuda")
        rt = _session_runtime
        fresh = False
    PinnedAccounting.install(rt)
    baseline = ResourceBaseline.take(rt)
    problems: list[str] = []
    try:
        yield rt
    finally:
        mode = _leak_mode(request)
        if mode != "off" and not rt.closed:
            problems = leak_problems(rt, baseline, grace_s=_pending_grace_s(request.config))
        if fresh:
            if not rt.closed and pending_operations(rt)[0]:
                # Work that never ends (a latch never released) would keep
                # Runtime.close() waiting for its pinned blocks: stop the
                # simulated device first, which drops it.
                rt.backend.close()
            rt.close()
            _drop_current(rt)
    if problems:
        msg = "gpuaio leak check: " + "; ".join(problems)
        if mode == "error":
            pytest.fail(msg, pytrace=False)
        warnings.warn(msg, pytest.PytestWarning, stacklevel=1)


@pytest.fixture
def gpuaio_device(gpuaio_runtime: Runtime) -> Device:
    """Device 0 of :func:`gpuaio_runtime`."""
    return gpuaio_runtime.device(0)


@pytest.fixture
def gpuaio_stream(gpuaio_device: Device) -> Iterator[Stream]:
    """A fresh stream on :func:`gpuaio_device`, closed after the test."""
    s = gpuaio_device.stream()
    yield s
    s.close()


# -- leak check ------------------------------------------------------------


def _leak_mode(request: pytest.FixtureRequest) -> str:
    if request.node.get_closest_marker("gpuaio_no_leak_check") is not None:
        return "off"
    opt = request.config.getoption("--gpuaio-leak-check", default=None)
    mode = str(opt or request.config.getini("gpuaio_leak_check") or "error").strip().lower()
    if mode not in ("error", "warn", "off"):
        raise pytest.UsageError(f"gpuaio_leak_check must be error, warn or off, not {mode!r}")
    return mode


def _pending_grace_s(config: pytest.Config) -> float:
    opt = config.getoption("--gpuaio-pending-grace-ms", default=None)
    raw = opt if opt is not None else config.getini("gpuaio_pending_grace_ms")
    try:
        return max(0.0, float(raw)) / 1000.0
    except (TypeError, ValueError):
        raise pytest.UsageError(f"gpuaio_pending_grace_ms must be a number, not {raw!r}") from None


class PinnedAccounting:
    """Counts the pinned and registered host bytes a backend holds.

    Installed on a runtime's backend by wrapping its ``host_alloc``/``host_free``
    and ``host_register``/``host_unregister``. An allocation made for a user
    (:func:`gpuaio.pinned_empty` and other gpuaio allocations) is told apart
    from gpuaio's own (the staging pool, a completion engine's flag slab) by
    whether ``gpuaio/_memory.py`` asked for it.
    """

    _by_backend: ClassVar[weakref.WeakKeyDictionary[Any, PinnedAccounting]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pinned: dict[int, tuple[int, bool]] = {}
        """Live ``host_alloc`` blocks: address -> (bytes, made for a user)."""
        self.registered: dict[int, int] = {}
        """Live ``host_register`` ranges: address -> bytes."""
        self.allocs = 0
        self.frees = 0

    @property
    def pinned_bytes(self) -> int:
        """Every live pinned byte, gpuaio's own included."""
        with self._lock:
            return sum(n for n, _user in self.pinned.values())

    @property
    def user_pinned_bytes(self) -> int:
        """Live pinned bytes allocated for users (not the pool's, not engines')."""
        with self._lock:
            return sum(n for n, user in self.pinned.values() if user)

    @property
    def registered_bytes(self) -> int:
        with self._lock:
            return sum(self.registered.values())

    @classmethod
    def of(cls, runtime: Runtime) -> PinnedAccounting | None:
        """The accounting installed on ``runtime``'s backend, if any."""
        return cls._by_backend.get(runtime.backend)

    @classmethod
    def install(cls, runtime: Runtime) -> PinnedAccounting:
        """Count ``runtime.backend``'s pinned memory from now on (idempotent)."""
        backend = runtime.backend
        acct = cls._by_backend.get(backend)
        if acct is not None:
            return acct
        acct = cls()
        alloc, free = backend.host_alloc, backend.host_free
        register, unregister = backend.host_register, backend.host_unregister

        def host_alloc(nbytes: int) -> int:
            ptr = alloc(nbytes)
            user = _called_from(_MEMORY_MODULE)
            with acct._lock:
                acct.pinned[ptr] = (nbytes, user)
                acct.allocs += 1
            return ptr

        def host_free(ptr: int) -> None:
            free(ptr)
            with acct._lock:
                if acct.pinned.pop(ptr, None) is not None:
                    acct.frees += 1

        def host_register(ptr: int, nbytes: int) -> None:
            register(ptr, nbytes)
            with acct._lock:
                acct.registered[ptr] = nbytes

        def host_unregister(ptr: int) -> None:
            unregister(ptr)
            with acct._lock:
                acct.registered.pop(ptr, None)

        for name, fn in (
            ("host_alloc", host_alloc),
            ("host_free", host_free),
            ("host_register", host_register),
            ("host_unregister", host_unregister),
        ):
            setattr(backend, name, fn)
        cls._by_backend[backend] = acct
        return acct


_MEMORY_MODULE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_memory.py"
)


def _called_from(filename: str, depth: int = 6) -> bool:
    """Whether one of the ``depth`` callers above the wrapper runs code of ``filename``."""
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_filename == filename:
            return True
        frame = frame.f_back
    return False


def _pool_stats(runtime: Runtime) -> tuple[int, int]:
    """(reserved, in_use) bytes of the runtime's staging pool, reclaiming fired blocks."""
    stager = runtime.extras.get("stager")
    if stager is None:
        return 0, 0
    stats = stager.pool.stats()  # reclaims blocks whose GPU work has finished
    return stats.reserved, stats.in_use


@dataclass(frozen=True, slots=True)
class ResourceBaseline:
    """Pinned bytes held outside the staging pool, and registered bytes, at a moment."""

    user_pinned: int
    registered: int

    @classmethod
    def take(cls, runtime: Runtime) -> ResourceBaseline:
        """What ``runtime`` holds now: pinned bytes, pending ops and registrations."""
        acct = PinnedAccounting.of(runtime)
        if acct is None:
            return cls(0, 0)
        return cls(acct.user_pinned_bytes, acct.registered_bytes)


def pending_operations(runtime: Runtime) -> tuple[int, list[str]]:
    """Operations of ``runtime`` not yet complete: (count, labels of those known).

    Counts ops waiting for their completion marker and, on the simulated
    backend, stream work still queued (latches included).
    """
    count = 0
    labels: list[str] = []
    for eng in list(getattr(runtime, "_engines", {}).values()):
        n = eng.pending()
        count += n
        if not n:
            continue
        # Labels are diagnostics only: read the engines' tables without their
        # locks, and give up quietly if a strategy keeps them differently.
        with contextlib.suppress(RuntimeError, AttributeError, TypeError, ValueError):
            queues = getattr(eng, "_queues", None)
            if queues is not None:
                for q in list(queues.values()):
                    labels.extend(op.label for op, _ev in list(getattr(q, "entries", q)))
            else:
                labels.extend(op.label for op in list(eng._pending))
    if not count:
        count += _sim_backlog(runtime.backend)
    return count, labels


def _sim_backlog(backend: Any) -> int:
    """Work queued and not retired on the simulated backend's streams."""
    lock = getattr(backend, "_lock", None)
    devices = getattr(backend, "_devices", None)
    if lock is None or devices is None or getattr(backend, "_closed", True):
        return 0
    with lock:
        return sum(max(0, s.submitted - s.retired) for d in devices for s in list(d.streams))


def _any_device_faulted(runtime: Runtime) -> bool:
    """Whether a device of ``runtime`` has had a sticky (context-fatal) error."""
    from .._errors import DeviceFatalError

    backend = runtime.backend
    for ordinal in list(getattr(runtime, "_devices", {})):
        try:
            backend.event_destroy(backend.event_create(ordinal))
        except DeviceFatalError:
            return True
        except Exception:  # a closed backend and the like: not a fault
            continue
    return False


def _flush_reaper(runtime: Runtime, timeout: float = 2.0) -> None:
    done = threading.Event()
    runtime.reaper.submit(done.set)
    done.wait(timeout)


def leak_problems(
    runtime: Runtime, baseline: ResourceBaseline | None = None, *, grace_s: float = 0.1
) -> list[str]:
    """What ``runtime`` still holds that a finished test should have released.

    Waits up to ``grace_s`` for pending operations. Returns one sentence per
    problem (empty: clean). ``baseline`` is from :meth:`ResourceBaseline.take`
    at the start of the test (default: nothing held).
    """
    baseline = baseline or ResourceBaseline(0, 0)
    problems: list[str] = []
    deadline = time.monotonic() + grace_s
    count, labels = pending_operations(runtime)
    while count and time.monotonic() < deadline:
        time.sleep(0.002)
        count, labels = pending_operations(runtime)
    if count:
        shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
        what = f": {shown}" if shown else " (queued stream work)"
        problems.append(
            f"{count} operation(s) still pending {grace_s * 1e3:.0f} ms after the test{what}; "
            "await every operation (or gpuaio.wait_all) before the test ends"
        )
    _reserved, in_use = _pool_stats(runtime)
    # A host step hands its staging blocks back just after its op resolves
    # (an aborted or abandoned transfer's step may still be copying): wait.
    deadline = time.monotonic() + grace_s
    while in_use and not count and time.monotonic() < deadline:
        time.sleep(0.002)
        _reserved, in_use = _pool_stats(runtime)
    if in_use and not count and not _any_device_faulted(runtime):
        # (After a sticky fault, blocks guarded by the dead device's events stay
        # out of the pool: that is the fault's doing, not the test's.)
        problems.append(f"{in_use} bytes of the pinned staging pool were not handed back")
    acct = PinnedAccounting.of(runtime)
    if acct is None:
        return problems

    def excess() -> tuple[int, int]:
        return (
            acct.user_pinned_bytes - baseline.user_pinned,
            acct.registered_bytes - baseline.registered,
        )

    pinned, registered = excess()
    # An op's buffers are let go just after it leaves the engine's queue (its
    # done-callbacks run after the count above dropped), and their frees go
    # through the reaper: collect, flush and look again, up to the grace.
    deadline = time.monotonic() + grace_s
    while pinned > 0 or registered > 0:
        gc.collect()
        _flush_reaper(runtime)
        pinned, registered = excess()
        if time.monotonic() >= deadline:
            break
        if pinned > 0 or registered > 0:
            time.sleep(0.005)
    if pinned > 0:
        problems.append(
            f"{pinned} bytes of pinned memory allocated during the test are still allocated "
            "(a pinned_empty array kept alive after the test?)"
        )
    if registered > 0:
        problems.append(
            f"{registered} bytes of host memory registered during the test are still "
            "registered (register_host without unregister?)"
        )
    return problems


# -- event-loop watchdog ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoopBlock:
    """One time the event loop did not run for ``duration_s``."""

    duration_s: float
    stack: str
    """Where the loop thread was, ``max_block_ms`` into the block (may be empty)."""
    gc_s: float = 0.0
    """How much of the block Python's garbage collector ran (it holds the GIL)."""


class LoopWatchdog:
    """Measures how late an event loop runs a callback posted from another thread.

    A watchdog thread posts a callback to the loop every ``interval`` (a
    quarter of the limit, at most 5 ms) and waits for it; when it has not run
    after ``max_block_ms``, the thread records the loop thread's stack. The
    lateness of every callback is the time the loop could not run anything:
    a blocking call, or a long stretch of CPU work without an ``await``.

    :meth:`watch` is entered inside the running loop (asyncio, uvloop or
    trio); the plugin does this around every test that uses the
    ``gpuaio_loop_watchdog`` fixture. :meth:`check` raises if a block was
    longer than the limit.
    """

    def __init__(self, max_block_ms: float = DEFAULT_MAX_LOOP_BLOCK_MS) -> None:
        self.max_block_ms = max_block_ms
        self.blocks: list[LoopBlock] = []
        """Every block longer than the limit in force when it ended."""
        self.worst_s: float = 0.0
        """The longest lateness measured, limit or not."""
        self.pings: int = 0
        """Callbacks answered by the loop so far."""
        self.watching: bool = False
        """True while :meth:`watch` is active (the test body is being watched)."""
        self._allowed = 0
        self._allow_epoch = 0
        self._lock = threading.Lock()

    @property
    def max_block_s(self) -> float:
        return self.max_block_ms / 1000.0

    @contextlib.contextmanager
    def allow(self) -> Iterator[None]:
        """Blocks that overlap this ``with`` block are not held against the test."""
        with self._lock:
            self._allowed += 1
            self._allow_epoch += 1
        try:
            yield
        finally:
            with self._lock:
                self._allowed -= 1
                self._allow_epoch += 1

    @contextlib.contextmanager
    def watch(self) -> Iterator[LoopWatchdog]:
        """Watch the running event loop (call from inside it) until the block exits."""
        post = _loop_poster()
        run = _WatchRun(self, post, threading.get_ident())
        # Objects made before the watch are left out of garbage collections
        # during it: a full collection of a long test session's heap holds the
        # GIL for hundreds of ms, which is the session's doing, not the code's
        # under test (a 281 ms block with no stack on an H200, run i).
        gc.freeze()
        run.start()
        self.watching = True
        try:
            yield self
        finally:
            self.watching = False
            run.stop()
            gc.unfreeze()

    def _record(self, duration_s: float, stack: str, epoch: int, gc_s: float = 0.0) -> None:
        with self._lock:
            self.pings += 1
            if self._allowed or epoch != self._allow_epoch:
                return
            self.worst_s = max(self.worst_s, duration_s)
            if duration_s > self.max_block_s:
                self.blocks.append(LoopBlock(duration_s, stack, gc_s))

    def _epoch(self) -> int:
        with self._lock:
            return self._allow_epoch

    def failures(self) -> list[LoopBlock]:
        """The blocks longer than the current limit."""
        return [b for b in self.blocks if b.duration_s > self.max_block_s]

    def report(self) -> str:
        """A description of the blocks over the limit (empty: none)."""
        bad = self.failures()
        if not bad:
            return ""
        worst = max(bad, key=lambda b: b.duration_s)
        lines = [
            f"event loop blocked for {worst.duration_s * 1e3:.1f} ms (limit "
            f"{self.max_block_ms:g} ms; {len(bad)} block(s) over the limit). "
            "A blocking call ran on the event loop thread: move it to a worker thread "
            "(anyio.to_thread.run_sync) or use gpuaio's awaitable API."
        ]
        if worst.gc_s:
            lines.append(
                f"Python's garbage collector ran for {worst.gc_s * 1e3:.1f} ms of that block "
                "(a collection holds the GIL, whatever thread triggered it)."
            )
        if worst.stack:
            lines.append("The loop thread was here while blocked:")
            lines.append(worst.stack.rstrip())
        elif not worst.gc_s:
            lines.append(
                "No stack: the watchdog's own thread could not run during the block either, "
                "so something held the GIL throughout (a C call that does not release it)."
            )
        return "\n".join(lines)

    def check(self) -> None:
        """Fail (``pytest.fail``) if a block was longer than the limit."""
        msg = self.report()
        if msg:
            pytest.fail(msg, pytrace=False)


def _loop_poster() -> Callable[[Callable[[], None]], Any]:
    """``call_soon_threadsafe`` of the running loop (asyncio, uvloop) or trio's equivalent."""
    import sniffio

    lib = sniffio.current_async_library()
    if lib == "asyncio":
        import asyncio

        return asyncio.get_running_loop().call_soon_threadsafe
    if lib == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    raise RuntimeError(f"gpuaio's loop watchdog does not support {lib!r}")


def _stack_of(thread_id: int, limit: int = 12) -> str:
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame, limit=limit))


class _WatchRun:
    """One watched stretch of a loop: the watchdog thread and its outstanding ping."""

    def __init__(
        self, dog: LoopWatchdog, post: Callable[[Callable[[], None]], Any], loop_thread: int
    ) -> None:
        self.dog = dog
        self.post = post
        self.loop_thread = loop_thread
        self.cv = threading.Condition(threading.Lock())
        self.stopped = False
        self.outstanding: tuple[float, int] | None = None  # (posted at, allow epoch)
        self.stack = ""
        self.seq = 0
        self.thread = threading.Thread(target=self._run, name="gpuaio-loop-watchdog", daemon=True)
        self.gc_passes: list[tuple[float, float]] = []
        self._gc_t0 = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self.thread.start()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif len(self.gc_passes) < 100_000:
            self.gc_passes.append((self._gc_t0, time.perf_counter()))

    def _gc_within(self, t0: float, t1: float) -> float:
        """Seconds of garbage collection between ``t0`` and ``t1``."""
        return sum(
            max(0.0, min(b, t1) - max(a, t0)) for a, b in list(self.gc_passes) if b > t0 and a < t1
        )

    def stop(self) -> None:
        """On the loop thread: end the run; a ping still queued counts as lateness."""
        now = time.perf_counter()
        with self.cv:
            self.stopped = True
            late = self.outstanding
            self.outstanding = None
            stack = self.stack
            self.cv.notify_all()
        self.thread.join(timeout=5)
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if late is not None:
            self.dog._record(now - late[0], stack, late[1], self._gc_within(late[0], now))

    def _answer(self, seq: int) -> None:
        now = time.perf_counter()
        with self.cv:
            late = self.outstanding if seq == self.seq else None
            self.outstanding = None
            stack = self.stack
            self.cv.notify_all()
        if late is not None:
            self.dog._record(now - late[0], stack, late[1], self._gc_within(late[0], now))

    def _run(self) -> None:
        limit = self.dog.max_block_s
        interval = min(limit / 4, 0.005)
        while True:
            with self.cv:
                if self.stopped:
                    return
                self.seq += 1
                seq = self.seq
                self.stack = ""
                self.outstanding = (time.perf_counter(), self.dog._epoch())
            try:
                self.post(functools.partial(self._answer, seq))
            except Exception:  # the loop has closed
                with self.cv:
                    self.outstanding = None
                return
            with self.cv:
                self.cv.wait_for(lambda: self.outstanding is None or self.stopped, limit)
                late = self.outstanding is not None and not self.stopped
            if late:
                stack = _stack_of(self.loop_thread)
                with self.cv:
                    if self.outstanding is not None:
                        self.stack = stack
                    self.cv.wait_for(lambda: self.outstanding is None or self.stopped)
            with self.cv:
                if self.cv.wait_for(lambda: self.stopped, interval):
                    return


@pytest.fixture
def gpuaio_loop_watchdog(request: pytest.FixtureRequest) -> LoopWatchdog:
    """Fail this ``async def`` test if its event loop is blocked too long.

    The limit comes from the ``gpuaio_max_loop_block_ms`` marker, else
    ``--gpuaio-max-loop-block-ms``, else 20 ms; set ``.max_block_ms`` in the
    test to change it, and wrap expected blocking in ``with watchdog.allow():``.
    In a synchronous test that runs its own loop, enter ``watchdog.watch()``
    inside that loop and call ``watchdog.check()`` at the end.
    """
    limit = _configured_limit_ms(request.node)
    return LoopWatchdog(limit if limit else DEFAULT_MAX_LOOP_BLOCK_MS)


def _configured_limit_ms(item: pytest.Item) -> float | None:
    """The limit set by marker, option or ini; None or 0 for "not configured"."""
    marker = item.get_closest_marker("gpuaio_max_loop_block_ms")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("ms")
        return None if value is None else float(value)
    opt = item.config.getoption("--gpuaio-max-loop-block-ms", default=None)
    if opt is not None:
        return float(opt)
    raw = str(item.config.getini("gpuaio_max_loop_block_ms") or "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise pytest.UsageError(f"gpuaio_max_loop_block_ms must be a number, not {raw!r}") from None


def _watchdog_for(item: pytest.Item) -> LoopWatchdog | None:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    dog = funcargs.get("gpuaio_loop_watchdog")
    if isinstance(dog, LoopWatchdog):
        return dog
    marker = item.get_closest_marker("gpuaio_max_loop_block_ms")
    if marker is not None and (marker.args[:1] == (None,) or marker.kwargs.get("ms", 0) is None):
        return None
    limit = _configured_limit_ms(item)
    if not limit:
        return None
    return LoopWatchdog(limit)


def _watched(func: Callable[..., Any], dog: LoopWatchdog) -> Callable[..., Any]:
    @functools.wraps(func)
    async def run_watched(*args: Any, **kwargs: Any) -> Any:
        with dog.watch():
            return await func(*args, **kwargs)

    return run_watched


def _install_watch(item: pytest.Item, dog: LoopWatchdog) -> Callable[[], None] | None:
    """Make ``item`` run its coroutine under ``dog``; returns the undo, or None."""
    obj = getattr(item, "obj", None)
    inner = getattr(getattr(obj, "hypothesis", None), "inner_test", None)
    if inner is not None and inspect.iscoroutinefunction(inner):
        holder = obj.hypothesis  # type: ignore[union-attr]
        holder.inner_test = _watched(inner, dog)

        def undo_inner() -> None:
            holder.inner_test = inner

        return undo_inner
    if obj is not None and inspect.iscoroutinefunction(obj):
        item.obj = _watched(obj, dog)  # type: ignore[attr-defined]

        def undo() -> None:
            item.obj = obj  # type: ignore[attr-defined]

        return undo
    return None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    dog = _watchdog_for(item)
    undo = _install_watch(item, dog) if dog is not None else None
    if undo is None:
        return (yield)
    try:
        result = yield
    finally:
        undo()
    assert dog is not None
    dog.check()
    return result
