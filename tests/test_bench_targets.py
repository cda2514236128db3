"""The transfer benchmark judges issue 13's targets 1-3 in its own records.

A committed run must say, record by record, whether each target held:
gpuaio's pageable copy against the fastest peer that ran in the same
process (target 1), its pinned copy against the raw call from 1 MiB (target
2), and, from 64 MiB, the naive call and the host-copy ceiling (target 3).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def transfers() -> ModuleType:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import transfers as module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def _by_name(size: str, **values: float | None) -> dict[str, dict[str, Any]]:
    return {f"{k}_{size}": {"name": f"{k}_{size}", "value": v} for k, v in values.items()}


def _named(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in records}


def test_a_download_is_judged_against_the_fastest_peer(transfers: ModuleType) -> None:
    # Run LC's 1 MiB download (GB/s): CuPy was the fastest peer there.
    by = _by_name(
        "1MiB",
        d2h_pageable=7.6518,
        d2h_torch_to_cpu=8.3635,
        d2h_torch_copy_pageable=7.91,
        d2h_cupy_get=8.5733,
        h2d_pageable=7.811,
        h2d_torch_pageable=8.2502,
        h2d_cupy_asarray=5.971,
    )
    rec = _named(transfers.peer_records(by, "1MiB", 1 << 20))
    down = rec["d2h_pageable_vs_best_peer_1MiB"]
    assert down["peer"] == "d2h_cupy_get" and down["baseline_value"] == 8.5733
    assert down["ratio"] == pytest.approx(7.6518 / 8.5733, rel=1e-4)
    assert down["target"] == 1.0 and down["pass"] is False
    up = rec["h2d_pageable_vs_best_peer_1MiB"]
    assert up["peer"] == "h2d_torch_pageable" and up["pass"] is False


def test_a_copy_faster_than_every_peer_passes(transfers: ModuleType) -> None:
    by = _by_name("4MiB", h2d_pageable=18.0, h2d_torch_pageable=11.0, h2d_cupy_asarray=9.0)
    up = _named(transfers.peer_records(by, "4MiB", 4 << 20))["h2d_pageable_vs_best_peer_4MiB"]
    assert up["pass"] is True and up["ratio"] == pytest.approx(18 / 11, rel=1e-4)


def test_a_peer_that_did_not_run_is_left_out_and_none_means_no_target(
    transfers: ModuleType,
) -> None:
    by = _by_name(
        "64KiB",
        h2d_pageable=3.0,
        h2d_torch_pageable=None,
        h2d_cupy_asarray=2.5,
        d2h_pageable=3.0,
        d2h_torch_to_cpu=None,
        d2h_torch_copy_pageable=None,
        d2h_cupy_get=None,
    )
    rec = _named(transfers.peer_records(by, "64KiB", 64 << 10))
    up = rec["h2d_pageable_vs_best_peer_64KiB"]
    assert up["peer"] == "h2d_cupy_asarray" and up["pass"] is True
    down = rec["d2h_pageable_vs_best_peer_64KiB"]
    assert "target" not in down and "pass" not in down and down["ratio"] is None
    assert "no peer ran" in down["note"]


@pytest.mark.parametrize(
    ("n", "size", "target", "up_passes"),
    # 50 GB/s against 53 is 0.943: enough below 64 MiB, not from there.
    [
        (1 << 20, "1MiB", 0.9, True),
        (16 << 20, "16MiB", 0.9, True),
        (64 << 20, "64MiB", 0.97, False),
    ],
)
def test_pinned_copies_are_judged_from_1_mib_and_more_strictly_from_64(
    transfers: ModuleType, n: int, size: str, target: float, up_passes: bool
) -> None:
    by = _by_name(size, h2d_pinned=50.0, h2d_raw_pinned=53.0, d2h_pinned=52.0, d2h_raw_pinned=53.0)
    recs = transfers.peer_records(by, size, n)
    if n >= transfers.DERIVED_MIN:
        recs += transfers.derived_records(by, size)
    rec = _named(recs)
    names = [r["name"] for r in recs]
    # Once each, whichever function makes it.
    assert names.count(f"h2d_pinned_vs_raw_{size}") == 1
    up, down = rec[f"h2d_pinned_vs_raw_{size}"], rec[f"d2h_pinned_vs_raw_{size}"]
    assert up["target"] == down["target"] == target
    assert up["pass"] is up_passes and down["pass"] is True  # 52 / 53 = 0.981


def test_small_pinned_copies_have_no_pinned_target(transfers: ModuleType) -> None:
    by = _by_name("64KiB", h2d_pinned=3.0, h2d_raw_pinned=4.0)
    names = {r["name"] for r in transfers.peer_records(by, "64KiB", 64 << 10)}
    assert names == {"h2d_pageable_vs_best_peer_64KiB", "d2h_pageable_vs_best_peer_64KiB"}


def test_large_sizes_keep_the_naive_and_ceiling_targets(transfers: ModuleType) -> None:
    by = _by_name(
        "256MiB",
        d2h_pageable=35.8,
        d2h_naive_pageable=12.5,
        d2h_raw_pinned=54.8,
        host_copy_ceiling_d2h=34.9,
    )
    rec = _named(transfers.derived_records(by, "256MiB"))
    naive = rec["d2h_pageable_vs_naive_256MiB"]
    assert naive["target"] == 3.0 and naive["pass"] is False
    ceiling = rec["d2h_pageable_vs_ceiling_256MiB"]
    assert ceiling["baseline_value"] == 34.9 and ceiling["pass"] is True
