"""TitleLM: a causal language model that writes an article's title from its description (issue 18's
generation task), the SLM or the LLM of multi-token routing.

Same backbone and optimiser as the classifiers (`NextTokenClassifier`), another objective: cross-entropy
on every title token and the closing [SEP] given the description and what came before (teacher forcing);
the data module gives it `objective: title` batches. With a teacher (the LLM's title model) the student
also matches the teacher's full next-token distribution at every title position (token-level distillation):
a router can only keep the SLM's tokens where they are the LLM's, so agreement with the LLM, not with the
reference title, is what a client SLM needs. Test metrics are the token loss, the share of title tokens
whose greedy prediction is right (teacher-forced) and, with a teacher, the share that is the teacher's
greedy token; a generated title's quality against the reference is scored in the generation run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import BertLMHeadModel

from fedhlm.maths.distill import distill_kl
from fedhlm.models.classifier import Batch, NextTokenClassifier
from fedhlm.models.teacher import FrozenTeacher


def title_logits(model: torch.nn.Module, batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits [N, V] at the N positions ``mask`` [B, L-1] marks (those that predict a title token).

    Only these go through a BERT decoder's vocabulary projection (over every prompt position it would cost
    as much as the rest of the step)."""
    if isinstance(model, BertLMHeadModel):
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return model.cls(hidden[:, :-1][mask])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]


class TitleLM(NextTokenClassifier):
    """A title-generation LM; arguments as :class:`~fedhlm.models.classifier.NextTokenClassifier`
    (generation needs ``prompt_attention: causal``, the default of a new or a converted model), and:

    Args:
        teacher: the LLM title model to distil from (a folder or ``cache:<name>``; in a fit config
            ``config:<its fit YAML>``, trained first when missing); None = no distillation.
        distill_weight: weight of the distillation term (0 = off; the reference titles' cross-entropy
            always counts with weight 1).
        distill_temperature: temperature of both softmaxes of the distillation term.
    """

    def __init__(self, *args: Any, teacher: str | None = None, distill_weight: float = 0.0,
                 distill_temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if distill_weight > 0 and teacher is None:
            raise ValueError("model.distill_weight > 0 needs model.teacher (the LLM title model to distil from)")
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self._teacher = FrozenTeacher(teacher)

    def set_teacher(self, model: torch.nn.Module | None) -> None:
        """Attach an LLM title model (a HF causal LM) to distil from; it is never trained or saved."""
        self._teacher.set(model)

    def _token_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """ce (the reference titles' cross-entropy over the labelled positions), right (share predicted right)
        and, with a teacher, kl (the distillation term, before its weight) and agree (share whose greedy token
        is the teacher's)."""
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logits = title_logits(self.model, batch, mask)
        targets = labels[mask]
        out = {"ce": F.cross_entropy(logits.float(), targets),
               "right": (logits.argmax(dim=-1) == targets).float().mean()}
        teacher = self._teacher.on(self.device)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = title_logits(teacher, batch, mask)
            out["kl"] = distill_kl(logits, teacher_logits, self.distill_temperature)
            out["agree"] = (logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float().mean()
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self._token_loss(batch)
        loss = out["ce"] + self.distill_weight * out["kl"] if self.distill_weight > 0 else out["ce"]
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _evaluate(self, batch: Batch, metrics: Any, prefix: str) -> None:
        out = self._token_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log(f"{prefix}loss", out["ce"], prog_bar=True, batch_size=size)
        self.log(f"{prefix}token_acc", out["right"], prog_bar=True, batch_size=size)
        if "agree" in out:
            self.log(f"{prefix}teacher_agree", out["agree"], prog_bar=True, batch_size=size)
