"""The watcher-only ``thread`` completion engine, measured by ``completion.py`` for comparison.

``thread`` is gpuaio's ``events`` engine without loop-side polling: every
completion goes through the watcher thread and a cross-thread wake-up. It
was a library strategy until issue 16; it only serves to show what polling
from the loop buys, so it lives here and joins through gpuaio's extension
point for benchmarks, ``gpuaio._engine.completion.register_strategy``: after
:func:`register`, ``gpuaio.configure(completion="thread")`` (or
``GPUAIO_COMPLETION=thread``) selects it in this process. It is not in
``gpuaio.STRATEGIES``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import gpuaio

NAME = "thread"


def register(lib: ModuleType = gpuaio) -> str:
    """Make ``completion="thread"`` select the watcher-only engine in ``lib``; returns the name.

    ``lib`` is gpuaio, or another copy of it imported under another name
    (``tools/overhead_probe.py --baseline``). A copy from before issue 16 has
    the strategy built in and is left alone.
    """
    if NAME in lib.STRATEGIES:
        return NAME
    completion = importlib.import_module(f"{lib.__name__}._engine.completion")
    events = importlib.import_module(f"{lib.__name__}._engine.completion._events")

    class ThreadEngine(events.EventEngine):  # type: ignore[name-defined,misc]
        """``events`` with ``loop_spin_s = 0``: an await sleeps at once, the watcher wakes it."""

        strategy = NAME
        loop_spin_s = 0.0

    completion.register_strategy(NAME, ThreadEngine)
    return NAME
