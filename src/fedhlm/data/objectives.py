"""What a model's batches are for (`data.objective`): classification prompts, or the prompt and target of
a generation task. A generation task is a small class in `GENERATION_TASKS`; the training batches, the
simulation's prompts and its references all come from the same class, so they cannot disagree.

- ``title``: write an article's title from its description: ``[CLS] description headline :`` then the
  title and ``[SEP]``; 8-9 new tokens on AG News.
- ``continue``: continue an article: ``[CLS]`` and the first tokens of ``"title . description"`` (at most
  ``max_length - 1``, at most half of the article), then the next tokens (at most 32) and ``[SEP]`` where
  the article ends there; 20-32 new tokens on AG News, the length issue 18 measures session reuse at.

The reference of a generated sequence is the real target decoded by the tokenizer (lower-cased
WordPiece text, as the generated tokens are decoded), so ROUGE-L compares like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedhlm.data.encoding import PromptCollator, _ids
from fedhlm.data.items import NewsItem, prompt_text
from fedhlm.data.task import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class GenerationTask:
    """A prompt -> target task for a causal LM. Subclasses say how an article becomes both."""

    name: ClassVar[str]
    label: ClassVar[str]  # what the report calls it
    max_new: ClassVar[int]  # target tokens a training pair holds (the stop token comes on top)

    def pairs(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem],
              max_length: int) -> list[tuple[list[int], list[int], bool]]:
        """(prompt ids, target ids, whether the stop token follows the target) per article."""
        raise NotImplementedError

    def prompts(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem], max_length: int) -> list[list[int]]:
        return [p for p, _, _ in self.pairs(tokenizer, items, max_length)]

    def references(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem], max_length: int) -> list[str]:
        """The real target of each article as text, decoded the way generated tokens are."""
        return [tokenizer.decode(t) for _, t, _ in self.pairs(tokenizer, items, max_length)]


TITLE_SUFFIX = "headline :"


class TitleTask(GenerationTask):
    name, label, max_new = "title", "title from description", 24

    def pairs(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem],
              max_length: int) -> list[tuple[list[int], list[int], bool]]:
        suffix = _ids(tokenizer, [TITLE_SUFFIX])[0]
        budget = max_length - 1 - len(suffix)
        if budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the description after [CLS] and "
                             f"{TITLE_SUFFIX!r}")
        bodies = _ids(tokenizer, [" ".join(it.description.split()) for it in items], budget)
        titles = _ids(tokenizer, [" ".join(it.title.split()) for it in items], self.max_new)
        return [([tokenizer.cls_token_id, *body, *suffix], title, True) for body, title in zip(bodies, titles)]


class ContinueTask(GenerationTask):
    name, label, max_new = "continue", "continuation of the article", 32

    def pairs(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem],
              max_length: int) -> list[tuple[list[int], list[int], bool]]:
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the article after [CLS]")
        out = []
        for ids in _ids(tokenizer, [prompt_text(it) for it in items]):
            cut = max(1, min(max_length - 1, len(ids) // 2))  # a short article keeps half of itself to continue
            target = ids[cut : cut + self.max_new]
            out.append(([tokenizer.cls_token_id, *ids[:cut]], target, cut + self.max_new >= len(ids)))
        return out


GENERATION_TASKS: dict[str, type[GenerationTask]] = {t.name: t for t in (TitleTask, ContinueTask)}


def generation_task(objective: str) -> GenerationTask:
    """The generation task of a model's ``data.objective`` (a clear error for any other)."""
    if objective not in GENERATION_TASKS:
        raise ValueError(f"data.objective: a generation model needs one of {tuple(GENERATION_TASKS)}, "
                         f"got {objective!r}")
    return GENERATION_TASKS[objective]()


def encode_lm_pairs(tokenizer: PreTrainedTokenizerBase, items: Sequence[NewsItem], task: GenerationTask | str = "title",
                    max_length: int = 64) -> dict[str, torch.Tensor]:
    """A training batch: prompt, target (and [SEP] where the target ends the text) right-padded in ``input_ids``;
    ``labels`` hold the target and its stop token at their positions and -100 elsewhere (the loss predicts
    position t+1 from t), ``prompt_length`` [B] and ``uid`` [B]."""
    task = generation_task(task) if isinstance(task, str) else task
    pairs = task.pairs(tokenizer, items, max_length)
    rows = [p + t + ([tokenizer.sep_token_id] if stop else []) for p, t, stop in pairs]
    width = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, (prompt, _, _)) in enumerate(zip(rows, pairs)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = input_ids[i, len(prompt) : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_length": torch.tensor([len(p) for p, _, _ in pairs], dtype=torch.long),
            "uid": torch.tensor([it.uid for it in items], dtype=torch.long)}


@dataclass(frozen=True)
class LMCollator:
    """DataLoader ``collate_fn`` for a generation task: NewsItems -> ``encode_lm_pairs`` batch."""

    tokenizer: Any
    task: str = "title"
    max_length: int = 64

    def __call__(self, items: Sequence[NewsItem]) -> dict[str, torch.Tensor]:
        return encode_lm_pairs(self.tokenizer, items, self.task, self.max_length)


def make_collator(objective: str, tokenizer: Any, max_length: int, task: Task) -> PromptCollator | LMCollator:
    """The batches a model of this objective trains on: classification prompts or a generation task's pairs."""
    if objective == "classify":
        return PromptCollator(tokenizer, max_length, task.prompt_suffix)
    if objective in GENERATION_TASKS:
        return LMCollator(tokenizer, objective, max_length)
    raise ValueError(f"data.objective: must be one of {('classify', *GENERATION_TASKS)}, got {objective!r}")
