"""A client's peer step: find a token the cluster resolved already before paying for the LLM.

Two resolvers (`p2p.resolver`, registry `RESOLVERS`):

- `edge` (`EdgeStep`): the uncertain token goes to the client's edge with a SimHash sketch of
  its context; the edge answers from its cluster cache or forwards it to the LLM
  (`roles.edge_cache`). One message, no broadcast, no deadline to wait out.
- `peers` (`PeerStep`): every token the client resolves goes into its own `PeerCache`; an
  uncertain one is first broadcast to the cluster, and any peer with a context at least
  `delta` similar answers within `deadline_ms`. A peer answers on the asker's reply topic at its own
  id, which the broker binds to its login; audits that show a peer's answers disagree with the LLM
  exclude it (`core.peer_trust`).

Either way a client only ever talks to its transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from fedhlm.core.peer_cache import PeerCache
from fedhlm.core.peer_trust import PeerTrust
from fedhlm.core.settings import ClientSettings, P2PSettings
from fedhlm.core.sketch import SimHash, prefix_key
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.messages import (
    NO_WORKER,
    LLMVerdict,
    PeerQuery,
    PeerReply,
    ResolveRequest,
    SessionResolve,
    SessionToken,
    TokenRequest,
)

log = logging.getLogger(__name__)


class PeerStep:
    """The P2P part of one client: its cache, its queries and its answers."""

    answers_exploration: ClassVar[bool] = False  # a miss waits out the deadline: exploration goes straight
    similarity_trusted: ClassVar[bool] = False  # the answering peer states the similarity: it may lie

    def __init__(self, client_id: str, edge_id: str, settings: P2PSettings, embedder_name: str, embedding_dim: int,
                 endpoint, next_seq: Callable[[], int], counters) -> None:  # noqa: ANN001
        self.id, self.edge_id, self.s = client_id, edge_id, settings
        self.embedder_name = embedder_name
        self.endpoint = endpoint
        self.next_seq = next_seq
        self.counters = counters
        self.cache = PeerCache(embedding_dim, max_entries=settings.cache_entries, ttl_s=settings.ttl_s)
        self.trust = PeerTrust(settings.exclude_after)

    def subscribe(self) -> None:
        self.endpoint.subscribe(topics.edge_p2p_query(self.edge_id), self.on_query, qos=0, no_local=True)

    def resolve(self, embedding: np.ndarray, request: TokenRequest) -> PeerReply | LLMVerdict | None:
        """A peer's hit, or None: the client asks the LLM itself."""
        return self.ask(embedding)

    def ask(self, embedding: np.ndarray) -> PeerReply | None:
        """Ask the cluster; with scope 'neighbours', then the other clusters through the edge."""
        self.counters.peer_queries += 1
        start = time.perf_counter()
        reply = self._request(embedding, hops=0)
        if reply is None and self.s.asks_neighbours:
            reply = self._request(embedding, hops=1)  # hops=1: the edge forwards it to its neighbours
        self.counters.peer_ms.append((time.perf_counter() - start) * 1000.0)
        if reply is not None:
            self.counters.peer_hits += 1
        return reply

    def remember(self, embedding: np.ndarray, token: int, source: str) -> None:
        """A token this client now knows for this context: answerable to the next peer."""
        self.cache.add(embedding, token, source)

    def audited(self, responder: str, agreed: bool) -> None:
        """The LLM's verdict on an audited answer of `responder`: enough disagreement excludes it."""
        if self.trust.record(responder, agreed):
            self.counters.peers_excluded += 1
            log.warning("%s: excluded peer %s: %d of its %d audited answers disagreed with the LLM", self.id,
                        responder, self.trust.disagreements[responder], self.trust.audits[responder])

    def _accept(self, topic: str, reply: object) -> str | None:
        """Take a reply only from the responder its topic names (the broker's ACL binds that level to the
        responder's login), and never from an excluded one."""
        responder = topics.parse(topic).ids.get("responder_id")
        if not isinstance(reply, PeerReply) or reply.responder_id != responder:
            return "responder_mismatch"
        if not self.trust.trusted(responder):
            return "excluded_peer"
        return None

    def _request(self, embedding: np.ndarray, hops: int) -> PeerReply | None:
        query = PeerQuery(
            client_id=self.id, edge_id=self.edge_id, seq=self.next_seq(), model_name=self.embedder_name,
            embedding=np.asarray(embedding, dtype=np.float16), hops=hops, delta=float(self.s.delta),
        )
        try:
            answer = self.endpoint.request(topics.edge_p2p_query(self.edge_id), query,
                                           topics.client_p2p_replies(self.id), timeout_s=self.s.deadline_ms / 1000.0,
                                           per_responder=True, accept=self._accept)
        except (TimeoutError, ConnectionError):
            return None
        if isinstance(answer, PeerReply) and answer.similarity >= self.s.delta:
            return answer
        return None

    def on_query(self, inbound: Inbound) -> None:
        q = inbound.message
        if not isinstance(q, PeerQuery) or q.client_id == self.id or q.hops == 1:
            return  # our own query, or one our cluster already missed, on its way to the neighbours
        if q.model_name != self.embedder_name or q.embedding.size != self.cache.dim:
            self.counters.peer_refused += 1
            log.info("%s: ignored a peer query embedded with %s/%d", self.id, q.model_name, q.embedding.size)
            return
        if inbound.response_topic != topics.client_p2p_replies(q.client_id):
            self.counters.peer_refused += 1  # an answer there would go to someone other than the asker
            log.info("%s: ignored a peer query from %s with response topic %r", self.id, q.client_id,
                     inbound.response_topic)
            return
        hit = self.cache.lookup(q.embedding.astype(np.float32), q.delta)
        if hit is None:
            return
        self.counters.peer_answers += 1
        self.endpoint.reply(inbound, PeerReply(self.id, q.seq, hit.token, min(1.0, hit.similarity)),
                            per_responder=True)


