"""Speculative verification of a drafted token (Leviathan et al., 2023; Chen et al., 2023): pure maths.

The client drafts token x from its distribution p and sends p (top-k truncated, as in
CU-HLM) with x; the LLM, whose distribution is q, accepts x with probability
min(1, q(x) / p(x)), else samples from the residual max(0, q - p) / Z. The token that
comes out is then distributed exactly as q. beta = max(0, 1 - q(x) / p(x)) is the
probability that x is rejected: the label the threshold heads learn from.

Tail mass. The client only sends its k most likely tokens and their probabilities; p is
unknown outside them. We take the distribution that was sent *as the draft
distribution*: p'(v) = p(v) / (1 - tail_mass) on the top-k ids and 0 elsewhere (we
divide by the sum of the sent probabilities, which is 1 - tail_mass up to rounding).
The residual outside the top-k is therefore q itself. This is exact - the final token is
distributed as q - provided the draft was drawn from p' (a greedy draft is always in the
top-k; :func:`draft_from_topk` samples from p'). A draft outside the sent ids is an
error, never a guess. beta is computed with p', i.e. 1 - q(x)(1 - tail)/p(x) relative to
the untruncated p; with k = |V| (tail 0) it is the textbook value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

VerifyMode = Literal["sample", "greedy"]


@dataclass(frozen=True)
class Verdicts:
    """Outcome of verifying B drafted tokens; every field has leading dimension B."""

    accepted: torch.Tensor  # bool: the draft was kept
    token: torch.Tensor  # long: the final token (the draft, or a residual sample)
    beta: torch.Tensor  # float: rejection probability max(0, 1 - q(x)/p'(x))
    q_draft: torch.Tensor  # float: q(x), the LLM's probability of the draft
    p_draft: torch.Tensor  # float: p'(x), the renormalised client probability of the draft


def draft_distribution(topk_ids: torch.Tensor, topk_probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense p' [B, V]: the sent probabilities renormalised over the sent ids, 0 elsewhere."""
    if topk_ids.shape != topk_probs.shape:
        raise ValueError(f"topk ids and probs shapes differ: {tuple(topk_ids.shape)} vs {tuple(topk_probs.shape)}")
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= vocab_size):
        raise ValueError(f"topk ids must lie in 0..{vocab_size - 1}")
    probs = topk_probs.float().clamp_min(0.0)
    total = probs.sum(dim=-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("the sent top-k probabilities sum to 0")
    dense = torch.zeros(topk_ids.shape[0], vocab_size, dtype=torch.float32, device=topk_ids.device)
    dense.scatter_add_(1, topk_ids.long(), probs / total)
    return dense


def draft_from_topk(
    topk_ids: torch.Tensor, topk_probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample drafts from p' (the renormalised top-k), the distribution verification assumes: [B, k] -> [B]."""
    pick = torch.multinomial(topk_probs.float().clamp_min(0.0), 1, generator=generator).squeeze(-1)
    return topk_ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def rejection_probability(p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """beta = max(0, 1 - q(x) / p(x)); p(x) must be > 0 (x was drafted from p)."""
    return (1.0 - q_draft / p_draft.clamp_min(torch.finfo(torch.float32).tiny)).clamp_min(0.0)


def verify_batch(
    topk_ids: torch.Tensor,
    topk_probs: torch.Tensor,
    tail_mass: torch.Tensor | None,
    q_probs: torch.Tensor,
    draft_token: torch.Tensor,
    generator: torch.Generator | None = None,
    mode: VerifyMode = "sample",
) -> Verdicts:
    """Verify B drafts at once: ids/probs [B, k], tail [B] (may be None), q [B, V], drafts [B].

    ``tail_mass`` is checked against the sent probabilities (|sum + tail - 1| <= 1e-3)
    and otherwise not used: see the module docstring for how the unknown tail is treated.
    ``mode="greedy"`` verifies against the LLM's greedy choice: q becomes one-hot on
    argmax q, so a draft is kept iff it is the LLM's argmax (beta is 0 or 1) and a
    rejected draft is replaced by that argmax; ``q_draft`` still reports the soft q(x).
    """
    if q_probs.dim() != 2 or topk_ids.dim() != 2 or draft_token.dim() != 1:
        raise ValueError(
            f"expected ids/probs [B, k], q [B, V], drafts [B]; got {tuple(topk_ids.shape)}, "
            f"{tuple(q_probs.shape)}, {tuple(draft_token.shape)}"
        )
    b, v = q_probs.shape
    if topk_ids.shape[0] != b or draft_token.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, ids {topk_ids.shape[0]}, drafts {draft_token.shape[0]}")
    if tail_mass is not None:
        gap = (topk_probs.float().sum(dim=-1) + tail_mass.float() - 1.0).abs()
        if bool((gap > 1e-3).any()):
            row = int(gap.argmax())
            raise ValueError(f"row {row}: top-k probabilities + tail_mass = {1 + float(gap[row]):.4f}, expected 1")
    in_topk = (topk_ids == draft_token.unsqueeze(-1)).any(dim=-1)
    if not bool(in_topk.all()):
        row = int((~in_topk).nonzero()[0])
        raise ValueError(f"row {row}: draft token {int(draft_token[row])} is not among the sent top-k ids")
    p = draft_distribution(topk_ids, topk_probs, v)
    q = q_probs.float()
    q = q / q.sum(dim=-1, keepdim=True)
    x = draft_token.long().unsqueeze(-1)
    p_x, q_x = p.gather(1, x).squeeze(1), q.gather(1, x).squeeze(1)
    if mode == "greedy":
        q = torch.nn.functional.one_hot(q.argmax(dim=-1), v).float()
    elif mode != "sample":
        raise ValueError(f"mode must be 'sample' or 'greedy', got {mode!r}")
    beta = rejection_probability(p_x, q.gather(1, x).squeeze(1))
    coin = torch.rand(b, generator=generator, device=q.device)
    accepted = coin >= beta  # P(accept) = min(1, q/p) = 1 - beta
    residual = (q - p).clamp_min(0.0)
    z = residual.sum(dim=-1, keepdim=True)
    # where p == q exactly the residual is empty, but then beta == 0 and we always accept
    residual = torch.where(z > 0, residual / z.clamp_min(torch.finfo(torch.float32).tiny), q)
    resampled = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    token = torch.where(accepted, draft_token.long(), resampled)
    return Verdicts(accepted=accepted, token=token, beta=beta, q_draft=q_x, p_draft=p_x)


def verify(
    topk_ids: torch.Tensor,
    topk_probs: torch.Tensor,
    tail_mass: float | torch.Tensor | None,
    q_probs: torch.Tensor,
    draft_token: int,
    generator: torch.Generator | None = None,
    mode: VerifyMode = "sample",
) -> tuple[bool, int, float, float]:
    """Verify one draft: ids/probs [k], q [V] -> (accepted, final_token, beta, q(draft))."""
    tail = None if tail_mass is None else torch.as_tensor(tail_mass, dtype=torch.float32).reshape(1)
    out = verify_batch(
        topk_ids.reshape(1, -1),
        topk_probs.reshape(1, -1),
        tail,
        q_probs.reshape(1, -1),
        torch.tensor([int(draft_token)]),
        generator=generator,
        mode=mode,
    )
    return bool(out.accepted[0]), int(out.token[0]), float(out.beta[0]), float(out.q_draft[0])


def expected_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Acceptance rate of a draft drawn from p: sum_v min(p(v), q(v)) (= 1 - total variation)."""
    return torch.minimum(p.float(), q.float()).sum(dim=-1)
