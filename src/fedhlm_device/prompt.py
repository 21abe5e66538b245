"""Prompt encoding with the `tokenizers` library, id for id what `fedhlm.data.encode_prompts` produces.

``[CLS] + article ids (truncated to max_length - 1 - len(suffix)) + ids("topic :")``; the
article is never allowed to push the suffix out, so the class token always follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def prompt_text(title: str, description: str) -> str:
    """``"{title} . {description}"`` on one line (as fedhlm.data.prompt_text)."""
    title, description = " ".join(title.split()), " ".join(description.split())
    return f"{title} . {description}".strip() if title else description


class PromptEncoder:
    """Right-padded prompt batches: input_ids, attention_mask [B, L] and last_index [B], int64."""

    def __init__(self, tokenizer_file: str | Path, cls_id: int, suffix_ids: Sequence[int], pad_id: int = 0,
                 max_length: int = 64) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.cls_id, self.pad_id = int(cls_id), int(pad_id)
        self.suffix_ids = [int(i) for i in suffix_ids]
        self.max_length = max_length
        self.budget = max_length - 1 - len(self.suffix_ids)
        if self.budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the article")
        self.tokenizer.enable_truncation(max_length=self.budget)

    def ids(self, text: str) -> list[int]:
        body = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.cls_id, *body, *self.suffix_ids]

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        rows = [self.ids(t) for t in texts]
        width = max((len(r) for r in rows), default=0)
        input_ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "last_index": np.array([len(r) - 1 for r in rows], np.int64)}
