"""Splits and client partitions: pure functions of labels and a seed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhlm.data import NewsItem, label_histograms, partition, split_items, stratified_subset


def _labels(n: int, num_classes: int = 4) -> np.ndarray:
    return np.arange(n) % num_classes


def _items(counts: list[int]) -> list[NewsItem]:
    labels = [c for c, k in enumerate(counts) for _ in range(k)]
    return [NewsItem(uid=i, label=c, title=f"t{i}", description="d") for i, c in enumerate(labels)]


def _mean_max_share(labels: np.ndarray, parts: list[list[int]]) -> float:
    h = label_histograms(labels, parts, 4)
    return float((h.max(axis=1) / h.sum(axis=1)).mean())


def test_dirichlet_partition_puts_every_index_in_exactly_one_client() -> None:
    parts = partition(_labels(1000), 10, alpha=0.5, seed=3)
    flat = [i for p in parts for i in p]
    assert len(parts) == 10
    assert sorted(flat) == list(range(1000))


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=8, max_size=300),
    num_clients=st.integers(1, 8),
    alpha=st.one_of(st.none(), st.floats(0.01, 100.0)),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_partition_covers_all_indices_and_respects_min_size(
    labels: list[int], num_clients: int, alpha: float | None, seed: int
) -> None:
    parts = partition(labels, num_clients, alpha=alpha, seed=seed, min_size=1)
    assert sorted(i for p in parts for i in p) == list(range(len(labels)))
    assert min(len(p) for p in parts) >= 1


def test_partition_is_reproducible_by_seed_and_differs_across_seeds() -> None:
    y = _labels(800)
    assert partition(y, 8, alpha=0.3, seed=7) == partition(y, 8, alpha=0.3, seed=7)
    assert partition(y, 8, alpha=0.3, seed=7) != partition(y, 8, alpha=0.3, seed=8)
    assert partition(y, 8, seed=7) == partition(y, 8, seed=7)
    assert partition(y, 8, seed=7) != partition(y, 8, seed=8)


def test_small_alpha_skews_clients_towards_few_classes() -> None:
    y = _labels(2000)
    skew = {
        a: np.mean([_mean_max_share(y, partition(y, 10, alpha=a, seed=s)) for s in range(5)]) for a in (0.1, 1.0, 100.0)
    }
    # 4 balanced classes: 0.25 would be perfectly mixed, 1.0 a single class per client
    assert skew[0.1] > 0.75
    assert skew[100.0] < 0.32
    assert skew[0.1] > skew[1.0] > skew[100.0]


def test_iid_partition_sizes_differ_by_at_most_one_and_mix_classes() -> None:
    y = _labels(1003)
    parts = partition(y, 10, seed=1)
    assert sorted({len(p) for p in parts}) == [100, 101]
    assert _mean_max_share(y, parts) < 0.35


def test_tiny_alpha_is_repaired_to_min_size() -> None:
    y = _labels(200)
    parts = partition(y, 20, alpha=0.01, seed=0, min_size=5)
    assert min(len(p) for p in parts) >= 5
    assert sorted(i for p in parts for i in p) == list(range(200))


def test_partition_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="3 clients 5 items out of 10"):
        partition(_labels(10), 3, min_size=5)
    with pytest.raises(ValueError, match="alpha"):
        partition(_labels(10), 2, alpha=0.0)
    with pytest.raises(ValueError, match="num_clients"):
        partition(_labels(10), 0)


def test_label_histograms_count_classes_per_client() -> None:
    y = np.array([0, 0, 1, 3, 3, 3, 2])
    h = label_histograms(y, [[0, 1, 2], [3, 4, 5, 6]], 4)
    assert h.tolist() == [[2, 1, 0, 0], [0, 0, 1, 3]]
    with pytest.raises(ValueError, match="0..3"):
        label_histograms([0, 4], [[0, 1]], 4)


def test_splits_are_disjoint_cover_everything_and_are_stratified() -> None:
    items = _items([400, 300, 200, 100])
    s = split_items(items, seed=5)
    uids = [it.uid for part in (s.train, s.val, s.calib, s.test) for it in part]
    assert sorted(uids) == list(range(1000))
    assert s.sizes() == {"train": 600, "val": 100, "calib": 100, "test": 200}
    for part, frac in ((s.train, 0.6), (s.val, 0.1), (s.calib, 0.1), (s.test, 0.2)):
        counts = Counter(it.label for it in part)
        for label, total in enumerate([400, 300, 200, 100]):
            assert abs(counts[label] - frac * total) <= 1


def test_splits_are_seeded() -> None:
    items = _items([50, 50, 50, 50])
    assert split_items(items, seed=1) == split_items(items, seed=1)
    assert split_items(items, seed=1).test != split_items(items, seed=2).test


def test_split_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        split_items(_items([4, 4, 4, 4]), fractions=(0.5, 0.1, 0.1, 0.1))


def test_stratified_subset_keeps_label_proportions() -> None:
    items = _items([600, 200, 100, 100])
    sub = stratified_subset(items, 100, seed=0)
    assert len(sub) == 100
    assert Counter(it.label for it in sub) == {0: 60, 1: 20, 2: 10, 3: 10}
    assert [it.uid for it in sub] == sorted(it.uid for it in sub)
    assert stratified_subset(items, None) == items
