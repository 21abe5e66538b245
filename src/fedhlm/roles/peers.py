"""A client's peer step: ask the cluster for a token it resolved already, and answer the cluster's questions.

Every token the client resolves (by the LLM or by a peer) goes into its `PeerCache` with the
embedding of its context; a query from a peer is answered when a cached context is at
least `delta` similar. Queries travel through the edge's topic, so a client only ever talks
to its transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from fedhlm.core.peer_cache import PeerCache
from fedhlm.core.settings import P2PSettings
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.messages import PeerQuery, PeerReply

log = logging.getLogger(__name__)


class PeerStep:
    """The P2P part of one client: its cache, its queries and its answers."""

    def __init__(self, client_id: str, edge_id: str, settings: P2PSettings, embedder_name: str, embedding_dim: int,
                 endpoint, next_seq: Callable[[], int], counters) -> None:  # noqa: ANN001
        self.id, self.edge_id, self.s = client_id, edge_id, settings
        self.embedder_name = embedder_name
        self.endpoint = endpoint
        self.next_seq = next_seq
        self.counters = counters
        self.cache = PeerCache(embedding_dim, max_entries=settings.cache_entries, ttl_s=settings.ttl_s)

    def subscribe(self) -> None:
        self.endpoint.subscribe(topics.edge_p2p_query(self.edge_id), self.on_query, qos=0, no_local=True)

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

    def _request(self, embedding: np.ndarray, hops: int) -> PeerReply | None:
        query = PeerQuery(
            client_id=self.id, edge_id=self.edge_id, seq=self.next_seq(), model_name=self.embedder_name,
            embedding=np.asarray(embedding, dtype=np.float16), hops=hops, delta=float(self.s.delta),
        )
        try:
            answer = self.endpoint.request(topics.edge_p2p_query(self.edge_id), query,
                                           topics.client_p2p_reply(self.id), timeout_s=self.s.deadline_ms / 1000.0)
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
        hit = self.cache.lookup(q.embedding.astype(np.float32), q.delta)
        if hit is None or not inbound.response_topic:
            return
        self.counters.peer_answers += 1
        self.endpoint.reply(inbound, PeerReply(self.id, q.seq, hit.token, min(1.0, hit.similarity)))
