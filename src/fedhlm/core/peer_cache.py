"""The resolved-token cache a client keeps for its peers: bounded, LRU, TTL, vectorised lookup.

Every token the LLM (or a peer) resolved is kept with the L2-normalised embedding of its
context. A peer query is answered with the most similar entry when its cosine similarity
reaches delta. Lookup is one matrix-vector product over a preallocated float32 matrix,
not a Python loop, so a client can hold thousands of entries.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CacheHit:
    token: int
    similarity: float
    verdict: str  # "llm" or "peer": who resolved it first
    age_s: float


class PeerCache:
    """Bounded by `max_entries` and `max_bytes` (embedding storage), entries expire after `ttl_s`."""

    def __init__(self, dim: int, *, max_entries: int = 2000, max_bytes: int | None = None, ttl_s: float = 3600.0,
                 clock=time.monotonic) -> None:
        if dim <= 0 or max_entries <= 0 or ttl_s <= 0:
            raise ValueError("dim, max_entries and ttl_s must be > 0")
        bytes_per_entry = dim * 4
        if max_bytes is not None:
            max_entries = min(max_entries, max(1, max_bytes // bytes_per_entry))
        self.dim = dim
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._emb = np.zeros((max_entries, dim), dtype=np.float32)
        self._token = np.zeros(max_entries, dtype=np.int64)
        self._born = np.full(max_entries, -np.inf)
        self._valid = np.zeros(max_entries, dtype=bool)
        self._verdict: list[str] = [""] * max_entries
        self._lru: OrderedDict[int, None] = OrderedDict()  # slot -> None, oldest use first
        self._free = list(range(max_entries - 1, -1, -1))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        """Bytes held by live entries' embeddings."""
        return len(self._lru) * self.dim * 4

    def add(self, embedding: np.ndarray, token: int, verdict: str = "llm") -> None:
        vec = _normalise(embedding, self.dim)
        with self._lock:
            self._expire()
            if self._free:
                slot = self._free.pop()
            else:
                slot, _ = self._lru.popitem(last=False)  # evict the least recently used
            self._emb[slot] = vec
            self._token[slot] = token
            self._born[slot] = self._clock()
            self._valid[slot] = True
            self._verdict[slot] = verdict
            self._lru[slot] = None

    def lookup(self, embedding: np.ndarray, delta: float) -> CacheHit | None:
        """The most similar live entry with cosine similarity >= delta, or None."""
        vec = _normalise(embedding, self.dim)
        with self._lock:
            self._expire()
            if not self._lru:
                return None
            sims = self._emb @ vec
            sims[~self._valid] = -np.inf
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


def _normalise(embedding: np.ndarray, dim: int) -> np.ndarray:
    vec = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vec.shape[0] != dim:
        raise ValueError(f"embedding has dimension {vec.shape[0]}, cache expects {dim}")
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("embedding must be finite and non-zero")
    return vec / norm
