"""Operating points stated as users state them: "send 5 % of tokens", "agree with the LLM on 98 %".

A threshold that sends a target share is a quantile of the entropy over *all* tokens. A client
only sees the labelled ones, which over-represent uncertain tokens (all sent, confident ones only
at the exploration rate), but with the importance weights (1 / P(labelled)) their weighted
distribution estimates the distribution over all tokens, so the weighted quantile of the labelled
pairs is an unbiased place for tau. Exploration sends a share of the confident tokens on top: the
threshold itself must send (target - eps) / (1 - eps) for the total to be the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


def above_share(target: float, exploration: float) -> float:
    """The share of tokens the threshold must send so that, with exploration on top, `target` are sent."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target share must be in (0, 1], got {target}")
    if target <= exploration:
        raise ValueError(f"target share {target} must exceed the exploration rate {exploration}: exploration alone "
                         "sends that much")
    return (target - exploration) / (1.0 - exploration) if exploration < 1.0 else 1.0


def _checked_weights(u: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    w = np.ones_like(u) if weights is None else np.asarray(weights, np.float64).ravel()
    if w.shape != u.shape or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per value, not all zero")
    return w


def threshold_for_share(u: np.ndarray, share: float, weights: np.ndarray | None = None) -> float:
    """tau such that the (weighted) share of u above tau is `share`: the weighted (1 - share) quantile.

    Ties and gaps are resolved by taking the midpoint between the last kept and the first sent value,
    so the threshold does not sit on a sample."""
    u = np.asarray(u, np.float64).ravel()
    if u.size == 0:
        raise ValueError("no uncertainty values to place a threshold among")
    w = _checked_weights(u, weights)
    order = np.argsort(-u, kind="stable")  # most uncertain first
    u_sorted, w_sorted = u[order], w[order]
    if share <= 0:
        return float(u_sorted[0]) + 1e-6
    sent = np.cumsum(w_sorted) / w_sorted.sum()
    k = int(np.searchsorted(sent, share - 1e-12, side="left"))  # the top k + 1 values are sent
    if k >= u.size - 1:
        return float(u_sorted[-1]) - 1e-6
    return float(0.5 * (u_sorted[k] + u_sorted[k + 1]))


def threshold_for_agreement(u: np.ndarray, beta: np.ndarray, agreement: float,
                            weights: np.ndarray | None = None) -> float:
    """The highest tau whose kept tokens (u <= tau) cost at most 1 - agreement of all tokens in (weighted)
    rejection risk beta: the output then agrees with the LLM's on at least `agreement` of the tokens
    (greedy verification: beta is 1 exactly where the draft is not the LLM's token)."""
    u = np.asarray(u, np.float64).ravel()
    b = np.asarray(beta, np.float64).ravel()
    if u.size == 0 or b.shape != u.shape:
        raise ValueError("need one beta per uncertainty value, and at least one")
    w = _checked_weights(u, weights)
    order = np.argsort(u, kind="stable")  # most confident first: kept first
    u_sorted = u[order]
    risk = np.cumsum((w * b)[order]) / w.sum()
    kept = int(np.searchsorted(risk, (1.0 - agreement) + 1e-12, side="right"))  # the first `kept` stay local
    if kept == 0:
        return float(u_sorted[0]) - 1e-6
    if kept >= u.size:
        return float(u_sorted[-1]) + 1e-6
    return float(0.5 * (u_sorted[kept - 1] + u_sorted[kept]))


@dataclass(frozen=True)
class OperatingPoint:
    """How a client's threshold is placed after its local fit: by the price lambda alone (this base), or at a
    target the user states. A variant overrides `tau`."""

    name: ClassVar[str] = "price"

    def tau(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray, exploration: float) -> float | None:
        """Where tau goes given the labelled pairs; None: leave the fitted head as it is."""
        return None


@dataclass(frozen=True)
class TargetShare(OperatingPoint):
    """Send `share` of all tokens, exploration included."""

    share: float = 0.05
    name: ClassVar[str] = "share"

    def tau(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray, exploration: float) -> float | None:
        return threshold_for_share(u, above_share(self.share, exploration), weights)


@dataclass(frozen=True)
class TargetAgreement(OperatingPoint):
    """Agree with the LLM on `agreement` of all tokens, sending as few as that allows."""

    agreement: float = 0.98
    name: ClassVar[str] = "agreement"

    def tau(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray, exploration: float) -> float | None:
        return threshold_for_agreement(u, beta, self.agreement, weights)


def operating_point(routing: Any) -> OperatingPoint:
    """The operating point a routing section asks for (`target_share`, `target_agreement`, else the price)."""
    if getattr(routing, "target_share", None) is not None:
        return TargetShare(routing.target_share)
    if getattr(routing, "target_agreement", None) is not None:
        return TargetAgreement(routing.target_agreement)
    return OperatingPoint()
