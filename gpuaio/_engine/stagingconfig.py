"""The staging pipeline's settings: chunk sizes, depth, what is copied where.

:class:`StagingConfig` holds the settings a runtime may change
(``gpuaio.configure``); the module constants are the measured tunings that
only the environment changes. :mod:`gpuaio._engine.staging` runs the
pipeline they describe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .._core.errors import InvalidArgumentError
from .pool import parse_size

__all__ = [
    "D2H_NT_MIN",
    "D2H_PIECES",
    "D2H_PIECE_MIN",
    "D2H_SPLIT",
    "D2H_WARM_US",
    "DIRECT_UP_MAX",
    "DMA_STEP",
    "DOWN_FIRST_PCT",
    "DOWN_PIECE_MIN",
    "GATED_COPY_BPS",
    "GATED_DOWN_MAX",
    "GATED_DOWN_MIN",
    "GATED_MAX",
    "GATED_MIN",
    "GATED_SLICE",
    "GATED_UP_MAX",
    "GATED_UP_MIN",
    "LOOKAHEAD",
    "NT_MIN",
    "PCIE_BPS",
    "POLL_FIRST_MAX",
    "SOLO_CHUNK",
    "StagingConfig",
]


def _env_size(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return parse_size(raw) if raw else default


@dataclass(frozen=True, slots=True)
class StagingConfig:
    """Tuning of the staging pipeline (defaults measured on an H100 host).

    Environment: ``GPUAIO_CHUNK_BYTES``, ``GPUAIO_STAGING_DEPTH``,
    ``GPUAIO_INLINE_MAX``, ``GPUAIO_PINNED_BUDGET``, ``GPUAIO_HOST_THREADS``.
    """

    max_chunk: int = field(default_factory=lambda: _env_size("GPUAIO_CHUNK_BYTES", 64 << 20))
    """Largest chunk (64 MiB measured best on an H100 host); smaller transfers use
    smaller chunks (``1/split`` of the copy) so the pipeline fills quickly."""
    min_chunk: int = 1 << 20
    split: int = field(default_factory=lambda: int(os.environ.get("GPUAIO_STAGING_SPLIT", "2")))
    """Chunks a transfer is split into (before clamping to [min_chunk, max_chunk]).

    2: on an H200, 16 MiB copies ran 1.6-1.7x and 64 MiB ones 1.6x faster in 2
    chunks than in 8, and faster than in 4 (each chunk costs a block, a DMA,
    an event and thread hand-offs; the DMA of one overlaps the host copy of
    the next); from 256 MiB the 64 MiB cap decides (issue 13,
    ``benchmarks/results/2026-12-02-h200-staging-variants.log``). On the
    native copy threads 4 chunks ran 64 MiB uploads 7% faster but 16 MiB
    ones 16% slower (run CN)."""
    depth: int = field(default_factory=lambda: int(os.environ.get("GPUAIO_STAGING_DEPTH", "4")))
    """Chunks in flight per transfer (pinned use per transfer is depth x chunk)."""
    driver_max: int = field(default_factory=lambda: _env_size("GPUAIO_DRIVER_COPY_MAX", 4 << 20))
    """Largest copy (above ``inline_max``) handed to the driver's own pageable path,
    on the stream's host thread, when the stream has no GPU work pending; 0: never.

    4 MiB: the driver copies and DMAs in a pipeline on one thread with no
    hand-off, and at 2-4 MiB an H200 ran that 1.2-1.5x faster than two staged
    chunks, in three runs (issue 13, runs I-K); from 16 MiB staging's threads
    win or tie."""
    inline_max: int = field(default_factory=lambda: _env_size("GPUAIO_INLINE_MAX", 1 << 20))
    """Largest copy staged on the calling thread (1 MiB: about 50 us of memmove,
    less than the thread hop it saves; on an H200 a 1 MiB pageable copy ran at
    7.7-7.9 GB/s so against 2.1-2.4 through a host thread, issue 13).

    Not higher with the native copy threads' help either: woken from idle,
    they joined late, and a 2-4 MiB upload staged on the calling thread with
    them held it 148-282 us against 32-55 us as a host job, for copies 1-53%
    faster (issue 13, runs CK-CL)."""

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise InvalidArgumentError(
                f"staging depth (GPUAIO_STAGING_DEPTH) must be at least 1, not {self.depth}"
            )
        if not 0 < self.min_chunk <= self.max_chunk:
            raise InvalidArgumentError(
                f"chunk sizes must satisfy 0 < min_chunk <= max_chunk (GPUAIO_CHUNK_BYTES), "
                f"not {self.min_chunk} and {self.max_chunk}"
            )
        if self.split < 1:
            raise InvalidArgumentError(f"GPUAIO_STAGING_SPLIT must be at least 1, not {self.split}")
        if self.inline_max < 0:
            raise InvalidArgumentError(
                f"GPUAIO_INLINE_MAX must not be negative, not {self.inline_max}"
            )

    def chunk_for(self, nbytes: int, budget: int | None = None, split: int = 0) -> int:
        """The chunk size for a transfer of ``nbytes``: ``1/split`` of it (this
        config's ``split`` unless given), as a power of two, clamped to
        [``min_chunk``, ``max_chunk``].

        With a pinned ``budget``, also no larger than the power of two that
        lets one transfer's ``depth + LOOKAHEAD`` blocks fit in it (but never
        under ``min_chunk``): large and small transfers under a tight budget
        then share one block size instead of evicting each other's blocks.
        """
        target = max(self.min_chunk, nbytes // (split or self.split))
        chunk = min(self.max_chunk, 1 << (target - 1).bit_length())
        if budget is not None:
            per_transfer = self.depth + LOOKAHEAD
            fit = 1 << (max(budget // per_transfer, 1).bit_length() - 1)
            chunk = min(chunk, fit)
        return max(self.min_chunk, chunk)


PCIE_BPS = 60e9
"""A pinned DMA's rate over PCIe Gen5 x16, a little optimistic, so that expected
completion times come early rather than late: they decide when to poll,
never correctness. An H200 ran pinned DMA at up to 55 GB/s; at 52e9, issue
13's run L expected 1 GiB copies 1.2 ms late, and woke them that late."""

