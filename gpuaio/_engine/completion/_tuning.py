"""Every timing constant of the completion engines, in one place.

They were tuned on an H200 (see ``docs/completion.md`` and
``benchmarks/completion.py``): change one only with a measurement to show
for it. The engines import them by name, so patching one (tests do) must
patch the module that reads it, e.g. ``gpuaio._engine.completion._events``.
"""

from __future__ import annotations

import os

FAULT_PROBE_S = 5e-3
"""How often a device with pending work is checked for a sticky error.

While operations pend, something probes this often: the watcher, or the
loops polling in its stead (their sweeps), so a sticky error fails every
pending await within about this long of the driver first reporting it. With
nothing pending, nothing is probed and nothing wakes.
"""

# The events strategy.
LOOP_SPIN_S = float(os.environ.get("GPUAIO_LOOP_SPIN_US", "150")) * 1e-6
"""How long an awaiting task polls from its event loop before handing off."""
FIRST_POLL_RUN_S = 100e-6
"""How long a loop may go on through awaits of gpuaio's without yielding (``_firstpoll``).

A lone tiny op is polled for before the task's first yield only if the loop's
thread yielded in such an await less than this long ago: a task awaiting one
tiny op after another, each done when first polled, still lets the loop's
other tasks run at least this often."""
FIRST_SPIN_S = float(os.environ.get("GPUAIO_FIRST_SPIN_US", "0")) * 1e-6
"""How long a task polls on, without yielding, for a lone short op that its
first poll, before the task's first yield, found not done (``_firstpoll``);
0, the default until a GPU run measures it (issue 13's run MB, prepared):
never, one query only.

On a GPU a small copy is done 5-9 us after its driver call, and a first poll
right after the call never found it done (run MA's timelines on an H100: the
first polls' window had turned them off, and the task's first query came a
whole turn of the loop later, 6-7 us after the marker against the
hand-written await's 3.7). Polling on for a few microseconds finds it as
it completes. The same limits hold as for first polls: a loop goes at most
``FIRST_POLL_RUN_S`` (and one spin) without yielding, and spins that do not
find a third of their ops done stop."""
TAIL_SPIN_S = float(os.environ.get("GPUAIO_TAIL_SPIN_US", "5")) * 1e-6
"""How long a task polls on, without yielding, for a lone short op that its
first poll after a yield found not done (``_firstpoll``); 0: never.

A turn of an idle asyncio loop took about 3 us on the CPU machine's fake GPU
(2 on uvloop), so such an op was found done up to that long after it
completed. On an H100 (issue 13's run EC) spins cut 64 KiB pinned uploads on
asyncio by 16% and changed other copies of 4 KiB-1 MiB by at most 2%."""
STREAM_POLL_GAP_S = 2e-6
"""A loop queries one stream at most this often (many tasks poll the same one)."""
SHORT_OP_S = 10e-6
"""Ops expected to take at most this long on the GPU may share a marker (``_queue``).

Memsets, and copies between device and pinned memory of up to about half a
megabyte. Ops of unknown duration (kernels, markers) never do.
"""
BATCH_S = 50e-6
"""Expected GPU time past which a stream's open batch is sealed and a new one opened.

It bounds how late an op of a batch is resolved: at most the GPU time of the
short ops enqueued after it in the same batch."""
BATCH_AGE_S = 5e-3
"""How long a stream's open batch may stay open while loops poll for other ops.

A loop polling for an op of the batch seals it at once, and so does the
watcher; a loop's sweep, or a poll for another stream's op, only once it is
this old. With 1,000 tasks on 16 streams a loop turn takes about 10 ms, and
one stream's batch fills through most of it; ops nobody awaits still release
their buffers within about this long of completing."""
BATCH_PROBE_S = 10e-3
"""While a stream's batches hold one op each, its short ops get markers of their
own, but one op this often opens a batch, to see whether others join it."""
RETIRE_S = 20e-3
"""How long a stream's completion queue stays with its engine, empty, after its
last op (with what its batches were like), before the watcher drops it."""
BATCH_OP_S = 2e-6
"""What a short op adds to its batch's expected time besides its own estimate
(a 4-byte memset takes about that on an H100, launch included)."""
LOOP_SWEEP_S = 250e-6
"""How often polling loops drain the streams that no poll has drained, or found
an op of resolved, lately."""
LOOP_COVER_S = 1e-3
"""How long after a loop last polled the watcher leaves the device to loops."""
STAND_DOWN_S = 20e-3
"""How long the watcher sleeps while loops poll (they probe for it meanwhile).

A task that stops polling wakes it at once; an op nobody awaits that completes
just after the loops stopped polling may be resolved this late, and a sticky
error found this late if only such ops pend. Every wake-up while a loop is busy
costs that loop about 3 us a turn for up to 5 ms (``EventEngine._stand_down``).
"""
SPIN_S = 200e-6
"""How long the watcher keeps spinning after new work or a completion."""
SPIN_POLL_S = 10e-6
"""The watcher's pause between polls while it spins.

It asks for 10 us, which with gpuaio's 1 us timer slack is about what it gets
(``gpuaio._core.timerslack``); under Linux's default 50 us slack even
``time.sleep(0)`` took 56 us on an H200 host."""
MIN_SLEEP_S = 20e-6
"""The watcher's first sleep between polls once spinning is over."""
MAX_SLEEP_S = 250e-6
"""The longest the watcher sleeps between polls of ops of unknown duration."""
ETA_SLEEP_MIN_S = 150e-6
"""The watcher sleeps until the next expected completion only if it is further off."""
ETA_EARLY_S = 50e-6
"""How long before the expected completion that sleep ends."""
PREWAKE_S = 200e-6
"""How long before an awaited op is due the watcher wakes its loop to poll for it.

An event loop asleep for a millisecond took 50-260 us to run again after the
watcher's wake-up on an H200 host (issue 13's timelines), a fifth of a 64 MiB
pinned copy; woken this early, it polls while the DMA finishes instead."""
ETA_SLEEP_MAX_S = 5e-3
"""The longest such a sleep."""
