"""The objects users hold: the runtime, devices, streams, events and memory.

Each of them is re-exported by :mod:`gpuaio`; import them from there. This
layer composes the engine and the backends into the process-wide runtime.
"""
