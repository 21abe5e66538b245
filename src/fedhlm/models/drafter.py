"""A client's SLM as a `Drafter`: its own inputs in, drafted tokens out, timed; P2P representations on demand.

Simulated clients share one model instance (one process, one copy of the weights) but each
drafts its own inputs when its round comes, so the time a token waits for its SLM is that
client's own batch. Calls take turns on a lock: the model's sampling generator and the
embedder are not meant to be driven by many threads at once, and two CPU cores gain
nothing from overlapping them.

A sentence embedder runs only for the tokens the client finds uncertain (`represent`, when the
peer step asks), so that a confident token, most of them, pays nothing for P2P; the SLM's own
hidden state comes with the draft at no cost.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from fedhlm.core.records import Drafted
from fedhlm.data import NewsItem
from fedhlm.models.embedder import ContextEmbedder, SLMHiddenState
from fedhlm.models.hybrid import DraftingSLM, context_texts


class SLMDrafter:
    """Drafts with the pair's SLM; represents each context too when the client asks peers (`embedder`: a
    sentence embedder run on the text, or the SLM's own hidden state)."""

    TEXTS_KEPT = 100_000  # drafted contexts remembered for `represent` (uids are unique per delivery)

    def __init__(self, slm: DraftingSLM, embedder: ContextEmbedder | SLMHiddenState | None = None) -> None:
        self.slm = slm
        self.embedder = embedder
        self._lock = threading.Lock()
        self._texts: OrderedDict[int, str] = OrderedDict()

    def represent(self, uids: Sequence[int]) -> tuple[list[np.ndarray | None], float]:
        """The sentence embeddings of drafted tokens' contexts, computed now in one batch (None for a uid it did
        not draft, or without an embedder), and the seconds the embedder took (not the wait for the shared
        model's lock: a device has its own)."""
        if self.embedder is None or self.embedder.from_slm:
            return [None] * len(uids), 0.0
        with self._lock:
            start = time.perf_counter()
            texts = [self._texts.pop(uid, None) for uid in uids]
            known = [t for t in texts if t is not None]
            vectors = iter(self.embedder.encode(known)) if known else iter(())
            return [None if t is None else next(vectors) for t in texts], time.perf_counter() - start

    def draft(self, items: Sequence[NewsItem]) -> Drafted:
        if not items:
            return Drafted([], 0.0)
        with self._lock:
            start = time.perf_counter()
            if self.embedder is not None and self.embedder.from_slm:
                inputs = self.slm.draft(items, hidden_embeddings=True).inputs
            else:
                inputs = self.slm.draft(items).inputs
                if self.embedder is not None:  # embedded later, if the token turns out uncertain
                    for item, text in zip(items, context_texts(items)):
                        self._texts[item.uid] = text
                    while len(self._texts) > self.TEXTS_KEPT:
                        self._texts.popitem(last=False)
            return Drafted(inputs, time.perf_counter() - start)
