"""The example service written with gpuaio: no handler ever blocks the event loop.

``POST /process`` with a binary body uploads it to the GPU, runs the
``transform`` kernel over it and answers with the result; ``GET /health``
answers ``ok``. Each request borrows one of ``--slots`` streams (with a
device buffer), so requests overlap on the GPU while the loop keeps serving
others, health probes included.

The rule that keeps the loop responsive: the event-loop thread never makes
a blocking CUDA call and never copies a large buffer in one go. The body is
read chunk by chunk as it arrives, gpuaio's copies stage pageable memory on
worker threads, and the answer is written in bounded slices
(:func:`_common.write_body`), not as one ``web.Response``.

Run it (127.0.0.1 only)::

    python examples/service/gpuaio_app.py --port 8080
    curl --data-binary @file http://127.0.0.1:8080/process > out

``naive_app.py`` is the same service written as handlers usually are:
blocking driver calls, and the answer as one ``web.Response``;
``loadtest.py`` compares the two.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
from aiohttp import web

import gpuaio

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]


class GpuService:
    """Request handlers sharing a fixed set of (stream, device buffer) slots."""

    def __init__(self, dev: gpuaio.Device, *, rounds: int, slots: int, max_bytes: int) -> None:
        self.dev = dev
        self.kernel = common.make_kernel(dev)
        self.rounds = rounds
        self.max_bytes = max_bytes
        self._slots: asyncio.Queue[tuple[gpuaio.Stream, common.DeviceBuffer]] = asyncio.Queue()
        for _ in range(slots):
            self._slots.put_nowait((dev.stream(), common.DeviceBuffer(dev)))

    async def process(self, request: web.Request) -> web.StreamResponse:
        body = await common.read_body(request, self.max_bytes)
        out = await self.transform(body)
        # Not web.Response(body=out): that copies all of `out` on the loop thread.
        return await common.write_body(request, out)

    async def transform(self, body: np.ndarray) -> np.ndarray:
        """``body`` (uint8, C-contiguous) run through the kernel on the GPU, in a new array.

        The upload, the kernel and the download are gpuaio calls: the event
        loop is never blocked, and other requests (and health probes) are
        served meanwhile. At most ``slots`` requests are on the GPU at once;
        the others wait here for a slot. ``body`` must not be modified until
        this returns. The Ray Serve example's deployment calls this too.
        """
        n = body.size
        out = np.empty(n, np.uint8)
        stream, buffer = await self._slots.get()
        try:
            d = buffer.view(n)
            # Enqueue all three at once; stream order runs them in turn.
            ops = [
                stream.copy(d, body),
                stream.launch(
                    self.kernel,
                    common.grid_for(n),
                    common.BLOCK,
                    d,
                    np.uint64(n),
                    np.uint32(self.rounds),
                ),
                stream.copy(out, d),
            ]
            await gpuaio.wait_all(ops)
        finally:
            # Safe even if this request was cancelled mid-wait: the next
            # borrower's work queues behind these ops on the same stream,
            # and the ops own `body` and `out` until they complete.
            self._slots.put_nowait((stream, buffer))
        return out

    async def close(self, app: web.Application) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for each slot's stream to finish its work, then close it."""
        while not self._slots.empty():
            stream, _ = self._slots.get_nowait()
            await stream.aclose()


def make_app(args: argparse.Namespace) -> web.Application:
    """The aiohttp app; ``args`` as from :func:`_common.parse_args`."""
    service = GpuService(
        gpuaio.Device(0), rounds=args.rounds, slots=args.slots, max_bytes=args.max_mib << 20
    )
    app = web.Application(client_max_size=service.max_bytes)
    app.router.add_post("/process", service.process)
    app.router.add_get("/health", common.health)
    app.on_cleanup.append(service.close)
    return app


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args("gpuaio example service (non-blocking GPU calls)", argv)
    common.serve(make_app, args)


if __name__ == "__main__":
    main()