POLL_FIRST_MAX = _env_size("GPUAIO_POLL_FIRST_MAX", 16 << 10)
"""Copies staged on the calling thread up to this size get the expected
duration a pinned copy of their size has, so that a lone one, done by the
time its task awaits it, is found done at a first poll instead of after a
turn of the loop (``gpuaio._engine.completion._firstpoll``), and may share
its stream's markers like one; 0: none does.

On H200 hosts, toggled per call in one process (medians of 25 paired
rounds), the estimate made 4 and 16 KiB staged copies 9-17% faster on
asyncio and 1-9% on uvloop; 64 KiB ones ran 0.97-1.01 as fast (issue 13,
runs CO and CP), the first poll coming before their DMA had finished. Run
BW, on slower paths, had found 3-8% at 4-64 KiB on asyncio and up to 4%
slower at 256 KiB."""

DIRECT_UP_MAX = _env_size("GPUAIO_DIRECT_UP_MAX", 64 << 10)
"""Uploads from pageable memory up to this size are handed to the driver's own
pageable path (``cuMemcpyAsync`` from the user's buffer) on the calling
thread, where the stream is idle: none of gpuaio's work on it is pending, no
host action of it is queued, and no other library may enqueue there (its
handle was never handed out); 0: none is.

The driver copies a small pageable source into its own staging memory and
returns; CUDA lets it wait for the stream's earlier work first, which on an
idle stream is none. That saves the pinned block, its ``memmove`` and its
hand-back: a 4 KiB pageable upload cost 4-7 us more than a pinned one on an
H200 host, in gpuaio's code (issue 13, runs DD and DJ).

64 KiB: on an H100 host (issue 13, run DN, ``tools/direct_upload_probe.py``,
four processes) the call returned in 8-14 us (p50) at 4-64 KiB on an idle
stream, and as fast beside another thread's 16 MiB pageable uploads through
the driver (p99 under 45 us); from 256 KiB it waited for those
(1.2-2.1 ms p50: the driver's staging memory is shared), which would hold the
event loop. Awaited 4-64 KiB uploads ran 1.05-1.40x as fast as staged ones,
toggled per call, about as fast as pinned ones at 4-16 KiB. A busy stream
did not make the call wait at any size measured (up to 1 MiB); the path
still requires an idle one, as CUDA does not promise that."""

