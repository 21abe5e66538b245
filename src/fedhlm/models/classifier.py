"""NextTokenClassifier: what the SLM and the LLM share - a causal LM that classifies by its next token.

A prompt ``[CLS] article topic :`` is classified by the next-token distribution after
":"; training is cross-entropy over the *full vocabulary* on the verbaliser token of the
true class, so the model learns to put its mass on the task's verbalisers (what is routed
and verified is the full next-token distribution). The class decision renormalises the
next-token probabilities over the verbalisers (mass elsewhere is ignored, not given to
any class). :class:`~fedhlm.models.slm.SLMModule` and :class:`~fedhlm.models.llm.LLMRefiner` subclass
this and add the routing head and the verification respectively.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassF1Score

from fedhlm.data import DEFAULT_TASK, load_task, load_tokenizer, verbaliser_token_ids
from fedhlm.models.backbone import (
    BackboneSpec,
    build_backbone,
    count_parameters,
    load_causal_lm,
    next_token_logits,
    save_model,
)

Batch = dict[str, torch.Tensor]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then constant (total 0) or linear to 0 at ``total``."""
    factor = min(1.0, (step + 1) / max(warmup, 1))
    if total > 0:
        factor *= max(0.0, 1.0 - step / total)
    return factor


class NextTokenClassifier(LightningModule):
    """A Hugging Face causal LM plus the verbaliser bookkeeping, the LM-target loss and the metrics.

    Args:
        pretrained: model folder to load ("minilm", "cache:<name>" or a path); None builds
            a random BERT decoder of the size below.
        hidden_size: width of the random decoder.
        num_layers: its transformer layers.
        num_heads: its attention heads.
        intermediate_size: its feed-forward width.
        max_position: its longest sequence.
        embeddings_from: start the random decoder's embeddings from this model's (PCA); None = random.
        tokenizer: tokenizer folder; None = the bundled MiniLM's (shared by SLM and LLM).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps of the learning rate.
        lr_schedule: after warm-up, "constant" or "linear" decay to 0 at the last step of the fit.
        prompt_attention: "causal" or "bidirectional" (a prefix LM over the prompt, as the pretrained
            encoder read text; no multi-token KV sessions); None keeps a loaded model's (causal when new).
        seed: seeds the random decoder, and the random generator when training starts (dropout).
        task: the task whose verbalisers are the classes (a shipped name or a task YAML); the
            fit configs take it from ``data.task``, its one source.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int = 512,
        max_position: int = 128,
        embeddings_from: str | None = "minilm",
        tokenizer: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        seed: int = 0,
        task: str = DEFAULT_TASK,
        lr_schedule: Literal["constant", "linear"] = "constant",
        prompt_attention: Literal["causal", "bidirectional"] | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "linear"):
            raise ValueError(f"model.lr_schedule: must be 'constant' or 'linear', got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.task = load_task(task)
        self.lr = lr
        self._seed = seed
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.tokenizer = load_tokenizer(tokenizer)
        self.verbaliser_ids: list[int] = verbaliser_token_ids(self.tokenizer, self.task)
        self.register_buffer("_verbalisers", torch.tensor(self.verbaliser_ids, dtype=torch.long), persistent=False)
        spec = BackboneSpec(
            pretrained=pretrained, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            intermediate_size=intermediate_size, max_position=max_position, embeddings_from=embeddings_from, seed=seed,
            prompt_attention=prompt_attention,
        )
        pad = self.tokenizer.pad_token_id or 0
        # from_pretrained returns eval mode, which Lightning would keep during fit (no dropout)
        self.model = build_backbone(spec, vocab_size=len(self.tokenizer), pad_token_id=pad).train()
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=self.task.num_classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes=self.task.num_classes, average="macro"),
                "ece": MulticlassCalibrationError(num_classes=self.task.num_classes, n_bins=15),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    # ---- the model's view of a prompt batch -------------------------------------------
    def next_logits(self, batch: Batch) -> torch.Tensor:
        """Full-vocabulary logits [B, V] of the token after each prompt."""
        return next_token_logits(self.model, batch["input_ids"], batch["attention_mask"], batch["last_index"])

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The verbaliser columns [B, C] of next-token logits; softmax renormalises over them."""
        return logits.index_select(-1, self._verbalisers)

    def class_of_token(self, token: torch.Tensor) -> torch.Tensor:
        """Class index of each token id, -1 for a token that is no verbaliser."""
        match = token.unsqueeze(-1) == self._verbalisers
        return torch.where(match.any(dim=-1), match.long().argmax(dim=-1), torch.full_like(token, -1))

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary cross-entropy on the true class's verbaliser token."""
        return F.cross_entropy(logits.float(), self._verbalisers[labels])

    @torch.no_grad()
    def classify(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(class prediction [B], class distribution [B, C]) in eval mode."""
        with self.serving():
            probs = torch.softmax(self.class_logits(self.next_logits(batch)).float(), dim=-1)
        return probs.argmax(dim=-1), probs

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Eval mode and no autograd for inference calls made outside a Trainer (dropout off)."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    # ---- Lightning hooks ---------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(self.next_logits(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _evaluate(self, batch: Batch, metrics: MetricCollection, prefix: str) -> None:
        logits = self.next_logits(batch)
        labels = batch["labels"]
        self.log(f"{prefix}loss", self.lm_loss(logits, labels), batch_size=labels.shape[0])
        metrics.update(torch.softmax(self.class_logits(logits).float(), dim=-1), labels)
        self.log_dict(metrics, prog_bar=True, batch_size=labels.shape[0])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val_")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test_")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates; subclasses narrow it (the SLM's head target)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def on_fit_start(self) -> None:
        # Dropout draws from the global generator. The CLI seeds it before building the model, get_or_train
        # does not, and a pretrained start does not reseed it: without this the two paths, which name the
        # same cache folder, trained different LLMs (87.6 % vs 89.0 % test accuracy).
        torch.manual_seed(self._seed)

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)
        if self.warmup_steps <= 0 and self.lr_schedule == "constant":
            return optimizer
        warm = max(self.warmup_steps, 1)
        total = int(self.trainer.estimated_stepping_batches) if self.lr_schedule == "linear" else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warm, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- persistence ---------------------------------------------------------------------
    def save_pretrained(self, folder: str) -> str:
        """Write the HF model and the tokenizer, loadable later with ``pretrained=folder``."""
        return str(save_model(self.model, folder, self.tokenizer))

    def load_backbone(self, folder: str) -> None:
        """Replace the language model by the one saved in ``folder`` (e.g. a cached fit)."""
        model = load_causal_lm(folder)
        if model.get_input_embeddings().weight.shape[0] < len(self.tokenizer):
            raise ValueError(f"{folder}: vocabulary smaller than the tokenizer's {len(self.tokenizer)}")
        self.model = model.to(self.device).train(self.training)

    def num_parameters(self) -> int:
        """Parameters of the language model (tied embeddings counted once)."""
        return count_parameters(self.model)
