"""The client role: routes each SLM token (local, peer, LLM) and learns its threshold head with its edge.

Cheapest first: a confident token stays local and sends nothing; an uncertain one is
offered to the peers of the cluster (`PeerStep`), then sent to the LLM as a top-k payload.
Every LLM verdict is a (features, beta) label for the `Learner`, which fits the head at the
end of a round and trades it with the edge. Which tokens are offloaded is the client's
`RoutingPolicy`'s call. A client talks to the other roles only through its endpoint, and
it never sees ground truth: it routes drafts and returns `RoutedToken`s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedhlm.core.peer_cache import cache_labels, cached_beta
from fedhlm.core.policies import make_policy
from fedhlm.core.records import Drafter, RoutedToken, TokenInput
from fedhlm.core.settings import ClientSettings
from fedhlm.core.sketch import content_draw
from fedhlm.roles.learner import Learner
from fedhlm.roles.peers import make_peer_step
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.messages import ClientStatus, LLMVerdict, PeerReply, ThresholdModel, ThresholdUpdate, TokenRequest
from fedhlm.transport.network import Network, OwnThreads

log = logging.getLogger(__name__)

EXACT_SIMILARITY = 1.0 - 1e-6  # a cache answer for the request's own context (identical sketch or embedding)

__all__ = ["Client", "ClientCounters", "ClientSettings", "RoutingHead", "TokenInput"]


@dataclass
class ClientCounters:
    peer_queries: int = 0
    peer_hits: int = 0
    own_cache_hits: int = 0  # of peer_hits: answered from the client's own cache (resolver edge)
    peer_answers: int = 0  # queries of others this client answered
    peer_refused: int = 0  # queries ignored (other embedder, own query, a response topic not the asker's)
    peers_excluded: int = 0  # peers whose audited answers disagreed with the LLM (no answer taken from them since)
    peer_ms: list[float] = field(default_factory=list)  # time spent in the peer step
    fallbacks: int = 0
    llm_retries: int = 0  # requests sent again after a timeout
    updates_sent: int = 0
    models_received: int = 0
    rounds_without_model: int = 0


class RoutingHead(Protocol):
    """What a client needs of its threshold head, in numpy: the PyTorch ThresholdHead (through
    `models.head_fit.TorchHead`) and a device's numpy `ScalarHead` both provide it."""

    def route(self, features: np.ndarray) -> bool: ...
    def effective_tau(self) -> float: ...
    def params(self) -> dict[str, np.ndarray]: ...
    def trainable(self) -> list[str]: ...
    def load(self, params: dict[str, np.ndarray]) -> None: ...
    def fit(self, features: np.ndarray, beta: np.ndarray, *, lam: float, steps: int, lr: float,
            optimizer: str = "sgd", weights: np.ndarray | None = None) -> dict[str, float]: ...


