"""LLMRefiner: the server's model - fine-tuned like the SLM, then classifies and verifies what clients send.

One-token requests (classification) are verified by :func:`fedhlm.maths.verification.verify_drafts`
over :meth:`LLMRefiner.q_probs`, the one verification path the LLM service and the
calibration share. Multi-token generation keeps one KV cache per session (a bounded LRU of
``session_id -> past keys/values``): a client sends only the tokens added since its last
contact, so a verification encodes those few tokens, never the whole prefix again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fedhlm.data.task import DEFAULT_TASK
from fedhlm.models.classifier import Batch, NextTokenClassifier
from fedhlm.models.backbone import next_token_logits
from fedhlm.models.backbone import prompt_attention as attention_of
from fedhlm.models.kv_cache import SessionStore
from fedhlm.maths.speculative import VerifyMode, verify

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
        self.sessions = SessionStore(max_sessions)
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

        ``start == 0`` (re)opens the session with the whole prefix; a request that does not continue the
        session raises :class:`~fedhlm.models.kv_cache.SessionMismatch` (the client resends from 0).
        """
        if attention_of(self.model) != "causal":
            raise ValueError(f"session {session_id}: this LLM reads prompts {attention_of(self.model)}ly, which "
                             "cannot extend a KV cache token by token; sessions need prompt_attention: causal")
        with self.serving():
            return self.sessions.extend(self.model, session_id, token_ids, start, self.device)

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
        return self.sessions.held(session_id)

    def expire_sessions(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Drop the sessions unused for more than `ttl_s` (their clients died or forgot to end them)."""
        return self.sessions.expire(ttl_s, now)

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
