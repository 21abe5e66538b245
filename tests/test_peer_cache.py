"""The resolved-token cache: similarity threshold, LRU and byte bounds, TTL."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.core.peer_cache import PeerCache


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _unit(rng: np.random.Generator, dim: int = 16) -> np.ndarray:
    v = rng.normal(size=dim)
    return v / np.linalg.norm(v)


def test_similar_context_hits_and_dissimilar_misses() -> None:
    rng = np.random.default_rng(0)
    cache = PeerCache(16)
    a = _unit(rng)
    cache.add(a, token=7)
    near = a + 0.05 * _unit(rng)
    hit = cache.lookup(near, delta=0.9)
    assert hit is not None and hit.token == 7 and hit.similarity > 0.9
    assert cache.lookup(-a, delta=0.9) is None
    assert cache.lookup(_unit(rng), delta=0.9) is None  # random directions in 16-d are far apart


def test_returns_the_most_similar_entry() -> None:
    rng = np.random.default_rng(1)
    cache = PeerCache(16)
    a, b = _unit(rng), _unit(rng)
    cache.add(a, token=1)
    cache.add(b, token=2)
    assert cache.lookup(b + 0.01 * a, delta=0.5).token == 2


def test_lru_eviction_keeps_the_recently_used() -> None:
    rng = np.random.default_rng(2)
    cache = PeerCache(16, max_entries=3)
    vecs = [_unit(rng) for _ in range(4)]
    for i, v in enumerate(vecs[:3]):
        cache.add(v, token=i)
    assert cache.lookup(vecs[0], 0.99).token == 0  # touch entry 0
    cache.add(vecs[3], token=3)  # evicts entry 1, the least recently used
    assert len(cache) == 3
    assert cache.lookup(vecs[1], 0.99) is None
    assert cache.lookup(vecs[0], 0.99).token == 0 and cache.lookup(vecs[3], 0.99).token == 3


def test_byte_bound_caps_entries() -> None:
    rng = np.random.default_rng(3)
    cache = PeerCache(16, max_entries=1000, max_bytes=16 * 4 * 5)
    for i in range(20):
        cache.add(_unit(rng), token=i)
    assert len(cache) == 5 and cache.nbytes <= 16 * 4 * 5


def test_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    rng = np.random.default_rng(4)
    cache = PeerCache(16, ttl_s=10, clock=clock)
    v = _unit(rng)
    cache.add(v, token=5)
    clock.t = 9.0
    assert cache.lookup(v, 0.99).token == 5
    clock.t = 10.5
    assert cache.lookup(v, 0.99) is None and len(cache) == 0


def test_bad_embeddings_are_refused() -> None:
    cache = PeerCache(16)
    with pytest.raises(ValueError, match="dimension"):
        cache.add(np.ones(8), token=1)
    with pytest.raises(ValueError, match="non-zero"):
        cache.lookup(np.zeros(16), 0.5)


def test_simhash_distance_estimates_the_cosine() -> None:
    from fedhlm.core.sketch import SimHash, hamming

    family = SimHash(512, 32, seed=3)
    rng = np.random.default_rng(0)
    a = rng.normal(size=32)
    a /= np.linalg.norm(a)
    for cos in (0.99, 0.9, 0.7, 0.3):
        other = rng.normal(size=32)
        other -= (other @ a) * a
        b = cos * a + np.sqrt(1 - cos**2) * other / np.linalg.norm(other)
        d = hamming(family.sketch(a), family.sketch(b)[None, :])[0]
        assert abs(float(family.cosine(d)) - cos) < 0.12, (cos, d)
    assert hamming(family.sketch(a), family.sketch(a)[None, :])[0] == 0
    assert family.sketch(a).nbytes == 64 and family.name == "simhash512-s3-d32"
    assert family.fingerprint("embedder") != SimHash(512, 32, seed=4).fingerprint("embedder")
    assert family.fingerprint("embedder") != family.fingerprint("slm_hidden")
    assert family.cosine(family.max_distance(0.9)) >= 0.9 > family.cosine(family.max_distance(0.9) + 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        SimHash(100, 32)


def test_sketch_cache_bounds_lru_and_ttl() -> None:
    from fedhlm.core.peer_cache import SketchCache
    from fedhlm.core.sketch import SimHash

    now = [0.0]
    family = SimHash(64, 8)
    cache = SketchCache(family, max_entries=2, ttl_s=10, clock=lambda: now[0])
    vecs = [np.eye(8)[i] for i in range(3)]
    for i, v in enumerate(vecs[:2]):
        cache.add(family.sketch(v), token=i)
    assert cache.lookup(family.sketch(vecs[0]), 0.99).token == 0  # now the most recently used
    cache.add(family.sketch(vecs[2]), token=2)  # evicts entry 1, the least recently used
    assert len(cache) == 2 and cache.nbytes == 16
    assert cache.lookup(family.sketch(vecs[1]), 0.99) is None
    now[0] = 11.0
    assert cache.lookup(family.sketch(vecs[2]), 0.99) is None and len(cache) == 0
    with pytest.raises(ValueError, match="bytes"):
        cache.add(np.zeros(3, np.uint8), token=0)


def test_a_keyed_entry_answers_only_its_own_key() -> None:
    """Generation entries carry the digest of their generated prefix: the same prompt sketch answers only at
    the same prefix, and a classification query (key 0) never sees them."""
    from fedhlm.core.peer_cache import SketchCache
    from fedhlm.core.sketch import SimHash, prefix_key

    family = SimHash(64, 8)
    cache = SketchCache(family, max_entries=4, ttl_s=10)
    sketch = family.sketch(np.eye(8)[0])
    cache.add(sketch, token=7, key=prefix_key([2000, 2001]))
    cache.add(sketch, token=9)  # a classification entry of the same context
    assert cache.lookup(sketch, 0.99, prefix_key([2000, 2001])).token == 7
    assert cache.lookup(sketch, 0.99, prefix_key([2000, 2002])) is None
    assert cache.lookup(sketch, 0.99).token == 9
    keys = {prefix_key(p) for p in ([], [1], [1, 2], [2, 1], list(range(50)))}
    assert len(keys) == 5 and all(0 < k < 2**32 for k in keys)
    assert prefix_key([1, 2]) == prefix_key(np.array([1, 2], np.int64))  # the ids, not their container


def test_content_draw_is_fixed_by_the_text_and_the_seed_and_uniform_over_texts() -> None:
    from fedhlm.core.sketch import content_draw

    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 30_000, size=int(rng.integers(3, 40))).tolist() for _ in range(4000)]
    draws = np.array([content_draw(0, t) for t in texts])
    assert draws.min() >= 0.0 and draws.max() < 1.0
    assert content_draw(0, texts[0]) == draws[0]  # every device draws the same for the same text
    assert abs(draws.mean() - 0.5) < 0.02 and abs(np.mean(draws < 0.05) - 0.05) < 0.01
    assert content_draw(1, texts[0]) != draws[0]  # another run's seed, other texts explored


def test_a_cached_token_is_a_label_only_under_greedy_verification() -> None:
    from fedhlm.core.peer_cache import cache_labels, cached_beta

    assert cache_labels("greedy") and not cache_labels("sample")
    assert cached_beta(5, 5) == 0.0 and cached_beta(5, 6) == 1.0
