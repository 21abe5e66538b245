"""Which edge serves which client: given, round-robin, or k-means over client profiles.

"Clusters of similar clients" (the paper) are built here from what a client may share
about itself: its label histogram or the mean embedding of its inputs, never the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RULES = ("round_robin", "given", "kmeans_labels", "kmeans_embeddings")


def edge_ids(num_edges: int) -> list[str]:
    return [f"e{i}" for i in range(num_edges)]


def assign_clients(
    client_ids: Sequence[str],
    num_edges: int,
    rule: str = "round_robin",
    *,
    profiles: np.ndarray | None = None,
    given: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """client id -> edge id. Every edge gets at least one client."""
    edges = edge_ids(num_edges)
    if num_edges < 1 or num_edges > len(client_ids):
        raise ValueError(f"need 1 <= edges <= clients, got {num_edges} edges for {len(client_ids)} clients")
    if rule == "round_robin":
        return {cid: edges[i % num_edges] for i, cid in enumerate(client_ids)}
    if rule == "given":
        if given is None:
            raise ValueError("clustering 'given' needs an assignment")
        missing = [cid for cid in client_ids if cid not in given]
        if missing:
            raise ValueError(f"clustering 'given': no edge for client {missing[0]}")
        unknown = sorted({e for e in given.values() if e not in edges})
        if unknown:
            raise ValueError(f"clustering 'given': unknown edge {unknown[0]} (edges are {edges})")
        return {cid: given[cid] for cid in client_ids}
    if rule in ("kmeans_labels", "kmeans_embeddings"):
        if profiles is None or len(profiles) != len(client_ids):
            raise ValueError(f"clustering {rule!r} needs one profile row per client")
        labels = kmeans(np.asarray(profiles, dtype=np.float64), num_edges, seed=seed)
        return {cid: edges[int(k)] for cid, k in zip(client_ids, labels)}
    raise ValueError(f"clustering rule must be one of {RULES}, got {rule!r}")


def kmeans(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Cluster index per row, with no empty cluster (scikit-learn's k-means++, then a repair)."""
    from sklearn.cluster import KMeans

    if len(x) == k:
        return np.arange(k)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    # repair: an empty cluster takes the row farthest from its own cluster's mean
    for c in range(k):
        if not np.any(labels == c):
            sizes = np.bincount(labels, minlength=k)
            donors = np.flatnonzero(sizes[labels] > 1)
            centres = np.stack([x[labels == j].mean(0) if np.any(labels == j) else x.mean(0) for j in range(k)])
            dist = np.linalg.norm(x[donors] - centres[labels[donors]], axis=1)
            labels[donors[int(np.argmax(dist))]] = c
    return labels
