"""The LLM refiner as a service: takes uncertain tokens from MQTT, verifies them in batches, answers.

Workers share the request topic through an MQTT v5 shared subscription
(`$share/<group>/fedhlm/v1/llm/request`), so several refiner processes split the load and
the broker hands each request to one of them. Requests that arrive close together are
verified in one forward pass (up to `max_batch`, waiting at most `max_wait_ms`). Requests wait
in one bounded queue per client, taken round-robin (`core.fair_queue`): a client that floods the
worker delays the others by one slot per batch, its own oldest requests are dropped past
`per_client_queue`, and a request is dropped unserved once its client has given up on it: when its
MQTT v5 Message Expiry (the client's timeout, counted down by the broker while it held the request)
runs out, or, for a client that sets none, after `max_age_s`.

Generation sessions (`SessionToken` on `fedhlm/v1/llm/session`) are verified in the session's KV cache
(`sessions`, the refiner's), which only grows by the tokens each request adds; the tokens of different
sessions taken together go through the LLM in one forward pass (a one-token step is bound by reading the
weights, so they share one read). A token the worker cannot continue is answered with a `SessionMiss`.
Sessions end on a `SessionEnd` or after `session_ttl_s` unused, so a client that dies mid-sequence leaves
nothing behind. A sequence's first token comes through the shared subscription; every verdict names this
worker (`worker`, its client id), and the later tokens of the sessions it opened come to it by name on
`fedhlm/v1/llm/worker/<id>/session`, so with several worker processes a session stays where its cache is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedhlm.core.fair_queue import FairQueue
from fedhlm.core.records import ModelLimits
from fedhlm.maths.speculative import VerifyMode
from fedhlm.maths.verification import Draft, QFunction, verify_drafts
from fedhlm.models.kv_cache import SessionDraft, SessionMismatch
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.network import Network, OwnThreads
from fedhlm.transport.messages import LLMVerdict, SessionEnd, SessionMiss, SessionToken, TokenRequest

log = logging.getLogger(__name__)


class SessionVerifier(Protocol):
    """What the service needs of an LLM that keeps generation sessions (`models.kv_cache.RefinerSessions`)."""

    def verify_many(self, drafts: Sequence[SessionDraft], *, mode: VerifyMode
                    ) -> list[tuple[bool, int, float, float] | Exception]: ...

    def end_session(self, session_id: str) -> bool: ...

    def held(self, session_id: str) -> int: ...

    def expire_sessions(self, ttl_s: float) -> list[str]: ...


class SharedSessions:
    """One LLM's sessions served by several in-process workers: one session call at a time (a KV cache and
    the LRU that holds it are not thread-safe), so every worker continues every session."""

    def __init__(self, sessions: SessionVerifier) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()

    def verify_many(self, drafts: Sequence[SessionDraft], *, mode: VerifyMode
                    ) -> list[tuple[bool, int, float, float] | Exception]:
        with self._lock:
            return self._sessions.verify_many(drafts, mode=mode)

    def end_session(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.end_session(session_id)

    def held(self, session_id: str) -> int:
        with self._lock:
            return self._sessions.held(session_id)

    def expire_sessions(self, ttl_s: float) -> list[str]:
        with self._lock:
            return self._sessions.expire_sessions(ttl_s)


@dataclass
class LLMServiceStats:
    requests: int = 0
    batches: int = 0
    errors: int = 0
    compute_s: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> requests dropped unanswered
    session_tokens: int = 0  # verified in a session
    session_new_tokens: int = 0  # tokens those requests added to their sessions (what the LLM encoded)
    session_misses: int = 0
    sessions_ended: int = 0
    sessions_expired: int = 0


class LLMService:
    """One refiner worker. `q_fn` is the LLM's next-token distribution for a batch of contexts."""

    def __init__(
        self,
        address: BrokerAddress,
        q_fn: QFunction,
        *,
        mode: VerifyMode,  # the config's routing.verify: the one default lives there
        group: str = "llm",
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        pad_id: int = 0,
        seed: int = 0,
        network: Network | None = None,
        limits: ModelLimits | None = None,
        per_client_queue: int = 64,
        max_age_s: float | None = None,
        sessions: SessionVerifier | None = None,
        session_ttl_s: float = 60.0,
    ) -> None:
        self.q_fn = q_fn
        self.sessions = sessions  # None: this LLM keeps no sessions (a session token is refused, counted)
        self.session_ttl_s = session_ttl_s
        self.limits = limits  # None: only the schema's checks (a test's synthetic q function)
        self.group = group
        self.mode: VerifyMode = mode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.pad_id = pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = LLMServiceStats()
        self.endpoint = (network or OwnThreads()).endpoint(address, persistent=False)
        self._queue: FairQueue[Inbound] = FairQueue(per_client_queue, max_age_s)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"llm-{address.username}", daemon=True)

    def start(self, timeout_s: float = 10.0) -> "LLMService":
        self.endpoint.subscribe(topics.llm_request_shared(self.group), self._on_request, qos=1)
        self.endpoint.subscribe(topics.llm_session_shared(self.group), self._on_request, qos=1)
        self.endpoint.subscribe(topics.llm_session_end_shared(self.group), self._on_session_end, qos=1)
        # session affinity: the later tokens (and the end) of the sessions this worker opened come to it by name
        self.endpoint.subscribe(topics.llm_worker_session(self.worker), self._on_request, qos=1)
        self.endpoint.subscribe(topics.llm_worker_session_end(self.worker), self._on_session_end, qos=1)
        self.endpoint.start().wait_connected(timeout_s)
        self._thread.start()
        return self

    @property
    def worker(self) -> str:
        """This worker's name in its verdicts and its session topic: its MQTT client id."""
        return self.endpoint.client_id

    def stop(self) -> None:
        self._stopping.set()
        self._queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.endpoint.close()

    def _on_request(self, inbound: Inbound) -> None:
        if not isinstance(inbound.message, (TokenRequest, SessionToken)):
            log.warning("llm: dropped %s on %s: not a token request", type(inbound.message).__name__, inbound.topic)
            return
        if not inbound.response_topic:
            log.warning("llm: dropped a request from %s: no response topic", inbound.message.client_id)
            return
        r = inbound.message
        if inbound.response_topic != topics.client_llm_reply(r.client_id):
            # the verdict would land on another client's (or any) topic the LLM may write to: a client could
            # make the LLM publish into a peer's reply stream, or the edge's cache learn from a verdict it forged
            self._reject(r.client_id, "response_topic", f"response topic {inbound.response_topic!r} is not "
                         f"{r.client_id}'s reply topic")
            return
        if isinstance(r, SessionToken):
            problem = (("no_sessions", "this LLM keeps no generation sessions") if self.sessions is None else
                       self.limits.problem(r.new_ids, r.topk_ids, r.draft_token, r.start) if self.limits else None)
        else:
            problem = self.limits.problem(r.context_ids, r.topk_ids, r.draft_token) if self.limits else None
        if problem is not None:
            self._reject(r.client_id, *problem)
            if isinstance(r, SessionToken):
                self._refuse(inbound, r)
            return
        self._queue.put(r.client_id, inbound, ttl_s=inbound.expiry_s)

    def _on_session_end(self, inbound: Inbound) -> None:
        end = inbound.message
        if not isinstance(end, SessionEnd) or self.sessions is None:
            return
        self._queue.put(end.client_id, inbound)  # on the serving thread: the sessions are not shared with this one

    @property
    def dropped(self) -> dict[str, int]:
        """Requests dropped unserved by the fair queue: 'overflow' (a client over its share), 'expired'."""
        return dict(self._queue.dropped)

    def _reject(self, client_id: str, kind: str, problem: str) -> None:
        """Count the reason; log the first of each kind and then every 1000th (a flood must not flood the log)."""
        n = self.stats.rejected.get(kind, 0) + 1
        self.stats.rejected[kind] = n
        if n == 1 or n % 1000 == 0:
            log.warning("llm: dropped a request from %s (%d of this kind): %s", client_id, n, problem)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            batch = self._queue.take(self.max_batch, timeout_s=0.5, linger_s=self.max_wait_s)
            if self.sessions is not None:
                self.stats.sessions_expired += len(self.sessions.expire_sessions(self.session_ttl_s))
            sessions = [b for b in batch if isinstance(b.message, (SessionToken, SessionEnd))]
            if sessions:
                self._serve_sessions(sessions)
            batch = [b for b in batch if not isinstance(b.message, (SessionToken, SessionEnd))]
            if not batch:
                continue
            try:
                self._answer(batch)
            except Exception as exc:  # a bad batch must not kill the worker, nor the good requests in it
                log.warning("llm: a batch of %d failed (%s: %s); verifying its requests one by one", len(batch),
                            type(exc).__name__, exc)
                for inbound in batch:
                    try:
                        self._answer([inbound])
                    except Exception as one:
                        self.stats.errors += 1
                        self._reject(inbound.message.client_id, "verification_failed", f"{type(one).__name__}: {one}")

    def _answer(self, batch: list[Inbound]) -> None:
        requests: list[TokenRequest] = [b.message for b in batch]  # type: ignore[misc]
        start = time.perf_counter()
        v = verify_drafts(self.q_fn, [Draft(r.context_ids, r.topk_ids, r.topk_probs, r.draft_token) for r in requests],
                          pad_id=self.pad_id, mode=self.mode, generator=self.generator)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.compute_s += elapsed_ms / 1000.0
        for i, (inbound, r) in enumerate(zip(batch, requests)):
            verdict = LLMVerdict(
                client_id=r.client_id, session_id=r.session_id, seq=r.seq,
                accepted=bool(v.accepted[i]), final_token=int(v.token[i]),
                beta=float(v.beta[i].clamp(0, 1)), q_draft=float(v.q_draft[i].clamp(0, 1)),
                llm_ms=elapsed_ms, worker=self.worker,
            )
            self.endpoint.reply(inbound, verdict, qos=1)

    def _refuse(self, inbound: Inbound, message: SessionToken) -> None:
        """A session token this worker will not verify: a SessionMiss holding nothing, at once, so that the
        client stops offloading that sequence instead of waiting out its timeout on every later token."""
        miss = SessionMiss(message.client_id, message.session_id, message.seq, 0)
        self.endpoint.answer_on(topics.client_llm_miss(message.client_id), inbound, miss, qos=1)

    def _serve_sessions(self, inbounds: list[Inbound]) -> None:
        """Verify the session tokens taken together in one pass through their KV caches, answer each (a verdict,
        or a SessionMiss when its session is not held here or is out of step), then apply the session ends."""
        tokens = [b for b in inbounds if isinstance(b.message, SessionToken)]
        if tokens and self.sessions is not None:
            messages: list[SessionToken] = [b.message for b in tokens]  # type: ignore[misc]
            drafts = [SessionDraft(_session_key(m), m.new_ids.tolist(), m.start, m.topk_ids, m.topk_probs,
                                   m.draft_token) for m in messages]
            start = time.perf_counter()
            try:
                results = self.sessions.verify_many(drafts, mode=self.mode)
            except Exception as exc:  # a failed pass must not take the worker down
                results = [exc] * len(drafts)
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            self.stats.batches += 1
            self.stats.compute_s += elapsed_ms / 1000.0
            for inbound, message, draft, result in zip(tokens, messages, drafts, results):
                self._answer_session(inbound, message, draft.session_id, result, elapsed_ms)
        for inbound in inbounds:
            end = inbound.message
            if isinstance(end, SessionEnd) and self.sessions is not None and self.sessions.end_session(_session_key(end)):
                self.stats.sessions_ended += 1

    def _answer_session(self, inbound: Inbound, message: SessionToken, key: str,
                        result: tuple[bool, int, float, float] | Exception, elapsed_ms: float) -> None:
        if isinstance(result, SessionMismatch):  # evicted, expired, another worker's, out of step: resend from 0
            self.stats.session_misses += 1
            miss = SessionMiss(message.client_id, message.session_id, message.seq, self.sessions.held(key))  # type: ignore[union-attr]
            self.endpoint.answer_on(topics.client_llm_miss(message.client_id), inbound, miss, qos=1)
            return
        if isinstance(result, Exception):  # a bad request must not take the worker down
            self.stats.errors += 1
            self._reject(message.client_id, "verification_failed", f"{type(result).__name__}: {result}")
            self._refuse(inbound, message)
            return
        accepted, final, beta, q_draft = result
        self.stats.requests += 1
        self.stats.session_tokens += 1
        self.stats.session_new_tokens += int(message.new_ids.size)
        verdict = LLMVerdict(client_id=message.client_id, session_id=message.session_id, seq=message.seq,
                             accepted=bool(accepted), final_token=int(final), beta=min(1.0, max(0.0, float(beta))),
                             q_draft=min(1.0, max(0.0, float(q_draft))), llm_ms=elapsed_ms, worker=self.worker)
        self.endpoint.reply(inbound, verdict, qos=1)


def _session_key(message: SessionToken | SessionEnd) -> str:
    """Sessions are held per client: one client's session id never reaches another client's cache."""
    return f"{message.client_id}/{message.session_id}"