DOWN_PIECE_MIN = _env_size("GPUAIO_DOWN_PIECE_MIN", 512 << 10)
"""A small download into pageable memory (up to ``inline_max``) of at least
this many bytes that issues its DMA early (:mod:`gpuaio._engine.early`) goes
in two DMAs, a marker between them: the first piece is copied out of its
block as soon as its DMA has completed, while the second's DMA runs, and the
op completes once the second is copied out too; 0: never.

One DMA, then one copy-out, runs the two one after the other; the driver's
own pageable download pipelines them. With raw driver calls on an H100 host
(issue 13, run IC, ``tools/piece_probe.py``) a 1 MiB download into numpy's
page + 16 array took 107.5 us in one piece, 90.1 us in two halves, 95.9 in
four, 120.7 in eight; at 256 KiB 33.0 against 31.7. Run JA (H100,
``transfers.py`` on asyncio, alternating processes, two rounds, us per
awaited copy): 512 KiB downloads took 70.8 and 73.7 in one piece, 57.5 and
57.3 with a first piece of a third; 1 MiB ones 117.1 and 143.5 against
109.3 and 129.5 (halves: 55.8 and 71.3, 114.3 and 141.4); 256 KiB ones in
halves 44.5 and 37.2 against 36.3 and 40.4, no gain, hence 512 KiB."""

DOWN_FIRST_PCT = min(90, max(10, int(os.environ.get("GPUAIO_DOWN_FIRST_PCT", "33"))))
"""The first piece's share of such a download, in percent (10-90), rounded
down to whole 4 KiB pages. A smaller first piece starts the copy-out sooner;
the second's DMA must still be done by the time the first is copied out (a
DMA runs about three times as fast as the copy-out). A third beat halves in
both of run JA's rounds at 512 KiB and 1 MiB (figures above)."""

LOOKAHEAD = int(os.environ.get("GPUAIO_LOOKAHEAD", "2"))
"""Chunks the host threads may be copying at once within one transfer."""

DMA_STEP = _env_size("GPUAIO_DMA_STEP", 4 << 20)
"""The least a staged upload DMAs at once of a chunk's copied slices (the
chunk's last DMA takes what is left): a DMA call costs 10-40 us of the stream
thread, and at 4 MiB the last DMA, all that follows the host copy, takes
about 80 us at 55 GB/s."""

D2H_SPLIT = int(os.environ.get("GPUAIO_D2H_SPLIT", "8"))
"""Chunks a download is split into where more than ``StagingConfig.split`` (0:
as many as an upload), unless its chunks would then be copied by the stream
thread alone (:data:`SOLO_CHUNK`); with the native copy threads only.

8: a download's first copy-out waits for its first chunk's whole DMA, and
the copy threads idle meanwhile. On an H200 host, 8 chunks ran 64 MiB
downloads at 25.9-27.7 GB/s against 21.0-21.2 in 2, 256 MiB ones at
31.7-31.8 against 28.0-28.1 (issue 13, run CI); at 16 MiB the 2 MiB chunks
copied solo ran at 5.7-6.8 against 12.6-14.3, hence the floor."""

D2H_WARM_US = max(0, int(os.environ.get("GPUAIO_D2H_WARM_US", "100")))
"""Where above 0, a staged download wakes the idle native copy threads as it
enqueues its first DMA, to poll for its first copy-out rather than sleep,
for that DMA's expected time (at :data:`PCIE_BPS`) plus this many
microseconds at most (``HostPool.warm``; never on machines of four cores
or fewer); 0: it does not.

The first copy-out can start only once the first piece's DMA has landed
(about 150 us for 8 MiB at 54 GB/s), and the copy threads, asleep until it
is queued, wake tens of microseconds apart. In the committed runs each 64
MiB download is timed once between other methods, and ran at 0.75-0.83 of
the host-copy ceiling, against about 0.86 back to back (issue 13, run LC).
100 by the rule written before its A/B (issue 13, run LE, an H100, five
rounds of alternating processes): 64 MiB downloads 1.05x with it (rounds
0.96-1.09), 256 MiB 1.00x, the uploads it does not touch 0.98-1.01x."""

