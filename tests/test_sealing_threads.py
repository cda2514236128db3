"""A batch that another thread is sealing (``gpuaio._engine.completion._queue``).

The watcher, a loop's poll or a host thread may seal a stream's open batch
while a task enqueues more on the stream. Whatever the task enqueues must
go onto the stream after the batch's deferred words and its marker: a
kernel before the marker makes the batch's ops wait for the kernel (for
ever, if it waits for the host), and a memset before the words is undone
by them. GPU run AR hung in the first way, when the watcher sealed the
batch under the test that launches such a kernel. Here the sealing thread
is stopped inside the driver call, so the race is taken every time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import pytest

import gpuaio
from tests.conftest import add_one_kernel
from tests.test_marker_batches import _hold_by_launch, _queue_of, _warm

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("always_batch")]


class _Gate:
    """Stops the first call of a queue's ``place`` or ``write`` made off the
    test's thread inside it, until :meth:`open`; the call then goes on."""

    def __init__(self, q: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self._go = threading.Event(), threading.Event()
        test_thread = threading.get_ident()
        real = getattr(q, name)

        def gated(*args: Any) -> Any:
            if threading.get_ident() != test_thread and not self.entered.is_set():
                self.entered.set()
                self._go.wait(30)  # bounded: a broken test must not hang the suite
            return real(*args)

        monkeypatch.setattr(q, name, gated)

    def open(self) -> None:
        self._go.set()


@pytest.fixture
def sealing(stream: gpuaio.Stream) -> Iterator[list[threading.Thread]]:
    """Threads started by the test (each seals the stream's batch); joined at the end."""
    threads: list[threading.Thread] = []
    yield threads
    for t in threads:
        t.join(30)


def _seal_elsewhere(stream: gpuaio.Stream, gate: _Gate, threads: list[threading.Thread]) -> None:
    """Seal the stream's open batch on another thread, which stops in ``gate``.

    Whichever thread seals first (this one, or the watcher) stops there,
    holding the batch's ``seal_lock``.
    """
    t = threading.Thread(target=_queue_of(stream).seal, daemon=True)
    t.start()
    threads.append(t)
    assert gate.entered.wait(30)


async def test_a_kernel_goes_after_the_marker_another_thread_is_placing(
    dev: gpuaio.Device,
    stream: gpuaio.Stream,
    monkeypatch: pytest.MonkeyPatch,
    sealing: list[threading.Thread],
) -> None:
    d = dev.empty(8)
    await _warm(stream, d)
    gate = _Gate(_queue_of(stream), "place", monkeypatch)
    first = stream.memset(d[:2], 1)  # two bytes: enqueued at once, joins the batch
    assert first._poll is not None and first._poll[2] is not None
    _seal_elsewhere(stream, gate, sealing)
    release = _hold_by_launch(dev, stream)  # a kernel that waits for the host
    gate.open()
    try:
        # The batch's marker went on before the kernel: it completes while
        # the kernel still waits. (With the batch taken for sealed while its
        # marker was being placed, the kernel went first, and this timed out.)
        with anyio.fail_after(10):
            await first
    finally:
        release()
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    assert out.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


async def _words_being_written(
    dev: gpuaio.Device,
    stream: gpuaio.Stream,
    monkeypatch: pytest.MonkeyPatch,
    sealing: list[threading.Thread],
) -> tuple[gpuaio.DeviceArray, gpuaio.Operation, _Gate]:
    """An 8-byte array whose first 4 bytes a deferred memset sets to 1, and
    another thread stopped while it writes that memset's words."""
    d = dev.empty(8)
    await _warm(stream, d)
    gate = _Gate(_queue_of(stream), "write", monkeypatch)
    first = stream.memset(d[:4], 1)  # deferred: its words wait in the batch
    _seal_elsewhere(stream, gate, sealing)
    return d, first, gate


@pytest.mark.parametrize("then", ["kernel", "memset"])
async def test_work_goes_after_the_words_another_thread_is_writing(
    dev: gpuaio.Device,
    stream: gpuaio.Stream,
    monkeypatch: pytest.MonkeyPatch,
    sealing: list[threading.Thread],
    then: str,
) -> None:
    d, first, gate = await _words_being_written(dev, stream, monkeypatch, sealing)
    if then == "kernel":  # adds 1 to the first 4 bytes
        later = stream.launch(add_one_kernel(dev), 1, 32, d, np.uint64(4))
        expect = [2, 2, 2, 2, 0, 0, 0, 0]
    else:  # six bytes: a short op enqueued at once
        later = stream.memset(d[:6], 2)
        expect = [2, 2, 2, 2, 2, 2, 0, 0]
    gate.open()
    with anyio.fail_after(10):
        await first
        await later
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    # The later work came after the memset (before the fix it went first,
    # and the words written after it left 1s).
    assert out.tolist() == expect


async def test_a_tiny_memset_that_finds_the_batch_busy_still_joins_one(
    dev: gpuaio.Device,
    stream: gpuaio.Stream,
    monkeypatch: pytest.MonkeyPatch,
    sealing: list[threading.Thread],
) -> None:
    # The loop never waits for a batch being sealed: the memset goes to the
    # stream's host thread, which may wait, and defers it there. (When that
    # thread gave up on the busy batch too, every such memset cost it one
    # or two driver calls: in GPU run AR a third of 2,000 memsets of 200
    # tasks got markers of their own.)
    backend = dev._runtime.backend
    memset, memsets = backend.memset_async, []

    def counted(*args: Any) -> None:
        memsets.append(args)
        memset(*args)

    monkeypatch.setattr(backend, "memset_async", counted)
    d, first, gate = await _words_being_written(dev, stream, monkeypatch, sealing)
    second = stream.memset(d[4:], 2)  # the batch is busy: to the host thread
    gate.open()
    with anyio.fail_after(10):
        await first
        await second
    assert second._poll is not None and second._poll[2] is not None  # joined a batch
    # Both went to the GPU as batch writes (the warm-up's memset of 0s is enqueued).
    assert [args for args in memsets if args[1] != 0] == []
    out = np.empty(8, np.uint8)
    await stream.copy(out, d)
    assert out.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
