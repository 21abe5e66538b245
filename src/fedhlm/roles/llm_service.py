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
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from fedhlm.core.fair_queue import FairQueue
from fedhlm.core.records import ModelLimits
from fedhlm.maths.speculative import VerifyMode
from fedhlm.maths.verification import Draft, QFunction, verify_drafts
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.network import Network, OwnThreads
from fedhlm.transport.messages import LLMVerdict, TokenRequest

log = logging.getLogger(__name__)

@dataclass
class LLMServiceStats:
    requests: int = 0
    batches: int = 0
    errors: int = 0
    compute_s: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> requests dropped unanswered


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
    ) -> None:
        self.q_fn = q_fn
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
        self.endpoint.start().wait_connected(timeout_s)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.endpoint.close()

    def _on_request(self, inbound: Inbound) -> None:
        if not isinstance(inbound.message, TokenRequest):
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
        problem = self.limits.problem(r.context_ids, r.topk_ids, r.draft_token) if self.limits else None
        if problem is not None:
            self._reject(r.client_id, *problem)
            return
        self._queue.put(r.client_id, inbound, ttl_s=inbound.expiry_s)

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
                llm_ms=elapsed_ms,
            )
            self.endpoint.reply(inbound, verdict, qos=1)
