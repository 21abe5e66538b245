"""The client role: routes each SLM token (local, peer, LLM) and learns its threshold head with its edge.

Cheapest first: a confident token stays local and sends nothing; an uncertain one is
offered to the peers of the cluster (embedding similarity >= delta), then sent to the
LLM as a top-k payload. Every LLM verdict yields a (features, beta) pair; at the end of a
round the head is fitted on them (`HeadModule.training_step` through a Lightning Trainer)
and the update goes to the edge at QoS 1; the edge's cluster model comes back retained.
A client talks to the other roles only through its MQTT endpoint.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedhlm.core.aggregation import check_params, personalise
from fedhlm.core.peer_cache import PeerCache
from fedhlm.reporting.summary import TokenRecord
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.messages import (
    ClientStatus,
    LLMVerdict,
    PeerQuery,
    PeerReply,
    ThresholdModel,
    ThresholdUpdate,
    TokenRequest,
)
from fedhlm.transport.network import Network, OwnThreads

log = logging.getLogger(__name__)

POLICIES = ("learned", "static", "always", "never")


@dataclass(frozen=True)
class TokenInput:
    """What the SLM produced for one input: drafted once (batched) and routed by the client."""

    uid: int
    label: int
    context_ids: np.ndarray  # int32 prompt token ids
    draft_token: int
    topk_ids: np.ndarray  # int32
    topk_probs: np.ndarray  # float32
    tail_mass: float
    features: np.ndarray  # float32 uncertainty features (entropy first)
    embedding: np.ndarray | None = None  # float32 unit-norm context embedding, for P2P


@dataclass
class ClientSettings:
    client_id: str
    edge_id: str
    policy: str = "learned"  # learned | static | always | never
    static_tau: float = 0.5  # entropy threshold of the static policy
    exploration: float = 0.05
    importance_weights: bool = True  # weight each (features, beta) pair by 1 / P(it was labelled)
    lam: float = 0.1
    local_steps: int = 30
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam, for the local head steps
    lr_decay: float = 0.0  # lr / (1 + lr_decay * round): shrinking local steps make FedAvg settle on the pooled optimum
    llm_timeout_s: float = 10.0  # per attempt: no verdict by then and the client keeps its own token
    llm_retries: int = 1  # resends of a request that got no verdict (a crashed LLM worker loses what it held)
    round_wait_s: float = 30.0  # how long to wait for the edge's model after an update
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
    noise_std: float = 0.0  # Gaussian noise on the uploaded head parameters (never on the local head)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.llm_timeout_s <= 0:
            raise ValueError(f"llm_timeout_s must be > 0, got {self.llm_timeout_s}")
        if self.llm_retries < 0:
            raise ValueError(f"llm_retries must be >= 0, got {self.llm_retries}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@dataclass
class ClientCounters:
    peer_queries: int = 0
    peer_hits: int = 0
    peer_answers: int = 0  # queries of others this client answered
    peer_refused: int = 0  # queries ignored (other embedder, own query)
    peer_ms: list[float] = field(default_factory=list)  # time spent in the peer step
    fallbacks: int = 0
    llm_retries: int = 0  # requests sent again after a timeout
    updates_sent: int = 0
    models_received: int = 0
    rounds_without_model: int = 0


class RoutingHead(Protocol):
    """What a client needs of its threshold head, in numpy: the PyTorch ThresholdHead (through
    `head_module.TorchHead`) and a device's numpy `ScalarHead` both provide it."""

    def route(self, features: np.ndarray) -> bool: ...
    def effective_tau(self) -> float: ...
    def params(self) -> dict[str, np.ndarray]: ...
    def trainable(self) -> list[str]: ...
    def load(self, params: dict[str, np.ndarray]) -> None: ...
    def fit(self, features: np.ndarray, beta: np.ndarray, *, lam: float, steps: int, lr: float,
            optimizer: str = "sgd", weights: np.ndarray | None = None) -> dict[str, float]: ...


def as_routing_head(head: Any) -> RoutingHead:
    """A ThresholdHead (torch) is wrapped; anything that already speaks RoutingHead is used as it is."""
    if all(hasattr(head, name) for name in ("route", "params", "load", "fit", "trainable")):
        return head
    from fedhlm.models.head_fit import TorchHead  # torch and Lightning only for a torch head

    return TorchHead(head)


