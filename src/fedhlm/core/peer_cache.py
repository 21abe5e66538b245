"""Resolved-token caches: bounded, LRU, TTL, vectorised lookup.

Every token the LLM (or a peer) resolved is kept with a representation of its context. A
query is answered with the most similar entry when its similarity reaches delta. Lookup is
one vectorised pass over a preallocated table, not a Python loop, so a cache can hold
thousands of entries. An entry may also carry an exact `key` that a query must match (a generated
token's prefix: two sequences of similar prompts share an answer only at the same prefix); 0 is the
key of an entry that needs none. `PeerCache` keeps L2-normalised embeddings (a client's own cache,
cosine similarity); `SketchCache` keeps SimHash sketches (the edge's cluster cache,
estimated cosine from the Hamming distance).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fedhlm.core.sketch import SimHash, hamming


@dataclass(frozen=True)
class CacheHit:
    token: int
    similarity: float
    verdict: str  # "llm" or "peer": who resolved it first
    age_s: float


class _SlotCache:
    """Slots of a preallocated `table`, evicted least recently used first and expired after `ttl_s`."""

    def __init__(self, table: np.ndarray, *, ttl_s: float, clock=time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.max_entries = table.shape[0]
        self.ttl_s = ttl_s
        self._clock = clock
        self._table = table
        self._token = np.zeros(self.max_entries, dtype=np.int64)
        self._key = np.zeros(self.max_entries, dtype=np.int64)
        self._born = np.full(self.max_entries, -np.inf)
        self._valid = np.zeros(self.max_entries, dtype=bool)
        self._verdict: list[str] = [""] * self.max_entries
        self._lru: OrderedDict[int, None] = OrderedDict()  # slot -> None, oldest use first
        self._free = list(range(self.max_entries - 1, -1, -1))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        """Bytes held by live entries' representations."""
        return len(self._lru) * self._table[0].nbytes

    def _put(self, row: np.ndarray, token: int, verdict: str, key: int = 0) -> None:
        with self._lock:
            self._expire()
            if self._free:
                slot = self._free.pop()
            else:
                slot, _ = self._lru.popitem(last=False)  # evict the least recently used
            self._table[slot] = row
            self._token[slot] = token
            self._key[slot] = key
            self._born[slot] = self._clock()
            self._valid[slot] = True
            self._verdict[slot] = verdict
            self._lru[slot] = None

    def _best(self, similarity, delta: float, key: int = 0) -> CacheHit | None:
        """The live entry of `key` with the highest `similarity(table)` if it reaches delta (it becomes the most
        recent)."""
        with self._lock:
            self._expire()
            if not self._lru:
                return None
            sims = np.asarray(similarity(self._table), dtype=np.float64)
            sims[~self._valid | (self._key != key)] = -np.inf
            slot = int(np.argmax(sims))
            best = float(sims[slot])
            if best < delta:
                return None
            self._lru.move_to_end(slot)
            return CacheHit(int(self._token[slot]), best, self._verdict[slot], self._clock() - float(self._born[slot]))

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_s
        stale = np.flatnonzero(self._valid & (self._born < cutoff))
        for slot in stale.tolist():
            self._valid[slot] = False
            self._lru.pop(slot, None)
            self._free.append(slot)


class PeerCache(_SlotCache):
    """Embeddings (cosine). Bounded by `max_entries` and `max_bytes` (embedding storage)."""

    def __init__(self, dim: int, *, max_entries: int = 2000, max_bytes: int | None = None, ttl_s: float = 3600.0,
                 clock=time.monotonic) -> None:
        if dim <= 0 or max_entries <= 0:
            raise ValueError("dim and max_entries must be > 0")
        if max_bytes is not None:
            max_entries = min(max_entries, max(1, max_bytes // (dim * 4)))
        self.dim = dim
        super().__init__(np.zeros((max_entries, dim), dtype=np.float32), ttl_s=ttl_s, clock=clock)

    def add(self, embedding: np.ndarray, token: int, verdict: str = "llm") -> None:
        self._put(_normalise(embedding, self.dim), token, verdict)

    def lookup(self, embedding: np.ndarray, delta: float) -> CacheHit | None:
        """The most similar live entry with cosine similarity >= delta, or None."""
        vec = _normalise(embedding, self.dim)
        return self._best(lambda table: table @ vec, delta)


class SketchCache(_SlotCache):
    """SimHash sketches of one `SimHash` family (estimated cosine from the Hamming distance)."""

    def __init__(self, family: SimHash, *, max_entries: int = 20_000, ttl_s: float = 3600.0,
                 clock=time.monotonic) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be > 0")
        self.family = family
        super().__init__(np.zeros((max_entries, family.nbytes), dtype=np.uint8), ttl_s=ttl_s, clock=clock)

    def add(self, sketch: np.ndarray, token: int, verdict: str = "llm", key: int = 0) -> None:
        self._put(self._check(sketch), token, verdict, key)

    def lookup(self, sketch: np.ndarray, delta: float, key: int = 0) -> CacheHit | None:
        """The nearest live entry of `key` whose estimated cosine reaches delta, or None."""
        query = self._check(sketch)
        return self._best(lambda table: self.family.cosine(hamming(query, table)), delta, key)

    def _check(self, sketch: np.ndarray) -> np.ndarray:
        row = np.asarray(sketch, dtype=np.uint8).reshape(-1)
        if row.shape[0] != self.family.nbytes:
            raise ValueError(f"sketch has {row.shape[0]} bytes, {self.family.name} has {self.family.nbytes}")
        return row


def _normalise(embedding: np.ndarray, dim: int) -> np.ndarray:
    vec = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vec.shape[0] != dim:
        raise ValueError(f"embedding has dimension {vec.shape[0]}, cache expects {dim}")
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("embedding must be finite and non-zero")
    return vec / norm



def cache_labels(verify: str) -> bool:
    """Whether a cached LLM token is a routing label under this verification mode. Under greedy verification
    the LLM rejects exactly the drafts that differ from its argmax, so the token it gave for a context decides
    beta; under sampled verification beta needs the LLM's probability of the draft, which no cache keeps."""
    return verify == "greedy"


def cached_beta(draft_token: int, cached_token: int) -> float:
    """The greedy routing label a cached LLM token gives a draft: 0 (the LLM would accept it) or 1."""
    return 0.0 if int(draft_token) == int(cached_token) else 1.0
