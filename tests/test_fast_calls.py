"""The hot path's driver calls in C (``gpuaio.backends.cuda._fast``, ``_fastcalls.c``).

A compiled install calls ``cuMemcpyAsync``, ``cuEventRecord`` and
``cuEventQuery`` through the driver's function pointers, each behind a check
that the handle's context is current. Here the pointers are C functions made
from Python (ctypes) that stand in for the driver's, so the extension and
the backend's use of it are checked without a GPU: the arguments arrive
exactly, nothing runs while another context is current (the backend's own
switch does it then), and every ``CUresult`` comes back. Where this install
did not build the extension these tests skip; ``tests/test_context.py``
covers the cuda.bindings path, and on a GPU ``tests/test_cli.py`` checks that
a compiled install binds the real driver.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gpuaio._core.errors import CudaError
from gpuaio.backends._base import GATED_DOWN_DMAS, GATED_DOWN_WAITS, GATED_UP
from tests.test_context import _FakeDriver

driver = pytest.importorskip("cuda.bindings.driver")
_fast = pytest.importorskip("gpuaio.backends.cuda._fast")
try:
    from gpuaio.backends.cuda import _fastcalls  # type: ignore[attr-defined]
except ImportError:  # a pure-Python install
    pytest.skip(
        "no _fastcalls extension: it is built by a compiled install (hatch_build.py)",
        allow_module_level=True,
    )

_GET = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_void_p))
_MEMCPY = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
)
_RECORD = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_QUERY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_MEMOP = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint
)

NOT_READY = int(driver.CUresult.CUDA_ERROR_NOT_READY)


class _CDriver:
    """cuCtxGetCurrent, cuMemcpyAsync, cuEventRecord, cuEventQuery,
    cuStreamWriteValue32 and cuStreamWaitValue32 as C function pointers.
    ``current`` says the calling thread's context; every call is recorded
    with the context current when it ran; ``results`` are what each call
    answers."""

    def __init__(self, current: Any) -> None:
        self.current = current
        self.ran: list[tuple[Any, ...]] = []
        self.results = {"memcpy": 0, "record": 0, "query": 0, "get": 0, "write": 0, "wait": 0}
        # Kept here: the pointers are valid only while these objects live.
        self._fns = (
            _GET(self._get),
            _MEMCPY(self._memcpy),
            _RECORD(self._record),
            _QUERY(self._query),
            _MEMOP(self._write),
            _MEMOP(self._wait),
        )

    def addresses(self) -> dict[str, int]:
        out = {}
        for name, fn in zip(_fast.SYMBOLS + _fast.OPTIONAL, self._fns, strict=True):
            address = ctypes.cast(fn, ctypes.c_void_p).value
            assert address
            out[name] = address
        return out

    def _get(self, out: Any) -> int:
        out[0] = self.current() or None
        return self.results["get"]

    def _memcpy(self, dst: int, src: int, n: int, stream: int | None) -> int:
        self.ran.append(("memcpy", dst, src, n, stream or 0, self.current()))
        return self.results["memcpy"]

    def _record(self, event: int | None, stream: int | None) -> int:
        self.ran.append(("record", event or 0, stream or 0, self.current()))
        return self.results["record"]

    def _query(self, event: int | None) -> int:
        self.ran.append(("query", event or 0, self.current()))
        return self.results["query"]

    def _write(self, stream: int | None, addr: int, value: int, flags: int) -> int:
        self.ran.append(("write", stream or 0, addr, value, flags, self.current()))
        return self.results["write"]

    def _wait(self, stream: int | None, addr: int, value: int, flags: int) -> int:
        self.ran.append(("wait", stream or 0, addr, value, flags, self.current()))
        return self.results["wait"]


@pytest.fixture
def unbind_after() -> Iterator[None]:
    # The extension's pointers are process-wide: none may outlive the test's C functions.
    try:
        yield
    finally:
        _fastcalls.bind(0, 0, 0, 0)


CTX = 0x7F00_0000_C000
BIG = 0xFFFF_8000_0000_1234  # above 2**63: passed as unsigned 64-bit


def _bound(ctx: int) -> _CDriver:
    c = _CDriver(lambda: ctx)
    assert _fastcalls.bind(*c.addresses().values()) is True
    return c


def test_unbound_calls_do_nothing_and_say_so(unbind_after: None) -> None:
    assert _fastcalls.bind(0, 0, 0, 0) is False
    assert _fastcalls.memcpy(CTX, 1, 2, 3, 4) == _fastcalls.NOT_BOUND
    assert _fastcalls.record(CTX, 1, 2) == _fastcalls.NOT_BOUND
    assert _fastcalls.query(CTX, 1) == _fastcalls.NOT_BOUND
    assert _fastcalls.gated(CTX, 4, UP, 1, [2], 3, 3, [5]) == _fastcalls.NOT_BOUND
    assert _fastcalls.NOT_BOUND < 0 and _fastcalls.NOT_CURRENT < 0  # never a CUresult


@pytest.mark.parametrize("n", [0, 1, 64 << 10, (64 << 10) + 1, 1 << 30])
def test_each_call_passes_its_arguments_and_answers_the_driver(unbind_after: None, n: int) -> None:
    c = _bound(CTX)
    assert _fastcalls.memcpy(CTX, BIG, BIG - 4096, n, 0x5000) == 0
    assert _fastcalls.record(CTX, 0x6000, 0x5000) == 0
    assert _fastcalls.query(CTX, 0x6000) == 0
    assert c.ran == [
        ("memcpy", BIG, BIG - 4096, n, 0x5000, CTX),
        ("record", 0x6000, 0x5000, CTX),
        ("query", 0x6000, CTX),
    ]
    c.results.update(memcpy=1, record=700, query=NOT_READY)
    assert _fastcalls.memcpy(CTX, 1, 2, n, 0) == 1
    assert _fastcalls.record(CTX, 1, 0) == 700
    assert _fastcalls.query(CTX, 1) == NOT_READY


@pytest.mark.parametrize("call", ["memcpy", "record", "query"])
def test_other_threads_run_while_a_driver_call_blocks(unbind_after: None, call: str) -> None:
    # A driver call may block (a full launch queue, a pageable copy) on work
    # that needs the GIL: a host function on the stream is Python. Holding the
    # GIL across it deadlocked the hostfunc strategy's storm on a GPU. Here
    # the driver's call is usleep(its first argument): it blocks, in C, with
    # no Python of its own, for 0.3 s.
    usleep = ctypes.cast(ctypes.CDLL(None).usleep, ctypes.c_void_p).value
    c = _CDriver(lambda: CTX)
    get_current = c.addresses()["cuCtxGetCurrent"]
    assert _fastcalls.bind(get_current, usleep, usleep, usleep)
    calls: dict[str, Callable[[], int]] = {
        "memcpy": lambda: _fastcalls.memcpy(CTX, 300_000, 0, 64, 0),
        "record": lambda: _fastcalls.record(CTX, 300_000, 0),
        "query": lambda: _fastcalls.query(CTX, 300_000),
    }
    ticks = 0
    stop = threading.Event()
    running = threading.Event()

    def spin() -> None:
        # Lets the GIL go at every turn (sleep(0)): only a call that lets
        # it go too can be overtaken.
        nonlocal ticks
        running.set()
        while not stop.is_set():
            ticks += 1
            time.sleep(0)

    # No forced hand-over of the GIL (the default comes every 5 ms): the
    # C stand-in for cuCtxGetCurrent runs Python, where one could come.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100)
    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        assert running.wait(30)
        before = ticks
        assert calls[call]() == 0
        during = ticks - before
    finally:
        stop.set()
        t.join(30)
        sys.setswitchinterval(interval)
    assert during > 10, f"{call}: another thread ran {during} times while the call blocked"


STREAM = 0x5000
DEV = BIG - (1 << 30)


UP, DMAS, WAITS = GATED_UP, GATED_DOWN_DMAS, GATED_DOWN_WAITS


def _gated_calls(
    part: int, blocks: list[int], nbytes: int, chunk: int, flags: list[int]
) -> list[Any]:
    """What a part of a gated copy's stream work is, call by call
    (``Backend.enqueue_gated``)."""
    out: list[Any] = []
    for k, block in enumerate(blocks):
        off, ln = k * chunk, min(chunk, nbytes - k * chunk)
        if part == UP:
            out += [
                ("wait", STREAM, flags[k], 1, 0, CTX),
                ("memcpy", DEV + off, block, ln, STREAM, CTX),
            ]
        elif part == DMAS:
            out += [
                ("memcpy", block, DEV + off, ln, STREAM, CTX),
                ("write", STREAM, flags[2 * k], 1, 0, CTX),
            ]
        else:
            out.append(("wait", STREAM, flags[2 * k + 1], 1, 0, CTX))
    return out


@pytest.mark.parametrize("part", [UP, DMAS, WAITS], ids=["upload", "dmas", "waits"])
@pytest.mark.parametrize("chunks", [1, 3, 16])
def test_gated_enqueues_every_chunks_steps_in_stream_order(
    unbind_after: None, part: int, chunks: int
) -> None:
    c = _bound(CTX)
    chunk = 1 << 20
    nbytes = chunks * chunk - 4097  # the last chunk short
    blocks = [BIG - (k + 1) * (4 << 20) for k in range(chunks)]
    flags = [0x7000_0000 + 64 * i for i in range(chunks if part == UP else 2 * chunks)]
    assert _fastcalls.gated(CTX, STREAM, part, DEV, blocks, nbytes, chunk, flags) == 0
    assert c.ran == _gated_calls(part, blocks, nbytes, chunk, flags)


@pytest.mark.parametrize(
    ("part", "fails", "step"),
    [
        (UP, "wait", 3),
        (UP, "memcpy", 1),
        (DMAS, "memcpy", 1),
        (DMAS, "write", 2),
        (WAITS, "wait", 3),
    ],
)
def test_gated_stops_at_the_first_failing_call_and_names_it(
    unbind_after: None, part: int, fails: str, step: int
) -> None:
    c = _bound(CTX)
    blocks = [0x1000, 0x2000]
    flags = [0x100, 0x140] if part == UP else [0x100, 0x140, 0x180, 0x1C0]
    c.results[fails] = 700
    answer = _fastcalls.gated(CTX, STREAM, part, DEV, blocks, 2 * 4096, 4096, flags)
    assert divmod(answer, 65536) == (step, 700)
    expected = _gated_calls(part, blocks, 2 * 4096, 4096, flags)
    first = next(i for i, call in enumerate(expected) if call[0] == fails)
    assert c.ran == expected[: first + 1], "calls after the failing one were made"


def test_gated_needs_the_stream_memory_calls_and_checks_its_arguments(unbind_after: None) -> None:
    c = _CDriver(lambda: CTX)
    four = list(c.addresses().values())[:4]
    assert _fastcalls.bind(*four) is True  # no cuStreamWriteValue32/WaitValue32: the rest works
    assert _fastcalls.gated(CTX, STREAM, UP, DEV, [1], 8, 8, [2]) == _fastcalls.NOT_BOUND
    assert _fastcalls.memcpy(CTX, 1, 2, 3, 4) == 0
    assert _fastcalls.bind(*c.addresses().values()) is True
    c.ran.clear()
    with pytest.raises(TypeError, match="takes 8 arguments"):
        _fastcalls.gated(CTX, STREAM, UP, DEV, [1], 8, 8)
    with pytest.raises(TypeError, match="must be a list"):
        _fastcalls.gated(CTX, STREAM, UP, DEV, (1,), 8, 8, [2])
    with pytest.raises(ValueError, match="part"):
        _fastcalls.gated(CTX, STREAM, 3, DEV, [1], 8, 8, [2])
    for blocks, nbytes, chunk, flags in (
        ([1], 9, 8, [2]),  # 9 bytes are two chunks of 8
        ([1, 2], 9, 8, [2]),  # an upload: a flag per chunk
        ([1], 8, 0, [2]),
    ):
        with pytest.raises(ValueError, match="chunks"):
            _fastcalls.gated(CTX, STREAM, UP, DEV, blocks, nbytes, chunk, flags)
    with pytest.raises(ValueError, match="chunks"):
        _fastcalls.gated(CTX, STREAM, DMAS, DEV, [1], 8, 8, [2])  # a download: two a chunk
    with pytest.raises(ValueError, match="at most"):
        _fastcalls.gated(CTX, STREAM, UP, DEV, list(range(17)), 17, 1, list(range(17)))
    assert c.ran == []


def test_nothing_runs_while_another_context_is_current(unbind_after: None) -> None:
    c = _bound(0xF00000)
    assert _fastcalls.gated(CTX, STREAM, WAITS, DEV, [1], 8, 8, [2, 3]) == _fastcalls.NOT_CURRENT
    assert _fastcalls.memcpy(CTX, 1, 2, 3, 4) == _fastcalls.NOT_CURRENT
    assert _fastcalls.record(CTX, 1, 2) == _fastcalls.NOT_CURRENT
    assert _fastcalls.query(CTX, 1) == _fastcalls.NOT_CURRENT
    # No context current at all, or the driver unable to say: the same.
    c.current = lambda: 0
    assert _fastcalls.query(CTX, 1) == _fastcalls.NOT_CURRENT
    c.current = lambda: CTX
    c.results["get"] = 3  # CUDA_ERROR_NOT_INITIALIZED from cuCtxGetCurrent
    assert _fastcalls.query(CTX, 1) == _fastcalls.NOT_CURRENT
    assert c.ran == []


def test_bad_arguments_raise_at_the_call(unbind_after: None) -> None:
    c = _bound(CTX)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        _fastcalls.memcpy(CTX, 1, 2, 3)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        _fastcalls.record(CTX, 1)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        _fastcalls.query(CTX)
    with pytest.raises(ValueError, match="must not be negative"):
        _fastcalls.memcpy(CTX, 1, 2, -1, 4)
    with pytest.raises(OverflowError):
        _fastcalls.memcpy(CTX, -1, 2, 3, 4)  # no address is negative
    with pytest.raises(TypeError):
        _fastcalls.query(CTX, "0x10")
    with pytest.raises(OverflowError):
        _fastcalls.record(1 << 64, 1, 2)
    assert c.ran == []


def _patched_backend(monkeypatch: pytest.MonkeyPatch, c_functions: bool) -> tuple[Any, Any, Any]:
    cuda = pytest.importorskip("gpuaio.backends.cuda")
    fake = _FakeDriver(driver)
    for name in vars(_FakeDriver):
        if name.startswith("cu") and name[2:3].isupper():
            monkeypatch.setattr(driver, name, getattr(fake, name))
    c = _CDriver(fake.current)
    if c_functions:
        fake.proc = c.addresses()
    return cuda.CudaBackend(), fake, c


@pytest.mark.gpuaio_sim_only  # it patches the driver module a CUDA runtime's threads would use
def test_the_backend_makes_its_hot_calls_in_c_in_their_context(
    monkeypatch: pytest.MonkeyPatch, unbind_after: None
) -> None:
    be, fake, c = _patched_backend(monkeypatch, c_functions=True)
    assert be.fast_driver_calls
    p0, p1 = be.primary_context(0), be.primary_context(1)
    be.set_current_context(p0)
    s = be.stream_create(0)
    ev = be.event_create(0)
    ptr = be.mem_alloc(0, 64)
    pinned = be.host_alloc(1 << 20)
    fake.calls.clear()
    fake.ran_in.clear()
    for n in (64, 1 << 20):
        be.memcpy_async(ptr, pinned, n, s)
        be.event_record(ev, s)
        assert be.event_query(ev) is True
    # One C call each, its context checked there: no cuda.bindings call at all.
    assert fake.calls == {} and fake.ran_in == []
    assert c.ran == [
        ("memcpy", ptr, pinned, 64, s.address, p0),
        ("record", ev.address, s.address, p0),
        ("query", ev.address, p0),
        ("memcpy", ptr, pinned, 1 << 20, s.address, p0),
        ("record", ev.address, s.address, p0),
        ("query", ev.address, p0),
    ]
    be.memcpy_async(ptr, pinned, 0, s)  # nothing to copy: no call
    assert len(c.ran) == 6
    # Another context current (a created one; device 1's, as after
    # torch.cuda.set_device(1)): the backend switches to the stream's, runs
    # the call through the bindings, and switches back.
    for foreign in (0xF00000, p1):
        be.set_current_context(foreign)
        c.ran.clear()
        be.memcpy_async(ptr, pinned, 64, s)
        be.event_record(ev, s)
        assert be.event_query(ev) is True
        assert c.ran == []
        assert fake.ran_in == [p0] * 3
        assert fake.current() == foreign
        fake.ran_in.clear()
    # Every CUresult comes back as the error the bindings' path raises.
    be.set_current_context(p0)
    c.results["query"] = NOT_READY
    assert be.event_query(ev) is False
    c.results.update(memcpy=1, record=700, query=999)
    with pytest.raises(CudaError, match="cuMemcpyAsync") as info:
        be.memcpy_async(ptr, pinned, 64, s)
    assert info.value.code == 1
    with pytest.raises(CudaError, match="cuEventRecord") as info:
        be.event_record(ev, s)
    assert info.value.code == 700
    with pytest.raises(CudaError, match="cuEventQuery") as info:
        be.event_query(ev)
    assert info.value.code == 999
    c.results["memcpy"] = 12345  # a newer driver's code, not in this cuda.bindings' CUresult
    with pytest.raises(CudaError, match="cuMemcpyAsync") as info:
        be.memcpy_async(ptr, pinned, 64, s)
    assert info.value.code == 12345
    assert fake.ran_in == []
    be.close()


@pytest.mark.gpuaio_sim_only
@pytest.mark.parametrize("why", ["no symbol", "switched off", "per-thread default stream"], ids=str)
def test_the_backend_uses_the_bindings_where_c_calls_cannot_be_bound(
    monkeypatch: pytest.MonkeyPatch, unbind_after: None, why: str
) -> None:
    if why == "switched off":
        monkeypatch.setenv("GPUAIO_FAST_DRIVER_CALLS", "0")
    if why == "per-thread default stream":
        # cuda.bindings would resolve the _ptsz calls; the C ones are the legacy ones.
        monkeypatch.setenv("CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM", "1")
    be, fake, c = _patched_backend(monkeypatch, c_functions=why != "no symbol")
    if why == "no symbol":
        fake.proc = {name: a for name, a in c.addresses().items() if name != "cuEventQuery"}
        be = type(be)()
    assert not be.fast_driver_calls
    p0 = be.primary_context(0)
    be.set_current_context(p0)
    s = be.stream_create(0)
    ev = be.event_create(0)
    ptr = be.mem_alloc(0, 64)
    fake.calls.clear()
    be.memcpy_async(ptr, ptr, 64, s)
    be.event_record(ev, s)
    assert be.event_query(ev) is True
    assert c.ran == []
    assert fake.calls == {"cuCtxGetCurrent": 3}
    assert fake.ran_in == [p0] * 3


@pytest.mark.gpuaio_sim_only
def test_the_backend_enqueues_a_gated_copy_in_one_c_call_in_its_context(
    monkeypatch: pytest.MonkeyPatch, unbind_after: None
) -> None:
    be, fake, c = _patched_backend(monkeypatch, c_functions=True)
    p0 = be.primary_context(0)
    be.set_current_context(p0)
    s = be.stream_create(0)
    dev = be.mem_alloc(0, 64)
    blocks = [be.host_alloc(4096), be.host_alloc(4096)]
    flags = [0x100, 0x140, 0x180, 0x1C0]
    fake.calls.clear()
    be.enqueue_gated(s, DMAS, dev, blocks, 6000, 4096, flags)
    be.enqueue_gated(s, WAITS, dev, blocks, 6000, 4096, flags)
    assert fake.calls == {} and fake.ran_in == []  # no cuda.bindings call at all
    assert [call[0] for call in c.ran] == ["memcpy", "write", "memcpy", "write", "wait", "wait"]
    assert c.ran[0] == ("memcpy", blocks[0], dev, 4096, s.address, p0)
    assert c.ran[3] == ("write", s.address, flags[2], 1, 0, p0)
    assert c.ran[5] == ("wait", s.address, flags[3], 1, 0, p0)
    # Another context current: the same calls through the bindings, each in the stream's.
    be.set_current_context(0xF00000)
    c.ran.clear()
    be.enqueue_gated(s, UP, dev, blocks, 6000, 4096, flags[:2])
    assert c.ran == []
    assert fake.ran_in == [p0] * 4 and fake.current() == 0xF00000
    # A failure names its call and code, as the bindings' path does.
    be.set_current_context(p0)
    for name, call, part in (
        ("write", "cuStreamWriteValue32", DMAS),
        ("wait", "cuStreamWaitValue32", WAITS),
    ):
        c.results.update(write=0, wait=0)
        c.results[name] = 700
        with pytest.raises(CudaError, match=call) as info:
            be.enqueue_gated(s, part, dev, blocks, 6000, 4096, flags)
        assert info.value.code == 700
    be.close()
