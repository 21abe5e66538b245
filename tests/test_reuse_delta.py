"""The learned reuse threshold: per similarity band, a miss's nearest cached answer against the client's draft."""

from __future__ import annotations

import pytest

from fedhlm.core.intervals import wilson_interval
from fedhlm.core.reuse_delta import DeltaBands


def test_delta_stays_where_it_was_set_without_evidence() -> None:
    bands = DeltaBands(floor=0.8, start=0.9, min_pairs=5)
    assert bands.delta() == pytest.approx(0.9)
    assert not bands.record(0.95, True, False)  # a hit's band: no verdict to compare, never counted
    assert not bands.record(0.7, True, False)  # under the floor
    assert bands.pairs.sum() == 0


def test_delta_comes_down_band_by_band_where_cached_answers_beat_the_drafts() -> None:
    bands = DeltaBands(floor=0.8, start=0.9, width=0.025, min_pairs=10)
    for _ in range(30):  # [0.875, 0.9): the nearest entry always right, the draft wrong half the time
        bands.record(0.88, cache_agrees=True, slm_agrees=bool(_ % 2))
    assert bands.delta() == pytest.approx(0.875)
    for _ in range(30):  # [0.825, 0.85): fine too, but [0.85, 0.875) below it has no evidence: delta stays
        bands.record(0.83, cache_agrees=True, slm_agrees=False)
    assert bands.delta() == pytest.approx(0.875)
    for i in range(30):  # [0.85, 0.875): the cached answers wrong as often as the drafts: not good enough
        bands.record(0.86, cache_agrees=bool(i % 2), slm_agrees=bool(i % 2))
    assert bands.delta() == pytest.approx(0.875)
    assert bands.passes().tolist() == [False, True, False, True]


def test_a_band_needs_the_upper_bound_not_the_point_estimate_below_the_drafts() -> None:
    bands = DeltaBands(floor=0.85, start=0.9, width=0.05, min_pairs=1)
    for i in range(12):  # cached answers 1 wrong in 12, drafts 2 wrong: point estimate better, bound not
        bands.record(0.87, cache_agrees=i != 0, slm_agrees=i > 1)
    assert wilson_interval(1, 12)[1] > 2 / 12 and bands.delta() == pytest.approx(0.9)
    for i in range(100):  # many more pairs where the cache is right and the draft mostly wrong
        bands.record(0.87, cache_agrees=True, slm_agrees=i % 3 == 0)
    assert bands.delta() == pytest.approx(0.85)


def test_the_floor_must_be_below_the_delta() -> None:
    with pytest.raises(ValueError, match="floor"):
        DeltaBands(floor=0.9, start=0.9)
