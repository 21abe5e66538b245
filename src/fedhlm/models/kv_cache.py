"""KV-cache inference: extending a causal LM's cache by new tokens, and the LLM's per-session caches.

Kept apart from the modules that train (`models.cache.TRAINING_CODE`): how a session is served does not
change a trained weight, so tuning it retrains nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhlm.maths.speculative import VerifyMode, verify

log = logging.getLogger(__name__)


@functools.cache
def _forward_params(model_type: type) -> frozenset[str]:
    """The keyword names of a model class's forward (read once per class: a decoding step is the hot path)."""
    return frozenset(inspect.signature(model_type.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this model's forward takes a KV cache (transformers renamed it)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def extend_cache(model: nn.Module, new_ids: torch.Tensor, cache: Any | None) -> tuple[torch.Tensor, Any]:
    """Feed ``new_ids`` [1, n] after the tokens already in ``cache``; returns (last logits [V], new cache).

    Only the new tokens are encoded: the keys/values of the prefix come from the cache. Where the model can
    (``logits_to_keep``), only the last position is projected onto the vocabulary: an opening prompt of 50
    tokens would otherwise pay 50 vocabulary projections, each as dear as a token's six layers, for one row.
    """
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(type(model)) else {}
    kwargs = {cache_kwarg(model): cache, "use_cache": True, **keep}
    out = model(input_ids=new_ids, **kwargs)
    new_cache = out["cache"] if "cache" in out else out["past_key_values"]
    return out.logits[0, -1], new_cache


def extend_caches(model: nn.Module, caches: Sequence[Any | None], new_ids: Sequence[Sequence[int]]
                  ) -> list[tuple[torch.Tensor, Any]]:
    """:func:`extend_cache` for several sequences in one forward pass: row i feeds ``new_ids[i]`` (at least one
    token) after the ``caches[i]`` it continues (None: it opens with them). Returns (last logits [V], new
    cache) per row.

    Why: a one-token step is bound by reading the weights, not by arithmetic (measured here with MiniLM-L6 on
    2 cores: 12.3 ms for one session's token, 17.1 ms for eight sessions' tokens at once), so the tokens that
    reach a worker together share one read. The rows' caches are left-padded to the longest and masked, the new
    tokens follow (right-padded) with each row's own positions, so every row computes what :func:`extend_cache`
    would (up to float rounding); the padding is cut out of the caches handed back, and
    only each row's last real position is projected onto the vocabulary where the model lets us (a BERT
    decoder: `bert` + `cls`).
    """
    from transformers import BertLMHeadModel, DynamicCache

    n = len(caches)
    if n != len(new_ids) or n == 0:
        raise ValueError(f"extend_caches: {n} caches for {len(new_ids)} rows of new tokens")
    lengths = [cache_length(c) for c in caches]
    news = [len(ids) for ids in new_ids]
    if min(news) == 0:
        raise ValueError("extend_caches: every row needs at least one new token")
    past, width = max(lengths), max(news)
    device = next(model.parameters()).device
    padded = None
    if past > 0:  # left-padded: a row's held and new tokens then sit side by side, one slice to cut out again
        held = next(c for c in caches if cache_length(c) > 0)
        padded = DynamicCache()
        for layer in range(len(held.layers)):
            shape = held.layers[layer].keys.shape  # [1, heads, length, head_dim]
            keys = held.layers[layer].keys.new_zeros(n, shape[1], past, shape[3])
            values = torch.zeros_like(keys)
            for i, c in enumerate(caches):
                if lengths[i]:
                    keys[i, :, past - lengths[i]:] = c.layers[layer].keys[0]
                    values[i, :, past - lengths[i]:] = c.layers[layer].values[0]
            padded.update(keys, values, layer)
    ids = torch.zeros(n, width, dtype=torch.long, device=device)
    mask = torch.zeros(n, past + width, dtype=torch.long, device=device)
    positions = torch.zeros(n, width, dtype=torch.long, device=device)
    for i, (held_len, row) in enumerate(zip(lengths, new_ids)):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, past - held_len: past + len(row)] = 1
        positions[i] = torch.arange(held_len, held_len + width)
    kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": True}
    rows = torch.arange(n, device=device)
    last = torch.as_tensor(news, device=device) - 1
    if isinstance(model, BertLMHeadModel):
        out = model.bert(input_ids=ids, **kwargs, **{cache_kwarg(model.bert): padded})
        logits = model.cls(out.last_hidden_state[rows, last])
    else:
        out = model(input_ids=ids, **kwargs, **{cache_kwarg(model): padded})
        logits = out.logits[rows, last]
    grown = out["cache"] if "cache" in out else out["past_key_values"]
    results = []
    for i, (held_len, k) in enumerate(zip(lengths, news)):
        cache = DynamicCache()
        span = slice(past - held_len, past + k)
        for layer, state in enumerate(grown.layers):  # update copies the slices: no view keeps the batch alive
            cache.update(state.keys[i: i + 1, :, span], state.values[i: i + 1, :, span], layer)
        results.append((logits[i], cache))
    return results


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
        result = self.extend_many(model, [(session_id, token_ids, start)], device)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def extend_many(self, model: nn.Module, requests: Sequence[tuple[str, Sequence[int] | torch.Tensor, int]],
                    device: torch.device) -> list[torch.Tensor | Exception]:
        """:meth:`extend` for several requests ``(session_id, token_ids, start)``: q [V] per request, or the
        exception that request raises (the others are served all the same). The openings go through the
        model in one batch and the continuations of held sessions in another (:func:`extend_caches`); a second
        request of a session in the same call comes after them, one at a time, in order."""
        results: list[torch.Tensor | Exception | None] = [None] * len(requests)
        batch: list[tuple[int, str, list[int]]] = []  # continuations of held sessions
        openings: list[tuple[int, str, list[int]]] = []  # (re)openings, with their whole prefix
        later: list[int] = []
        seen: set[str] = set()
        for i, (session_id, token_ids, start) in enumerate(requests):
            ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
            if session_id in seen:  # checked once what comes before it has been applied
                later.append(i)
            elif (problem := self._problem(model, session_id, ids, start)) is not None:
                results[i] = problem
            elif start == 0:
                openings.append((i, session_id, ids))
            elif ids:
                batch.append((i, session_id, ids))
            else:
                later.append(i)  # nothing new: the session's q, in order
            seen.add(session_id)
        for group, caches in ((openings, [None] * len(openings)), (batch, [self[sid].cache for _, sid, _ in batch])):
            if group:  # openings apart: a one-token row padded to a 50-token prompt would pay for the padding
                grown = extend_caches(model, caches, [ids for _, _, ids in group])
                for (i, session_id, _), (logits, cache) in zip(group, grown):
                    results[i] = self._store(session_id, logits, cache)
        for i in later:  # a session's second request, or one with nothing new: in order, one by one
            session_id, token_ids, start = requests[i]
            ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
            problem = self._problem(model, session_id, ids, start)
            if problem is not None:
                results[i] = problem
                continue
            session = None if start == 0 else self[session_id]
            if session is not None and not ids:
                session.used = time.monotonic()
                self.move_to_end(session_id)
                results[i] = session.q
                continue
            new = torch.tensor([ids], dtype=torch.long, device=device)
            logits, cache = extend_cache(model, new, None if session is None else session.cache)
            results[i] = self._store(session_id, logits, cache)
        return results  # type: ignore[return-value]

    def _problem(self, model: nn.Module, session_id: str, ids: list[int], start: int) -> Exception | None:
        """Why this request cannot extend its session (None: it can)."""
        session = self.get(session_id)
        if start == 0:
            if not ids:
                return ValueError(f"session {session_id}: opening a session needs at least one token")
        elif session is None:
            return SessionMismatch(f"session {session_id}: not held by this refiner (evicted or never opened); "
                                   "resend from 0")
        elif session.length != start:
            return SessionMismatch(f"session {session_id}: holds {session.length} tokens, request starts at {start}; "
                                   "resend from 0")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and start + len(ids) > limit:
            return ValueError(f"session {session_id}: {start + len(ids)} tokens exceed the model's {limit} positions")
        return None

    def _store(self, session_id: str, logits: torch.Tensor, cache: Any) -> torch.Tensor:
        """Keep the grown session as the most recent (evicting the least recent beyond the bound); its q."""
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


@dataclass(frozen=True)
class SessionDraft:
    """One drafted token to verify in its session: the tokens since the session's last sync (from ``start``),
    the draft and the top-k distribution it was drafted from (as a `SessionToken` carries them)."""

    session_id: str
    token_ids: Sequence[int]
    start: int
    topk_ids: np.ndarray
    topk_probs: np.ndarray
    draft_token: int
    tail_mass: float | None = None  # None: 1 - the sum of the top-k


class RefinerSessions:
    """The generation sessions of a refiner (`models.llm.LLMRefiner`: its model, its `SessionStore`, its
    generator) as an LLM worker serves them: the drafts that reach the worker together are verified in one
    forward pass."""

    def __init__(self, refiner: Any) -> None:
        self.refiner = refiner

    @torch.no_grad()
    def verify_many(self, drafts: Sequence[SessionDraft], *, mode: VerifyMode
                    ) -> list[tuple[bool, int, float, float] | Exception]:
        """Per draft (accepted, final_token, beta, q(draft)), or the exception its request raised (a
        :class:`SessionMismatch`: the client resends from 0); one bad request fails only itself. The final
        token is not appended: the client sends it back as the first of its next new tokens."""
        llm = self.refiner
        if not drafts:
            return []
        from fedhlm.models.backbone import prompt_attention

        if prompt_attention(llm.model) != "causal":
            problem = ValueError(f"this LLM reads prompts {prompt_attention(llm.model)}ly, which cannot extend a KV "
                                 "cache token by token; sessions need prompt_attention: causal")
            return [problem] * len(drafts)
        with llm.serving():
            qs = llm.sessions.extend_many(llm.model, [(d.session_id, d.token_ids, d.start) for d in drafts], llm.device)
        results: list[tuple[bool, int, float, float] | Exception] = []
        for d, q in zip(drafts, qs):
            if isinstance(q, Exception):
                results.append(q)
                continue
            try:
                results.append(verify(torch.from_numpy(np.asarray(d.topk_ids, dtype=np.int64)).to(q.device),
                                      torch.from_numpy(np.asarray(d.topk_probs, dtype=np.float32)).to(q.device),
                                      d.tail_mass, q, int(d.draft_token),
                                      generator=llm.generator if q.device.type == "cpu" else None, mode=mode))
            except Exception as exc:  # a malformed draft fails its own request only
                results.append(exc)
        return results

    def end_session(self, session_id: str) -> bool:
        return self.refiner.end_session(session_id)

    def held(self, session_id: str) -> int:
        return self.refiner.held(session_id)

    def expire_sessions(self, ttl_s: float) -> list[str]:
        return self.refiner.expire_sessions(ttl_s)
