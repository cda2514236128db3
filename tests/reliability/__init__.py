"""gpuaio's reliability harness and its committed reports (see harness.py)."""
