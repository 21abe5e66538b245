"""Reference routers a run is measured against: the uncertainty curve and the oracle.

Both are computed from per-article facts (is the SLM right, is the LLM right, how uncertain is
the SLM) and never run in a deployment:

- the *uncertainty curve* sends the top-s most uncertain articles (by one SLM signal) to the
  LLM: what any threshold on that signal can reach at share s, with the threshold chosen in
  hindsight on the test articles;
- the *oracle* sends only articles where the SLM is wrong and the LLM right, as many as the
  share allows: the most any router can gain at share s. It needs the ground truth, so it is a
  yardstick, not a method.

The share of the oracle's gain a router captures at its own operating point,
``(acc - acc_slm) / (oracle(s) - acc_slm)``, says how much of what is attainable it takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DENSE_SHARES = tuple(round(s, 2) for s in np.linspace(0.0, 1.0, 101))


def _sent_count(share: float, n: int) -> int:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    return int(round(share * n))


def uncertainty_accuracy(uncertainty: np.ndarray, slm_correct: np.ndarray, llm_correct: np.ndarray,
                         share: float) -> float:
    """Accuracy when the round(share * n) most uncertain articles take the LLM's answer (ties: stable order)."""
    n = len(slm_correct)
    if n == 0:
        return float("nan")
    k = _sent_count(share, n)
    sent = np.zeros(n, bool)
    sent[np.argsort(-np.asarray(uncertainty, float), kind="stable")[:k]] = True
    return float(np.where(sent, llm_correct, slm_correct).mean())


def oracle_accuracy(slm_correct: np.ndarray, llm_correct: np.ndarray, share: float) -> float:
    """Accuracy when round(share * n) articles are sent, the ones where only the LLM is right first."""
    n = len(slm_correct)
    if n == 0:
        return float("nan")
    gains = int(np.sum(~np.asarray(slm_correct, bool) & np.asarray(llm_correct, bool)))
    return float((np.sum(slm_correct) + min(_sent_count(share, n), gains)) / n)


def oracle_gain_captured(accuracy: float, share: float, slm_correct: np.ndarray, llm_correct: np.ndarray) -> float | None:
    """The part of the oracle's gain over the SLM at this share that a router reaching `accuracy` takes
    (None where the oracle gains nothing there)."""
    base = float(np.mean(slm_correct))
    best = oracle_accuracy(slm_correct, llm_correct, share) - base
    return None if best <= 0 else (accuracy - base) / best


def reference_section(uncertainty: np.ndarray, slm_correct: np.ndarray, llm_correct: np.ndarray,
                      shares: Sequence[float], signal: str,
                      operating_points: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The report's `reference` section: both curves at the asked shares and densely (for the plot), and
    each method's (accuracy, share) against them."""
    slm_correct, llm_correct = np.asarray(slm_correct, bool), np.asarray(llm_correct, bool)

    def curves(points: Sequence[float]) -> list[dict[str, float]]:
        return [{"share": float(s), "uncertainty": uncertainty_accuracy(uncertainty, slm_correct, llm_correct, s),
                 "oracle": oracle_accuracy(slm_correct, llm_correct, s)} for s in points]

    methods = {}
    for name, (acc, share) in operating_points.items():
        methods[name] = {"accuracy": acc, "llm_share": share,
                         "uncertainty_at_share": uncertainty_accuracy(uncertainty, slm_correct, llm_correct, share),
                         "oracle_at_share": oracle_accuracy(slm_correct, llm_correct, share),
                         "oracle_gain_captured": oracle_gain_captured(acc, share, slm_correct, llm_correct)}
    return {
        "note": "references, not methods: the uncertainty curve picks its threshold in hindsight on the test "
                "articles, the oracle needs their labels",
        "signal": signal, "articles": int(len(slm_correct)),
        "slm_accuracy": float(slm_correct.mean()) if len(slm_correct) else None,
        "llm_accuracy": float(llm_correct.mean()) if len(llm_correct) else None,
        "only_llm_right": int(np.sum(~slm_correct & llm_correct)),
        "only_slm_right": int(np.sum(slm_correct & ~llm_correct)),
        "at_shares": curves(shares), "dense": curves(DENSE_SHARES), "methods": methods,
    }
