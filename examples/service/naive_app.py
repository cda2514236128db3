"""The example service written the naive way: blocking GPU calls in the handler.

Same endpoints, kernel and body reading as ``gpuaio_app.py``. The handler
makes the driver calls a CUDA user would write with ``cuda.bindings``:
``cuMemcpyHtoDAsync`` from the pageable body (the driver stages it and
blocks the calling thread), ``cuLaunchKernel``, ``cuMemcpyDtoHAsync`` into a
pageable buffer (returns only when done) and ``cuStreamSynchronize``. They
run on the event-loop thread, so while one request is on the GPU no other
request, and no health probe, is served. It answers the usual way, with a
``web.Response`` holding the whole result, which aiohttp may copy whole on
the event-loop thread (see ``_common.write_body``).

The calls go through gpuaio's backend object (a thin layer over
``cuda.bindings``), so this file also runs on the simulated backend, which
blocks its caller exactly where the driver does.
"""

from __future__ import annotations

import argparse

import numpy as np
from aiohttp import web

import gpuaio

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common  # type: ignore[no-redef]


class NaiveService:
    """One stream and one device buffer: the handler never yields while using them."""

    def __init__(self, dev: gpuaio.Device, *, rounds: int, max_bytes: int) -> None:
        self.dev = dev
        self.kernel = common.make_kernel(dev)
        self.rounds = rounds
        self.max_bytes = max_bytes
        self.backend = gpuaio.current_runtime().backend
        self.stream = self.backend.stream_create(dev.ordinal)
        self.buffer = common.DeviceBuffer(dev)

    async def process(self, request: web.Request) -> web.Response:
        body = await common.read_body(request, self.max_bytes)
        out = self.transform(body)
        return web.Response(body=memoryview(out), content_type="application/octet-stream")

    def transform(self, body: np.ndarray) -> np.ndarray:
        """What ``GpuService.transform`` computes, with blocking calls on the calling thread."""
        n = body.size
        out = np.empty(n, np.uint8)
        d = self.buffer.view(n)
        be, s = self.backend, self.stream
        be.memcpy_async(d.ptr, body.ctypes.data, n, s)  # blocks: pageable source
        args = (d, np.uint64(n), np.uint32(self.rounds))
        grid = (common.grid_for(n), 1, 1)
        be.launch(self.kernel.native, grid, (common.BLOCK, 1, 1), args, 0, s)
        be.memcpy_async(out.ctypes.data, d.ptr, n, s)  # blocks until the data is in `out`
        be.stream_synchronize(s)
        return out

    async def close(self, app: web.Application) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Wait for the stream (blocking), then destroy it."""
        self.backend.stream_synchronize(self.stream)
        self.backend.stream_destroy(self.stream)


def make_app(args: argparse.Namespace) -> web.Application:
    """The aiohttp app; ``args`` as from :func:`_common.parse_args` (``--slots`` is unused)."""
    service = NaiveService(gpuaio.Device(0), rounds=args.rounds, max_bytes=args.max_mib << 20)
    app = web.Application(client_max_size=service.max_bytes)
    app.router.add_post("/process", service.process)
    app.router.add_get("/health", common.health)
    app.on_cleanup.append(service.close)
    return app


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args("naive example service (blocking GPU calls in the handler)", argv)
    common.serve(make_app, args)


if __name__ == "__main__":
    main()
