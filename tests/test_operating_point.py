"""Target-share operating points: the weighted entropy quantile, exploration counted, and the client that uses it."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.core.operating_point import above_share, threshold_for_share
from fedhlm.core.settings import RoutingSettings, SettingError


def test_threshold_sends_the_asked_share_of_the_values() -> None:
    u = np.arange(100, dtype=float)  # 0..99
    for share in (0.05, 0.2, 0.5):
        tau = threshold_for_share(u, share)
        assert np.mean(u > tau) == pytest.approx(share)
    assert np.mean(u > threshold_for_share(u, 0.0)) == 0.0
    assert np.mean(u > threshold_for_share(u, 1.0)) == 1.0


def test_importance_weights_undo_the_labelled_pairs_bias() -> None:
    """All tokens above 0.8 are labelled, a tenth of the rest at weight 10: the weighted quantile is the
    quantile over every token, the unweighted one is far off."""
    rng = np.random.default_rng(0)
    every = rng.uniform(0, 1, 20000)
    labelled = (every > 0.8) | (rng.uniform(size=every.size) < 0.1)
    u = every[labelled]
    w = np.where(u > 0.8, 1.0, 10.0)
    tau_w = threshold_for_share(u, 0.1, w)
    assert np.mean(every > tau_w) == pytest.approx(0.1, abs=0.01)
    assert np.mean(every > threshold_for_share(u, 0.1)) < 0.07  # unweighted: too few sent


def test_exploration_is_counted_in_the_target() -> None:
    assert above_share(0.05, 0.0) == pytest.approx(0.05)
    share = above_share(0.10, 0.05)  # the threshold sends s, exploration 5 % of the other (1 - s)
    assert share + 0.05 * (1 - share) == pytest.approx(0.10)
    with pytest.raises(ValueError, match="exceed the exploration"):
        above_share(0.05, 0.05)


def test_bad_inputs_and_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="no uncertainty"):
        threshold_for_share(np.zeros(0), 0.1)
    with pytest.raises(ValueError, match="weights"):
        threshold_for_share(np.ones(3), 0.1, np.array([1.0, -1.0, 1.0]))
    with pytest.raises(SettingError, match="routing.target_share"):
        RoutingSettings(target_share=0.03, exploration=0.05)
    with pytest.raises(SettingError, match="routing.target_share"):
        RoutingSettings(target_share=1.5)


def test_the_learner_moves_tau_to_the_target_after_its_fit() -> None:
    """A client asked for 20 % (5 % exploration) ends its fit with tau at the weighted quantile."""
    from types import SimpleNamespace

    from fedhlm.core.settings import ClientSettings
    from fedhlm.roles.learner import Learner
    from fedhlm_device.head import ScalarHead

    settings = ClientSettings("c000", "e0", routing=RoutingSettings(target_share=0.2, exploration=0.05, lam=0.1))
    learner = Learner(settings, ScalarHead(tau=0.5, temperature=0.1), np.random.default_rng(0), SimpleNamespace())
    rng = np.random.default_rng(1)
    for u in rng.uniform(0, 2, 400):
        learner.add_label(np.array([u, 0, 0, 0], np.float32), float(u > 1.5), "uncertain" if u > 1.0 else "exploration")
    stats = learner.fit(0)
    features, _, weights = learner.pairs()
    expected = threshold_for_share(features[:, 0], above_share(0.2, 0.05), weights)
    assert stats["tau"] == pytest.approx(expected) and float(learner.head.params()["tau"]) == pytest.approx(expected)


def test_a_decaying_exploration_weighs_each_label_by_its_rounds_rate() -> None:
    """Exploration falls as 1 / (1 + decay * round); a pair explored in round 3 weighs 1 / that round's rate,
    so the pooled pairs of all rounds stay an unbiased sample."""
    from types import SimpleNamespace

    from fedhlm.core.settings import ClientSettings
    from fedhlm.roles.learner import Learner
    from fedhlm_device.head import ScalarHead

    r = RoutingSettings(exploration=0.1, exploration_decay=1.0)
    assert [r.exploration_rate(k) for k in (0, 1, 3)] == pytest.approx([0.1, 0.05, 0.025])
    learner = Learner(ClientSettings("c000", "e0", routing=r), ScalarHead(tau=0.5, temperature=0.1),
                      np.random.default_rng(0), SimpleNamespace())
    assert learner.label_weight("exploration", 0) == pytest.approx(10.0)
    assert learner.label_weight("exploration", 3) == pytest.approx(40.0)
    assert learner.label_weight("uncertain", 3) == 1.0
    with pytest.raises(SettingError, match="routing.exploration_decay"):
        RoutingSettings(exploration_decay=-1.0)


def test_agreement_threshold_keeps_the_confident_tokens_while_the_risk_allows() -> None:
    """Ten tokens, the LLM disagrees with the draft on the 3rd and 7th most confident: 90 % agreement keeps
    up to the 6th (one disagreement kept), 100 % only the first two."""
    from fedhlm.core.operating_point import TargetAgreement, operating_point, threshold_for_agreement

    u = np.arange(10, dtype=float)
    beta = np.zeros(10)
    beta[[2, 6]] = 1.0
    assert np.sum(u <= threshold_for_agreement(u, beta, 0.9)) == 6
    assert np.sum(u <= threshold_for_agreement(u, beta, 1.0)) == 2
    assert np.sum(u <= threshold_for_agreement(u, beta, 0.5)) == 10  # every token kept: within the risk
    w = np.ones(10)
    w[2] = 3.0  # that disagreement stands for three tokens (12 in all): 10 % is 1.2 tokens' worth
    assert np.sum(u <= threshold_for_agreement(u, beta, 0.9, w)) == 2
    assert isinstance(operating_point(RoutingSettings(target_agreement=0.98)), TargetAgreement)
    assert operating_point(RoutingSettings()).tau(u, beta, w, 0.05) is None  # the price alone: head untouched
    with pytest.raises(SettingError, match="not both"):
        RoutingSettings(target_share=0.1, target_agreement=0.98)


def test_pooled_share_and_risk_curves_give_the_pooled_quantiles() -> None:
    """FedAvg of the clients' curves, weighted by their token weights, is the curve of their pooled tokens, so tau
    read off it is the pooled quantile (within the grid's spacing), which the mean of the clients' own is not."""
    from fedhlm.core.operating_point import (TAU_GRID, risk_curve, share_curve, tau_where_curve_reaches,
                                             threshold_for_agreement, threshold_for_share)

    rng = np.random.default_rng(0)
    parts = [rng.exponential(scale, 400) for scale in (0.05, 0.5, 2.0)]
    weights = [rng.uniform(0.5, 3.0, 400) for _ in parts]
    betas = [(rng.uniform(size=400) < np.minimum(1, u)).astype(float) for u in parts]
    u, w, b = np.concatenate(parts), np.concatenate(weights), np.concatenate(betas)
    mass = np.array([x.sum() for x in weights])
    pooled = sum(m * share_curve(x, y) for m, x, y in zip(mass, parts, weights)) / mass.sum()
    assert np.allclose(pooled, share_curve(u, w), atol=1e-5)
    tau = tau_where_curve_reaches(pooled, 0.1, rising=False)
    exact = threshold_for_share(u, 0.1, w)
    assert abs(tau - exact) <= 0.04 * exact
    assert abs((w * (u > tau)).sum() / w.sum() - 0.1) < 0.005
    naive = np.mean([threshold_for_share(x, 0.1, y) for x, y in zip(parts, weights)])
    assert abs((w * (u > naive)).sum() / w.sum() - 0.1) > 0.03  # averaging the quantiles misses
    risk = sum(m * risk_curve(x, bb, y) for m, x, bb, y in zip(mass, parts, betas, weights)) / mass.sum()
    assert np.allclose(risk, risk_curve(u, b, w), atol=1e-5) and np.all(np.diff(risk) >= -1e-7)
    ta = tau_where_curve_reaches(risk, 0.05, rising=True)
    assert abs(ta - threshold_for_agreement(u, b, 0.95, w)) <= 0.04 * ta + 1e-3
    assert TAU_GRID[0] == 0 and np.all(np.diff(TAU_GRID) > 0)
