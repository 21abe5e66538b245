"""KV-cache inference: extending a causal LM's cache by new tokens, and the LLM's per-session caches.

Kept apart from the modules that train (`models.cache.TRAINING_CODE`): how a session is served does not
change a trained weight, so tuning it retrains nothing.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this model's forward takes a KV cache (transformers renamed it)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def extend_cache(model: nn.Module, new_ids: torch.Tensor, cache: Any | None) -> tuple[torch.Tensor, Any]:
    """Feed ``new_ids`` [1, n] after the tokens already in ``cache``; returns (last logits [V], new cache).

    Only the new tokens are encoded: the keys/values of the prefix come from the cache. Where the model can
    (``logits_to_keep``), only the last position is projected onto the vocabulary: an opening prompt of 50
    tokens would otherwise pay 50 vocabulary projections, each as dear as a token's six layers, for one row.
    """
    params = inspect.signature(model.forward).parameters
    kwargs = {cache_kwarg(model): cache, "use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {})}
    out = model(input_ids=new_ids, **kwargs)
    new_cache = out["cache"] if "cache" in out else out["past_key_values"]
    return out.logits[0, -1], new_cache


def cache_length(cache: Any | None) -> int:
    """Number of tokens held in a KV cache (0 for None)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


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


class SessionStore(OrderedDict[str, Session]):
    """A bounded LRU of sessions (``session_id -> Session``): the least recently used is evicted beyond
    ``max_sessions``; :meth:`extend` is the one way a session grows."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__()
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions

    def extend(self, model: nn.Module, session_id: str, token_ids: Sequence[int] | torch.Tensor, start: int,
               device: torch.device) -> torch.Tensor:
        """Extend ``session_id`` with the tokens at positions ``start``.. and return q [V] after the last.

        ``start == 0`` (re)opens the session with the whole prefix. Otherwise ``start`` must equal the number
        of tokens the session holds, else :class:`SessionMismatch` (evicted, or a message was lost): the
        client resends from 0. The caller runs this in inference mode with the model in eval mode.
        """
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids,
                              dtype=torch.long).reshape(1, -1).to(device)
        session = self.get(session_id)
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
            self.move_to_end(session_id)
            return session.q
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and start + ids.shape[1] > limit:
            raise ValueError(f"session {session_id}: {start + ids.shape[1]} tokens exceed the model's {limit} positions")
        logits, cache = extend_cache(model, ids, None if session is None else session.cache)
        q = torch.softmax(logits.float(), dim=-1)
        self[session_id] = Session(cache=cache, length=cache_length(cache), q=q, used=time.monotonic())
        self.move_to_end(session_id)
        while len(self) > self.max_sessions:
            evicted, _ = self.popitem(last=False)
            log.debug("evicted LLM session %s", evicted)
        return q

    def held(self, session_id: str) -> int:
        """Tokens held of a session (0: none)."""
        session = self.get(session_id)
        return 0 if session is None else session.length

    def expire(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Drop the sessions unused for more than `ttl_s` (their clients died or forgot to end them)."""
        now = time.monotonic() if now is None else now
        stale = [sid for sid, session in self.items() if now - session.used > ttl_s]
        for sid in stale:
            del self[sid]
        return stale
