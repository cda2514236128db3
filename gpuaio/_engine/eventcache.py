"""A per-device cache of fired staging events, reused instead of re-created."""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["EventCache"]


class EventCache:
    """Fired staging events (blocking-sync, no timing), kept per device for reuse.

    A staged copy records one event per chunk (the guard of its pinned block)
    and a ring of ``depth``; creating and destroying each is a driver call of
    4-12 us, a tenth of a 1 MiB chunk's time on an H200 (issue 13's
    timelines). An event comes back when nothing waits on it any more (the
    ring's when its transfer ends, a guard once the pool saw it fire), and every
    user records an event before waiting on it, so a reused event never
    carries an old record into a new wait. Thread-safe: list ``append`` and
    ``pop`` are atomic.
    """

    KEEP = 64
    """Events kept per device; more are destroyed."""

    def __init__(self, backend: Any, defer: Any) -> None:
        self._backend = backend
        self._defer = defer
        self._free: dict[int, list[Any]] = {}

    def get(self, device: int) -> Any:
        """A cached event of ``device``, else a new one (a driver call: never on a loop)."""
        lst = self._free.get(device)
        if lst:
            try:
                return lst.pop()
            except IndexError:  # another thread took the last one
                pass
        return self._backend.event_create(device, blocking_sync=True)

    def put(self, events: list[Any]) -> None:
        """Take back fired events (any device)."""
        extra = []
        for ev in events:
            device = getattr(ev, "device", None)  # both backends' events name it
            if device is None:
                extra.append(ev)
                continue
            lst = self._free.setdefault(device, [])
            if len(lst) < self.KEEP:
                lst.append(ev)
            else:
                extra.append(ev)
        if extra:
            self._defer(lambda: self._destroy(extra))

    def close(self) -> None:
        """Destroy every cached event."""
        events = [ev for lst in self._free.values() for ev in lst]
        self._free.clear()
        self._destroy(events)

    def _destroy(self, events: list[Any]) -> None:
        for ev in events:
            # A faulted context fails the destroy: its events are gone anyway.
            with contextlib.suppress(Exception):
                self._backend.event_destroy(ev)
