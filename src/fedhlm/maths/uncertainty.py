"""Uncertainty of a next-token distribution: pure, batched tensor functions over logits.

The router decides from these numbers whether a token stays on the client. FedHLM's
paper scores a token by the entropy of the SLM's next-token distribution; U-HLM
(arXiv 2412.12687) scores it by how often temperature samples disagree with the greedy
token; max probability and the top-2 margin are the usual confidence baselines. All
functions take logits of shape [..., V] and return [...] (one score per distribution),
so one call scores a whole batch of tokens.
"""

from __future__ import annotations

import math

import torch

FEATURE_NAMES: tuple[str, ...] = ("entropy", "max_prob", "top2_margin", "sampling_uncertainty")
"""Order of the columns of :func:`features`; the threshold head's entropy column is index 0."""

ENTROPY_INDEX = FEATURE_NAMES.index("entropy")


def entropy(logits: torch.Tensor, normalise: bool = False) -> torch.Tensor:
    """Shannon entropy in nats, u = -sum_v p(v) log p(v); with ``normalise`` divided by log |V|.

    Computed from log-softmax so that -inf logits (masked tokens) contribute 0, not NaN.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    u = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)
    if normalise:
        u = u / math.log(logits.shape[-1])
    return u


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Probability of the most likely token: high means confident."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """p(first) - p(second): small when the SLM hesitates between two tokens."""
    if logits.shape[-1] < 2:
        return torch.ones(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def sampling_uncertainty(
    logits: torch.Tensor,
    k: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """U-HLM's score: the share of ``k`` samples at ``temperature`` that differ from the greedy token.

    It is a Monte-Carlo estimate of 1 - p_T(argmax), in steps of 1/k; pass a seeded
    ``generator`` for reproducible scores.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat = logits.float().reshape(-1, logits.shape[-1])
    greedy = flat.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(flat / temperature, dim=-1)
    samples = torch.multinomial(probs, k, replacement=True, generator=generator)
    share = (samples != greedy).float().mean(dim=-1)
    return share.reshape(logits.shape[:-1])


def features(
    logits: torch.Tensor,
    *,
    normalise_entropy: bool = False,
    samples: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """All scores stacked in the order of :data:`FEATURE_NAMES`: [..., V] -> [..., F] (float32)."""
    cols = [
        entropy(logits, normalise=normalise_entropy),
        max_prob(logits),
        top2_margin(logits),
        sampling_uncertainty(logits, k=samples, temperature=temperature, generator=generator),
    ]
    return torch.stack(cols, dim=-1)


def topk_compress(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncate a distribution to what the client uploads (CU-HLM): top-k ids, their probabilities, tail mass.

    Returns ``(ids [..., k], probs [..., k], tail_mass [...])`` with ids sorted by
    probability, probabilities as computed on the full vocabulary (not renormalised) and
    ``tail_mass = 1 - sum(top-k probs)`` clamped at 0. k is capped at |V|.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, probs.shape[-1])
    top = probs.float().topk(k, dim=-1)
    tail = (1.0 - top.values.sum(dim=-1)).clamp_min(0.0)
    return top.indices, top.values, tail
