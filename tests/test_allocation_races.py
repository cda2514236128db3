"""An allocation counts its users without a lock: each race with ``free`` forced.

``Allocation.acquire`` marks, then checks for a free request; ``free`` requests,
then checks for marks. These tests stop each side between its two steps and
run the other there, so each interleaving is taken every time: the block must
be freed exactly once, never while an operation that went ahead uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import gpuaio
from gpuaio._api.memory import Allocation


class _Reaper:
    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)


class _Backend:
    def __init__(self) -> None:
        self.freed: list[int] = []

    def mem_free(self, ptr: int) -> None:
        self.freed.append(ptr)

    mem_free_async = mem_free  # how an unshared device block is freed


class _Runtime:
    def __init__(self) -> None:
        self.reaper = _Reaper()
        self.backend = _Backend()
        self.released = False
        self.closed = True  # ``Allocation.__del__`` leaves the block alone

    def frees(self) -> list[int]:
        """Run the reaper's jobs; the addresses freed so far."""
        jobs, self.reaper.jobs = self.reaper.jobs, []
        for job in jobs:
            job()
        return self.backend.freed


class _Hooked(list[None]):
    """The users' list, running ``hook`` once: after the next append, or at the
    next truth test (``free``'s check for users)."""

    def __init__(self, hook: Callable[[], Any], at: str) -> None:
        super().__init__()
        self.hook: Callable[[], Any] | None = hook
        self.at = at

    def _fire(self, at: str) -> None:
        hook, self.hook = self.hook, None
        if hook is not None and self.at == at:
            hook()
        elif hook is not None:
            self.hook = hook

    def append(self, item: None) -> None:
        super().append(item)
        self._fire("append")

    def __len__(self) -> int:
        self._fire("len")
        return super().__len__()


def _alloc(rt: _Runtime) -> Allocation:
    return Allocation(rt, 0x1000, 64, gpuaio.MemoryKind.DEVICE, 0)  # type: ignore[arg-type]


def test_free_while_in_use_waits_for_the_last_release() -> None:
    rt = _Runtime()
    a = _alloc(rt)
    a.acquire()
    a.acquire()
    a.free()
    assert rt.frees() == [] and a.freed
    a.release()
    assert rt.frees() == []
    a.release()
    assert rt.frees() == [0x1000]
    a.free()  # a second request does nothing
    assert rt.frees() == [0x1000]
    with pytest.raises(gpuaio.BufferFreedError):
        a.acquire()
    assert a._users == 0 and rt.frees() == [0x1000]


def test_a_free_between_marking_and_checking_leaves_the_free_to_the_acquire() -> None:
    """``free`` runs after ``acquire`` marked the block: it sees the mark and
    leaves it; ``acquire`` then sees the request, fails and frees the block."""
    rt = _Runtime()
    a = _alloc(rt)
    a._in_use = _Hooked(a.free, "append")
    with pytest.raises(gpuaio.BufferFreedError):
        a.acquire()
    assert a._users == 0
    assert rt.frees() == [0x1000], "freed exactly once, by the failed acquire"


def test_an_acquire_between_requesting_and_checking_keeps_the_block() -> None:
    """``acquire`` runs after ``free`` requested but before it looked for users:
    the acquire fails (nothing uses the block), and the block is freed once."""
    rt = _Runtime()
    a = _alloc(rt)
    failed: list[BaseException] = []

    def acquire() -> None:
        try:
            a.acquire()
        except gpuaio.BufferFreedError as exc:
            failed.append(exc)

    a._in_use = _Hooked(acquire, "len")
    a.free()
    assert len(failed) == 1 and a._users == 0
    assert rt.frees() == [0x1000]


def test_an_op_that_went_ahead_keeps_the_block_through_a_racing_free() -> None:
    """A free runs between a second acquire's two steps while a first op holds
    the block: the second acquire fails, and the block waits for the first."""
    rt = _Runtime()
    a = _alloc(rt)
    a.acquire()
    hooked = _Hooked(a.free, "append")
    hooked.extend(a._in_use)  # the first op's mark (extend runs no hook)
    a._in_use = hooked
    with pytest.raises(gpuaio.BufferFreedError):
        a.acquire()
    assert a._users == 1 and rt.frees() == []
    a.release()
    assert rt.frees() == [0x1000]


def test_threads_acquiring_and_releasing_against_a_free_free_it_once_after_the_last() -> None:
    rt = _Runtime()
    for _ in range(20):
        a = _alloc(rt)
        rt.backend.freed.clear()
        start = threading.Barrier(5)
        held: list[int] = []

        def user(
            a: Allocation = a, start: threading.Barrier = start, held: list[int] = held
        ) -> None:
            start.wait()
            for _ in range(2000):
                try:
                    a.acquire()
                except gpuaio.BufferFreedError:
                    return
                # The block must not be freed while this op holds it.
                held.append(len(rt.backend.freed) + len(rt.reaper.jobs))
                a.release()

        threads = [threading.Thread(target=user) for _ in range(4)]
        for t in threads:
            t.start()
        start.wait()
        a.free()
        for t in threads:
            t.join()
        assert a._users == 0
        assert rt.frees() == [0x1000], "freed exactly once"
        assert not any(held), "an op saw the block freed while it held it"
