"""DeviceClient: `fedhlm.roles.client.Client` for a device, on the same topics and payloads, without torch.

Routing is the Python client's, decision for decision: the same policies, the same seeded
random streams (exploration, audit, update noise), LLM requests with retries and a
fallback to the SLM token, peer queries and answers, the same TokenRecords. What differs is
what a device has: the SLM runs through ONNX Runtime (`ExportedSLM.token_inputs`), the head
is the numpy `ScalarHead` trained by plain SGD, there is no sentence-transformers (P2P
works only with embeddings the caller supplies, else it is off), and an update goes through
an on-disk `Outbox`: written before publish, removed on PUBACK, resent at start.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhlm.aggregation import check_params, personalise
from fedhlm.peer_cache import PeerCache
from fedhlm.report import TokenRecord
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import encode
from fedhlm.transport.endpoint import Endpoint, Inbound
from fedhlm.transport.messages import (
    ClientStatus,
    LLMVerdict,
    PeerQuery,
    PeerReply,
    ThresholdModel,
    ThresholdUpdate,
    TokenRequest,
)
from fedhlm_device.head import ScalarHead, fit_sgd
from fedhlm_device.outbox import Outbox

log = logging.getLogger(__name__)

POLICIES = ("learned", "static", "always", "never")


@dataclass(frozen=True)
class TokenInput:
    """One drafted input (the fields of fedhlm.roles.client.TokenInput)."""

    uid: int
    label: int
    context_ids: np.ndarray
    draft_token: int
    topk_ids: np.ndarray
    topk_probs: np.ndarray
    tail_mass: float
    features: np.ndarray
    embedding: np.ndarray | None = None


@dataclass
class DeviceSettings:
    """The fields of fedhlm.roles.client.ClientSettings (same names, same defaults) plus the outbox folder."""

    client_id: str
    edge_id: str
    policy: str = "learned"
    static_tau: float = 0.5
    exploration: float = 0.05
    lam: float = 0.1
    local_steps: int = 30
    lr: float = 0.05
    optimizer: str = "sgd"  # a device trains with plain gradient steps only
    lr_decay: float = 0.0
    llm_timeout_s: float = 10.0
    llm_retries: int = 1
    round_wait_s: float = 30.0
    personalise: float = 0.0
    p2p: bool = False
    delta: float = 0.9
    p2p_deadline_s: float = 0.04
    p2p_scope: str = "cluster"
    audit: float = 0.05
    embedder_name: str = "all-MiniLM-L6-v2"
    cache_entries: int = 2000
    cache_ttl_s: float = 3600.0
    seed: int = 0
    noise_std: float = 0.0
    state_dir: str | None = None  # outbox lives in <state_dir>/outbox; None: no outbox (tests, simulations)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.optimizer != "sgd":
            raise ValueError(f"optimizer: a device trains its head with 'sgd' only, got {self.optimizer!r}")
        if self.llm_timeout_s <= 0:
            raise ValueError(f"llm_timeout_s must be > 0, got {self.llm_timeout_s}")
        if self.llm_retries < 0:
            raise ValueError(f"llm_retries must be >= 0, got {self.llm_retries}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    @classmethod
    def from_fields(cls, values: dict, **changes: object) -> "DeviceSettings":
        """From a dict of setting names (e.g. dataclasses.asdict of a ClientSettings); unknown names are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown device settings {unknown}")
        return cls(**{**values, **changes})


@dataclass
class ClientCounters:
    peer_queries: int = 0
    peer_hits: int = 0
    peer_answers: int = 0
    peer_refused: int = 0
    peer_ms: list[float] = field(default_factory=list)
    fallbacks: int = 0
    llm_retries: int = 0
    updates_sent: int = 0
    updates_resent: int = 0  # from the outbox at start
    models_received: int = 0
    rounds_without_model: int = 0


