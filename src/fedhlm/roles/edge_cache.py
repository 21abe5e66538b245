"""The edge's semantic cache: uncertain tokens of its cluster come through it, repeats are answered in one hop.

A client of a cluster with `p2p.resolver: edge` sends each uncertain token to its edge as a
`ResolveRequest` (the TokenRequest plus a SimHash sketch of its context). The edge looks the
sketch up in the cluster's cache: a hit is answered at once on the client's p2p reply topic
(a PeerReply with the request's Correlation Data, no LLM call); a miss is forwarded to the
LLM as the plain TokenRequest with the client's Response Topic and Correlation Data, so the
verdict goes straight to the client. The edge also reads its members' verdict topics and
caches each verdict whose request it forwarded. Compared with asking every peer:

- no broadcast: one message up per uncertain token, whatever the cluster's size;
- no deadline: a miss costs one broker hop (the forward), not a wait for peers that have nothing;
- the cost of the peer step where nothing can hit is the sketch (32 bytes at 256 bits) on a
  request that was going out anyway;
- the cache is the cluster's, not one client's: a token any member got from the LLM answers all.

A generating client sends an uncertain token as a `SessionResolve` (the SessionToken, a sketch of
the prompt - with the sequence's first request only: the edge keeps it per sequence - and a digest of
the tokens generated so far): a hit needs a similar prompt AND the same
generated prefix (`context_key`), and a miss is forwarded as the SessionToken to the LLM worker that
holds the sequence's session (or to the workers' shared topic), so a miss still costs one broker hop
and the session's KV cache lives where it did. The verdict is learnt from the client's llm/reply
topic, as in classification. Generation entries are not shared with the neighbours (`CacheEntry`
carries no prefix digest).

With `p2p.delta_floor` set, the edge learns its cluster's delta: a miss's nearest entry (above the floor)
and the client's draft were both candidate answers, and the verdict the edge reads anyway says whether
each was right; delta comes down to where the nearest entries have been no worse than the drafts
(`core.reuse_delta`). Clients then take the edge's answers from the floor up.

With `p2p.scope: neighbours` every edge also publishes each entry it learns (`CacheEntry`, the
sketch and the token: about 80 bytes, server to server) and adds the other edges' entries to its
own cache, so a repeat that crosses clusters is answered at its own edge, with no wait on a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np

from fedhlm.core.peer_cache import CacheHit, SketchCache
from fedhlm.core.reuse_delta import DeltaBands
from fedhlm.core.settings import P2PSettings
from fedhlm.core.sketch import SimHash
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.messages import NO_WORKER, CacheEntry, LLMVerdict, PeerReply, ResolveRequest, SessionResolve

log = logging.getLogger(__name__)

MAX_PENDING = 10_000  # forwarded requests waiting for their verdict (oldest dropped first)
DEFAULT_EMBEDDING_DIM = 384  # all-MiniLM-L6-v2, the shipped P2P embedder (a `fedhlm edge` loads no embedder)


@dataclass(frozen=True)
class _Forwarded:
    """A request the edge forwarded: its key in the cache, and what its verdict tells the learned delta."""

    sketch: np.ndarray
    key: int  # the generated prefix's digest (0: classification)
    at: float  # monotonic time it was forwarded
    draft: int  # the client's draft
    nearest: CacheHit | None  # the nearest entry it missed (above the delta floor; None when not learning)


@dataclass
class EdgeCacheStats:
    requests: int = 0
    hits: int = 0
    forwarded: int = 0
    learned: int = 0  # verdicts put into the cache
    refused: int = 0  # requests or entries dropped: see EdgeResolver.refused for why
    shared: int = 0  # entries published for the other edges
    from_neighbours: int = 0  # other edges' entries added here
    unkeyed: int = 0  # generation requests whose sequence's sketch this edge did not hold (forwarded, not learnt)

    def as_dict(self, cache: SketchCache) -> dict[str, float | int]:
        return {"requests": self.requests, "hits": self.hits, "forwarded": self.forwarded, "learned": self.learned,
                "refused": self.refused, "shared": self.shared, "from_neighbours": self.from_neighbours,
                "unkeyed": self.unkeyed,
                "hit_rate": self.hits / self.requests if self.requests else 0.0,
                "entries": len(cache), "cache_bytes": cache.nbytes}


class EdgeResolver:
    """The cache and the request path of one edge (`attach` it to the edge's endpoint)."""

    def __init__(self, edge_id: str, members: list[str], family: SimHash, *, delta: float = 0.9,
                 representation: str = "embedder", max_entries: int = 20_000, ttl_s: float = 3600.0,
                 pending_ttl_s: float = 60.0, share: bool = False, delta_floor: float | None = None) -> None:
        """`delta`: the estimated cosine a cached context needs; `representation`: what the clients sketch (with
        the family, the fingerprint their sketches must carry); `share`: publish each learned entry for the other
        edges and take theirs (p2p scope neighbours); `delta_floor`: learn delta from the misses, not below it
        (`core.reuse_delta`; None: delta stays)."""
        self.id = edge_id
        self.delta = delta
        self.bands = DeltaBands(delta_floor, delta) if delta_floor is not None else None
        self.fingerprint = family.fingerprint(representation)
        self.share = share
        self.members = set(members)
        self.family = family
        self.cache = SketchCache(family, max_entries=max_entries, ttl_s=ttl_s)
        self.pending_ttl_s = pending_ttl_s
        # (client, seq) of a forwarded request -> what its verdict will teach
        self._pending: OrderedDict[tuple[str, int], _Forwarded] = OrderedDict()
        # (client, session id) of a generated sequence -> its prompt's sketch, sent with its first request only
        self._sketches: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = EdgeCacheStats()
        self.refused: Counter[str] = Counter()  # reason -> count: not_request, not_member, family
        self.endpoint = None

    @classmethod
    def from_settings(cls, edge_id: str, members: list[str], p2p: P2PSettings,
                      embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> EdgeResolver | None:
        """The resolver the p2p section asks for (None: clients do not go through the edge)."""
        if not p2p.through_edge:
            return None
        return cls(edge_id, members, SimHash(p2p.sketch_bits, embedding_dim), delta=p2p.delta,
                   representation=p2p.representation, max_entries=p2p.edge_cache_entries, ttl_s=p2p.ttl_s,
                   share=p2p.asks_neighbours, delta_floor=p2p.delta_floor)

    def attach(self, endpoint) -> None:  # noqa: ANN001
        """Subscribe to the cluster's resolve topic and to each member's verdicts."""
        self.endpoint = endpoint
        endpoint.subscribe(topics.edge_resolve(self.id), self.on_request, qos=0)
        endpoint.subscribe(topics.edge_session_resolve(self.id), self.on_session_request, qos=0)
        for client_id in sorted(self.members):
            endpoint.subscribe(topics.client_llm_reply(client_id), self.on_verdict, qos=0)
        if self.share:
            endpoint.subscribe(topics.edge_p2p_entry_filter(), self.on_entry, qos=0, no_local=True)

    def on_request(self, inbound: Inbound) -> None:
        """A classification token: answered from the cache, or its TokenRequest forwarded to the LLM."""
        req = inbound.message
        if not isinstance(req, ResolveRequest) or not inbound.response_topic:
            return self._refuse("not_request", "not a resolve request with a response topic")
        sketch = self._admit(req.client_id, req.family, req.sketch)
        if sketch is None or self._answered(inbound, req.client_id, req.seq, sketch, 0, req.draft_token):
            return None
        self.endpoint.forward(topics.llm_request(), req.token_request(), inbound, qos=1)
        return None

    def on_session_request(self, inbound: Inbound) -> None:
        """A generation token: answered from the cache at its prefix, or its SessionToken forwarded to the worker
        holding the session (the shared session topic when none does yet)."""
        req = inbound.message
        if not isinstance(req, SessionResolve) or not inbound.response_topic:
            return self._refuse("not_request", "not a session resolve request with a response topic")
        key = (req.client_id, req.session_id)
        if req.sketch:  # the sequence's first request: its sketch is kept for the later ones
            sketch = self._admit(req.client_id, req.family, req.sketch)
            if sketch is None:
                return None
            with self._lock:
                self._sketches[key] = sketch
                self._sketches.move_to_end(key)
                while len(self._sketches) > MAX_PENDING:
                    self._sketches.popitem(last=False)
        elif req.client_id not in self.members:
            return self._refuse("not_member", f"{req.client_id} is not a member of {self.id}")
        else:  # a later request: the sketch (and its family) were checked with the first
            self.stats.requests += 1
            with self._lock:
                sketch = self._sketches.get(key)
            if sketch is None:  # not held (evicted, a restarted edge): forwarded without a lookup, not learnt
                self.stats.unkeyed += 1
        if sketch is not None and self._answered(inbound, req.client_id, req.seq, sketch, req.context_key,
                                                 req.draft_token):
            return None
        # the client's own rule: a later token to the worker holding the session, anything else to the shared topic
        named = req.start > 0 and req.worker != NO_WORKER
        topic = topics.llm_worker_session(req.worker) if named else topics.llm_session()
        self.endpoint.forward(topic, req.session_token(), inbound, qos=1)
        return None

    def _admit(self, client_id: str, family: int, sketch: bytes) -> np.ndarray | None:
        """The request's sketch, or None (refused: not a member, another sketch family)."""
        if client_id not in self.members:
            return self._refuse("not_member", f"{client_id} is not a member of {self.id}")
        if family != self.fingerprint or len(sketch) != self.family.nbytes:
            return self._refuse("family", f"sketch family {family:#010x} ({len(sketch)} B), this edge keeps "
                                f"{self.family.name} ({self.fingerprint:#010x})")
        self.stats.requests += 1
        return np.frombuffer(sketch, dtype=np.uint8)

    def _answered(self, inbound: Inbound, client_id: str, seq: int, sketch: np.ndarray, key: int, draft: int) -> bool:
        """Answer a hit on the client's p2p reply topic (True); else remember the request, whose verdict this edge
        will learn (with the nearest entry it missed, when delta is learnt), and count it forwarded (False: the
        caller forwards it)."""
        hit = self.cache.lookup(sketch, self.delta if self.bands is None else self.bands.floor, key)
        if hit is not None and hit.similarity >= self.delta:
            self.stats.hits += 1
            self.endpoint.answer_on(topics.client_p2p_reply(client_id, self.id), inbound,
                                    PeerReply(self.id, seq, hit.token, float(np.clip(hit.similarity, -1, 1))))
            return True
        with self._lock:
            self._pending[(client_id, seq)] = _Forwarded(sketch, key, time.monotonic(), draft, hit)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        self.stats.forwarded += 1
        return False

    def on_verdict(self, inbound: Inbound) -> None:
        """A member's verdict: cache it when it answers a request this edge forwarded."""
        verdict = inbound.message
        if not isinstance(verdict, LLMVerdict):
            return
        with self._lock:
            entry = self._pending.pop((verdict.client_id, verdict.seq), None)
            cutoff = time.monotonic() - self.pending_ttl_s
            while self._pending and next(iter(self._pending.values())).at < cutoff:
                self._pending.popitem(last=False)
        if entry is None:
            return  # an audit or a request sent straight to the LLM (the edge was down), or one we never saw
        sketch, key = entry.sketch, entry.key
        self.cache.add(sketch, verdict.final_token, "llm", key)
        self.stats.learned += 1
        if self.bands is not None and entry.nearest is not None:
            final = verdict.final_token
            with self._lock:
                if self.bands.record(entry.nearest.similarity, entry.nearest.token == final, entry.draft == final):
                    self.delta = self.bands.delta()
        if self.share and key == 0:  # a CacheEntry carries no prefix digest: generation entries stay here
            self.endpoint.publish(topics.edge_p2p_entry(self.id),
                                  CacheEntry(self.id, self.fingerprint, sketch.tobytes(), verdict.final_token), qos=0)
            self.stats.shared += 1

    def on_entry(self, inbound: Inbound) -> None:
        """Another edge's new entry: answerable here too."""
        entry = inbound.message
        topic_edge = topics.parse(inbound.topic).ids.get("edge_id")
        if not isinstance(entry, CacheEntry) or entry.edge_id != topic_edge or entry.edge_id == self.id:
            return None
        if entry.family != self.fingerprint or len(entry.sketch) != self.family.nbytes:
            return self._refuse("family", f"entry of {entry.edge_id} with sketch family {entry.family:#010x}, this edge keeps "
                                f"{self.fingerprint:#010x}")
        self.cache.add(np.frombuffer(entry.sketch, dtype=np.uint8), entry.token, "neighbour")
        self.stats.from_neighbours += 1
        return None

    def report(self) -> dict[str, float | int | dict[str, int]]:
        out = {**self.stats.as_dict(self.cache), "refused_by_reason": dict(self.refused), "delta": self.delta}
        if self.bands is not None:
            out["delta_bands"] = self.bands.as_dict()
        return out

    def _refuse(self, reason: str, why: str) -> None:
        self.stats.refused += 1
        self.refused[reason] += 1
        log.info("%s: refused %s: %s", self.id, reason, why)
