"""Progress reporting for long transfers and for the prefetch loader.

``stream.copy(dst, src, progress=cb)`` calls ``cb(done_bytes, total_bytes)``
as a staged transfer advances (after each chunk, on the stream's host
thread) and once more when the operation completes successfully (on the
thread that finds it complete: a gpuaio thread, or the event loop of a task
polling for it). Keep it quick and thread-safe.

``prefetch(source, progress=cb)`` calls ``cb(batches, total)`` on the
consumer's task each time a batch is handed over, ``total`` being
``len(source)`` when the source has a length and ``None`` otherwise, and
once more with ``total == batches`` when the source is exhausted.

An exception raised by a callback is logged on the ``gpuaio`` logger and
does not disturb the transfer. :func:`progress_bar` makes a callback that
drives a tqdm bar.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ProgressCallback", "progress_bar"]

ProgressCallback = Callable[[int, int], None]
"""``cb(done, total)``: bytes of a copy."""

LoaderProgressCallback = Callable[[int, "int | None"], None]
"""``cb(done, total)``: batches of a loader; ``total`` is None when unknown."""

log = logging.getLogger("gpuaio")


def report_progress(cb: Callable[[int, Any], None], done: int, total: int | None) -> None:
    """Call a user's progress callback; its exceptions are logged, never raised."""
    try:
        cb(done, total)
    except Exception:
        log.exception("gpuaio progress callback %r failed", cb)


def progress_bar(
    desc: str | None = None, *, unit: str = "B", **tqdm_kwargs: Any
) -> Callable[[int, int | None], None]:
    """A progress callback that draws a tqdm bar (needs the ``tqdm`` package).

    The bar is created on the first report and closed once ``done`` reaches
    ``total``. ``unit="B"`` (the default, for copies) counts bytes with
    binary prefixes; another unit counts as is, for example
    ``prefetch(source, progress=progress_bar("epoch", unit="batch"))``. A
    ``total`` of None (a source of unknown length) draws a bar without an
    end, closed by the loader's last report.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("progress_bar() needs tqdm: pip install tqdm") from exc
    lock = threading.Lock()
    state: dict[str, Any] = {"bar": None, "last": 0}

    scale: dict[str, Any] = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}

    def report(done: int, total: int | None) -> None:
        with lock:
            bar = state["bar"]
            if bar is None:
                bar = state["bar"] = tqdm(total=total, desc=desc, unit=unit, **scale, **tqdm_kwargs)
            elif total is not None and bar.total != total:
                bar.total = total
            bar.update(done - state["last"])
            state["last"] = done
            if total is not None and done >= total:
                bar.close()

    return report
