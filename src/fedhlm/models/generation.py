"""A client's SLM generating a sequence token by token, for the router.

The SLM keeps a KV cache of its own sequence, so each step encodes one token; every step
returns the greedy draft, the top-k the client would upload and the basic uncertainty
features (entropy first), which are what the same threshold head reads for classification.
The task's label features (and a hidden-state probe) describe class tokens only: generation
runs on the basic feature set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhlm.core.records import NextToken
from fedhlm.maths.uncertainty import features, topk_compress
from fedhlm.models.backbone import prompt_attention
from fedhlm.models.kv_cache import extend_cache


class SLMSequenceDrafter:
    """`SequenceDrafter` over a causal Hugging Face LM (the SLM's backbone)."""

    def __init__(self, model: nn.Module, top_k: int, *, samples: int = 16, seed: int = 0) -> None:
        if prompt_attention(model) != "causal":
            raise ValueError(f"this SLM reads prompts {prompt_attention(model)}ly, which cannot extend a KV cache "
                             "token by token; generation needs prompt_attention: causal")
        self.model = model.eval()
        self.top_k = top_k
        self.samples = samples
        self.generator = torch.Generator().manual_seed(seed)
        self._cache: Any = None
        self.length = 0

    @torch.no_grad()
    def _step(self, ids: Sequence[int]) -> NextToken:
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        new = torch.as_tensor(list(ids), dtype=torch.long, device=device).reshape(1, -1)
        logits, self._cache = extend_cache(self.model, new, self._cache)
        self.length += new.shape[1]
        logits = logits.float().cpu()
        probs = torch.softmax(logits, dim=-1)
        top_ids, top_probs, tail = topk_compress(probs, self.top_k)
        feats = features(logits, samples=self.samples, generator=self.generator)
        return NextToken(draft_token=int(logits.argmax()), topk_ids=top_ids.numpy().astype(np.int32),
                         topk_probs=top_probs.numpy().astype(np.float32), tail_mass=float(tail),
                         features=feats.numpy().astype(np.float32), ms=(time.perf_counter() - start) * 1000.0)

    def open(self, prompt_ids: Sequence[int]) -> NextToken:
        if len(prompt_ids) == 0:
            raise ValueError("a sequence needs at least one prompt token")
        self._cache, self.length = None, 0
        return self._step(prompt_ids)

    def append(self, token: int) -> NextToken:
        if self._cache is None:
            raise RuntimeError("append before open")
        return self._step([int(token)])
