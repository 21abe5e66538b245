"""Aggregation maths, apart from any I/O."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.core.aggregation import (
    WeightedParams,
    aggregate,
    check_params,
    fedavg,
    median,
    personalise,
    trimmed_mean,
)


def _wp(tau: float, n: int, t: float = 1.0) -> WeightedParams:
    return WeightedParams({"tau": np.array([tau], np.float32), "temperature": np.array([t], np.float32)}, n)


def test_fedavg_weights_by_sample_count() -> None:
    out = fedavg([_wp(1.0, 30), _wp(2.0, 10)])
    assert out is not None
    assert out["tau"][0] == pytest.approx(1.25)
    assert out["temperature"][0] == pytest.approx(1.0)
    assert out["tau"].dtype == np.float32


def test_fedavg_of_one_client_is_that_client() -> None:
    out = fedavg([_wp(0.7, 5)])
    assert out is not None and out["tau"][0] == pytest.approx(0.7)


def test_empty_round_aggregates_to_none() -> None:
    assert fedavg([]) is None and median([]) is None and trimmed_mean([]) is None


def test_zero_weights_fall_back_to_plain_mean() -> None:
    out = fedavg([_wp(1.0, 0), _wp(3.0, 0)])
    assert out is not None and out["tau"][0] == pytest.approx(2.0)


def test_median_and_trimmed_mean_resist_one_absurd_update() -> None:
    updates = [_wp(1.0, 10), _wp(1.1, 10), _wp(0.9, 10), _wp(1.05, 10), _wp(500.0, 10)]
    assert fedavg(updates)["tau"][0] > 50  # FedAvg is dragged away
    assert median(updates)["tau"][0] == pytest.approx(1.05)
    assert trimmed_mean(updates, 0.2)["tau"][0] == pytest.approx((1.0 + 1.05 + 1.1) / 3, rel=1e-6)


def test_aggregate_dispatch_and_unknown_method() -> None:
    updates = [_wp(1.0, 1), _wp(3.0, 3)]
    assert aggregate(updates, "fedavg")["tau"][0] == pytest.approx(2.5)
    assert aggregate(updates, "median")["tau"][0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="aggregation method"):
        aggregate(updates, "krum")


def test_mismatched_parameter_names_or_shapes_raise() -> None:
    with pytest.raises(ValueError, match="names differ"):
        fedavg([_wp(1.0, 1), WeightedParams({"tau": np.ones(1, np.float32)}, 1)])
    bad = WeightedParams({"tau": np.ones(2, np.float32), "temperature": np.ones(1, np.float32)}, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        fedavg([_wp(1.0, 1), bad])


def test_personalise_interpolates() -> None:
    out = personalise({"tau": np.array([1.0])}, {"tau": np.array([3.0])}, 0.25)
    assert out["tau"][0] == pytest.approx(0.25 * 1.0 + 0.75 * 3.0)
    with pytest.raises(ValueError):
        personalise({"tau": np.array([1.0])}, {"tau": np.array([3.0])}, 1.5)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e9])
def test_check_params_rejects_absurd_values(value: float) -> None:
    reason = check_params({"tau": np.array([value], np.float32)})
    assert reason is not None and "tau" in reason


def test_check_params_against_reference_shapes() -> None:
    ref = {"tau": np.zeros(1, np.float32)}
    assert check_params({"tau": np.array([0.5], np.float32)}, ref) is None
    assert "shape" in check_params({"tau": np.zeros(3, np.float32)}, ref)
    assert "differ" in check_params({"w": np.zeros(1, np.float32)}, ref)
