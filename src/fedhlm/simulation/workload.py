"""Workloads with repetition: the same article reaching several clients, at later rounds, mostly near the first.

In an IoT fleet the same news item, alert or command text reaches many devices of a site at
different times; a peer or edge cache can only pay on such a workload. Each test article is
delivered once by the partition (the default, `deliveries: 1`); on top of that,
`(deliveries - 1) x articles` repeat deliveries are drawn with Zipf popularity over a random
ranking of the articles (exponent `zipf_s`: a few articles are delivered many times). A
repeat goes to another client of the first recipient's edge cluster with probability
`locality`, else to a client of another cluster, in a round no earlier than the first
delivery's. Repeats are exact (the same text): paraphrase-level near repeats are not generated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Repeat:
    """One more delivery of test article `index` to `client_id` in `round`."""

    index: int
    client_id: str
    round: int


def zipf_popularity(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Delivery probabilities over n articles: 1/rank^s over a random ranking (s = 0: uniform)."""
    ranks = rng.permutation(n) + 1
    weights = ranks.astype(np.float64) ** -s
    return weights / weights.sum()


def plan_repeats(first: Sequence[tuple[str, int]], assignment: Mapping[str, str], rounds: int, *,
                 deliveries: float, zipf_s: float, locality: float, seed: int) -> list[Repeat]:
    """Repeat deliveries of the articles whose first delivery went to `first[i] = (client, round)`."""
    n = len(first)
    extra = int(round((deliveries - 1.0) * n))
    if extra <= 0 or n == 0:
        return []
    rng = np.random.default_rng([seed, 7])
    articles = rng.choice(n, size=extra, p=zipf_popularity(n, zipf_s, rng))
    by_edge: dict[str, list[str]] = {}
    for cid, edge in sorted(assignment.items()):
        by_edge.setdefault(edge, []).append(cid)
    out = []
    for i in articles.tolist():
        client, r0 = first[i]
        edge = assignment[client]
        near = [c for c in by_edge[edge] if c != client]
        far = [c for e, members in by_edge.items() if e != edge for c in members]
        pool = near if (rng.random() < locality and near) or not far else far
        pool = pool or [client]  # a single client: it sees the article again
        out.append(Repeat(i, pool[int(rng.integers(len(pool)))], int(rng.integers(r0, rounds))))
    return out


def workload_summary(repeats: Sequence[Repeat], first: Sequence[tuple[str, int]], assignment: Mapping[str, str],
                     *, deliveries: float, zipf_s: float, locality: float) -> dict[str, float | int]:
    """What the report says about the workload it ran."""
    n = len(first)
    counts = np.bincount([r.index for r in repeats], minlength=n) + 1 if n else np.zeros(0)
    same = sum(1 for r in repeats if assignment[r.client_id] == assignment[first[r.index][0]])
    return {"deliveries": deliveries, "zipf_s": zipf_s, "locality": locality, "articles": n,
            "total_deliveries": n + len(repeats), "repeat_deliveries": len(repeats),
            "repeats_same_cluster": same / len(repeats) if repeats else 0.0,
            "max_deliveries_of_one_article": int(counts.max()) if n else 0,
            "articles_delivered_more_than_once": int((counts > 1).sum()) if n else 0}
