"""Routing features beyond the basic four: label scores, the whitened PCA of the hidden state, feature sets."""

from __future__ import annotations

import math

import pytest
import torch

from fedhlm.core.settings import RoutingSettings, SettingError
from fedhlm.maths.route_features import (FEATURE_SETS, LABEL_FEATURE_NAMES, WhitenedPCA, feature_set,
                                         label_features)
from fedhlm.maths.uncertainty import FEATURE_NAMES
from fedhlm.models.head_fit import routing_head


def test_label_features_read_the_class_tokens_slice_of_the_distribution() -> None:
    # vocabulary of 6, class tokens 1 and 4: full probabilities 0.3 / 0.1 on them, 0.6 elsewhere
    probs = torch.tensor([[0.2, 0.3, 0.2, 0.1, 0.1, 0.1]])
    f = label_features(probs.log(), torch.tensor([1, 4]))
    p = torch.tensor([0.75, 0.25])
    ent = float(-(p * p.log()).sum() / math.log(2))
    assert f.shape == (1, len(LABEL_FEATURE_NAMES))
    assert f[0].tolist() == pytest.approx([ent, 0.75, 0.5, 0.4], abs=1e-5)


def test_a_confident_class_token_has_zero_label_entropy_and_full_margin() -> None:
    logits = torch.full((2, 5), -30.0)
    logits[0, 2] = 10.0  # all mass on class token 2
    logits[1, 0] = 10.0  # all mass on a token that is no class
    f = label_features(logits, torch.tensor([2, 3]))
    assert f[0, 0] < 1e-4 and f[0, 2] == pytest.approx(1.0, abs=1e-4) and f[0, 3] == pytest.approx(1.0, abs=1e-4)
    assert f[1, 3] < 1e-4  # the mass on the class tokens says the SLM would rather say something else


def test_whitened_pca_gives_uncorrelated_unit_variance_components() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    pca = WhitenedPCA.fit(x, 3)
    z = pca(x)
    cov = torch.cov(z.T.double())
    assert torch.allclose(cov, torch.eye(3, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(z.mean(dim=0), torch.zeros(3), atol=1e-4)
    with pytest.raises(ValueError, match="more than 3 rows"):
        WhitenedPCA.fit(x[:3], 3)


def test_feature_sets_keep_entropy_first_and_say_what_they_add() -> None:
    assert set(FEATURE_SETS) == {"basic", "label", "hidden"}
    assert feature_set("basic").names() == FEATURE_NAMES
    assert feature_set("label").names() == FEATURE_NAMES + LABEL_FEATURE_NAMES
    hidden = feature_set("hidden", hidden_dim=3)
    assert hidden.names()[0] == "entropy" and hidden.num_features == 11
    with pytest.raises(ValueError, match="feature set must be one of"):
        feature_set("everything")
    base, logits = torch.rand(2, 4), torch.randn(2, 7)
    with pytest.raises(ValueError, match="needs the hidden state"):
        hidden.assemble(base, logits, torch.tensor([0, 1]))
    out = feature_set("label").assemble(base, logits, torch.tensor([0, 1]))
    assert out.shape == (2, 8) and torch.equal(out[:, :4], base)


def test_the_routing_head_follows_the_settings_and_every_role_builds_the_same_start() -> None:
    r = RoutingSettings(head="mlp", features="hidden", hidden_dim=4, head_hidden=5)
    a, b = routing_head(r, 0.7, seed=3), routing_head(r, 0.7, seed=3)
    assert a.num_features == 12 and a.mlp[0].weight.shape == (5, 12)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    f = torch.rand(9, 12)
    assert torch.equal(a.route(f), f[:, 0] > 0.7)  # at the start it is the scalar head


def test_richer_heads_refuse_an_entropy_target_naming_the_field() -> None:
    with pytest.raises(SettingError, match="routing.head"):
        RoutingSettings(head="linear", target_share=0.1)
    with pytest.raises(SettingError, match="routing.features"):
        RoutingSettings(features="all")
