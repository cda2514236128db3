"""What a process forked after gpuaio initialized may do with what it inherited: nothing.

CUDA does not survive ``fork``. In a forked child, driver enqueues fail with
``CUDA_ERROR_NOT_INITIALIZED`` while ``cuEventQuery`` on an inherited event
reports success (both seen on an H200), so inherited driver state can never
be trusted there. The child also inherits none of gpuaio's threads (stream
host threads, completion watchers, the reaper, the sim's stream workers) but
every lock they may have held at the fork.

So in the child every call on the inherited runtime fails at once with
:class:`~gpuaio.ForkedProcessError`, and nothing inherited is freed (freeing
would be a driver call on a context the child cannot use): the child leaks
it. The simulated backend is held to the same rule, so that code tested on
the sim fails the same way it would on a GPU. :mod:`gpuaio._api.runtime` installs
the ``os.register_at_fork`` hooks that apply this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from .._core.errors import ForkedProcessError

__all__ = ["disable_backend", "forked_message"]

# Backend calls that release something: in the child they do nothing (leak).
_RELEASES = frozenset(
    {
        "close",
        "event_destroy",
        "host_free",
        "host_free_async",
        "host_unregister",
        "mem_free",
        "mem_free_async",
        "stream_destroy",
    }
)
# Backend calls that only read the Python handle: they keep working (reprs, keys).
_PURE = frozenset({"stream_handle"})


def forked_message(backend: str, pid: int, parent: int) -> str:
    """The advice a :class:`~gpuaio.ForkedProcessError` carries."""
    if backend == "cuda":
        what = "initialized CUDA, and CUDA cannot be used in a forked child"
        fresh = ""
    else:
        what = (
            f"initialized its {backend} backend, which, like CUDA, cannot be used in a forked child"
        )
        fresh = "; for a new simulated runtime in the child, call gpuaio.use_backend('sim') there"
    return (
        f"this process (pid {pid}) was forked from process {parent} after gpuaio had {what}. "
        "Start worker processes with the 'spawn' or 'forkserver' multiprocessing start method "
        "(multiprocessing.get_context('spawn'); 'fork', the default on Linux before Python "
        "3.14, cannot work), or fork before gpuaio is first used" + fresh
    )


def disable_backend(backend: Any, detail: str) -> None:
    """Make ``backend`` refuse every call with :class:`~gpuaio.ForkedProcessError`.

    Calls that release memory, events or streams (and ``close``) do nothing
    instead, so that objects collected in the child, or closed at its exit,
    leave the parent's driver state alone. Called in a forked child, where
    nothing else runs: it only sets attributes, taking no lock.
    """
    cls = type(backend)
    for name in dir(cls):
        if name.startswith("_") or name in _PURE:
            continue
        attr = getattr(cls, name, None)
        if not callable(attr) or isinstance(attr, type):
            continue
        setattr(backend, name, _leak if name in _RELEASES else _refuser(name, detail))


def _leak(*args: Any, **kwargs: Any) -> None:
    """A release in a forked child: the parent's resource is left alone."""


def _refuser(call: str, detail: str) -> Callable[..., NoReturn]:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise ForkedProcessError(call, detail=detail)

    return refuse
