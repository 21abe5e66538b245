"""The one verification path: drafted tokens and their contexts in, the LLM's verdicts out.

The LLM service (`roles.llm_service`), the static-threshold calibration (`models.hybrid`)
and the tests all call `verify_drafts`, so the label a client learns from online and the
label the baseline is calibrated on are computed by the same lines. The LLM itself is a
`QFunction`: contexts in, its next-token distribution out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedhlm.maths.speculative import Verdicts, VerifyMode, verify_batch

# context token ids [B, L] (right padded), attention mask [B, L], last index [B] -> q [B, V]
QFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Draft:
    """One drafted token as the LLM sees it: the context it follows and the client's top-k upload."""

    context_ids: np.ndarray  # int prompt ids, unpadded
    topk_ids: np.ndarray  # [k] int
    topk_probs: np.ndarray  # [k] float
    draft_token: int


def pad_contexts(contexts: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L], attention mask [B, L] and the last real position [B]."""
    length = max(int(c.size) for c in contexts)
    ids = torch.full((len(contexts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), length), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, : c.size] = torch.from_numpy(np.asarray(c).astype("int64"))
        mask[i, : c.size] = 1
    return ids, mask, mask.sum(dim=1) - 1


@torch.no_grad()
def verify_drafts(q_fn: QFunction, drafts: Sequence[Draft], *, pad_id: int, mode: VerifyMode,
                  generator: torch.Generator | None = None) -> Verdicts:
    """Verify B drafts in one LLM forward; rows with different top-k sizes are verified group by group."""
    if not drafts:
        raise ValueError("no drafts to verify")
    input_ids, mask, last = pad_contexts([d.context_ids for d in drafts], pad_id)
    q = q_fn(input_ids, mask, last)
    n = len(drafts)
    accepted = torch.zeros(n, dtype=torch.bool)
    token = torch.zeros(n, dtype=torch.long)
    beta, q_draft, p_draft = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    by_k: dict[int, list[int]] = {}
    for i, d in enumerate(drafts):
        by_k.setdefault(int(np.asarray(d.topk_ids).size), []).append(i)
    for rows in by_k.values():  # normally a single group
        idx = torch.tensor(rows)
        ids = torch.from_numpy(np.stack([drafts[i].topk_ids for i in rows]).astype(np.int64))
        probs = torch.from_numpy(np.stack([drafts[i].topk_probs for i in rows]).astype(np.float32))
        tokens = torch.tensor([int(drafts[i].draft_token) for i in rows], dtype=torch.long)
        v = verify_batch(ids, probs, None, q[idx], tokens, generator=generator, mode=mode)
        accepted[idx], token[idx], beta[idx], q_draft[idx], p_draft[idx] = (
            v.accepted, v.token, v.beta, v.q_draft, v.p_draft)
    return Verdicts(accepted=accepted, token=token, beta=beta, q_draft=q_draft, p_draft=p_draft)
