"""What a run measured, as plain data: per-token records in, the report's method summaries out.

Pure functions, so the report's arithmetic (local + peer + llm == total, rates, latency
percentiles) is tested without a broker or a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

ROUTES = ("local", "peer", "llm")
BYTE_KINDS = ("llm", "p2p", "fl")


@dataclass(frozen=True)
class TokenRecord:
    """One routed token: where it was resolved and what it cost."""

    client_id: str
    round: int
    uid: int
    label: int  # ground-truth class (-1 when unknown)
    draft: int  # the SLM's class
    final: int  # the class the client ended with
    route: str  # local | peer | llm
    reason: str = ""  # uncertain | exploration | audit | fallback ('' for plain local)
    latency_ms: float = 0.0
    llm_final: int | None = None  # the LLM's answer where it was asked (audits, exploration)
    peer_token: int | None = None  # the reused answer on a peer hit

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")


@dataclass
class ByteCounts:
    """Bytes seen at the clients' endpoints: uplink = published, downlink = received."""

    uplink: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KINDS, 0))
    downlink: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KINDS, 0))
    messages_up: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KINDS, 0))

    def add(self, other: "ByteCounts") -> None:
        for kind in BYTE_KINDS:
            self.uplink[kind] += other.uplink.get(kind, 0)
            self.downlink[kind] += other.downlink.get(kind, 0)
            self.messages_up[kind] += other.messages_up.get(kind, 0)

    def summary(self) -> dict[str, int]:
        return {
            "uplink": sum(self.uplink.values()),
            "downlink": sum(self.downlink.values()),
            **{kind: self.uplink[kind] + self.downlink[kind] for kind in BYTE_KINDS},
            "uplink_by_kind": dict(self.uplink),
            "downlink_by_kind": dict(self.downlink),
        }


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def summarise(records: Sequence[TokenRecord], counts: ByteCounts, *, fallback_ok: bool = True) -> dict:
    """The report entry for one method."""
    total = len(records)
    by_route = {r: sum(1 for t in records if t.route == r) for r in ROUTES}
    correct = sum(1 for t in records if t.final == t.label)
    exploration = sum(1 for t in records if t.reason == "exploration")
    audit = sum(1 for t in records if t.reason == "audit")
    fallback = sum(1 for t in records if t.reason == "fallback")
    peer_hits = [t for t in records if t.route == "peer" or t.reason == "audit"]
    audited = [t for t in records if t.reason == "audit" and t.llm_final is not None and t.peer_token is not None]
    wrong = sum(1 for t in audited if t.peer_token != t.llm_final)
    latencies = [t.latency_ms for t in records]
    by_bytes = counts.summary()
    llm_up_msgs = counts.messages_up["llm"]
    return {
        "accuracy": correct / total if total else 0.0,
        "tokens": {"total": total, **by_route, "exploration": exploration, "audit": audit, "fallback": fallback},
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
        },
    }


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
