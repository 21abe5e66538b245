"""Aggregation of threshold-head parameters: pure functions over state dicts (name -> float32 array).

Weighted FedAvg (McMahan et al., 2017) is what the edge and the cloud do in FedHLM
(HierFAVG pattern: edge rounds, then a cloud round). Coordinate-wise median and trimmed
mean (Yin et al., 2018) are the robust options; the same functions serve edge and cloud.
A configuration names one (`AGGREGATORS`), `make_aggregator` binds its options once, and
the round collector only ever calls the resulting function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class WeightedParams:
    """One participant's parameters and the number of samples behind them."""

    params: Mapping[str, np.ndarray]
    num_samples: int


def _stack(updates: Sequence[WeightedParams]) -> tuple[list[str], dict[str, np.ndarray]]:
    keys = sorted(updates[0].params)
    for u in updates[1:]:
        if sorted(u.params) != keys:
            raise ValueError(f"parameter names differ: {keys} vs {sorted(u.params)}")
    stacked = {}
    for k in keys:
        arrays = [np.asarray(u.params[k], dtype=np.float64) for u in updates]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"parameter {k!r}: shapes differ {sorted(shapes)}")
        stacked[k] = np.stack(arrays)
    return keys, stacked


def cap_weights(updates: Sequence[WeightedParams], max_ratio: float) -> list[WeightedParams]:
    """Each update's sample count clipped to `max_ratio` times the median of the round's positive counts
    (0: unchanged): one participant claiming far more data than its peers cannot outvote them all."""
    counts = [u.num_samples for u in updates if u.num_samples > 0]
    if max_ratio <= 0 or not counts:
        return list(updates)
    cap = max(1, int(max_ratio * float(np.median(counts))))
    return [u if u.num_samples <= cap else WeightedParams(u.params, cap) for u in updates]


def fedavg(updates: Sequence[WeightedParams]) -> Params | None:
    """Sample-weighted mean; None for an empty round (the caller keeps its model).

    All-zero weights (clients that saw no data) fall back to the plain mean, so that a
    round of silent-but-present clients still yields their shared model.
    """
    if not updates:
        return None
    keys, stacked = _stack(updates)
    weights = np.array([max(u.num_samples, 0) for u in updates], dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(updates), 1.0 / len(updates))
    return {k: np.tensordot(weights, stacked[k], axes=1).astype(np.float32) for k in keys}


def median(updates: Sequence[WeightedParams]) -> Params | None:
    """Coordinate-wise median: one absurd participant cannot move it far."""
    if not updates:
        return None
    keys, stacked = _stack(updates)
    return {k: np.median(stacked[k], axis=0).astype(np.float32) for k in keys}


def trimmed_mean(updates: Sequence[WeightedParams], trim_fraction: float = 0.2) -> Params | None:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if not updates:
        return None
    keys, stacked = _stack(updates)
    n = len(updates)
    cut = int(np.floor(trim_fraction * n))
    out = {}
    for k in keys:
        ordered = np.sort(stacked[k], axis=0)
        out[k] = ordered[cut : n - cut].mean(axis=0).astype(np.float32)
    return out


Aggregator = Callable[[Sequence["WeightedParams"]], "Params | None"]

# name -> factory of the bound aggregator; options a method does not use are ignored
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "fedavg": lambda trim_fraction=0.2: fedavg,
    "median": lambda trim_fraction=0.2: median,
    "trimmed_mean": lambda trim_fraction=0.2: partial(trimmed_mean, trim_fraction=trim_fraction),
}
METHODS = tuple(AGGREGATORS)


def make_aggregator(method: str = "fedavg", trim_fraction: float = 0.2) -> Aggregator:
    """The aggregation function a configuration names, with its options bound."""
    if method not in AGGREGATORS:
        raise ValueError(f"aggregation method must be one of {METHODS}, got {method!r}")
    return AGGREGATORS[method](trim_fraction=trim_fraction)


def aggregate(updates: Sequence[WeightedParams], method: str = "fedavg", trim_fraction: float = 0.2) -> Params | None:
    """One aggregation by name (for a one-off call; roles bind theirs once with `make_aggregator`)."""
    return make_aggregator(method, trim_fraction)(updates)


def personalise(local: Mapping[str, np.ndarray], shared: Mapping[str, np.ndarray], a: float) -> Params:
    """tau_i <- a tau_i + (1 - a) tau_shared, per parameter (a = 0 adopts the shared model)."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"personalisation weight a must be in [0, 1], got {a}")
    return {k: (a * np.asarray(local[k]) + (1 - a) * np.asarray(shared[k])).astype(np.float32) for k in shared}


def check_params(
    params: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None = None,
    *,
    max_abs: float = 1e3,
) -> str | None:
    """Why an update must be rejected (None when it is acceptable).

    Rejects non-finite values, absurd magnitudes and, given a reference model, missing or
    extra names and wrong shapes: the defence against poisoned or corrupt updates.
    """
    if not params:
        return "no parameters"
    if reference is not None:
        if set(params) != set(reference):
            return f"parameter names {sorted(params)} differ from {sorted(reference)}"
        for k, ref in reference.items():
            if np.shape(params[k]) != np.shape(ref):
                return f"parameter {k!r} has shape {np.shape(params[k])}, expected {np.shape(ref)}"
    for k, value in params.items():
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            return f"parameter {k!r} is not finite"
        if np.any(np.abs(arr) > max_abs):
            return f"parameter {k!r} is out of range (|x| > {max_abs:g})"
    return None
