"""Operating points stated as users state them: "send 5 % of tokens", "agree with the LLM on 98 %".

A threshold that sends a target share is a quantile of the entropy over *all* tokens. A client
only sees the labelled ones, which over-represent uncertain tokens (all sent, confident ones only
at the exploration rate), but with the importance weights (1 / P(labelled)) their weighted
distribution estimates the distribution over all tokens, so the weighted quantile of the labelled
pairs is an unbiased place for tau. Exploration sends a share of the confident tokens on top: the
threshold itself must send (target - eps) / (1 - eps) for the total to be the target.

Federated, a quantile does not average: the mean of the clients' own quantiles is not the quantile
of their pooled tokens (a client with 14 tokens a round places its tau on a handful of weighted
pairs, and non-IID clients differ). So a target is federated as a curve instead: each client sends,
for a fixed grid of candidate taus, its weighted share of tokens above each one (`share_curve`; the
kept rejection risk for an agreement target), FedAvg with the clients' token counts as weights
gives the pooled curve exactly, and every client reads tau off the aggregate (`CURVE_PARAM`).
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


CURVE_PARAM = "op_curve"  # the federated curve's name among a head's parameters on the wire
# candidate taus: 0 and 63 log-spaced entropies from 1e-3 to 16 nats (ln of a 8.9M-token vocabulary), 17 % apart,
# with linear interpolation between them: 256 bytes on every update and model (float32), against 1 KB for 256
# points. Uncertainties packed tighter than the spacing (a random tiny model's) cannot be told apart.
TAU_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 16.0, 63)])


def share_curve(u: np.ndarray, weights: np.ndarray | None = None, grid: np.ndarray = TAU_GRID) -> np.ndarray:
    """The weighted share of values above each grid tau (non-increasing, float32)."""
    u = np.asarray(u, np.float64).ravel()
    w = _checked_weights(u, weights)
    order = np.argsort(u)
    above = w.sum() - np.concatenate([[0.0], np.cumsum(w[order])])[np.searchsorted(u[order], grid, side="right")]
    return (above / w.sum()).astype(np.float32)


def risk_curve(u: np.ndarray, beta: np.ndarray, weights: np.ndarray | None = None,
               grid: np.ndarray = TAU_GRID) -> np.ndarray:
    """The weighted rejection risk of the tokens kept (u <= tau) at each grid tau, over all tokens."""
    u = np.asarray(u, np.float64).ravel()
    w = _checked_weights(u, weights)
    order = np.argsort(u)
    risk = np.concatenate([[0.0], np.cumsum((w * np.asarray(beta, np.float64).ravel())[order])])
    return (risk[np.searchsorted(u[order], grid, side="right")] / w.sum()).astype(np.float32)


def tau_where_curve_reaches(curve: np.ndarray, level: float, *, rising: bool, grid: np.ndarray = TAU_GRID) -> float:
    """For a falling curve (share above tau): the smallest tau whose value is <= level; for a rising one
    (kept risk): the largest tau whose value is <= level. Linear between the two grid points around it."""
    c = np.asarray(curve, np.float64).ravel()
    if c.shape != grid.shape:
        raise ValueError(f"curve has {c.size} points, the grid {grid.size}")
    ok = c <= level + 1e-9
    if rising:
        if not ok[0]:
            return float(grid[0])
        j = int(np.flatnonzero(ok)[-1])
        if j == grid.size - 1:
            return float(grid[-1])
        lo, hi = c[j], c[j + 1]
    else:
        if not ok.any():
            return float(grid[-1])
        j = int(np.argmax(ok))
        if j == 0:
            return float(grid[0])
        j -= 1
        lo, hi = c[j], c[j + 1]
    frac = 0.0 if hi == lo else float(np.clip((level - lo) / (hi - lo), 0.0, 1.0))
    return float(grid[j] + frac * (grid[j + 1] - grid[j]))


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

    def curve(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """This client's curve for the federation to pool (None: the point has none; tau itself is averaged)."""
        return None

    def tau_from_curve(self, curve: np.ndarray, exploration: float) -> float | None:
        """tau read off a pooled curve."""
        return None


@dataclass(frozen=True)
class TargetShare(OperatingPoint):
    """Send `share` of all tokens, exploration included."""

    share: float = 0.05
    name: ClassVar[str] = "share"

    def tau(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray, exploration: float) -> float | None:
        return threshold_for_share(u, above_share(self.share, exploration), weights)

    def curve(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        return share_curve(u, weights)

    def tau_from_curve(self, curve: np.ndarray, exploration: float) -> float | None:
        return tau_where_curve_reaches(curve, above_share(self.share, exploration), rising=False)


@dataclass(frozen=True)
class TargetAgreement(OperatingPoint):
    """Agree with the LLM on `agreement` of all tokens, sending as few as that allows."""

    agreement: float = 0.98
    name: ClassVar[str] = "agreement"

    def tau(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray, exploration: float) -> float | None:
        return threshold_for_agreement(u, beta, self.agreement, weights)

    def curve(self, u: np.ndarray, beta: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        return risk_curve(u, beta, weights)

    def tau_from_curve(self, curve: np.ndarray, exploration: float) -> float | None:
        return tau_where_curve_reaches(curve, 1.0 - self.agreement, rising=True)


def with_curve(params: dict[str, np.ndarray], routing: Any) -> dict[str, np.ndarray]:
    """A head's parameters plus the (empty) federated curve its operating point needs: the model every edge,
    the cloud and every client start from and check updates against."""
    if operating_point(routing).name == OperatingPoint.name:
        return dict(params)
    return {**params, CURVE_PARAM: np.zeros(TAU_GRID.size, np.float32)}


def operating_point(routing: Any) -> OperatingPoint:
    """The operating point a routing section asks for (`target_share`, `target_agreement`, else the price)."""
    if getattr(routing, "target_share", None) is not None:
        return TargetShare(routing.target_share)
    if getattr(routing, "target_agreement", None) is not None:
        return TargetAgreement(routing.target_agreement)
    return OperatingPoint()