class EdgeStep:
    """The uncertain token through the edge's cluster cache: a PeerReply (hit), the LLM's verdict (the edge
    forwarded it), or None (no answer in time: the client asks the LLM directly, and keeps doing so for
    `EDGE_RETRY_S` before it tries its edge again).

    The client also keeps the contexts it resolved itself (`p2p.cache_entries`, exact cosine on its own
    embeddings) and looks there first: everything in it is in the edge's cache too, so the edge could
    only answer the same, one broker hop later; and while its edge does not answer, it is the only
    cache the client has. A miss there costs a lookup on the device (about 0.4 ms at 2,000 entries of
    384 dimensions), nothing on the wire."""

    EDGE_RETRY_S = 30.0
    answers_exploration: ClassVar[bool] = True  # a miss costs nothing (the edge forwards it), a hit is a label
    similarity_trusted: ClassVar[bool] = True  # measured by the client's own edge or its own cache

    def __init__(self, client_id: str, edge_id: str, settings: P2PSettings, embedding_dim: int, endpoint,  # noqa: ANN001
                 counters, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.id, self.edge_id, self.s = client_id, edge_id, settings
        self.family = SimHash(settings.sketch_bits, embedding_dim)
        self.fingerprint = self.family.fingerprint(settings.representation)
        self.endpoint = endpoint
        self.counters = counters
        self.timeout_s = timeout_s
        self._clock = clock
        self._edge_down_until = -np.inf
        self._dim = embedding_dim
        self.cache: PeerCache | None = None  # made with the first token resolved: an idle client holds none

    def subscribe(self) -> None:
        """Nothing to answer: peers never query this client."""

    def remember(self, embedding: np.ndarray, token: int, source: str) -> None:
        """A token this client resolved (from the LLM or its edge): its own cache answers a repeat at once."""
        if self.cache is None:
            self.cache = PeerCache(self._dim, max_entries=self.s.cache_entries, ttl_s=self.s.ttl_s)
        self.cache.add(embedding, token, source)

    def audited(self, responder: str, agreed: bool) -> None:
        """Nothing to exclude: the only responders are the client's own edge, whose entries are LLM verdicts
        it read itself, and the client's own cache; a disagreement there is a wrong reuse, counted in the report."""

    def resolve(self, embedding: np.ndarray, request: TokenRequest) -> PeerReply | LLMVerdict | None:
        start = time.perf_counter()
        own = self.cache.lookup(embedding, self.s.delta) if self.cache is not None else None
        if own is not None:  # the client resolved this context itself: no hop to the edge
            self.counters.peer_queries += 1
            self.counters.own_cache_hits += 1
            reply = PeerReply(self.id, request.seq, own.token, float(min(1.0, own.similarity)))
            self.hit(reply, request.seq, start)
            return reply
        if self._clock() < self._edge_down_until:
            return None
        fields = {f.name: getattr(request, f.name) for f in TokenRequest.field_specs()}
        through = ResolveRequest(**fields, family=self.fingerprint, sketch=self.family.sketch(embedding).tobytes())
        self.counters.peer_queries += 1
        try:
            reply = self.endpoint.request(topics.edge_resolve(self.edge_id), through, topics.client_llm_reply(self.id),
                                          timeout_s=self.timeout_s, qos=1, expiry_s=self.timeout_s,
                                          also_on=(self.reply_topic,))
        except (TimeoutError, ConnectionError) as exc:
            self.edge_failed(exc)
            return None
        if self.hit(reply, request.seq, start):
            return reply
        if isinstance(reply, LLMVerdict) and reply.seq == request.seq:
            return reply
        return None

    # -- generation tokens: the session router sends them itself, through here --------------------------
    def sketch(self, embedding: np.ndarray) -> bytes:
        """A sequence's prompt sketch, computed once and sent with each of its uncertain tokens."""
        return self.family.sketch(embedding).tobytes()

    def through(self, message: SessionToken, worker: str, sketch: bytes,
                generated: Sequence[int]) -> tuple[str, SessionResolve] | None:
        """The topic and message that take a generation token through the edge's cache, keyed by the prompt's
        sketch (b"": the one the sequence's earlier request gave the edge) and the tokens generated before it;
        None while the edge is not answering (send it straight)."""
        if self._clock() < self._edge_down_until:
            return None
        self.counters.peer_queries += 1
        fields = {f.name: getattr(message, f.name) for f in SessionToken.field_specs()}
        return topics.edge_session_resolve(self.edge_id), SessionResolve(
            **fields, worker=worker if message.start > 0 and worker else NO_WORKER,
            family=self.fingerprint if sketch else 0, sketch=sketch, context_key=prefix_key(generated))

    @property
    def reply_topic(self) -> str:
        """Where the edge answers a hit."""
        return topics.client_p2p_reply(self.id, self.edge_id)

    def hit(self, reply: object, seq: int, start: float) -> bool:
        """Whether `reply` is the edge's usable answer to request `seq` (counted, with its time since `start`)."""
        if isinstance(reply, PeerReply) and reply.seq == seq and reply.similarity >= self.s.edge_answers_from:
            self.counters.peer_hits += 1
            self.counters.peer_ms.append((time.perf_counter() - start) * 1000.0)
            return True
        return False

    def edge_failed(self, exc: BaseException) -> None:
        """No answer through the edge: go straight to the LLM for `EDGE_RETRY_S`."""
        self._edge_down_until = self._clock() + self.EDGE_RETRY_S
        log.warning("%s: no answer through edge %s (%s); asking the LLM directly for %.0f s", self.id,
                    self.edge_id, exc, self.EDGE_RETRY_S)


def make_peer_step(settings: ClientSettings, embedding_dim: int, endpoint, next_seq: Callable[[], int],  # noqa: ANN001
                   counters) -> PeerStep | EdgeStep:
    """The client's resolver named by `p2p.resolver`."""
    return RESOLVERS[settings.p2p.resolver](settings, embedding_dim, endpoint, next_seq, counters)


RESOLVERS: dict[str, Callable[..., PeerStep | EdgeStep]] = {
    "peers": lambda s, dim, ep, seq, counters: PeerStep(s.client_id, s.edge_id, s.p2p, s.embedder_name, dim, ep, seq,
                                                        counters),
    "edge": lambda s, dim, ep, seq, counters: EdgeStep(s.client_id, s.edge_id, s.p2p, dim, ep, counters,
                                                       timeout_s=s.routing.llm_timeout_s),
}