class Client:
    """One IoT client. `class_of` maps a token id to its class (-1: not a class token).

    `head` is a RoutingHead or a torch ThresholdHead; the routing and the protocol do not
    depend on which, so a device (`fedhlm_device.DeviceClient`) is this class with a numpy head.
    """

    def __init__(
        self,
        settings: ClientSettings,
        address: BrokerAddress,
        head: Any,
        class_of: Callable[[int], int],
        embedding_dim: int = 384,
        *,
        network: Network | None = None,
    ) -> None:
        """`network`: how the endpoint runs (default its own threads; a `SharedLoop` shares one network
        thread and a few handler threads with the other clients of this process, as a gateway would)."""
        self.s = settings
        self.id = settings.client_id
        self.head = as_routing_head(head)
        self.class_of = class_of
        self.rng = np.random.default_rng([settings.seed, _stable_hash(self.id)])
        # a stream of its own, so that the routing draws are the same with and without noise
        self._noise_rng = np.random.default_rng([settings.seed, _stable_hash(self.id), 1])
        self._llm_down = False  # the last request fell back: try once, not 1 + llm_retries times
        self.counters = ClientCounters()
        self.cache = PeerCache(embedding_dim, max_entries=settings.cache_entries, ttl_s=settings.cache_ttl_s)
        self._pairs_f: list[np.ndarray] = []
        self._pairs_beta: list[float] = []
        self._pairs_w: list[float] = []  # inverse probability that the pair was labelled at all
        self._seq = 0
        self._model_lock = threading.Condition()
        self._model: ThresholdModel | None = None
        self.tau_history: list[tuple[int, float]] = []
        self._said_offline = False
        will = (topics.client_status(self.id), ClientStatus(self.id, False, settings.edge_id, time.time()))
        self.endpoint = (network or OwnThreads()).endpoint(address, persistent=True, will=will)

    # -- life cycle ----------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> "Client":
        """Connect, wait until subscribed, announce "online"."""
        return self.connect().wait_ready(timeout_s)

    def connect(self) -> "Client":
        """Subscribe and begin connecting; returns at once (many clients then connect side by side)."""
        ep = self.endpoint
        if self.s.policy == "learned":
            ep.subscribe(topics.edge_model(self.s.edge_id), self._on_model, qos=1)
        if self.s.p2p:
            ep.subscribe(topics.edge_p2p_query(self.s.edge_id), self._on_peer_query, qos=0, no_local=True)
        ep.on_connected(self._on_connected)
        ep.start()
        return self

    def _on_connected(self, reconnected: bool) -> None:
        # back after a lost connection: the broker has published the Last Will ("offline", retained) meanwhile
        if reconnected and not self._said_offline:
            self.endpoint.publish(topics.client_status(self.id),
                                  ClientStatus(self.id, True, self.s.edge_id, time.time()), qos=1, retain=True)

    def wait_ready(self, timeout_s: float = 10.0) -> "Client":
        """Wait for the connection and its subscriptions, then publish the retained "online" status."""
        self.endpoint.wait_connected(timeout_s)
        self.endpoint.publish(topics.client_status(self.id), ClientStatus(self.id, True, self.s.edge_id, time.time()),
                              qos=1, retain=True)
        return self

    def stop(self) -> None:
        if not self.endpoint.connected:  # never connected (or gone): nothing to say, nothing to flush
            self.endpoint.close()
            return
        try:
            self.announce_offline()
            self.endpoint.flush(2.0)
        finally:
            self.endpoint.close()

    def announce_offline(self) -> None:
        """Publish the retained "offline" status (once); `stop` does it, a deployment does it for all clients
        first so that their acknowledgements overlap."""
        if self._said_offline or not self.endpoint.connected:
            return
        self._said_offline = True
        self.endpoint.publish(topics.client_status(self.id), ClientStatus(self.id, False, self.s.edge_id, time.time()),
                              qos=1, retain=True)

    # -- routing -------------------------------------------------------------------
    def offload(self, features: np.ndarray) -> bool:
        """The hard routing decision for one token."""
        if self.s.policy == "always":
            return True
        if self.s.policy == "never":
            return False
        if self.s.policy == "static":
            return float(features[0]) > self.s.static_tau
        return bool(self.head.route(np.asarray(features, dtype=np.float32)))

    def run_round(self, round_: int, inputs: Sequence[TokenInput], slm_ms: float = 0.0) -> list[TokenRecord]:
        """Route every input of this round; `slm_ms` is the SLM's per-token compute time, added to latency."""
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
                self.cache.add(inp.embedding, hit.token, "peer")  # resolved here too: answerable to the next peer
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
        self.add_label(inp.features, verdict.beta, reason)
        if self.s.p2p and inp.embedding is not None:
            self.cache.add(inp.embedding, verdict.final_token, "llm")
        final = self.class_of(verdict.final_token)
        latency = slm_ms + (time.perf_counter() - start) * 1000.0
        return TokenRecord(**base, final=final, route="llm", reason=reason, latency_ms=latency, llm_final=final,
                           peer_token=peer_class)

    def _request_verdict(self, request: TokenRequest) -> LLMVerdict | None:
        """The LLM's verdict, or None after `1 + llm_retries` attempts of `llm_timeout_s` each.

        A request can vanish without any error: an LLM worker of the shared subscription that
        dies takes the requests it had received (and acknowledged) with it, and Mosquitto hands
        them to no other worker. One resend reaches a live one. While the LLM looks down (the
        previous request fell back) a single attempt is made, so an outage costs one timeout a token.
        """
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
            except ConnectionError as exc:  # the endpoint is closed: resending cannot help
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
        """Ask the cluster; with scope 'neighbours', then the other clusters through the edge."""
        self.counters.peer_queries += 1
        start = time.perf_counter()
        reply = self._peer_request(inp, hops=0)
        if reply is None and self.s.p2p_scope == "neighbours":
            reply = self._peer_request(inp, hops=1)  # hops=1: the edge forwards it to its neighbours
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
            return  # our own query, or one our cluster already missed, on its way to the neighbours
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
    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (features [N, F], beta [N], weights [N]) this client has learned from so far (its training data)."""
        if not self._pairs_f:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
        return (np.stack(self._pairs_f), np.asarray(self._pairs_beta, np.float32),
                np.asarray(self._pairs_w, np.float32))

    def add_label(self, features: np.ndarray, beta: float, reason: str = "uncertain") -> None:
        """Keep one (features, beta) pair for the local fits, weighted for why the token was sent."""
        self._pairs_f.append(np.asarray(features, dtype=np.float32))
        self._pairs_beta.append(float(beta))
        self._pairs_w.append(self.label_weight(reason))

    def label_weight(self, reason: str) -> float:
        """1 / P(a token like this one gets an LLM label): 1 for a token sent because it was uncertain,
        1/exploration for a confident token sent to explore, 1/audit for an audited peer hit.

        Without it the pairs over-represent uncertain tokens (all of them are labelled, only a share
        `exploration` of the rest), and the threshold fitted to them is biased towards sending.
        """
        if not self.s.importance_weights:
            return 1.0
        rate = {"exploration": self.s.exploration, "audit": self.s.audit}.get(reason, 1.0)
        return 1.0 / rate if rate > 0 else 1.0

    def head_params(self) -> dict[str, np.ndarray]:
        return self.head.params()

    def finish_round(self, round_: int) -> dict[str, float] | None:
        """Fit the head, send the update, adopt the edge's model; returns the fit's numbers."""
        if self.s.policy != "learned":
            return None
        fit = None
        features, beta, weights = self.pairs()
        if beta.size and self.s.local_steps > 0:
            lr = self.s.lr / (1.0 + self.s.lr_decay * round_)
            fit = self.head.fit(features, beta, lam=self.s.lam, steps=self.s.local_steps, lr=lr,
                                optimizer=self.s.optimizer, weights=weights)
        # FedAvg weight: the tokens the pairs stand for (their weights), not just how many were labelled
        update = ThresholdUpdate(self.id, self.s.edge_id, round_, int(round(float(weights.sum()))), self.upload_params())
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
        """QoS 1 to the edge (a device adds its on-disk outbox)."""
        self.endpoint.publish(topics.edge_update(self.s.edge_id, self.id), update, qos=1)
        self.counters.updates_sent += 1

    def upload_params(self) -> dict[str, np.ndarray]:
        """What goes to the edge: the head's parameters, with N(0, noise_std^2) added to the trainable ones.

        The noise blurs what one update says about the client's data; the local head keeps
        its exact values, and FedAvg over n clients shrinks the noise by sqrt(n).
        """
        params = self.head_params()
        if self.s.noise_std > 0:
            for name in self.head.trainable():
                noise = self._noise_rng.normal(0.0, self.s.noise_std, size=params[name].shape)
                params[name] = (params[name] + noise).astype(np.float32)
        return params

    def current_round(self) -> int:
        """The round the edge is collecting as far as this client knows: one past the newest cluster model.

        A client that comes back after a crash joins here (its persistent session or the
        retained model tells it the edge's progress) instead of replaying rounds it missed.
        """
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
