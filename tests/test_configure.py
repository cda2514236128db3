"""gpuaio.configure(): settings in code, each overriding its environment variable."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import gpuaio
from gpuaio._core.errors import InvalidArgumentError
from gpuaio._engine import completion as _completion
from gpuaio._engine.completion._events import EventEngine
from tests.conftest import latch
from tests.test_copy import pattern
from tests.test_loader import eventually

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@pytest.fixture
def restored(gpuaio_runtime: Any) -> Iterator[Any]:
    """The runtime, with its staging and strategy as they were after the test.

    ``configure`` closes the stager it replaces (on the reaper), so the
    runtime gets a default one again, made on first use as before: on a GPU
    the runtime is the session's, shared with the tests after this one.
    """
    rt = gpuaio_runtime
    had = "stager" in rt.extras
    old, strategy = rt.extras.get("stager"), rt.strategy
    yield rt
    new = rt.extras.pop("stager", None)
    if new is not None and new is old:
        rt.extras["stager"] = old  # never replaced
    else:
        if had and old is None:
            rt.extras["stager"] = None  # staging was off
        rt._staging_settings = (None, None)
        if new is not None:
            new.close()
    if rt.strategy != strategy:
        rt.set_completion(strategy)


async def test_staging_settings_in_code(restored: Any, dev: gpuaio.Device) -> None:
    rt = gpuaio.configure(pinned_budget="2M", chunk_bytes=MiB, staging_depth=2, inline_max="64K")
    assert rt is restored
    stager = rt.stager
    assert stager.pool.budget == 2 * MiB
    assert (stager.config.max_chunk, stager.config.depth, stager.config.inline_max) == (
        MiB,
        2,
        64 << 10,
    )
    n = 8 * MiB
    src = pattern(n, 4)
    d = dev.empty(n)
    s = dev.stream()
    await s.copy(d, src)
    out = np.empty(n, np.uint8)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    assert stager.pool.stats().peak_reserved <= 2 * MiB
    gpuaio.configure(staging_depth=3)  # the others stay
    assert rt.stager.pool.budget == 2 * MiB and rt.stager.config.depth == 3
    s.close()


async def test_staging_off_and_on(restored: Any, dev: gpuaio.Device) -> None:
    gpuaio.configure(staging=False)
    assert restored.stager is None
    gpuaio.configure(pinned_budget="4M")  # staying off: only the budget was given
    assert restored.stager is None
    src = pattern(3 * MiB, 6)
    d = dev.empty(src.nbytes)
    s = dev.stream()
    await s.copy(d, src)  # the driver's own path
    gpuaio.configure(staging=True)
    assert restored.stager is not None and restored.stager.pool.budget == 4 * MiB
    out = np.empty_like(src)
    await s.copy(out, d)
    np.testing.assert_array_equal(out, src)
    s.close()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"pinned_budget": -1}, "pinned_budget"),
        ({"pinned_budget": "lots"}, "pinned_budget"),
        ({"pinned_budget": 1.5}, "pinned_budget"),
        ({"chunk_bytes": "1K"}, "chunk_bytes"),
        ({"staging_depth": 0}, "staging_depth"),
        ({"staging_depth": True}, "staging_depth"),
        ({"inline_max": -5}, "inline_max"),
        ({"staging": "yes"}, "staging"),
    ],
)
def test_bad_settings_name_the_argument_and_change_nothing(
    restored: Any, kwargs: dict[str, Any], name: str
) -> None:
    before = restored.extras.get("stager")
    with pytest.raises(InvalidArgumentError, match=name):
        gpuaio.configure(**kwargs)
    assert restored.extras.get("stager") is before


async def test_staging_settings_wait_for_transfers_in_flight(
    restored: Any, dev: gpuaio.Device
) -> None:
    import dataclasses

    # Staged, so that pinned blocks stay in use (the default stager is replaced below).
    stager = restored.stager
    stager.config = dataclasses.replace(stager.config, driver_max=0)
    s = dev.stream()
    release = latch(dev, s)
    src = pattern(4 * MiB, 2)
    d = dev.empty(src.nbytes)
    op = s.copy(d, src)  # its staging blocks stay guarded behind the latch
    await eventually(lambda: restored.stager.pool.stats().in_use > 0)
    try:
        with pytest.raises(RuntimeError, match="hold pinned blocks"):
            gpuaio.configure(pinned_budget="8M")
    finally:
        release()
    await op
    gpuaio.configure(pinned_budget="8M")
    assert restored.stager.pool.budget == 8 * MiB
    s.close()


@pytest.mark.parametrize("name", ["thread", "bogus", ""])
def test_unknown_completion_strategy_is_rejected(restored: Any, name: str) -> None:
    # "thread" was a strategy until issue 16; it now lives in benchmarks/.
    before = restored.strategy
    with pytest.raises(InvalidArgumentError, match="completion") as info:
        gpuaio.configure(completion=name)  # type: ignore[arg-type]
    for valid in gpuaio.STRATEGIES:
        assert repr(valid) in str(info.value)
    assert restored.strategy == before
    with pytest.raises(InvalidArgumentError, match="completion"):
        restored.set_completion(name)
    assert restored.strategy == before
    assert "thread" not in gpuaio.STRATEGIES


def test_bad_completion_environment_variable_is_named() -> None:
    with pytest.raises(InvalidArgumentError, match="GPUAIO_COMPLETION") as info:
        _completion.check_strategy("thread", "GPUAIO_COMPLETION")
    assert "'events'" in str(info.value)


async def test_a_registered_strategy_is_selectable(
    restored: Any, dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The extension point benchmarks/completion.py uses for its "thread" engine."""
    monkeypatch.setattr(_completion, "_registered", {})

    class WatcherOnly(EventEngine):
        strategy = "watcher-only"
        loop_spin_s = 0.0

    _completion.register_strategy("watcher-only", WatcherOnly)
    with pytest.raises(InvalidArgumentError, match="built in"):
        _completion.register_strategy("events", WatcherOnly)
    gpuaio.configure(completion="watcher-only")  # type: ignore[arg-type]
    assert isinstance(restored.engine(0), WatcherOnly)
    assert "watcher-only" not in gpuaio.STRATEGIES
    s = dev.stream()
    d = dev.empty(64)
    await s.memset(d, 5)
    out = np.empty(64, np.uint8)
    await s.copy(out, d)
    assert (out == 5).all()
    await s.aclose()
    gpuaio.configure(completion="events")


async def test_a_stream_used_before_a_strategy_change_goes_to_the_new_engine(
    restored: Any, dev: gpuaio.Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams keep their device's engine (a lookup less per op) until it closes:
    a new completion strategy closes it, and the stream's next op goes to the
    engine that replaced it."""
    monkeypatch.setattr(_completion, "_registered", {})

    class WatcherOnly(EventEngine):
        strategy = "watcher-only"
        loop_spin_s = 0.0

    _completion.register_strategy("watcher-only", WatcherOnly)
    s = dev.stream()
    d = dev.empty(64)
    await s.memset(d, 1)
    old = restored.engine(dev.ordinal)
    gpuaio.configure(completion="watcher-only")  # type: ignore[arg-type]
    try:
        assert old.closed
        new = restored.engine(dev.ordinal)
        assert isinstance(new, WatcherOnly)
        op = s.memset(d, 7)
        assert op._poll is not None and op._poll[0] is new, "the op went to the closed engine"
        await op
        out = np.empty(64, np.uint8)
        await s.copy(out, d)
        assert (out == 7).all()
        await s.aclose()
    finally:
        gpuaio.configure(completion="events")
