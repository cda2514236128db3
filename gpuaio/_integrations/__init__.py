"""Integrations built on the public objects: prefetching loaders, interop, multi-GPU.

Nothing below this layer imports it.
"""
