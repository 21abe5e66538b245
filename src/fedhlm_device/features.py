"""Uncertainty features and the routing view of next-token logits, in numpy.

The same columns, order and definitions as `fedhlm.maths.uncertainty` (entropy in nats, max
probability, top-2 margin, U-HLM's sampling disagreement) and the same draft/top-k rules as
`SLMModule.route_view`; the sampling feature draws from a numpy Generator, so it matches the
PyTorch one in distribution, not sample by sample (the scalar head reads entropy only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FEATURE_NAMES: tuple[str, ...] = ("entropy", "max_prob", "top2_margin", "sampling_uncertainty")
ENTROPY_INDEX = FEATURE_NAMES.index("entropy")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def entropy(logits: np.ndarray, normalise: bool = False) -> np.ndarray:
    """-sum p log p in nats (masked -inf logits contribute 0); with `normalise` divided by log |V|."""
    logp = log_softmax(logits)
    p = np.exp(logp)
    u = -(p * np.where(p > 0, logp, 0.0)).sum(axis=-1)
    return (u / math.log(logits.shape[-1]) if normalise else u).astype(np.float32)


def max_prob(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).max(axis=-1)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    if logits.shape[-1] < 2:
        return np.ones(logits.shape[:-1], np.float32)
    top2 = -np.partition(-softmax(logits), 1, axis=-1)[..., :2]
    return (top2[..., 0] - top2[..., 1]).astype(np.float32)


def sampling_uncertainty(logits: np.ndarray, k: int = 16, temperature: float = 1.0,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Share of `k` samples at `temperature` that differ from the greedy token (estimates 1 - p_T(argmax))."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rng = rng or np.random.default_rng()
    flat = np.asarray(logits, np.float32).reshape(-1, logits.shape[-1])
    greedy = flat.argmax(axis=-1)
    probs = softmax(flat / temperature).astype(np.float64)
    cdf = np.cumsum(probs, axis=-1)
    cdf /= cdf[:, -1:]
    draws = rng.random((flat.shape[0], k))
    samples = np.stack([np.searchsorted(cdf[i], draws[i], side="right") for i in range(flat.shape[0])])
    share = (samples != greedy[:, None]).mean(axis=-1)
    return share.reshape(logits.shape[:-1]).astype(np.float32)


def features(logits: np.ndarray, *, normalise_entropy: bool = False, samples: int = 16, temperature: float = 1.0,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """[..., V] -> [..., F] float32 in the order of FEATURE_NAMES."""
    cols = [entropy(logits, normalise_entropy), max_prob(logits), top2_margin(logits),
            sampling_uncertainty(logits, samples, temperature, rng)]
    return np.stack(cols, axis=-1).astype(np.float32)


def topk_compress(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-k ids [..., k] by falling probability, their probabilities, tail mass = max(0, 1 - sum))."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, probs.shape[-1])
    part = np.argpartition(-probs, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(probs, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    ids = np.take_along_axis(part, order, axis=-1)
    top = np.take_along_axis(vals, order, axis=-1).astype(np.float32)
    tail = np.clip(1.0 - top.sum(axis=-1, dtype=np.float32), 0.0, None).astype(np.float32)
    return ids.astype(np.int32), top, tail


@dataclass(frozen=True)
class RouteView:
    """What the client needs to route B tokens (cf. SLMModule.route_view)."""

    draft_token: np.ndarray  # [B] int32
    class_pred: np.ndarray  # [B]
    class_probs: np.ndarray  # [B, C]
    topk_ids: np.ndarray  # [B, k] int32
    topk_probs: np.ndarray  # [B, k] float32
    tail_mass: np.ndarray  # [B] float32
    features: np.ndarray  # [B, F] float32


def route_view(logits: np.ndarray, verbaliser_ids: np.ndarray, *, topk: int = 8, samples: int = 16,
               sample_temperature: float = 1.0, normalise_entropy: bool = False,
               rng: np.random.Generator | None = None) -> RouteView:
    """Greedy class draft over the verbalisers; a draft missing from the top-k replaces its last entry."""
    logits = np.asarray(logits, np.float32)
    verbalisers = np.asarray(verbaliser_ids, np.int64)
    probs = softmax(logits)
    class_probs = softmax(logits[:, verbalisers])
    class_pred = class_probs.argmax(axis=-1)
    draft = verbalisers[class_pred].astype(np.int32)
    ids, top, tail = topk_compress(probs, topk)
    missing = ~(ids == draft[:, None]).any(axis=-1)
    if missing.any():
        ids, top = ids.copy(), top.copy()
        rows = np.flatnonzero(missing)
        ids[rows, -1] = draft[rows]
        top[rows, -1] = probs[rows, draft[rows]]
        tail = np.clip(1.0 - top.sum(axis=-1, dtype=np.float32), 0.0, None).astype(np.float32)
    feats = features(logits, normalise_entropy=normalise_entropy, samples=samples, temperature=sample_temperature,
                     rng=rng)
    return RouteView(draft, class_pred, class_probs, ids, top, tail, feats)