D2H_PIECES = max(1, int(os.environ.get("GPUAIO_D2H_PIECES", "8")))
"""A staged download's chunks are DMAed in up to this many pieces of at least
``D2H_PIECE_MIN`` bytes, an event behind each, so that the copy threads start
copying a piece out once its own DMA has landed (:mod:`gpuaio._engine.download`);
1: whole chunks. On the native copy threads only, as ``D2H_SPLIT`` (a test may
set ``Stager.d2h_pieces`` anywhere).

The copy threads wait for a whole chunk's DMA before its first copy-out: a
32 MiB chunk of a 256 MiB download takes about 0.6 ms at 54 GB/s, and the
copy-out of each later chunk waited for its DMA once more. On H100 hosts
(issue 13, runs LA and LB, awaited copies in alternating processes, five
rounds each; medians of the per-round ratios against whole chunks) 8 pieces
of at least 8 MiB, the default, ran 256 MiB downloads 1.11x and 1 GiB ones
1.07x as fast, 4 pieces of 8-16 MiB 1.02-1.12x and 1.04-1.05x; 64 MiB
downloads cut into 2 MiB pieces ran at 0.73-0.78x and into 4 MiB ones at
0.90x, hence the floor: they keep whole 8 MiB chunks. The default won the
rule written before run LB."""

D2H_PIECE_MIN = _env_size("GPUAIO_D2H_PIECE_MIN", 8 << 20)
"""The least bytes of a piece of a download's chunk DMAed on its own (``D2H_PIECES``)."""

SOLO_CHUNK = _env_size("GPUAIO_SOLO_CHUNK", 2 << 20)
"""Chunks up to this size are copied by the stream's host thread itself, while
the DMA of the chunk before runs: handing 1-2 MiB to the copy threads cost
more than the copy (an H200 ran 4 MiB pageable copies at 3.2-4.5 GB/s that
way, and 16 MiB ones faster with fewer threads; issue 13)."""

NT_MIN = _env_size("GPUAIO_NT_MIN", 256 << 10)
"""Uploads copy their source into pinned blocks with non-temporal stores from
this size (a chunk's slices, or a copy staged on the calling thread), where
the install has the native copy threads and the CPU such stores
(:func:`gpuaio._engine.nativecopy.nt_copier`); 0: never.

A DMA that reads a block just written by ordinary stores must snoop each
line still dirty in the CPU's caches. On an H200 host (issue 13, run DC) a
1 MiB DMA took 54-57 us after a ``memmove`` into its block and 34-35 us
after a non-temporal copy (32-36 us for the same DMA again at once), and
awaited uploads, toggled per call in one process, ran 1.23-1.33x as fast at
1 MiB, 1.28-1.36x at 16 MiB and 1.08-1.16x at 1 GiB (0.98-1.13x at 256 KiB,
4, 64 and 256 MiB). At 64 KiB they ran 0.94-0.99x: the non-temporal copy
itself is slower there, and its DMA gains 1-2 us. 256 KiB is the size from
which every measured size held at least 0.97x in each of four processes,
the rule the run was judged by."""

INLINE_PIECES = int(os.environ.get("GPUAIO_INLINE_PIECES", "1"))
"""An upload staged on the calling thread (up to ``inline_max``) is copied into
its block and DMAed in up to this many pieces of at least
``INLINE_PIECE_MIN`` bytes, each piece's DMA enqueued as soon as it is
copied, so the DMA of one overlaps the copy of the next; 1: one piece.

The blocking call it replaces, the driver's own pageable copy, pipelines
its staging with its DMA the same way; gpuaio's 1 MiB upload, one copy then
one DMA, ran at 0.88-0.97 of torch's on H100 hosts (issue 13, runs DT and
DV). Each piece costs a driver call (1.6-2.4 us on those hosts), and on an
H100 that cost what the overlap won: 1 MiB uploads in 2 pieces ran at
0.77-0.78 of naive against 0.75-0.78 in one, in 4 at 0.68-0.72 (issue 13,
run DX). So it stays off."""

INLINE_PIECE_MIN = 128 << 10
"""The smallest piece of an upload staged on the calling thread in pieces."""

D2H_NT_MIN = _env_size("GPUAIO_D2H_NT_MIN", 256 << 20)
"""Downloads of at least this size, staged through the stream's host thread,
copy their chunks out of the pinned blocks into the destination with
non-temporal stores (:func:`gpuaio._engine.nativecopy.nt_copier`); 0: never.

Ordinary stores read each destination line before writing it; these do
not, and leave the destination out of the CPU's caches, where a download
this large would not stay anyway. On an H200 host (issue 13, run DE),
awaited downloads toggled per call in one process ran 1.07-1.17x as fast
at 256 MiB and 1.05-1.10x at 1 GiB, but 0.93-0.97x at 64 MiB and 0.81-0.92x
at 16 MiB: 256 MiB is where the rule the run was judged by (every size from
there up at least 0.97x, one at least 1.03x, in each of four processes)
starts."""

