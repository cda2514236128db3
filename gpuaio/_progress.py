"""Progress reporting for long transfers.

``stream.copy(dst, src, progress=cb)`` calls ``cb(done_bytes, total_bytes)``
as a staged transfer advances (after each chunk) and once more when the
operation completes successfully. The callback runs on a gpuaio worker
thread: keep it quick and thread-safe. :func:`progress_bar` makes one that
drives a tqdm bar.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ProgressCallback", "progress_bar"]

ProgressCallback = Callable[[int, int], None]


def progress_bar(desc: str | None = None, **tqdm_kwargs: Any) -> ProgressCallback:
    """A progress callback that draws a tqdm bar (needs the ``tqdm`` package).

    The bar is created on the first report, in bytes, and closed when the
    transfer completes.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("progress_bar() needs tqdm: pip install tqdm") from exc
    lock = threading.Lock()
    state: dict[str, Any] = {"bar": None, "last": 0}

    def report(done: int, total: int) -> None:
        with lock:
            bar = state["bar"]
            if bar is None:
                bar = state["bar"] = tqdm(
                    total=total,
                    desc=desc,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    **tqdm_kwargs,
                )
            bar.update(done - state["last"])
            state["last"] = done
            if done >= total:
                bar.close()

    return report
