"""What both versions of the example service share.

The kernel, reading a request body chunk by chunk, writing an answer chunk
by chunk, and serving an aiohttp app on 127.0.0.1. ``gpuaio_app.py`` and
``naive_app.py`` read bodies the same way; they differ in the GPU calls and
in how they answer: the gpuaio app streams its answer with
:func:`write_body`, the naive one returns a ``web.Response`` holding the
whole body, as handlers usually do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web

import gpuaio

KERNEL_SRC = r"""
extern "C" __global__ void transform(unsigned char* data, unsigned long long n,
                                     unsigned int rounds) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < n; i += stride) {
        unsigned int x = data[i];
        for (unsigned int r = 0; r < rounds; ++r) x = (x * 3u + 7u) & 0xFFu;
        data[i] = (unsigned char)x;
    }
}
"""

BLOCK = 256
MAX_GRID = 1 << 16
HOST = "127.0.0.1"


def transform_host(data: np.ndarray, rounds: int) -> None:
    """The kernel's effect, on the host (the simulated backend's kernel body)."""
    for _ in range(rounds):
        data *= np.uint8(3)
        data += np.uint8(7)


def _transform_sim(grid: Any, block: Any, data: np.ndarray, n: Any, rounds: Any) -> None:
    transform_host(data.reshape(-1)[: int(n)], int(rounds))


def expected(payload: bytes, rounds: int) -> bytes:
    """What ``POST /process`` answers for ``payload``."""
    out = np.frombuffer(payload, np.uint8).copy()
    transform_host(out, rounds)
    return out.tobytes()


def make_kernel(dev: gpuaio.Device) -> gpuaio.Kernel:
    """``transform`` compiled for ``dev`` (NVRTC on a GPU, the Python body on the sim)."""
    return dev.compile(KERNEL_SRC, "transform", sim=_transform_sim)


def grid_for(n: int) -> int:
    return max(1, min(MAX_GRID, (n + BLOCK - 1) // BLOCK))


PREFAULT_MIN = 1 << 20
"""Bodies from this size up are read into a buffer faulted in off the event loop."""
_PAGE = 4096


def faulted_in(n: int) -> np.ndarray:
    """A new uint8 buffer of ``n`` bytes whose pages are all mapped (contents undefined)."""
    buf = np.empty(n, np.uint8)
    buf[::_PAGE] = 0
    buf[-1:] = 0  # the last page, where the buffer does not start on a page
    return buf


async def body_buffer(n: int) -> np.ndarray:
    """A new uint8 buffer for a request body of ``n`` bytes.

    A large one's pages are faulted in on a worker thread: the first write
    to each one zeroes a fresh page in the kernel, and in a VM that backs
    guest memory lazily one 2 MiB huge page took 5-7 ms of system time,
    every eighth 256 KiB chunk, on the event-loop thread.
    """
    if n >= PREFAULT_MIN:
        return await asyncio.to_thread(faulted_in, n)
    return np.empty(n, np.uint8)


async def read_body(request: web.Request, limit: int) -> np.ndarray:
    """The request body in a fresh (pageable) numpy buffer, read chunk by chunk.

    Avoids the extra whole-body copy of ``await request.read()``.
    """
    n = request.content_length
    if n is None:
        raise web.HTTPLengthRequired()
    if n > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=n)
    if n == 0:
        raise web.HTTPBadRequest(text="empty body")
    buf = await body_buffer(n)
    off = 0
    async for chunk in request.content.iter_any():
        k = len(chunk)
        if off + k > n:
            raise web.HTTPBadRequest(text="body longer than Content-Length")
        buf[off : off + k] = np.frombuffer(chunk, np.uint8)
        off += k
    if off != n:
        raise web.HTTPBadRequest(text="body shorter than Content-Length")
    return buf


WRITE_CHUNK = 1 << 20
"""Most bytes :func:`write_body` hands the socket in one step of the event loop."""


async def write_body(request: web.Request, data: np.ndarray) -> web.StreamResponse:
    """Answer ``request`` with the bytes of ``data`` (C-contiguous), ``WRITE_CHUNK`` at a time.

    ``web.Response(body=data)`` writes the whole body in one step: aiohttp
    joins it with the headers into a new ``bytes`` object (on Python before
    3.12.9, 3.13 before 3.13.2), and asyncio before 3.12 copies what the
    socket doesn't take at once into its buffer. For 64 MiB that is tens of
    milliseconds of copying on the event-loop thread, during which no other
    request, health probes included, is served. Here no step copies more
    than ``WRITE_CHUNK`` bytes, and the loop runs other work between steps.

    The transport may keep views of ``data`` until the bytes are sent, so
    pass a buffer that is not reused afterwards.
    """
    resp = web.StreamResponse()
    resp.content_type = "application/octet-stream"
    resp.content_length = data.nbytes
    await resp.prepare(request)
    view = data.data.cast("B")  # the bytes of `data`, not a copy
    for off in range(0, len(view), WRITE_CHUNK):
        await resp.write(view[off : off + WRITE_CHUNK])
        # write() waits only once the socket is backed up; yield regardless,
        # so that a fast reader can't keep the loop on this one answer.
        await asyncio.sleep(0)
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    """The liveness probe: answers at once unless the event loop is blocked."""
    return web.Response(text="ok")


class DeviceBuffer:
    """A device buffer that grows to the largest request seen (powers of two)."""

    def __init__(self, dev: gpuaio.Device) -> None:
        self._dev = dev
        self._array: gpuaio.DeviceArray | None = None

    def view(self, n: int) -> gpuaio.DeviceArray:
        if self._array is None or self._array.nbytes < n:
            # The old buffer is freed once operations still using it complete.
            self._array = self._dev.empty(1 << (n - 1).bit_length(), np.uint8)
        return self._array[:n]


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--rounds", type=int, default=256, help="kernel work per byte")
    parser.add_argument("--slots", type=int, default=8, help="requests on the GPU at once")
    parser.add_argument("--max-mib", type=int, default=256, help="largest request body")
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="stop when the parent process is gone"
    )
    return parser.parse_args(argv)


async def _watch_parent(stop: asyncio.Event) -> None:
    """Set ``stop`` once the process that started this one has exited."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop.set()


def serve(
    make_app: Callable[[argparse.Namespace], web.Application], args: argparse.Namespace
) -> None:
    """Serve on 127.0.0.1 until SIGINT/SIGTERM; prints ``READY http://127.0.0.1:PORT``."""

    async def main() -> None:
        app = make_app(args)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, args.port))
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.ensure_future(_watch_parent(stop)) if args.exit_with_parent else None
        print(f"READY http://{HOST}:{sock.getsockname()[1]}", flush=True)
        try:
            await stop.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            await runner.cleanup()

    if args.uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
