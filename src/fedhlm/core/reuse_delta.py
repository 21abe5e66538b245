"""A cluster's reuse threshold delta, learned by its edge from the requests its cache just missed.

When the edge's cache misses, its nearest entry (below delta) and the client's draft are both
candidate answers, and the LLM's verdict, which the edge reads anyway, says which of them it
would have accepted. So every miss is a free labelled pair: (similarity of the nearest entry,
did that entry's token agree with the LLM, did the SLM's draft). The issue's bound for reuse is
"wrong no more often than the SLM on the same tokens"; per similarity band below the configured
delta, this module keeps those counts and lowers delta to the lowest band from which every band up
to the configured one meets the bound, on at least `min_pairs` pairs and with the cached answers'
disagreement taken at its Wilson upper bound (a band that merely looks good on few pairs does
not count). Bands at or above the configured delta are hits, whose LLM answer is not known (only
audits see it), so delta never rises above the configured value; once lowered, a band stops
collecting (it hits now) and its evidence stands as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedhlm.core.intervals import wilson_interval


@dataclass
class DeltaBands:
    """Counts per similarity band in [floor, start): pairs, cached answers the LLM disagreed with, drafts it
    disagreed with."""

    floor: float
    start: float  # the configured delta: the most this edge's delta can be
    width: float = 0.025
    min_pairs: int = 20
    pairs: np.ndarray = field(init=False)
    cache_wrong: np.ndarray = field(init=False)
    slm_wrong: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not self.floor < self.start:
            raise ValueError(f"delta floor {self.floor} must be below delta {self.start}")
        n = int(np.ceil((self.start - self.floor) / self.width - 1e-9))
        self.edges = self.start - self.width * np.arange(n, -1, -1)  # n + 1 edges, the last one = start
        self.edges[0] = max(self.edges[0], self.floor)
        self.pairs = np.zeros(n, np.int64)
        self.cache_wrong = np.zeros(n, np.int64)
        self.slm_wrong = np.zeros(n, np.int64)

    def record(self, similarity: float, cache_agrees: bool, slm_agrees: bool) -> bool:
        """Count one miss whose nearest entry was `similarity` away; False when outside [floor, start)."""
        if not self.floor <= similarity < self.start:
            return False
        band = int(np.searchsorted(self.edges, similarity, side="right")) - 1
        band = min(max(band, 0), self.pairs.size - 1)
        self.pairs[band] += 1
        self.cache_wrong[band] += int(not cache_agrees)
        self.slm_wrong[band] += int(not slm_agrees)
        return True

    def passes(self) -> np.ndarray:
        """Per band: enough pairs, and the cached answers' disagreement (upper bound) no higher than the drafts'."""
        upper = np.array([(wilson_interval(int(k), int(n)) or [0.0, 1.0])[1]
                          for k, n in zip(self.cache_wrong, self.pairs)])
        slm = np.divide(self.slm_wrong, self.pairs, out=np.zeros(self.pairs.size), where=self.pairs > 0)
        return (self.pairs >= self.min_pairs) & (upper <= slm)

    def delta(self) -> float:
        """The lowest band edge from which every band up to the configured delta passes (that delta if none)."""
        ok = self.passes()
        lowest = ok.size
        while lowest > 0 and ok[lowest - 1]:
            lowest -= 1
        return float(self.edges[lowest])

    def as_dict(self) -> dict[str, list]:
        return {"edges": [round(float(e), 4) for e in self.edges], "pairs": self.pairs.tolist(),
                "cache_wrong": self.cache_wrong.tolist(), "slm_wrong": self.slm_wrong.tolist()}
