"""Round bookkeeping for the aggregators (edge and cloud): who reported, quorum, deadline, checkpoints.

Pure state with an explicit clock, so the rules (duplicates count once, a missing
participant never blocks a round, late updates are not folded into a closed round) are
tested without a broker; the roles only feed it what arrives over MQTT.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhlm.core.aggregation import Aggregator, Params, WeightedParams, cap_weights, fedavg

CLOSED_ROUNDS_KEPT = 4  # how far back a redelivered update is still recognised as a duplicate


@dataclass
class RoundCollector:
    """Collects one update per participant per round and says when a round may close.

    A round closes when every registered participant has reported, or when at least
    `quorum` of them have and `deadline_s` has passed since its first update came (a round nobody
    has reported to holds nobody up: an edge that starts minutes before its clients, or waits out
    a slow round of theirs, must not close round 0 at its first update). Updates for the
    next `future_rounds` rounds are kept until their round opens (a fast client may be a round
    ahead of a straggling edge); further ahead they are refused ('future'), so the buffer stays
    within (future_rounds + 1) x participants. Updates for closed rounds are stale, except a
    participant's second copy of an update already folded into a recent closed round (a QoS 1
    redelivery after a reconnect), which is a duplicate. A sample count above `max_samples` is
    refused ('implausible_samples'), and at closing each weight is capped at `max_weight_ratio`
    times the round's median.
    """

    participants: set[str]
    quorum: float = 0.5
    deadline_s: float = 10.0
    round: int = 0
    opened_at: float = 0.0
    started_at: float | None = None  # when the open round's first update came; None: none yet
    future_rounds: int = 1
    max_samples: int | None = None
    max_weight_ratio: float = 0.0
    _pending: dict[int, dict[str, WeightedParams]] = field(default_factory=dict)
    _closed: dict[int, frozenset[str]] = field(default_factory=dict)  # who was folded into the last rounds

    def __post_init__(self) -> None:
        if not 0.0 < self.quorum <= 1.0:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")

    def add(self, participant: str, round_: int, update: WeightedParams, now: float | None = None) -> str:
        """Record an update that came at `now` (default: when the round opened); returns 'accepted',
        'duplicate', 'stale', 'future', 'implausible_samples' or 'unknown'."""
        if participant not in self.participants:
            return "unknown"
        if round_ < self.round:
            return "duplicate" if participant in self._closed.get(round_, frozenset()) else "stale"
        if round_ > self.round + self.future_rounds:
            return "future"
        if update.num_samples < 0 or (self.max_samples is not None and update.num_samples > self.max_samples):
            return "implausible_samples"
        bucket = self._pending.setdefault(round_, {})
        if participant in bucket:
            return "duplicate"
        bucket[participant] = update
        if round_ == self.round and self.started_at is None:
            self.started_at = self.opened_at if now is None else now
        return "accepted"

    @property
    def received(self) -> dict[str, WeightedParams]:
        return self._pending.get(self.round, {})

    @property
    def quorum_count(self) -> int:
        return max(1, math.ceil(self.quorum * len(self.participants)))

    def ready(self, now: float) -> bool:
        got = len(self.received)
        if got >= len(self.participants):
            return True
        return got >= self.quorum_count and self.waited(now) >= self.deadline_s

    def waited(self, now: float) -> float:
        """How long the open round has waited since its first update (0 before any came)."""
        return 0.0 if self.started_at is None else now - self.started_at

    def overdue(self, now: float) -> bool:
        """Past the deadline without a quorum: the caller may close the round empty-handed."""
        return self.waited(now) >= self.deadline_s and len(self.received) < self.quorum_count

    def close(self, now: float, aggregator: Aggregator = fedavg) -> tuple[Params | None, int, list[str]]:
        """Aggregate the current round, open the next; returns (params or None, samples, who)."""
        updates = self.received
        who = sorted(updates)
        params = aggregator(cap_weights([updates[p] for p in who], self.max_weight_ratio))
        samples = sum(max(u.num_samples, 0) for u in updates.values())
        self._pending.pop(self.round, None)
        self._closed[self.round] = frozenset(who)
        self._closed.pop(self.round - CLOSED_ROUNDS_KEPT, None)
        self.round += 1
        self.opened_at = now
        self.started_at = now if self._pending.get(self.round) else None  # early updates for it came already
        return params, samples, who


@dataclass
class ServerState:
    """What an aggregator must remember across a restart: its round and its current model."""

    round: int
    params: Params | None
    num_samples: int = 0
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "round": self.round,
            "num_samples": self.num_samples,
            "params": None if self.params is None else {k: np.asarray(v).tolist() for k, v in self.params.items()},
            "history": self.history,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "ServerState":
        params = data.get("params")
        return cls(
            round=int(data["round"]),
            params=None if params is None else {k: np.asarray(v, dtype=np.float32) for k, v in params.items()},
            num_samples=int(data.get("num_samples", 0)),
            history=list(data.get("history", [])),
        )


def save_state(path: str | Path, state: ServerState) -> None:
    """Atomic write (temp file + rename), so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state.to_json()))
    os.replace(tmp, path)


def load_state(path: str | Path) -> ServerState | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        return ServerState.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt server checkpoint {path}: {exc}") from exc
