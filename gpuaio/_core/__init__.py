"""The core: what every other layer is made of, importing nothing of gpuaio above it.

Errors, operations (the awaitable handle of enqueued work), the protocols by
which operations name their stream and runtime, loop ports (waking an event
loop from any thread), tracing, progress callbacks, kernel argument specs and
DLPack. See docs/architecture.md for the layers.
"""
