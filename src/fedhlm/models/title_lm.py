"""TitleLM: a causal language model that writes an article's title from its description (issue 18's
generation task), the SLM or the LLM of multi-token routing.

Same backbone and optimiser as the classifiers (`NextTokenClassifier`), another objective: cross-entropy
on every title token and the closing [SEP] given the description and what came before (teacher forcing);
the data module gives it `objective: title` batches. Test metrics are the token loss and the share of
title tokens whose greedy prediction is right (teacher-forced); a generated title's quality against the
reference is scored in the generation run, not here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedhlm.models.classifier import Batch, NextTokenClassifier


class TitleLM(NextTokenClassifier):
    """A title-generation LM; arguments as :class:`~fedhlm.models.classifier.NextTokenClassifier`
    (generation needs ``prompt_attention: causal``, the default of a new or a converted model)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def _token_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the labelled positions, share of them predicted right)."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        mask = labels != -100
        right = ((logits.argmax(dim=-1) == labels) & mask).sum() / mask.sum().clamp_min(1)
        return loss, right

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self._token_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _evaluate(self, batch: Batch, metrics: Any, prefix: str) -> None:
        loss, right = self._token_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log(f"{prefix}loss", loss, prog_bar=True, batch_size=size)
        self.log(f"{prefix}token_acc", right, prog_bar=True, batch_size=size)