class Client:
    """One IoT client. `class_of` maps a token id to its class (-1: not a class token).

    `head` is a RoutingHead; the routing and the protocol do not depend on which, so a device
    (`fedhlm_device.DeviceClient`) is this class with a numpy head. `drafter` is the client's
    own SLM, used by `serve_round`; `run_round` routes tokens drafted elsewhere.
    """

    def __init__(
        self,
        settings: ClientSettings,
        address: BrokerAddress,
        head: RoutingHead,
        class_of: Callable[[int], int],
        embedding_dim: int = 384,
        *,
        drafter: Drafter | None = None,
        network: Network | None = None,
    ) -> None:
        """`network`: how the endpoint runs (default its own threads; a `SharedLoop` shares one network
        thread and a few handler threads with the other clients of this process, as a gateway would)."""
        self.s = settings
        self.id = settings.client_id
        self.head = head
        self.class_of = class_of
        self.drafter = drafter
        self.policy = make_policy(settings.policy, static_tau=settings.static_tau)
        self.rng = np.random.default_rng([settings.seed, _stable_hash(self.id)])
        self._llm_down = False  # the last request fell back: try once, not 1 + llm_retries times
        self.counters = ClientCounters()
        self._seq = 0
        self.tau_history: list[tuple[int, float]] = []
        self._said_offline = False
        will = (topics.client_status(self.id), ClientStatus(self.id, False, settings.edge_id, time.time()))
        self.endpoint = (network or OwnThreads()).endpoint(address, persistent=True, will=will)
        self.learner = Learner(settings, head, np.random.default_rng([settings.seed, _stable_hash(self.id), 1]),
                               self.counters)
        self.peers = make_peer_step(settings, embedding_dim, self.endpoint, self._next_seq, self.counters)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    @property
    def cache(self):  # noqa: ANN201
        """The contexts this client resolved, for its peers."""
        return self.peers.cache

    # -- life cycle ----------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> "Client":
        """Connect, wait until subscribed, announce "online"."""
        return self.connect().wait_ready(timeout_s)

    def connect(self) -> "Client":
        """Subscribe and begin connecting; returns at once (many clients then connect side by side)."""
        ep = self.endpoint
        if self.policy.federated:
            ep.subscribe(topics.edge_model(self.s.edge_id), lambda inbound: self.learner.on_model(inbound, self.id), qos=1,
                         always_retained=True)  # a restarted client learns the round its edge is at
        if self.s.p2p.enabled:
            self.peers.subscribe()
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
        """The hard routing decision for one token (the policy's)."""
        return self.policy.offload(features, self.head)

    def serve_round(self, round_: int, items: Sequence[Any]) -> list[RoutedToken]:
        """Draft this round's inputs with the client's own SLM, then route them; the SLM's time per token
        (this client's own batch) is part of every token's latency."""
        if self.drafter is None:
            raise RuntimeError(f"{self.id}: serve_round needs a drafter (the client's SLM)")
        drafted = self.drafter.draft(items)
        inputs, waited_ms = self._represent_outgoing(drafted.inputs, round_)
        return [self._route(round_, inp, drafted.ms_per_token + waited_ms.get(inp.uid, 0.0)) for inp in inputs]

    def _represent_outgoing(self, inputs: list[TokenInput], round_: int) -> tuple[list[TokenInput], dict[int, float]]:
        """The peer step's context representations, in one batch, for the tokens that will go through it (the
        head does not change within a round, and an exploration draw that goes through it is the text's own): a
        token that stays local pays nothing for P2P, one that goes out waits for the batch (uid -> that wait in
        ms, added to its latency)."""
        if not self.s.p2p.enabled or self.drafter is None:
            return inputs, {}
        text_drawn = self.policy.explores and self.tries_peers("exploration")  # a draw that consumes no randomness
        todo = [i for i, inp in enumerate(inputs) if inp.embedding is None and (
            self.offload(inp.features) or (text_drawn and self._explores(inp.context_ids, round_)))]
        if not todo:
            return inputs, {}
        vectors, seconds = self.drafter.represent([inputs[i].uid for i in todo])
        waited = seconds * 1000.0
        out = list(inputs)
        for i, vec in zip(todo, vectors):
            if vec is not None:
                out[i] = dataclasses.replace(inputs[i], embedding=vec)
        return out, {inputs[i].uid: waited for i in todo}

    def run_round(self, round_: int, inputs: Sequence[TokenInput], slm_ms: float = 0.0) -> list[RoutedToken]:
        """Route every input of this round; `slm_ms` is the SLM's per-token compute time, added to latency."""
        return [self._route(round_, inp, slm_ms) for inp in inputs]

    def send_reason(self, features: np.ndarray, context_ids: Sequence[int], round_: int) -> str | None:
        """Why a token leaves the device (None: it stays local): "uncertain" when the policy offloads it, else
        "exploration" for the round's share of the policy's confident tokens."""
        if self.offload(features):
            return "uncertain"
        if self.policy.explores and self._explores(context_ids, round_):
            return "exploration"
        return None

    def _explores(self, context_ids: Sequence[int], round_: int) -> bool:
        """The exploration draw. Where a cache answers exploration tokens (`tries_peers`), the draw is the text's
        own (`core.sketch.content_draw`, the same on every device): a text explored once is explored at each
        delivery, and its repeats are labelled from the cache for nothing. Without one it is a fresh draw per
        token: exploring a popular text at every delivery would pay the LLM each time for the same label (and
        on a Zipf workload make the explored share hang on which texts are popular)."""
        rate = self.s.routing.exploration_rate(round_)
        if self.tries_peers("exploration"):
            return content_draw(self.s.seed, context_ids) < rate
        return bool(self.rng.random() < rate)

    def tries_peers(self, reason: str | None) -> bool:
        """Whether a token sent for `reason` goes through the peer step first: an uncertain one whenever P2P is
        on; an exploration one only where a miss costs nothing (the edge forwards it) and a cached token is a
        label (greedy verification), since exploration is there for its label."""
        if reason is None or not self.s.p2p.enabled:
            return False
        return reason == "uncertain" or (reason == "exploration" and self.peers.answers_exploration
                                         and cache_labels(self.s.routing.verify))

    def _route(self, round_: int, inp: TokenInput, slm_ms: float) -> RoutedToken:
        start = time.perf_counter()
        draft_class = self.class_of(inp.draft_token)
        base = dict(client_id=self.id, round=round_, uid=inp.uid, draft=draft_class)
        reason = self.send_reason(inp.features, inp.context_ids, round_)
        if reason is None:
            return RoutedToken(**base, final=draft_class, route="local", latency_ms=slm_ms)
        request = self._token_request(inp, reason, round_)
        embedding = self._representation(inp) if self.tries_peers(reason) else None
        if embedding is not None:
            answer = self.peers.resolve(embedding, request)
            if isinstance(answer, PeerReply):
                return self._reuse(inp, reason, base, start, slm_ms, answer, embedding)
            if isinstance(answer, LLMVerdict):  # the edge had no entry and forwarded the request
                self._llm_down = False
                return self._settle(inp, reason, base, start, slm_ms, answer, embedding=embedding)
        return self._settle(inp, reason, base, start, slm_ms, self._request_verdict(request), embedding=embedding)

    def _reuse(self, inp: TokenInput, reason: str, base: dict, start: float, slm_ms: float, answer: PeerReply,
               embedding: np.ndarray) -> RoutedToken:
        """A token answered by a peer or the edge: the cached token is final (the LLM checks a share `p2p.audit`
        of them) and, where it decides beta, the token's label, weighed for why it was sent."""
        peer_class = self.class_of(answer.token)
        beta = cached_beta(inp.draft_token, answer.token) if cache_labels(self.s.routing.verify) else None
        if self.audits(answer):
            routed = self._ask_llm(inp, "audit", base, start, slm_ms, peer_class=peer_class, embedding=embedding,
                                   label_reason=reason if beta is not None else "audit")
            if routed.llm_final is not None:
                self.peers.audited(answer.responder_id, routed.llm_final == peer_class)
            return routed
        if beta is not None:
            self.learner.add_label(inp.features, beta, reason, base["round"])
        self.peers.remember(embedding, answer.token, "peer")  # resolved here too: answerable to the next peer
        latency = slm_ms + (time.perf_counter() - start) * 1000.0
        return RoutedToken(**base, final=peer_class, route="peer", reason=reason, latency_ms=latency,
                           peer_token=peer_class)

    def audits(self, answer: PeerReply) -> bool:
        """Whether the LLM also checks this cache answer (a share `p2p.audit` of them, drawn here). Not where the
        answer's context is the request's own (similarity 1: the same text, as the sketch or embedding can tell)
        under greedy verification: the LLM gave that answer to that text and would give it again, so the audit
        could only agree and would cost an LLM call for nothing. Only where the similarity is the resolver's own
        finding (the edge's or the client's cache): a peer could claim 1 to escape its audits."""
        if (answer.similarity >= EXACT_SIMILARITY and self.peers.similarity_trusted
                and cache_labels(self.s.routing.verify)):
            return False
        return bool(self.rng.random() < self.s.p2p.audit)

    def _representation(self, inp: TokenInput) -> np.ndarray | None:
        """The token's context representation for the peer step: drafted with it, or computed now by the
        client's own drafter (a sentence embedder runs only for uncertain tokens); None: no peer step."""
        if inp.embedding is not None:
            return inp.embedding
        return self.drafter.represent([inp.uid])[0][0] if self.drafter is not None else None

    def _token_request(self, inp: TokenInput, reason: str, round_: int) -> TokenRequest:
        return TokenRequest(
            client_id=self.id, session_id=f"{self.id}-{inp.uid}", seq=self._next_seq(), round=round_,
            context_ids=np.asarray(inp.context_ids, dtype=np.int32), draft_token=int(inp.draft_token),
            topk_ids=np.asarray(inp.topk_ids, dtype=np.int32), topk_probs=np.asarray(inp.topk_probs, np.float32),
            tail_mass=float(inp.tail_mass), features=np.asarray(inp.features, dtype=np.float32), reason=reason,
        )

    def _ask_llm(self, inp: TokenInput, reason: str, base: dict, start: float, slm_ms: float,
                 peer_class: int | None = None, embedding: np.ndarray | None = None,
                 label_reason: str | None = None) -> RoutedToken:
        verdict = self._request_verdict(self._token_request(inp, reason, base["round"]))
        return self._settle(inp, reason, base, start, slm_ms, verdict, peer_class, embedding, label_reason)

    def _settle(self, inp: TokenInput, reason: str, base: dict, start: float, slm_ms: float,
                verdict: LLMVerdict | None, peer_class: int | None = None,
                embedding: np.ndarray | None = None, label_reason: str | None = None) -> RoutedToken:
        """The routed token for an LLM verdict (None: none came, the SLM's token stays); the verdict is a label,
        weighed as `label_reason` (default `reason`) says."""
        if verdict is None:
            self.counters.fallbacks += 1
            latency = slm_ms + (time.perf_counter() - start) * 1000.0
            return RoutedToken(**base, final=base["draft"], route="llm", reason="fallback", latency_ms=latency)
        self.learner.add_label(inp.features, verdict.beta, label_reason or reason, base["round"])
        if embedding is not None:
            self.peers.remember(embedding, verdict.final_token, "llm")
        final = self.class_of(verdict.final_token)
        latency = slm_ms + (time.perf_counter() - start) * 1000.0
        return RoutedToken(**base, final=final, route="llm", reason=reason, latency_ms=latency, llm_final=final,
                           peer_token=peer_class)

    def _request_verdict(self, request: TokenRequest) -> LLMVerdict | None:
        """The LLM's verdict, or None after `1 + llm_retries` attempts of `llm_timeout_s` each.

        A request can vanish without any error: an LLM worker of the shared subscription that
        dies takes the requests it had received (and acknowledged) with it, and Mosquitto hands
        them to no other worker. One resend reaches a live one. While the LLM looks down (the
        previous request fell back) a single attempt is made, so an outage costs one timeout a token.
        """
        attempts = 1 if self._llm_down else 1 + self.s.routing.llm_retries
        problem = ""
        for attempt in range(attempts):
            if attempt:
                self.counters.llm_retries += 1
                log.info("%s: no LLM verdict for seq %d (%s); sending it again", self.id, request.seq, problem)
            try:
                reply = self.endpoint.request(topics.llm_request(), request, topics.client_llm_reply(self.id),
                                              timeout_s=self.s.routing.llm_timeout_s, qos=1,
                                              expiry_s=self.s.routing.llm_timeout_s)  # later, nobody waits for it
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

    # -- federated learning ------------------------------------------------------------
    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (features [N, F], beta [N], weights [N]) this client has learned from so far (its training data)."""
        return self.learner.pairs()

    def add_label(self, features: np.ndarray, beta: float, reason: str = "uncertain", round_: int = 0) -> None:
        self.learner.add_label(features, beta, reason, round_)

    def label_weight(self, reason: str, round_: int = 0) -> float:
        return self.learner.label_weight(reason, round_)

    def head_params(self) -> dict[str, np.ndarray]:
        return self.head.params()

    def upload_params(self) -> dict[str, np.ndarray]:
        return self.learner.upload_params()

    def current_round(self) -> int:
        """The round the edge is collecting as far as this client knows: one past the newest cluster model.

        A client that comes back after a crash joins here (its persistent session or the
        retained model tells it the edge's progress) instead of replaying rounds it missed.
        """
        return self.learner.current_round()

    def wait_model(self, round_: int, timeout_s: float) -> ThresholdModel | None:
        return self.learner.wait_model(round_, timeout_s)

    def adopt(self, model: ThresholdModel) -> None:
        self.learner.adopt(model)

    def finish_round(self, round_: int) -> dict[str, float] | None:
        """Fit the head, send the update, adopt the edge's model; returns the fit's numbers (None: not federated)."""
        fit = self.send_round_update(round_)
        self.adopt_round_model(round_)
        return fit

    def send_round_update(self, round_: int) -> dict[str, float] | None:
        """The first half of finish_round: fit the head and send the update (None: not federated). A process of
        many clients sends every client's update before any waits, since the edge needs a quorum of them."""
        if not self.policy.federated:
            return None
        fit = self.learner.fit(round_)
        self.send_update(ThresholdUpdate(self.id, self.s.edge_id, round_, self.learner.sample_count(),
                                         self.upload_params()))
        return fit

    def adopt_round_model(self, round_: int) -> None:
        """The second half of finish_round: wait for the edge's model of the round and adopt it."""
        if not self.policy.federated:
            return
        wait_s = self.s.federation.client_wait_s
        model = self.wait_model(round_, wait_s)
        if model is None:
            self.counters.rounds_without_model += 1
            log.warning("%s: no edge model for round %d within %.0f s; keeping the local head", self.id, round_, wait_s)
        else:
            self.adopt(model)
        self.tau_history.append((round_, self.head.effective_tau()))

    def send_update(self, update: ThresholdUpdate) -> None:
        """QoS 1 to the edge (a device adds its on-disk outbox)."""
        self.endpoint.publish(topics.edge_update(self.s.edge_id, self.id), update, qos=1)
        self.counters.updates_sent += 1


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())
