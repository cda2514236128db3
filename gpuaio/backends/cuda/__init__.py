"""The real backend: the CUDA driver API through ``cuda.bindings``.

Contexts. The backend uses each device's *primary* context (the one the CUDA
runtime, CuPy, PyTorch and ``cuda.core`` share). It is retained with
``cuDevicePrimaryCtxRetain`` the first time a device is used and released by
:meth:`CudaBackend.close`. Calls arrive from the event-loop thread, from
gpuaio's threads and from the user's, and other code in those threads may
have made another context current (``torch.cuda.set_device(1)``,
``with cupy.cuda.Device(1)``, a PyCUDA context). So every method that needs a
context reads the thread's current one (``cuCtxGetCurrent``; no cache could
see what foreign code set), makes the one it needs current only when they
differ, and makes the previous one current again once its driver call has
returned (see :class:`~gpuaio.backends.Backend` for the two cases where the
context stays). When the right context is current already, as in gpuaio's own
threads after their first call, that is one ``cuCtxGetCurrent`` per call. In
a compiled install the copies, event records and queries of every awaited
operation make that check and their call in one C function (``_fast``).

Errors. Every ``CUresult`` is checked; a failure becomes
:func:`gpuaio._core.errors.make_cuda_error` (``CudaError``, or ``DeviceFatalError``
for sticky codes) naming the driver call, the ``CUresult`` name and its
description. Bad arguments caught before a call raise
:class:`~gpuaio._core.errors.InvalidArgumentError`; nothing is enqueued then.

Kernel arguments: how :meth:`CudaBackend.launch` passes Python values to a
kernel is described in ``_launch``.

One module per concern; :class:`CudaBackend` is their mixins put together:

* ``_driver``: the bindings, ``CUresult`` checks, devices and their
  properties, primary contexts and the context switch around each call;
* ``_memory``: device, managed and pinned memory, host registration, pointer
  classification;
* ``_streams``: streams, events, copies, memsets and stream memory operations;
* ``_fast``: the hot path's copy, record and query calls through the driver's
  function pointers, where a compiled install built ``_fastcalls.c``;
* ``_launch``: kernel launches (argument lowering) and host functions;
* ``_compile``: NVRTC compiles through ``cuda.core`` and the kernel handle.
"""

from __future__ import annotations

from ._compile import CompileCalls, CudaKernel
from ._launch import LaunchCalls
from ._memory import MemoryCalls
from ._streams import CudaEvent, CudaStream, StreamCalls

__all__ = ["CudaBackend", "CudaEvent", "CudaKernel", "CudaStream"]


class CudaBackend(LaunchCalls, CompileCalls, StreamCalls, MemoryCalls):
    """The ``cuda`` backend: CUDA driver API calls through ``cuda.bindings``.

    Construction initializes the driver (``cuInit``) and counts devices; it
    raises :class:`~gpuaio._core.errors.NoDeviceError` if the driver library is
    missing, ``cuInit`` fails, or no device exists. Everything per device is
    lazy: a device's primary context is retained on its first use.
    """

    name = "cuda"
