"""Uncertainty scores on distributions whose answers are known: uniform, one-hot, two-way ties."""

from __future__ import annotations

import math

import pytest
import torch

from fedhlm.maths.uncertainty import (
    FEATURE_NAMES,
    entropy,
    features,
    max_prob,
    sampling_uncertainty,
    top2_margin,
    topk_compress,
)

V = 50


def uniform_logits(batch: int = 3) -> torch.Tensor:
    return torch.zeros(batch, V)


def one_hot_logits(batch: int = 3) -> torch.Tensor:
    logits = torch.full((batch, V), -float("inf"))
    logits[:, 7] = 0.0
    return logits


def test_uniform_distribution_has_entropy_log_v_and_normalised_one():
    assert torch.allclose(entropy(uniform_logits()), torch.full((3,), math.log(V)), atol=1e-5)
    assert torch.allclose(entropy(uniform_logits(), normalise=True), torch.ones(3), atol=1e-6)


def test_one_hot_distribution_has_zero_entropy_without_nan():
    u = entropy(one_hot_logits())
    assert not torch.isnan(u).any()
    assert torch.allclose(u, torch.zeros(3), atol=1e-7)


def test_two_way_tie_has_entropy_log_two_and_zero_margin():
    logits = torch.full((1, V), -float("inf"))
    logits[0, 3] = logits[0, 9] = 1.5
    assert entropy(logits).item() == pytest.approx(math.log(2), abs=1e-6)
    assert top2_margin(logits).item() == pytest.approx(0.0, abs=1e-7)
    assert max_prob(logits).item() == pytest.approx(0.5, abs=1e-7)


def test_confidence_scores_on_uniform_and_one_hot():
    assert torch.allclose(max_prob(uniform_logits()), torch.full((3,), 1 / V))
    assert torch.allclose(max_prob(one_hot_logits()), torch.ones(3))
    assert torch.allclose(top2_margin(one_hot_logits()), torch.ones(3))
    assert torch.allclose(top2_margin(uniform_logits()), torch.zeros(3), atol=1e-7)


def test_sampling_uncertainty_is_zero_for_one_hot_and_near_one_minus_1_over_v_for_uniform():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sampling_uncertainty(one_hot_logits(), k=32, generator=g), torch.zeros(3))
    share = sampling_uncertainty(uniform_logits(400), k=64, generator=g)
    assert share.mean().item() == pytest.approx(1 - 1 / V, abs=0.01)


def test_sampling_uncertainty_estimates_one_minus_tempered_argmax_probability():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(1)
    assert sampling_uncertainty(logits, k=16, generator=g).mean().item() == pytest.approx(0.3, abs=0.01)
    # a low temperature sharpens towards the greedy token
    assert sampling_uncertainty(logits, k=16, temperature=0.2, generator=g).mean().item() < 0.01


def test_features_stack_in_feature_name_order_over_any_leading_shape():
    logits = torch.randn(2, 5, V)
    f = features(logits, generator=torch.Generator().manual_seed(0))
    assert f.shape == (2, 5, len(FEATURE_NAMES)) and f.dtype == torch.float32
    assert torch.allclose(f[..., FEATURE_NAMES.index("entropy")], entropy(logits))
    assert torch.allclose(f[..., FEATURE_NAMES.index("max_prob")], max_prob(logits))
    assert torch.allclose(f[..., FEATURE_NAMES.index("top2_margin")], top2_margin(logits))


def test_topk_compress_keeps_largest_and_reports_tail_mass():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    ids, top, tail = topk_compress(probs, 2)
    assert ids.tolist() == [[1, 3]]
    assert torch.allclose(top, torch.tensor([[0.5, 0.3]]))
    assert tail.item() == pytest.approx(0.2, abs=1e-6)
    ids, top, tail = topk_compress(probs, 99)  # k capped at |V|
    assert ids.shape == (1, 5) and tail.item() == pytest.approx(0.0, abs=1e-6)
