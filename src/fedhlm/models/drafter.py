"""A client's SLM as a `Drafter`: its own inputs in, drafted tokens (and their P2P embeddings) out, timed.

Simulated clients share one model instance (one process, one copy of the weights) but each
drafts its own inputs when its round comes, so the time a token waits for its SLM is that
client's own batch. Calls take turns on a lock: the model's sampling generator and the
embedder are not meant to be driven by many threads at once, and two CPU cores gain
nothing from overlapping them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from fedhlm.core.records import Drafted
from fedhlm.data import NewsItem
from fedhlm.models.embedder import ContextEmbedder, SLMHiddenState
from fedhlm.models.hybrid import DraftingSLM, context_texts


class SLMDrafter:
    """Drafts with the pair's SLM; represents each context too when the client asks peers (`embedder`: a
    sentence embedder run on the text, or the SLM's own hidden state)."""

    def __init__(self, slm: DraftingSLM, embedder: ContextEmbedder | SLMHiddenState | None = None) -> None:
        self.slm = slm
        self.embedder = embedder
        self._lock = threading.Lock()

    def draft(self, items: Sequence[NewsItem]) -> Drafted:
        if not items:
            return Drafted([], 0.0)
        with self._lock:
            start = time.perf_counter()
            if self.embedder is not None and self.embedder.from_slm:
                inputs = self.slm.draft(items, hidden_embeddings=True).inputs
            else:
                embeddings = self.embedder.encode(context_texts(items)) if self.embedder is not None else None
                inputs = self.slm.draft(items, embeddings).inputs
            return Drafted(inputs, time.perf_counter() - start)
