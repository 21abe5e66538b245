"""Dividing items: train/val/calib/test splits and the spread of data across clients.

Pure functions of labels and a seed. Non-IID clients follow the usual label-skew recipe
(Hsu, Qi, Brown 2019, "Measuring the effects of non-identical data distribution"): for
each class, draw client shares from Dirichlet(alpha) and cut the class's items by them;
small alpha gives each client few classes, large alpha approaches IID.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedhlm.data.items import NewsItem


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of one corpus: fit, validate, calibrate thresholds on, report on."""

    train: list[NewsItem]
    val: list[NewsItem]
    calib: list[NewsItem]
    test: list[NewsItem]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "calib": len(self.calib), "test": len(self.test)}


def _stratified_order(items: Sequence[NewsItem], rng: np.random.Generator) -> np.ndarray:
    """Item indices in an order whose every prefix and every run holds each label in proportion.

    Each class is shuffled and its k-th item placed at (k + u) / n_class on [0, 1), with a
    random offset u per class; sorting by position interleaves the classes evenly, so any
    cut of the sequence is stratified to within one item per class.
    """
    labels = np.array([it.label for it in items], dtype=np.int64)
    position = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        position[idx] = (np.arange(len(idx)) + rng.random()) / len(idx)
    return np.argsort(position, kind="stable")


def split_items(
    items: Sequence[NewsItem], *, fractions: Sequence[float] = (0.6, 0.1, 0.1, 0.2), seed: int = 0
) -> Splits:
    """Seeded split stratified by label: sizes round(fraction * n), each class cut in proportion."""
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (4,) or np.any(frac < 0) or not np.isclose(frac.sum(), 1.0):
        raise ValueError(
            f"fractions must be 4 non-negative numbers summing to 1 (train, val, calib, test), got {tuple(fractions)}"
        )
    rng = np.random.default_rng(seed)
    cuts = np.round(np.cumsum(frac)[:-1] * len(items)).astype(np.int64)
    parts = np.split(_stratified_order(items, rng), cuts)
    train, val, calib, test = ([items[i] for i in rng.permutation(part)] for part in parts)
    return Splits(train=train, val=val, calib=calib, test=test)


def stratified_subset(items: Sequence[NewsItem], limit: int | None, *, seed: int = 0) -> list[NewsItem]:
    """At most ``limit`` items keeping the label proportions (original order kept); None keeps all."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    keep = _stratified_order(items, np.random.default_rng(seed))[:limit]
    return [items[i] for i in np.sort(keep)]


def partition(
    labels: Sequence[int],
    num_clients: int,
    *,
    alpha: float | None = None,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[list[int]]:
    """Indices of ``labels`` per client: IID when ``alpha`` is None, else Dirichlet(alpha) label skew.

    Every index goes to exactly one client; lists are sorted; the same seed gives the same
    result. Draws are repeated up to ``max_tries`` times until every client holds at least
    ``min_size`` items, then the largest clients give items to the short ones.
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0 (or None for IID), got {alpha}")
    if min_size < 0 or len(y) < num_clients * min_size:
        raise ValueError(f"cannot give each of {num_clients} clients {min_size} items out of {len(y)}")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [sorted(p.tolist()) for p in np.array_split(rng.permutation(len(y)), num_clients)]
    classes = np.unique(y)
    for _ in range(max(1, max_tries)):
        buckets: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for bucket, chunk in zip(buckets, np.split(idx, np.clip(cuts, 0, len(idx)))):
                bucket.extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min_size:
            break
    else:
        _repair(buckets, min_size, rng)
    return [sorted(b) for b in buckets]


def _repair(buckets: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move random items from the largest client to each client short of ``min_size``."""
    for short in range(len(buckets)):
        while len(buckets[short]) < min_size:
            donor = max(range(len(buckets)), key=lambda k: len(buckets[k]))
            buckets[short].append(buckets[donor].pop(int(rng.integers(len(buckets[donor])))))


def label_histograms(
    labels: Sequence[int], parts: Sequence[Sequence[int]], num_classes: int
) -> np.ndarray:
    """Items of each class per client, shape [num_clients, num_classes]."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, part in enumerate(parts):
        out[k] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return out
