"""The device's numpy uncertainty features and threshold-head training against the PyTorch originals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhlm.models.head_fit import fit_head
from fedhlm.models.slm import SLMModule
from fedhlm.maths.threshold import ThresholdHead
from fedhlm.maths.uncertainty import FEATURE_NAMES
from fedhlm.maths.uncertainty import features as torch_features
from fedhlm_device.features import FEATURE_NAMES as DEVICE_FEATURE_NAMES
from fedhlm_device.features import features, route_view
from fedhlm_device.head import ScalarHead, fit_sgd, routing_loss

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "embeddings_from": None}


def pairs(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = rng.uniform(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
    beta = np.clip(1.5 * (f[:, 0] - 0.2) + rng.normal(0, 0.1, n), 0, 1).astype(np.float32)
    return f, beta


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("engine", ["loop", "trainer"])
@pytest.mark.parametrize("steps,lr,lam", [(30, 0.05, 0.1), (20, 1.0, 0.3), (60, 0.5, 0.05)])
def test_numpy_sgd_matches_fit_head_sgd(steps: int, lr: float, lam: float, engine: str, weighted: bool) -> None:
    """The device's numpy SGD, the plain-loop fit and the Lightning Trainer fit take the same steps,
    with or without importance weights (one pair in five weighs 20, as exploration at 5 %)."""
    f, beta = pairs()
    w = np.where(np.arange(len(beta)) % 5 == 0, 20.0, 1.0).astype(np.float32) if weighted else None
    torch_head = ThresholdHead(tau=0.8, temperature=0.1)
    ref = fit_head(torch_head, torch.from_numpy(f), torch.from_numpy(beta), lam=lam, steps=steps, lr=lr,
                   optimizer="sgd", engine=engine, weights=None if w is None else torch.from_numpy(w))
    head = ScalarHead(tau=0.8, temperature=0.1)
    got = fit_sgd(head, f, beta, lam=lam, steps=steps, lr=lr, weights=w)
    assert abs(got["tau"] - 0.8) > 0.01  # it moved
    assert got["tau"] == pytest.approx(ref["tau"], abs=1e-5)
    assert got["loss_before"] == pytest.approx(ref["loss_before"], abs=1e-6)
    assert got["loss_after"] == pytest.approx(ref["loss_after"], abs=1e-6)
    assert np.array_equal(head.route(f), torch_head.route(torch.from_numpy(f)).numpy())
    np.testing.assert_allclose(head(f), torch_head(torch.from_numpy(f)).detach().numpy(), atol=1e-5)


def test_head_params_have_the_state_dict_keys_and_shapes() -> None:
    torch_state = ThresholdHead(tau=0.3, temperature=0.2).state_dict()
    params = ScalarHead(0.3, 0.2).params()
    assert set(params) == set(torch_state)
    for k, v in params.items():
        assert v.dtype == np.float32 and v.shape == tuple(torch_state[k].shape)
        assert float(v) == pytest.approx(float(torch_state[k]))


def test_routing_loss_is_the_papers_loss() -> None:
    s, beta = np.array([0.2, 0.9], np.float32), np.array([1.0, 0.0], np.float32)
    assert routing_loss(s, beta, 0.5) == pytest.approx((0.8 * 1.0 + 0.1 * 0.0) / 2 + 0.5 * 0.55)


def test_numpy_features_match_the_torch_features() -> None:
    assert DEVICE_FEATURE_NAMES == FEATURE_NAMES
    logits = torch.randn(64, 500) * 3
    logits[0, :] = 0.0  # uniform: entropy log V
    logits[1, 7] = 40.0  # near one-hot
    ref = torch_features(logits, samples=4096, generator=torch.Generator().manual_seed(0)).numpy()
    got = features(logits.numpy(), samples=4096, rng=np.random.default_rng(0))
    np.testing.assert_allclose(got[:, :3], ref[:, :3], atol=2e-5)  # entropy, max prob, margin: exact maths
    assert got[0, 0] == pytest.approx(np.log(500), rel=1e-5)
    # sampling disagreement is Monte Carlo: both estimate 1 - p(argmax); 4096 samples -> std <= 0.008
    np.testing.assert_allclose(got[:, 3], 1 - ref[:, 1], atol=0.04)
    np.testing.assert_allclose(ref[:, 3], 1 - ref[:, 1], atol=0.04)


def test_route_view_matches_the_slm_module() -> None:
    slm = SLMModule(**TINY, topk=4)
    logits = torch.randn(32, slm.model.config.vocab_size) * 2
    logits[:16, slm.verbaliser_ids[2]] += 8.0  # drafts inside the top-k ...
    # ... and, for the other half, drafts the top-k misses (replaced into its last entry)
    ref = slm.route_view(logits)
    got = route_view(logits.numpy(), np.array(slm.verbaliser_ids), topk=4, rng=np.random.default_rng(0))
    assert np.array_equal(got.draft_token, ref["draft_token"].numpy())
    assert np.array_equal(got.topk_ids, ref["topk_ids"].numpy())
    np.testing.assert_allclose(got.topk_probs, ref["topk_probs"].numpy(), atol=1e-6)
    np.testing.assert_allclose(got.tail_mass, ref["tail_mass"].numpy(), atol=1e-6)
    np.testing.assert_allclose(got.features[:, 0], ref["features"][:, 0].numpy(), atol=2e-5)
    missing = ~(ref["topk_ids"][:, :-1] == ref["draft_token"][:, None]).any(-1)
    assert 0 < int(missing.sum()) < 32  # both branches ran