_GATED_BOTH = any(os.environ.get(k) for k in ("GPUAIO_GATED_MIN", "GPUAIO_GATED_MAX"))

GATED_MIN = _env_size("GPUAIO_GATED_MIN", 512 << 10)
"""With ``GPUAIO_GATED_MIN`` or ``GPUAIO_GATED_MAX`` set, copies between the
GPU and pageable memory of ``GATED_MIN``-``GATED_MAX`` bytes, either way, are
gated: they go through their pinned blocks by the native copy threads while
their stream waits on flags the threads set, and the threads on words the
stream sets (:mod:`gpuaio._engine.gated`), where the install has those
threads. ``GPUAIO_GATED_MAX=0`` turns the path off.

Unset, each direction has its own measured range (:data:`GATED_UP_MIN`,
:data:`GATED_DOWN_MIN`)."""

GATED_MAX = _env_size("GPUAIO_GATED_MAX", 16 << 20)
"""See :data:`GATED_MIN`."""

GATED_UP_MIN = _env_size("GPUAIO_GATED_UP_MIN", GATED_MIN if _GATED_BOTH else 2 << 20)
"""Uploads of ``GATED_UP_MIN``-``GATED_UP_MAX`` bytes are gated; by default
2-8 MiB. ``GPUAIO_GATED_UP_MIN``/``_MAX`` set uploads alone, over
``GPUAIO_GATED_MIN``/``_MAX``.

Measured (issue 13, run DL, H100, compiled install): in ``transfers.py``,
gated against the usual path over three rounds, awaited pageable uploads ran
1.75x as fast at 2 MiB, 2.20x at 4 MiB, 1.57x at 8 MiB, 1.30x at 12 MiB and
1.12x at 16 MiB (medians). The rule written before the run kept a size
where every round was faster, the median by at least 1.05x, and
``tools/nt_probe.py --toggle gated`` agreed: uploads kept 2-8 MiB (12 and
16 MiB failed the probe). Run DO then passed the whole GPU suite with these
ranges on. Run EX (H100) measured uploads gated from 512 KiB under the same
rule: 0.79-0.86x at 512 KiB and 0.92-1.08x at 1 MiB, so the range still
starts at 2 MiB."""

GATED_UP_MAX = _env_size("GPUAIO_GATED_UP_MAX", GATED_MAX if _GATED_BOTH else 8 << 20)
"""See :data:`GATED_UP_MIN`; 0: no upload is gated."""

GATED_DOWN_MIN = _env_size("GPUAIO_GATED_DOWN_MIN", GATED_MIN if _GATED_BOTH else 2 << 20)
"""Downloads of ``GATED_DOWN_MIN``-``GATED_DOWN_MAX`` bytes are gated; by
default 2-16 MiB: as :data:`GATED_UP_MIN`, with
``GPUAIO_GATED_DOWN_MIN``/``_MAX``. Run DL: downloads 1.14-1.86x at 2-16 MiB
(medians); its rule kept 2 MiB and 6-16 MiB, so the range first began at the
run of kept sizes that holds 16 MiB, 6 MiB. Run DP (H100) measured 2, 3, 4
and 6 MiB again with a rule written before it: gated downloads ran 1.35x,
1.80x and 1.50x as fast at 2, 3 and 4 MiB (medians of three rounds, every
round faster), and ``tools/nt_probe.py --toggle gated`` kept all four sizes
on both loops, so the range starts at 2 MiB. The whole GPU suite passed with
that minimum before it became the default. Run EX (H100) measured downloads
gated from 512 KiB under the same rule: 0.58-0.67x at 512 KiB and
0.81-0.92x at 1 MiB, where the default path already beat the naive call."""

GATED_DOWN_MAX = _env_size("GPUAIO_GATED_DOWN_MAX", GATED_MAX if _GATED_BOTH else 16 << 20)
"""See :data:`GATED_DOWN_MIN`; 0: no download is gated."""

GATED_SLICE = _env_size("GPUAIO_GATED_SLICE", 256 << 10)
"""The least slice a copy thread takes of a gated copy's chunk (one slice per
thread where that is more)."""

GATED_COPY_BPS = 40e9
"""What the copy threads are expected to manage together, optimistic, for a
gated copy's expected duration (which decides when it is polled for)."""