class DeviceClient:
    """One device. `class_of` maps a token id to its class (-1: not a class token); see the module docstring."""

    def __init__(self, settings: DeviceSettings, address: BrokerAddress, head: ScalarHead,
                 class_of: Callable[[int], int], embedding_dim: int = 384) -> None:
        self.s = settings
        self.id = settings.client_id
        self.head = head
        self.class_of = class_of
        self.rng = np.random.default_rng([settings.seed, _stable_hash(self.id)])
        self._noise_rng = np.random.default_rng([settings.seed, _stable_hash(self.id), 1])
        self._llm_down = False
        self.counters = ClientCounters()
        self.cache = PeerCache(embedding_dim, max_entries=settings.cache_entries, ttl_s=settings.cache_ttl_s)
        self._pairs_f: list[np.ndarray] = []
        self._pairs_beta: list[float] = []
        self._round_pairs = 0
        self._seq = 0
        self._model_lock = threading.Condition()
        self._model: ThresholdModel | None = None
        self.tau_history: list[tuple[int, float]] = []
        self.outbox = Outbox(Path(settings.state_dir) / "outbox") if settings.state_dir else None
        will = (topics.client_status(self.id), ClientStatus(self.id, False, settings.edge_id, time.time()))
        self.endpoint = Endpoint(address, persistent=True, will=will)

    # -- life cycle ----------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> "DeviceClient":
        ep = self.endpoint
        if self.s.policy == "learned":
            ep.subscribe(topics.edge_model(self.s.edge_id), self._on_model, qos=1)
        if self.s.p2p:
            ep.subscribe(topics.edge_p2p_query(self.s.edge_id), self._on_peer_query, qos=0)
        ep.start().wait_connected(timeout_s)
        ep.publish(topics.client_status(self.id), ClientStatus(self.id, True, self.s.edge_id, time.time()), qos=1,
                   retain=True)
        self.resend_outbox()
        return self

    def stop(self) -> None:
        try:
            self.endpoint.publish(topics.client_status(self.id), ClientStatus(self.id, False, self.s.edge_id,
                                  time.time()), qos=1, retain=True)
            if self.endpoint.flush(2.0) and self.outbox is not None:
                for entry in self.outbox.pending():  # acknowledged meanwhile: every QoS 1 message is
                    self.outbox.remove(entry.path)
        finally:
            self.endpoint.close()

    # -- routing (as Client) ------------------------------------------------------------
    def offload(self, features: np.ndarray) -> bool:
        if self.s.policy == "always":
            return True
        if self.s.policy == "never":
            return False
        if self.s.policy == "static":
            return float(features[0]) > self.s.static_tau
        return bool(self.head.route(np.asarray(features, dtype=np.float32)))

    def run_round(self, round_: int, inputs: Sequence[TokenInput], slm_ms: float = 0.0) -> list[TokenRecord]:
        self._round_pairs = 0
        return [self._route(round_, inp, slm_ms) for inp in inputs]

    def _route(self, round_: int, inp: TokenInput, slm_ms: float) -> TokenRecord:
        start = time.perf_counter()
        draft_class = self.class_of(inp.draft_token)
        base = dict(client_id=self.id, round=round_, uid=inp.uid, label=inp.label, draft=draft_class)
        if not self.offload(inp.features):
            if self.s.policy == "learned" and self.rng.random() < self.s.exploration:
                return self._ask_llm(inp, "exploration", base, start, slm_ms)
            return TokenRecord(**base, final=draft_class, route="local", latency_ms=slm_ms)
        if self.s.p2p and inp.embedding is not None:
            hit = self._ask_peers(inp)
            if hit is not None:
                peer_class = self.class_of(hit.token)
                if self.rng.random() < self.s.audit:
                    return self._ask_llm(inp, "audit", base, start, slm_ms, peer_class=peer_class)
                latency = slm_ms + (time.perf_counter() - start) * 1000.0
                return TokenRecord(**base, final=peer_class, route="peer", latency_ms=latency, peer_token=peer_class)
        return self._ask_llm(inp, "uncertain", base, start, slm_ms)

    def _ask_llm(self, inp: TokenInput, reason: str, base: dict, start: float, slm_ms: float,
                 peer_class: int | None = None) -> TokenRecord:
        self._seq += 1
        request = TokenRequest(
            client_id=self.id, session_id=f"{self.id}-{inp.uid}", seq=self._seq, round=base["round"],
            context_ids=np.asarray(inp.context_ids, dtype=np.int32), draft_token=int(inp.draft_token),
            topk_ids=np.asarray(inp.topk_ids, dtype=np.int32), topk_probs=np.asarray(inp.topk_probs, np.float32),
            tail_mass=float(inp.tail_mass), features=np.asarray(inp.features, dtype=np.float32), reason=reason,
        )
        verdict = self._request_verdict(request)
        if verdict is None:
            self.counters.fallbacks += 1
            latency = slm_ms + (time.perf_counter() - start) * 1000.0
            return TokenRecord(**base, final=base["draft"], route="llm", reason="fallback", latency_ms=latency)
        self._pairs_f.append(np.asarray(inp.features, dtype=np.float32))
        self._pairs_beta.append(float(verdict.beta))
        self._round_pairs += 1
        if self.s.p2p and inp.embedding is not None:
            self.cache.add(inp.embedding, verdict.final_token, "llm")
        final = self.class_of(verdict.final_token)
        latency = slm_ms + (time.perf_counter() - start) * 1000.0
        return TokenRecord(**base, final=final, route="llm", reason=reason, latency_ms=latency, llm_final=final,
                           peer_token=peer_class)

    def _request_verdict(self, request: TokenRequest) -> LLMVerdict | None:
        """The verdict, or None after 1 + llm_retries attempts (one attempt while the LLM looks down)."""
        attempts = 1 if self._llm_down else 1 + self.s.llm_retries
        problem = ""
        for attempt in range(attempts):
            if attempt:
                self.counters.llm_retries += 1
                log.info("%s: no LLM verdict for seq %d (%s); sending it again", self.id, request.seq, problem)
            try:
                reply = self.endpoint.request(topics.llm_request(), request, topics.client_llm_reply(self.id),
                                              timeout_s=self.s.llm_timeout_s, qos=1)
            except TimeoutError as exc:
                problem = str(exc)
                continue
            except ConnectionError as exc:
                problem = str(exc)
                break
            if isinstance(reply, LLMVerdict) and reply.seq == request.seq:
                self._llm_down = False
                return reply
            problem = f"unexpected reply {type(reply).__name__} seq {getattr(reply, 'seq', '?')}"
        self._llm_down = True
        log.warning("%s: LLM gave no verdict (%s); keeping the SLM token", self.id, problem)
        return None

    # -- peers -----------------------------------------------------------------------
    def _ask_peers(self, inp: TokenInput) -> PeerReply | None:
        self.counters.peer_queries += 1
        start = time.perf_counter()
        reply = self._peer_request(inp, hops=0)
        if reply is None and self.s.p2p_scope == "neighbours":
            reply = self._peer_request(inp, hops=1)
        self.counters.peer_ms.append((time.perf_counter() - start) * 1000.0)
        if reply is not None:
            self.counters.peer_hits += 1
        return reply

    def _peer_request(self, inp: TokenInput, hops: int) -> PeerReply | None:
        self._seq += 1
        query = PeerQuery(
            client_id=self.id, edge_id=self.s.edge_id, seq=self._seq, model_name=self.s.embedder_name,
            embedding=np.asarray(inp.embedding, dtype=np.float16), hops=hops, delta=float(self.s.delta),
        )
        try:
            answer = self.endpoint.request(topics.edge_p2p_query(self.s.edge_id), query,
                                           topics.client_p2p_reply(self.id), timeout_s=self.s.p2p_deadline_s)
        except (TimeoutError, ConnectionError):
            return None
        if isinstance(answer, PeerReply) and answer.similarity >= self.s.delta:
            return answer
        return None

    def _on_peer_query(self, inbound: Inbound) -> None:
        q = inbound.message
        if not isinstance(q, PeerQuery) or q.client_id == self.id or q.hops == 1:
            return
        if q.model_name != self.s.embedder_name or q.embedding.size != self.cache.dim:
            self.counters.peer_refused += 1
            log.info("%s: ignored a peer query embedded with %s/%d", self.id, q.model_name, q.embedding.size)
            return
        hit = self.cache.lookup(q.embedding.astype(np.float32), q.delta)
        if hit is None or not inbound.response_topic:
            return
        self.counters.peer_answers += 1
        self.endpoint.reply(inbound, PeerReply(self.id, q.seq, hit.token, min(1.0, hit.similarity)))

    # -- federated learning ------------------------------------------------------------
    def head_params(self) -> dict[str, np.ndarray]:
        return self.head.params()

    def finish_round(self, round_: int) -> dict[str, float] | None:
        """Fit the head (numpy SGD), send the update through the outbox, adopt the edge's model."""
        if self.s.policy != "learned":
            return None
        fit = None
        if self._pairs_f and self.s.local_steps > 0:
            lr = self.s.lr / (1.0 + self.s.lr_decay * round_)
            start = time.perf_counter()
            fit = fit_sgd(self.head, np.stack(self._pairs_f), np.asarray(self._pairs_beta, np.float32),
                          lam=self.s.lam, steps=self.s.local_steps, lr=lr)
            fit["seconds"] = time.perf_counter() - start
        update = ThresholdUpdate(self.id, self.s.edge_id, round_, len(self._pairs_beta), self.upload_params())
        self.send_update(update)
        model = self.wait_model(round_, self.s.round_wait_s)
        if model is None:
            self.counters.rounds_without_model += 1
            log.warning("%s: no edge model for round %d within %.0f s; keeping the local head", self.id, round_,
                        self.s.round_wait_s)
        else:
            self.adopt(model)
        self.tau_history.append((round_, self.head.effective_tau()))
        return fit

    def send_update(self, update: ThresholdUpdate) -> None:
        """QoS 1 through the outbox: on disk first, removed once the broker acknowledged it."""
        topic = topics.edge_update(self.s.edge_id, self.id)
        entry = self.outbox.put(topic, encode(update)) if self.outbox is not None else None
        self.counters.updates_sent += 1
        self._publish_acked(topic, update, entry)

    def resend_outbox(self) -> int:
        """Publish what a previous run left unacknowledged; returns how many."""
        if self.outbox is None:
            return 0
        entries = self.outbox.pending()
        for entry in entries:
            log.info("%s: resending %s from the outbox", self.id, entry.path.name)
            self.counters.updates_resent += 1
            self._publish_acked(entry.topic, entry.message, entry.path)
        return len(entries)

    def _publish_acked(self, topic: str, message: ThresholdUpdate, entry: Path | None) -> None:
        try:
            self.endpoint.publish(topic, message, qos=1, wait=entry is not None, timeout_s=self.s.round_wait_s)
        except TimeoutError:
            log.warning("%s: no PUBACK for %s yet; it stays in the outbox", self.id, topic)
            return
        if entry is not None and self.outbox is not None:
            self.outbox.remove(entry)

    def upload_params(self) -> dict[str, np.ndarray]:
        """The head's parameters, with N(0, noise_std^2) on the trainable one (tau), as Client.upload_params."""
        params = self.head_params()
        if self.s.noise_std > 0:
            noise = self._noise_rng.normal(0.0, self.s.noise_std, size=params["tau"].shape)
            params["tau"] = (params["tau"] + noise).astype(np.float32)
        return params

    def current_round(self) -> int:
        with self._model_lock:
            return 0 if self._model is None else self._model.round + 1

    def _on_model(self, inbound: Inbound) -> None:
        model = inbound.message
        if not isinstance(model, ThresholdModel):
            return
        reason = check_params(model.params, self.head_params())
        if reason:
            log.warning("%s: rejected model from %s: %s", self.id, model.source_id, reason)
            return
        with self._model_lock:
            if self._model is None or model.round >= self._model.round:
                self._model = model
                self.counters.models_received += 1
            self._model_lock.notify_all()

    def wait_model(self, round_: int, timeout_s: float) -> ThresholdModel | None:
        deadline = time.monotonic() + timeout_s
        with self._model_lock:
            while self._model is None or self._model.round < round_:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._model_lock.wait(remaining)
            return self._model

    def adopt(self, model: ThresholdModel) -> None:
        self.head.load(personalise(self.head_params(), model.params, self.s.personalise))


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())
