"""Workloads with repetition: the same article reaching several clients, at later rounds, mostly near the first.

In an IoT fleet the same news item, alert or command text reaches many devices of a site at
different times; a peer or edge cache can only pay on such a workload. Each test article is
delivered once by the partition (the default, `deliveries: 1`); on top of that,
`(deliveries - 1) x articles` repeat deliveries are drawn with Zipf popularity over a random
ranking of the articles (exponent `zipf_s`: a few articles are delivered many times). A
repeat goes to another client of the first recipient's edge cluster with probability
`locality`, else to a client of another cluster, in a round no earlier than the first
delivery's. A repeat is the same text, or, for a share `near` of them, another outlet's version of the
same story (`outlet_version`: its dateline and agency tags gone, a headline of its own, the lead without
the last part): a near repeat that a cache may answer only if its similarity threshold lets it, and whose
LLM answer may differ from the original's. (AG News's own near-duplicate pairs are too few for this: a
trigram match over the 5,600 evaluation articles finds 33 pairs with Jaccard >= 0.5.)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhlm.data.items import NewsItem

# what another outlet would not print: datelines and agency tags ("NEW YORK (AP) --", "(Reuters)", "AFP -")
_TAGS = re.compile(r"^\s*[A-Z][A-Z .,'/-]*\s*\([A-Za-z.]+\)\s*-*\s*|"  # a dateline with its source
                   r"\((?:AP|Reuters|AFP|CP)\)\s*-*\s*|^\s*(?:AFP|AP|Reuters)\s+-+\s*")  # a bare agency tag


@dataclass(frozen=True)
class Repeat:
    """One more delivery of test article `index` to `client_id` in `round`."""

    index: int
    client_id: str
    round: int
    near: bool = False  # another outlet's version of the story, not the same text


def outlet_version(item: NewsItem, rng: np.random.Generator, uid: int) -> NewsItem:
    """The same story as another outlet runs it (same label, new uid): datelines and agency tags removed, a
    headline written from the lead's first words half of the time, and the lead cut to 60-90 % of its words."""
    words = _TAGS.sub("", item.description).split()
    keep = max(4, int(round(len(words) * rng.uniform(0.6, 0.9)))) if len(words) > 4 else len(words)
    lead = " ".join(words[:keep])
    title = _TAGS.sub("", item.title).strip()
    if rng.random() < 0.5 and len(words) >= 6:
        title = " ".join(words[: int(rng.integers(5, 9))]).rstrip(",;:")
    return dataclasses.replace(item, uid=uid, title=title, description=lead)


def zipf_popularity(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Delivery probabilities over n articles: 1/rank^s over a random ranking (s = 0: uniform)."""
    ranks = rng.permutation(n) + 1
    weights = ranks.astype(np.float64) ** -s
    return weights / weights.sum()


def plan_repeats(first: Sequence[tuple[str, int]], assignment: Mapping[str, str], rounds: int, *,
                 deliveries: float, zipf_s: float, locality: float, seed: int, near: float = 0.0) -> list[Repeat]:
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
        own = [c for c in by_edge[edge] if c != client]
        far = [c for e, members in by_edge.items() if e != edge for c in members]
        pool = own if (rng.random() < locality and own) or not far else far
        pool = pool or [client]  # a single client: it sees the article again
        out.append(Repeat(i, pool[int(rng.integers(len(pool)))], int(rng.integers(r0, rounds))))
    if near > 0:  # drawn after the rest, from a stream of its own: the deliveries are the same whatever `near`
        near_rng = np.random.default_rng([seed, 9])
        out = [dataclasses.replace(r, near=bool(near_rng.random() < near)) for r in out]
    return out


def workload_summary(repeats: Sequence[Repeat], first: Sequence[tuple[str, int]], assignment: Mapping[str, str],
                     *, deliveries: float, zipf_s: float, locality: float,
                     near: float = 0.0) -> dict[str, float | int]:
    """What the report says about the workload it ran."""
    n = len(first)
    counts = np.bincount([r.index for r in repeats], minlength=n) + 1 if n else np.zeros(0)
    same = sum(1 for r in repeats if assignment[r.client_id] == assignment[first[r.index][0]])
    return {"deliveries": deliveries, "zipf_s": zipf_s, "locality": locality, "near_repeats": near, "articles": n,
            "total_deliveries": n + len(repeats), "repeat_deliveries": len(repeats),
            "near_repeat_deliveries": sum(1 for r in repeats if r.near),
            "repeats_same_cluster": same / len(repeats) if repeats else 0.0,
            "max_deliveries_of_one_article": int(counts.max()) if n else 0,
            "articles_delivered_more_than_once": int((counts > 1).sum()) if n else 0}
