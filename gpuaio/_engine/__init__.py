"""The engine: the machinery behind every stream, below the objects users hold.

Host threads, the pinned staging pool, the reaper, completion engines (how a
finished GPU operation wakes its awaiting tasks), per-stream sequencers (stream
order across driver and host work) and the stager (pageable transfers). It
imports the core and the backends; it is handed the runtime as a
:class:`~gpuaio._engine.services.Services` protocol, never imports it.
"""
