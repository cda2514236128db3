"""Precise short sleeps on gpuaio's own threads (Linux timer slack).

Linux lets a sleeping thread wake up to its *timer slack* late, 50 us by
default, so that wake-ups can be batched. Every timed wait of a gpuaio thread
pays it: the watcher's polls between completions, a stream thread's waits for
an earlier operation, even ``time.sleep(0)`` (56 us on an H200 host, issue 13's
``driver-lock-probe``). On a path whose whole budget is tens of microseconds
that is the largest single cost, so gpuaio's threads ask for less. The
setting is per thread: the application's threads, the event loop's included,
keep theirs.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["SLACK_NS", "precise_timers"]

SLACK_NS = int(os.environ.get("GPUAIO_TIMER_SLACK_NS", "1000"))
"""The timer slack gpuaio's threads ask for, in ns (0: leave the system's)."""

_PR_SET_TIMERSLACK = 29
_prctl = None
if sys.platform == "linux" and SLACK_NS > 0:
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no libc symbol: keep the default slack
        _prctl = None


def precise_timers() -> None:
    """Give the calling thread a timer slack of :data:`SLACK_NS` (Linux; else nothing)."""
    if _prctl is not None:
        _prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(SLACK_NS), 0, 0, 0)
