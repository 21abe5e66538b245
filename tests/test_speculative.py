"""Speculative verification is exact: whatever p drafted, the final token is distributed as q."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedhlm.maths.speculative import (
    draft_distribution,
    draft_from_topk,
    expected_acceptance,
    rejection_probability,
    verify,
    verify_batch,
)
from fedhlm.maths.uncertainty import topk_compress

V = 12
DRAWS = 20_000


def fixed_pq() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, dim=-1)
    return p, q


def run_verification(p: torch.Tensor, q: torch.Tensor, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids, top, tail = topk_compress(p.expand(DRAWS, V), k)
    drafts = draft_from_topk(ids, top, generator=g)
    out = verify_batch(ids, top, tail, q.expand(DRAWS, V), drafts, generator=g)
    return ids, top, drafts, out


def chi_square_p(tokens: torch.Tensor, q: torch.Tensor) -> float:
    observed = np.bincount(tokens.numpy(), minlength=V)
    qd = q.double().numpy()
    expected = qd / qd.sum() * len(tokens)
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("k", [V, 4])
def test_final_token_is_distributed_as_q_over_20000_draws(k):
    p, q = fixed_pq()
    _, _, _, out = run_verification(p, q, k, seed=11)
    assert chi_square_p(out.token, q) > 0.01


def test_the_draft_distribution_alone_is_rejected_by_the_same_chi_square():
    """Guard: the test above would notice if verification just passed drafts through."""
    p, q = fixed_pq()
    _, _, drafts, _ = run_verification(p, q, V, seed=11)
    assert chi_square_p(drafts, q) < 1e-6


@pytest.mark.parametrize("k", [V, 4])
def test_acceptance_rate_matches_sum_of_min_p_q_and_beta_is_the_rejection_rate(k):
    p, q = fixed_pq()
    ids, top, drafts, out = run_verification(p, q, k, seed=5)
    p_sent = draft_distribution(ids[:1], top[:1], V)[0]
    expected = expected_acceptance(p_sent, q).item()
    assert out.accepted.float().mean().item() == pytest.approx(expected, abs=0.015)
    assert (1 - out.beta.mean()).item() == pytest.approx(expected, abs=0.015)
    # beta is exactly max(0, 1 - q(x)/p'(x)) per draft
    manual = (1 - q[drafts] / p_sent[drafts]).clamp_min(0)
    assert torch.allclose(out.beta, manual, atol=1e-6)


def test_truncated_upload_renormalises_sent_probabilities_and_zeroes_the_rest():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    ids, top, tail = topk_compress(probs, 2)
    dense = draft_distribution(ids, top, 4)
    assert torch.allclose(dense, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert tail.item() == pytest.approx(0.2)


def test_identical_p_and_q_always_accept_with_zero_beta():
    p, _ = fixed_pq()
    ids, top, tail = topk_compress(p.expand(500, V), V)
    drafts = draft_from_topk(ids, top, generator=torch.Generator().manual_seed(0))
    out = verify_batch(ids, top, tail, p.expand(500, V), drafts, generator=torch.Generator().manual_seed(1))
    assert out.accepted.all() and torch.equal(out.token, drafts)
    assert out.beta.max().item() < 1e-5


def test_greedy_mode_keeps_only_the_llm_argmax_and_labels_beta_zero_or_one():
    p, q = fixed_pq()
    ids, top, tail = topk_compress(p.expand(300, V), V)
    drafts = draft_from_topk(ids, top, generator=torch.Generator().manual_seed(0))
    out = verify_batch(ids, top, tail, q.expand(300, V), drafts, mode="greedy")
    best = int(q.argmax())
    assert torch.equal(out.accepted, drafts == best)
    assert torch.all(out.token == best)
    assert set(out.beta.unique().tolist()) <= {0.0, 1.0}


def test_single_verify_returns_plain_values_and_rejects_drafts_outside_the_upload():
    p, q = fixed_pq()
    ids, top, tail = topk_compress(p, 3)
    accepted, token, beta, q_x = verify(ids, top, tail, q, int(ids[0]), generator=torch.Generator().manual_seed(0))
    assert isinstance(accepted, bool) and 0 <= token < V
    assert q_x == pytest.approx(float(q[ids[0]]))
    assert beta == pytest.approx(float(rejection_probability(top[0] / top.sum(), q[ids[0]])), abs=1e-6)
    outside = int(p.argsort()[0])
    with pytest.raises(ValueError, match=f"draft token {outside} is not among the sent top-k"):
        verify(ids, top, tail, q, outside)


def test_inconsistent_tail_mass_is_refused_with_the_row():
    p, q = fixed_pq()
    ids, top, _ = topk_compress(p.expand(2, V), 3)
    with pytest.raises(ValueError, match="row 0"):
        verify_batch(ids, top, torch.tensor([0.9, 0.9]), q.expand(2, V), ids[:, 0])


def test_verify_drafts_pads_contexts_groups_topk_sizes_and_matches_verify_batch_row_by_row() -> None:
    """The one verification path (LLM service, calibration) gives each row what verify_batch gives it alone."""
    from fedhlm.maths.verification import Draft, pad_contexts, verify_drafts

    seen = {}

    def q_fn(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        seen.update(ids=ids, mask=mask, last=last)
        g = torch.Generator().manual_seed(int(ids[:, 0].sum()))
        return torch.softmax(torch.randn(ids.shape[0], V, generator=g), dim=-1)

    drafts = [Draft(np.array([3, 1, 4]), np.array([0, 5]), np.array([0.7, 0.3], np.float32), 5),
              Draft(np.array([2]), np.array([1, 2, 3]), np.array([0.5, 0.3, 0.2], np.float32), 1),
              Draft(np.array([7, 7]), np.array([4, 6]), np.array([0.9, 0.1], np.float32), 4)]
    v = verify_drafts(q_fn, drafts, pad_id=0, mode="greedy")
    ids, mask, last = pad_contexts([d.context_ids for d in drafts], 0)
    assert torch.equal(seen["ids"], ids) and last.tolist() == [2, 0, 1] and mask.sum().item() == 6
    q = q_fn(ids, mask, last)
    for i, d in enumerate(drafts):
        alone = verify_batch(torch.from_numpy(d.topk_ids)[None], torch.from_numpy(d.topk_probs)[None], None,
                             q[i : i + 1], torch.tensor([d.draft_token]), mode="greedy")
        assert bool(v.accepted[i]) == bool(alone.accepted[0]) and int(v.token[i]) == int(alone.token[0])
        assert float(v.beta[i]) == pytest.approx(float(alone.beta[0]))
    with pytest.raises(ValueError, match="no drafts"):
        verify_drafts(q_fn, [], pad_id=0, mode="greedy")
