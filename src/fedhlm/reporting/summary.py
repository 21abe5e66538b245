"""What a run measured, as plain data: per-token records in, the report's method summaries out.

Pure functions, so the report's arithmetic (local + peer + llm == total, rates, latency
percentiles) is tested without a broker or a model.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from fedhlm.core.intervals import wilson_interval
from fedhlm.core.records import BYTE_KINDS, ROUTES, ByteCounts, RoutedToken

__all__ = ["BYTE_KINDS", "ROUTES", "ByteCounts", "TokenRecord", "check_consistency", "per_round", "percentile", "summarise",
           "wilson_interval"]


@dataclass(frozen=True)
class TokenRecord(RoutedToken):
    """A routed token with the ground truth the client never saw (-1 when unknown): one report row."""

    label: int = -1

    @classmethod
    def labelled(cls, token: RoutedToken, label: int) -> "TokenRecord":
        return cls(**{f.name: getattr(token, f.name) for f in fields(RoutedToken)}, label=int(label))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def summarise(records: Sequence[TokenRecord], counts: ByteCounts, *, fallback_ok: bool = True) -> dict:
    """The report entry for one method."""
    total = len(records)
    by_route = {r: sum(1 for t in records if t.route == r) for r in ROUTES}
    correct = sum(1 for t in records if t.final == t.label)
    exploration = sum(1 for t in records if t.reason == "exploration" and t.route == "llm")
    exploration_cached = sum(1 for t in records if t.reason == "exploration" and t.route == "peer")
    audit = sum(1 for t in records if t.reason == "audit")
    fallback = sum(1 for t in records if t.reason == "fallback")
    peer_hits = [t for t in records if t.route == "peer" or t.reason == "audit"]
    audited = [t for t in records if t.reason == "audit" and t.llm_final is not None and t.peer_token is not None]
    wrong = sum(1 for t in audited if t.peer_token != t.llm_final)
    reused = [t for t in peer_hits if t.peer_token is not None]
    reused_wrong = sum(1 for t in reused if t.peer_token != t.label)
    slm_wrong = sum(1 for t in reused if t.draft != t.label)
    latencies = [t.latency_ms for t in records]
    by_bytes = counts.summary()
    llm_up_msgs = counts.messages_up["llm"]
    return {
        "accuracy": correct / total if total else 0.0,
        "tokens": {"total": total, **by_route, "exploration": exploration,
                   "exploration_cached": exploration_cached, "audit": audit, "fallback": fallback},
        "llm_share": by_route["llm"] / total if total else 0.0,
        "bytes": by_bytes,
        "uplink_bytes_per_llm_token": (counts.uplink["llm"] / llm_up_msgs) if llm_up_msgs else 0.0,
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                       "mean": float(np.mean(latencies)) if latencies else 0.0},
        "peer": {
            "hits": len(peer_hits),
            "audited": len(audited),
            "wrong_reuse": wrong,
            "wrong_reuse_rate": wrong / len(audited) if audited else None,
            "wrong_reuse_ci95": wilson_interval(wrong, len(audited)),
            # against ground truth (a simulation knows it): every reused token, and the SLM's error on the same ones
            "label_error": reused_wrong / len(reused) if reused else None,
            "label_error_ci95": wilson_interval(reused_wrong, len(reused)),
            "slm_error_same_tokens": slm_wrong / len(reused) if reused else None,
        },
    }


def reuse_by_delivery(records: Sequence[TokenRecord], repeat_of: Mapping[int, int],
                      near: Collection[int]) -> dict[str, dict]:
    """Tokens, peer/cache answers and their error against ground truth (with the SLM's on the same tokens),
    for first deliveries, exact repeats and near repeats (another outlet's version) apart: a cache that answers
    a near repeat with the original's LLM token is right only as often as the two stories share a label."""
    groups: dict[str, list[TokenRecord]] = {"first": [], "exact_repeat": [], "near_repeat": []}
    for t in records:
        groups["first" if t.uid not in repeat_of else "near_repeat" if t.uid in near else "exact_repeat"].append(t)
    out = {}
    for name, recs in groups.items():
        reused = [t for t in recs if (t.route == "peer" or t.reason == "audit") and t.peer_token is not None]
        wrong = sum(1 for t in reused if t.peer_token != t.label)
        out[name] = {"tokens": len(recs), "llm": sum(1 for t in recs if t.route == "llm"), "reused": len(reused),
                     "label_error": wrong / len(reused) if reused else None,
                     "label_error_ci95": wilson_interval(wrong, len(reused)),
                     "slm_error_same_tokens": (sum(1 for t in reused if t.draft != t.label) / len(reused)
                                               if reused else None)}
    return out


def per_round(records: Iterable[TokenRecord]) -> list[dict]:
    """Tokens and accuracy per round, for the per-round plots."""
    rounds: dict[int, list[TokenRecord]] = {}
    for t in records:
        rounds.setdefault(t.round, []).append(t)
    out = []
    for r in sorted(rounds):
        recs = rounds[r]
        out.append({
            "round": r,
            "total": len(recs),
            "llm": sum(1 for t in recs if t.route == "llm"),
            "peer": sum(1 for t in recs if t.route == "peer"),
            "accuracy": sum(1 for t in recs if t.final == t.label) / len(recs),
        })
    return out


def check_consistency(methods: Mapping[str, dict]) -> list[str]:
    """Problems with a report's arithmetic (an empty list when it is consistent)."""
    problems = []
    for name, m in methods.items():
        t = m["tokens"]
        if t["local"] + t["peer"] + t["llm"] != t["total"]:
            problems.append(f"{name}: local + peer + llm != total ({t})")
        if t["exploration"] + t["audit"] > t["llm"]:
            problems.append(f"{name}: exploration + audit exceed llm tokens")
        if t["llm"] > 0 and m["bytes"]["llm"] == 0:
            problems.append(f"{name}: tokens went to the LLM but no LLM bytes were counted")
        if t["llm"] == 0 and m["bytes"]["llm"] > 0:
            problems.append(f"{name}: LLM bytes counted but no token went to the LLM")
    return problems
