"""Threshold head and routing loss: the learned tau lands where E[beta | u = tau] = lambda."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhlm.maths.threshold import (
    ThresholdHead,
    annealed_temperature,
    central_threshold,
    closed_form_tau,
    fit_linear_beta,
    hard_routing_loss,
    routing_loss,
    uhlm_threshold,
)

A, B, LAM = 0.4, 0.05, 0.45
TAU_STAR = (LAM - B) / A  # 1.0: where E[beta | u] = a u + b meets lambda


def linear_pairs(n: int = 50_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """u uniform on [0, 2]; beta = a u + b + bounded noise (a rejection probability in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    u = 2.0 * torch.rand(n, generator=g)
    beta = (A * u + B + 0.05 * (torch.rand(n, generator=g) - 0.5)).clamp(0, 1)
    return u, beta


def train_head(head: ThresholdHead, feats: torch.Tensor, beta: torch.Tensor, steps: int = 400) -> None:
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        routing_loss(head(feats), beta, LAM).backward()
        opt.step()


def test_routing_loss_is_rejection_when_keeping_and_lambda_when_sending():
    beta = torch.tensor([0.2, 0.8])
    assert routing_loss(torch.zeros(2), beta, LAM).item() == pytest.approx(0.5)
    assert routing_loss(torch.ones(2), beta, LAM).item() == pytest.approx(LAM)
    assert routing_loss(torch.tensor([0.0, 1.0]), beta, LAM).item() == pytest.approx((0.2 + LAM) / 2)
    assert hard_routing_loss(np.array([0.1, 2.0]), np.array([0.2, 0.8]), tau=1.0, lam=LAM) == pytest.approx((0.2 + LAM) / 2)


def test_closed_form_tau_recovers_the_line_crossing():
    u, beta = linear_pairs()
    a, b = fit_linear_beta(u, beta)
    assert a == pytest.approx(A, rel=0.01) and b == pytest.approx(B, abs=0.005)
    assert closed_form_tau(u, beta, LAM) == pytest.approx(TAU_STAR, rel=0.02)


def test_closed_form_refuses_rejection_that_does_not_grow_with_uncertainty():
    u = torch.linspace(0, 1, 100)
    with pytest.raises(ValueError, match="slope"):
        closed_form_tau(u, 0.5 - 0.3 * u, LAM)


def test_weighted_loss_and_optimum_equal_those_of_the_data_with_rows_repeated_by_weight():
    """A pair of weight 3 counts as three identical pairs: what importance weights for exploration rely on."""
    g = torch.Generator().manual_seed(1)
    u = 2.0 * torch.rand(300, generator=g)
    beta = (0.4 * u + 0.1 * torch.rand(300, generator=g)).clamp(0, 1)
    w = torch.randint(1, 4, (300,), generator=g)
    u_rep, beta_rep = u.repeat_interleave(w), beta.repeat_interleave(w)
    s = torch.sigmoid((u - 1.0) / 0.1)
    s_rep = torch.sigmoid((u_rep - 1.0) / 0.1)
    assert routing_loss(s, beta, LAM, w.float()).item() == pytest.approx(routing_loss(s_rep, beta_rep, LAM).item(), rel=1e-5)
    for method in ("hard", "sigmoid"):
        weighted = central_threshold(u, beta, LAM, method=method, weights=w)
        repeated = central_threshold(u_rep, beta_rep, LAM, method=method)
        assert weighted == pytest.approx(repeated, abs=1e-4), method
    # weights that favour the kept side (as 1/eps for explored confident tokens) move the optimum
    favour_low = torch.where(u < 1.0, 10.0, 1.0)
    moved = central_threshold(u, beta, LAM, method="sigmoid", weights=favour_low)
    assert abs(moved - central_threshold(u, beta, LAM, method="sigmoid")) > 1e-3
    with pytest.raises(ValueError, match="weights"):
        central_threshold(u, beta, LAM, weights=torch.zeros(300))


def test_uhlm_threshold_keeps_a_well_posed_fit_and_clips_a_flat_one_to_the_data():
    u, beta = linear_pairs()
    fit = uhlm_threshold(u, beta, LAM)
    assert fit["tau"] == pytest.approx(TAU_STAR, rel=0.02) and not fit["clipped"] and not fit["degenerate_fit"]
    # a slope of 1e-6: (lam - b) / a lies ~1e5 nats away, far beyond what servers accept
    flat = uhlm_threshold(u, 0.05 + 1e-6 * u, LAM)
    assert flat["clipped"] and not flat["degenerate_fit"]
    assert float(u.max()) < flat["tau"] < float(u.max()) + 1e-3  # "send nothing", as the line says
    falling = uhlm_threshold(u, 0.9 - 0.1 * u, LAM)  # rejections above lam everywhere: send everything
    assert falling["degenerate_fit"] and falling["tau"] < float(u.min())


@pytest.mark.parametrize("method", ["hard", "sigmoid"])
def test_central_threshold_matches_the_closed_form(method):
    u, beta = linear_pairs()
    assert central_threshold(u, beta, LAM, method=method, temperature=0.05) == pytest.approx(TAU_STAR, rel=0.02)


def test_scalar_head_trained_on_routing_loss_converges_to_closed_form_threshold():
    u, beta = linear_pairs()
    head = ThresholdHead(mode="scalar", num_features=1, tau=0.3, temperature=0.1)
    train_head(head, u.unsqueeze(-1), beta)
    assert head.effective_tau() == pytest.approx(closed_form_tau(u, beta, LAM), rel=0.02)
    assert head.effective_tau() == pytest.approx(TAU_STAR, rel=0.02)


def test_head_with_learnable_temperature_still_finds_the_threshold():
    u, beta = linear_pairs()
    head = ThresholdHead(mode="scalar", num_features=1, tau=1.6, temperature=0.2, learn_temperature=True)
    train_head(head, u.unsqueeze(-1), beta, steps=600)
    assert head.effective_tau() == pytest.approx(TAU_STAR, rel=0.02)


@pytest.mark.parametrize("mode", ["linear", "mlp"])
def test_richer_heads_equal_the_scalar_head_at_initialisation(mode):
    feats = torch.rand(64, 4) * torch.tensor([3.0, 1.0, 1.0, 1.0])
    scalar = ThresholdHead(mode="scalar", tau=0.7, temperature=0.2)
    rich = ThresholdHead(mode=mode, tau=0.7, temperature=0.2)
    assert torch.allclose(rich(feats), scalar(feats), atol=1e-7)
    assert rich.effective_tau() == pytest.approx(0.7)


@pytest.mark.parametrize("mode", ["linear", "mlp"])
def test_frozen_richer_head_trains_exactly_like_the_scalar_head(mode):
    u, beta = linear_pairs(5_000)
    noise = torch.rand(u.shape[0], 3, generator=torch.Generator().manual_seed(9))
    feats = torch.cat([u.unsqueeze(-1), noise], dim=-1)
    scalar = ThresholdHead(mode="scalar", tau=0.3, temperature=0.1)
    rich = ThresholdHead(mode=mode, tau=0.3, temperature=0.1, freeze_to_scalar=True)
    train_head(scalar, feats, beta, steps=100)
    train_head(rich, feats, beta, steps=100)
    assert rich.effective_tau() == pytest.approx(scalar.effective_tau(), abs=1e-5)
    assert torch.allclose(rich(feats), scalar(feats), atol=1e-5)
    assert torch.equal(rich.weight, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_state_dict_is_tiny_explicit_float32():
    assert sorted(ThresholdHead().state_dict()) == ["tau", "temperature"]
    assert sorted(ThresholdHead(mode="linear").state_dict()) == ["tau", "temperature", "weight"]
    mlp = ThresholdHead(mode="mlp", hidden=8).state_dict()
    assert sorted(mlp) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "tau", "temperature", "weight"]
    assert all(v.dtype == torch.float32 for v in mlp.values())
    assert sum(v.numel() for v in mlp.values()) == 2 + 4 + (8 * 4 + 8) + (8 + 1)
    # a state dict round-trips between heads (what aggregation does)
    a, b = ThresholdHead(tau=0.2), ThresholdHead(tau=0.9)
    b.load_state_dict(a.state_dict())
    assert b.effective_tau() == pytest.approx(0.2)


def test_hard_route_is_entropy_above_tau_and_temperature_anneals_to_its_floor():
    head = ThresholdHead(num_features=1, tau=0.5, temperature=0.1)
    assert head.route(torch.tensor([[0.4], [0.6]])).tolist() == [False, True]
    assert annealed_temperature(0, 0.5, 0.05, 0.9) == pytest.approx(0.5)
    assert annealed_temperature(10, 0.5, 0.05, 0.9) == pytest.approx(0.5 * 0.9**10)
    assert annealed_temperature(1000, 0.5, 0.05, 0.9) == pytest.approx(0.05)
    head.set_temperature(0.01)
    assert head(torch.tensor([[0.55]])).item() > 0.99


def test_bad_feature_shape_names_the_expected_width():
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        ThresholdHead()(torch.rand(5, 3))
