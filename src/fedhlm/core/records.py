"""What flows through a client: drafted tokens in, routed tokens out. Plain data, no torch.

A client never sees ground truth: `TokenInput` is what its SLM produced, `RoutedToken` is
where the token was resolved and what it cost. The simulation joins labels to routed tokens
for the report (`reporting.summary.TokenRecord`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

ROUTES = ("local", "peer", "llm")
BYTE_KINDS = ("llm", "p2p", "fl")


@dataclass(frozen=True)
class TokenInput:
    """What the SLM produced for one input: the draft, its top-k upload and its uncertainty features."""

    uid: int
    context_ids: np.ndarray  # int32 prompt token ids
    draft_token: int
    topk_ids: np.ndarray  # int32
    topk_probs: np.ndarray  # float32
    tail_mass: float
    features: np.ndarray  # float32 uncertainty features (entropy first)
    embedding: np.ndarray | None = None  # float32 unit-norm context embedding, for P2P


@dataclass(frozen=True)
class RoutedToken:
    """One routed token: where it was resolved and what it cost. Classes are -1 for a non-class token."""

    client_id: str
    round: int
    uid: int
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


@dataclass(frozen=True)
class Drafted:
    """A client's own SLM output for one round's inputs, and the wall time the SLM took for them."""

    inputs: list[TokenInput]
    seconds: float

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.inputs))


class Drafter(Protocol):
    """A client's SLM: raw inputs (articles, prompts) to drafted tokens, timed; and, on demand, the P2P
    representation of a drafted token's context (None: it has none)."""

    def draft(self, items: Sequence[Any]) -> Drafted: ...

    def represent(self, uids: Sequence[int]) -> tuple[list[Any], float]: ...  # vectors, compute seconds


@dataclass(frozen=True)
class NextToken:
    """A generating SLM's proposal for the next token of its sequence: the draft, what the client uploads
    when it offloads it (top-k and tail mass) and the features its threshold head reads."""

    draft_token: int
    topk_ids: np.ndarray  # int32
    topk_probs: np.ndarray  # float32
    tail_mass: float
    features: np.ndarray  # float32, entropy first (the basic feature set)
    ms: float  # the SLM's compute time for this step


class SequenceDrafter(Protocol):
    """A client's SLM generating one sequence at a time, keeping its own KV cache: `open` reads the prompt,
    `append` the token the client settled on; each returns the proposal for the position after."""

    def open(self, prompt_ids: Sequence[int]) -> NextToken: ...

    def append(self, token: int) -> NextToken: ...


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


@dataclass(frozen=True)
class ModelLimits:
    """What a request must respect to be computable by the model it targets (the LLM service checks each one:
    a single out-of-range id or an over-long context would otherwise fail the whole batch it lands in)."""

    vocab_size: int
    max_positions: int

    def problem(self, context_ids: np.ndarray, topk_ids: np.ndarray, draft_token: int,
                start: int = 0) -> tuple[str, str] | None:
        """(kind, message) of why a request cannot be verified by this model; None when it can. `start`: the
        position of context_ids[0] in a session's sequence (the tokens before it are in the session)."""
        if start + context_ids.size > self.max_positions:
            return "context_length", (f"context of {start + context_ids.size} tokens exceeds the model's "
                                      f"{self.max_positions} positions")
        if context_ids.size and int(context_ids.max()) >= self.vocab_size:
            return "context_id", f"context token id {int(context_ids.max())} >= vocabulary size {self.vocab_size}"
        if topk_ids.size and int(topk_ids.max()) >= self.vocab_size:
            return "topk_id", f"top-k token id {int(topk_ids.max())} >= vocabulary size {self.vocab_size}"
        if int(draft_token) not in {int(t) for t in topk_ids}:
            return "draft_not_in_topk", "the draft token is not among the uploaded top-k"
        return None

