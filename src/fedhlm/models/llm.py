"""LLMRefiner: the server's model - fine-tuned like the SLM, then classifies and verifies what clients send.

One-token requests (classification) are verified by :func:`fedhlm.maths.verification.verify_drafts`
over :meth:`LLMRefiner.q_probs`, the one verification path the LLM service and the
calibration share. Multi-token generation keeps one KV cache per session (a bounded LRU of
``session_id -> past keys/values``): a client sends only the tokens added since its last
contact, so a verification encodes those few tokens, never the whole prefix again.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedhlm.data.task import DEFAULT_TASK
from fedhlm.models.classifier import Batch, NextTokenClassifier
from fedhlm.models.backbone import cache_length, extend_cache, next_token_logits
from fedhlm.models.backbone import prompt_attention as attention_of
from fedhlm.maths.speculative import VerifyMode, verify

log = logging.getLogger(__name__)


class SessionMismatch(LookupError):
    """The request does not continue the session the refiner holds (evicted, or out of step): resend from 0."""


@dataclass
class Session:
    """One generation session: its KV cache, how many tokens it holds, q after the last one and when it was
    last used (monotonic seconds: a session whose client died expires after a TTL)."""

    cache: Any
    length: int
    q: torch.Tensor
    used: float = 0.0


class LLMRefiner(NextTokenClassifier):
    """The LLM (by default pretrained MiniLM as a decoder) with verification and per-session KV caches.

    Args (besides those of :class:`~fedhlm.models.classifier.NextTokenClassifier`, whose
    defaults here are the pretrained MiniLM and a fine-tuning learning rate):
        max_sessions: KV caches kept; the least recently used is evicted beyond this.
    """

    def __init__(
        self,
        pretrained: str | None = "minilm",
        hidden_size: int = 384,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 1536,
        max_position: int = 512,
        embeddings_from: str | None = None,
        tokenizer: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 30,
        seed: int = 0,
        task: str = DEFAULT_TASK,
        lr_schedule: Literal["constant", "linear"] = "constant",
        prompt_attention: Literal["causal", "bidirectional"] | None = None,
        max_sessions: int = 256,
    ) -> None:
        super().__init__(
            pretrained=pretrained, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            intermediate_size=intermediate_size, max_position=max_position, embeddings_from=embeddings_from,
            tokenizer=tokenizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed, task=task,
            lr_schedule=lr_schedule, prompt_attention=prompt_attention,
        )
        self.save_hyperparameters()
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.generator = torch.Generator().manual_seed(seed)

    # ---- one-token requests (classification) -------------------------------------------
    @torch.no_grad()
    def q_probs(self, batch: Batch) -> torch.Tensor:
        """The LLM's next-token distribution [B, V] after each prompt."""
        with self.serving():
            return torch.softmax(self.next_logits(batch).float(), dim=-1)

    def _cpu_generator(self, like: torch.Tensor) -> torch.Generator | None:
        return self.generator if like.device.type == "cpu" else None

    # ---- multi-token sessions -----------------------------------------------------------
    @torch.no_grad()
    def session_q(self, session_id: str, token_ids: Sequence[int] | torch.Tensor, start: int) -> torch.Tensor:
        """Extend ``session_id`` with the tokens at positions ``start``.. and return q [V] after the last.

        ``start == 0`` (re)opens the session with the whole prefix. Otherwise ``start`` must
        equal the number of tokens the session holds, else :class:`SessionMismatch`
        (the session was evicted or a message was lost) and the client resends from 0.
        """
        if attention_of(self.model) != "causal":
            raise ValueError(f"session {session_id}: this LLM reads prompts {attention_of(self.model)}ly, which "
                             "cannot extend a KV cache token by token; sessions need prompt_attention: causal")
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids, dtype=torch.long)
        ids = ids.reshape(1, -1).to(self.device)
        session = self.sessions.get(session_id)
        if start == 0:
            session = None
            if ids.shape[1] == 0:
                raise ValueError(f"session {session_id}: opening a session needs at least one token")
        elif session is None:
            raise SessionMismatch(f"session {session_id}: not held by this refiner (evicted or never opened); resend from 0")
        elif session.length != start:
            raise SessionMismatch(f"session {session_id}: holds {session.length} tokens, request starts at {start}; resend from 0")
        if session is not None and ids.shape[1] == 0:
            session.used = time.monotonic()
            self.sessions.move_to_end(session_id)
            return session.q
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and start + ids.shape[1] > limit:
            raise ValueError(f"session {session_id}: {start + ids.shape[1]} tokens exceed the model's {limit} positions")
        with self.serving():
            logits, cache = extend_cache(self.model, ids, None if session is None else session.cache)
        q = torch.softmax(logits.float(), dim=-1)
        self.sessions[session_id] = Session(cache=cache, length=cache_length(cache), q=q, used=time.monotonic())
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > self.max_sessions:
            evicted, _ = self.sessions.popitem(last=False)
            log.debug("evicted LLM session %s", evicted)
        return q

    @torch.no_grad()
    def verify_in_session(
        self,
        session_id: str,
        token_ids: Sequence[int] | torch.Tensor,
        start: int,
        topk_ids: torch.Tensor,
        topk_probs: torch.Tensor,
        tail_mass: float | torch.Tensor | None,
        draft_token: int,
        generator: torch.Generator | None = None,
        *,
        mode: VerifyMode,
    ) -> tuple[bool, int, float, float]:
        """Verify one drafted token of a generation: (accepted, final_token, beta, q(draft)).

        ``mode``: "sample" (speculative sampling, the output distributed as q) or "greedy"
        (keep the draft iff it is the LLM's argmax, else the argmax).

        The final token is *not* appended to the session: the client sends it back as the
        first of its next new tokens, so the refiner only ever holds confirmed tokens.
        """
        q = self.session_q(session_id, token_ids, start)
        return verify(
            topk_ids.to(q.device), topk_probs.to(q.device), tail_mass, q, draft_token,
            generator=generator or self._cpu_generator(q), mode=mode,
        )

    def end_session(self, session_id: str) -> bool:
        """Drop a finished session's cache; False when it was not held."""
        return self.sessions.pop(session_id, None) is not None

    def held(self, session_id: str) -> int:
        """Tokens held of a session (0: none)."""
        session = self.sessions.get(session_id)
        return 0 if session is None else session.length

    def expire_sessions(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Drop the sessions unused for more than `ttl_s` (their clients died or forgot to end them)."""
        now = time.monotonic() if now is None else now
        stale = [sid for sid, session in self.sessions.items() if now - session.used > ttl_s]
        for sid in stale:
            del self.sessions[sid]
        return stale

    @torch.no_grad()
    def reencoded_q(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """q [V] after a whole prefix encoded from scratch (the reference the session cache must match)."""
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids, dtype=torch.long)
        ids = ids.reshape(1, -1).to(self.device)
        with self.serving():
            logits = next_token_logits(
                self.model, ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1], device=ids.device)
            )
        return torch.softmax(logits[0].float(), dim=-1)
