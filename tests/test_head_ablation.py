"""The feature ablation's maths: the price that sends a share, heads fitted for it, cross-fitting."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.reporting.head_ablation import (Pairs, ablation, accuracy_at_share, cross_fitted_accuracy, fit_ranker,
                                         folds, lam_for_share)


def synthetic_pairs(n: int, seed: int) -> Pairs:
    """The SLM is wrong (and the LLM right) exactly where column 1 is high; entropy (column 0) is noise."""
    rng = np.random.default_rng(seed)
    signal = rng.random(n)
    slm_wrong = signal > 0.9
    entropy = rng.random(n) + 0.2 * slm_wrong  # a little informative
    feats = np.stack([entropy, signal, rng.random(n)], axis=1).astype(np.float32)
    return Pairs(feats, slm_wrong.astype(np.float32), ~slm_wrong, np.ones(n, bool))


def test_lam_for_share_finds_the_price_that_sends_the_share() -> None:
    p = synthetic_pairs(2000, 0)
    for share in (0.05, 0.2):
        lam, tau = lam_for_share(p.features[:, 0], p.beta, share)
        assert 0 < lam < 1
        assert abs(float(np.mean(p.features[:, 0] > tau)) - share) < 0.03


def test_a_linear_head_finds_the_column_that_carries_the_signal() -> None:
    train, test = synthetic_pairs(3000, 1), synthetic_pairs(3000, 2)
    scalar = accuracy_at_share(fit_ranker(train, 0.1, "scalar"), test, 0.1)
    linear = accuracy_at_share(fit_ranker(train, 0.1, "linear", steps=300), test, 0.1)
    assert linear > scalar + 0.04  # entropy alone finds few of the 10 % wrong drafts; column 1 finds most
    assert linear > 0.97


def test_folds_partition_and_cross_fitting_never_ranks_a_fold_by_its_own_labels() -> None:
    parts = folds(103, 5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    p = synthetic_pairs(1500, 3)
    acc = cross_fitted_accuracy(p, 0.1, "linear", k=3, steps=200)
    assert acc > 0.97


def test_ablation_rows_cover_every_subset_and_head() -> None:
    calib, test = synthetic_pairs(800, 4), synthetic_pairs(900, 5)
    rows = ablation(calib, test, {"entropy": [0], "entropy+signal": [0, 1]}, [0.05, 0.1], k=2, steps=50)
    assert [(r["features"], r["head"]) for r in rows] == [("entropy", "scalar"), ("entropy+signal", "linear"),
                                                          ("entropy+signal", "mlp")]
    assert all(set(r["cross_fit"]) == {0.05, 0.1} for r in rows)
    assert rows[1]["calibration_fit"][0.1] > rows[0]["calibration_fit"][0.1]


def test_pairs_columns_keep_the_labels() -> None:
    p = synthetic_pairs(10, 6).columns([0, 2])
    assert p.features.shape == (10, 2) and p.beta.shape == (10,)
    with pytest.raises(IndexError):
        synthetic_pairs(10, 6).columns([5])
