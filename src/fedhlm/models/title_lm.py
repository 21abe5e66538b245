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
from transformers import BertLMHeadModel

from fedhlm.models.classifier import Batch, NextTokenClassifier


class TitleLM(NextTokenClassifier):
    """A title-generation LM; arguments as :class:`~fedhlm.models.classifier.NextTokenClassifier`
    (generation needs ``prompt_attention: causal``, the default of a new or a converted model)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def _token_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the labelled positions, share of them predicted right).

        Only the positions that predict a title token go through the vocabulary projection (a BERT decoder's
        LM head over every prompt position would cost as much as the rest of the step)."""
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        if isinstance(self.model, BertLMHeadModel):
            hidden = self.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = self.model.cls(hidden[:, :-1][mask])
        else:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        targets = labels[mask]
        loss = F.cross_entropy(logits.float(), targets)
        right = (logits.argmax(dim=-1) == targets).float().mean()
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
