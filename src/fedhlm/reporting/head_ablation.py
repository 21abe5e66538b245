"""Which routing features carry the signal: heads fitted on column subsets, compared at equal shares sent.

For a share s, a head is fitted with the routing loss at the price lambda_s that makes the entropy
threshold sending s of the training pairs optimal (so every head is fitted for that operating point,
starting from that threshold: the scalar head is the special case it may only improve on),
then the test articles are ranked by the head's score and the top s are sent - the threshold in
hindsight, as for the uncertainty curve, so that every router is compared at exactly the same
share. What is measured is the routing quality of each feature set, not how well a threshold
was placed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedhlm.maths.threshold import ThresholdHead
from fedhlm.models.head_fit import fit_pooled
from fedhlm.reporting.reference import oracle_accuracy, uncertainty_accuracy


@dataclass(frozen=True)
class Pairs:
    """Per article: routing features [N, F] (entropy first), the LLM's beta, and who is right."""

    features: np.ndarray
    beta: np.ndarray
    slm_correct: np.ndarray
    llm_correct: np.ndarray

    def rows(self, index: np.ndarray) -> Pairs:
        return Pairs(self.features[index], self.beta[index], self.slm_correct[index], self.llm_correct[index])

    def columns(self, cols: Sequence[int]) -> Pairs:
        return Pairs(self.features[:, list(cols)], self.beta, self.slm_correct, self.llm_correct)


def lam_for_share(u: np.ndarray, beta: np.ndarray, share: float) -> tuple[float, float]:
    """(lambda, tau) of an operating point that sends `share`: tau cuts off the top `share` of u, and lambda
    is E[beta | u near tau] (the mean beta of the pairs ranked around the cut), the price at which that
    tau satisfies the routing loss's optimality condition E[beta | u = tau] = lambda. (The exact pooled
    optimum as a function of lambda jumps over shares where beta grows slowly with u, so it cannot be
    asked for a share.)"""
    n = u.size
    if n == 0 or not 0 < share < 1:
        raise ValueError(f"need pairs and a share in (0, 1), got {n} pairs and share {share}")
    order = np.argsort(-u, kind="stable")
    cut = int(round(share * n))
    half = max(10, int(0.25 * share * n))
    window = order[max(0, cut - half) : min(n, cut + half)]
    lam = float(np.clip(np.mean(beta[window]), 1e-3, 1 - 1e-3))
    kept, sent = u[order[min(cut, n - 1)]], u[order[max(cut - 1, 0)]]
    return lam, float(0.5 * (kept + sent))


def fit_ranker(train: Pairs, share: float, mode: str, *, temperature: float = 0.1, steps: int = 400,
               hidden: int = 8, seed: int = 0) -> ThresholdHead:
    """A `mode` head over all of train's columns, fitted with the routing loss at the price that sends `share`."""
    u = train.features[:, 0]
    lam, tau = lam_for_share(u, train.beta, share)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ThresholdHead(mode=mode, num_features=train.features.shape[1], tau=tau, temperature=temperature,
                             hidden=hidden)
    if mode != "scalar":
        fit_pooled(head, train.features, train.beta, lam=lam, steps=steps)
    return head


def accuracy_at_share(head: ThresholdHead, test: Pairs, share: float) -> float:
    """Accuracy when the top `share` of the test articles by the head's score take the LLM's answer."""
    with torch.no_grad():
        score = head.score(torch.from_numpy(test.features.astype(np.float32))).numpy()
    return uncertainty_accuracy(score, test.slm_correct, test.llm_correct, share)


def folds(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """k disjoint, shuffled index sets covering range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def cross_fitted_accuracy(pairs: Pairs, share: float, mode: str, k: int = 5, seed: int = 0, **fit) -> float:
    """Each fold ranked by a head fitted on the other folds; the folds' sends pooled at the same share."""
    sent = np.zeros(len(pairs.beta), bool)
    for part in folds(len(pairs.beta), k, seed):
        rest = np.setdiff1d(np.arange(len(pairs.beta)), part)
        head = fit_ranker(pairs.rows(rest), share, mode, seed=seed, **fit)
        with torch.no_grad():
            score = head.score(torch.from_numpy(pairs.features[part].astype(np.float32))).numpy()
        top = np.argsort(-score, kind="stable")[: int(round(share * len(part)))]
        sent[part[top]] = True
    return float(np.where(sent, pairs.llm_correct, pairs.slm_correct).mean())


def ablation(calib: Pairs, test: Pairs, subsets: dict[str, Sequence[int]], shares: Sequence[float],
             modes: Sequence[str] = ("linear", "mlp"), k: int = 5, **fit) -> list[dict]:
    """One row per (feature subset, head): accuracy at each share when fitted on the calibration pairs
    (what a deployment can fit before it runs) and cross-fitted on the test pairs (what labels on the
    clients' own traffic could teach, every token labelled)."""
    rows = []
    for name, cols in subsets.items():
        for mode in (("scalar",) if len(cols) == 1 else modes):
            row = {"features": name, "columns": len(cols), "head": mode, "calibration_fit": {}, "cross_fit": {}}
            c, t = calib.columns(cols), test.columns(cols)
            for s in shares:
                row["calibration_fit"][s] = accuracy_at_share(fit_ranker(c, s, mode, **fit), t, s)
                row["cross_fit"][s] = cross_fitted_accuracy(t, s, mode, k=k, **fit)
            rows.append(row)
    return rows


def oracle_row(test: Pairs, shares: Sequence[float]) -> dict[float, float]:
    return {s: oracle_accuracy(test.slm_correct, test.llm_correct, s) for s in shares}
