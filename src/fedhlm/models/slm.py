"""SLMModule: the client's small language model plus its threshold head.

Two training targets share one module. ``fit_target="lm"`` trains the language model
(cross-entropy on the verbaliser token, optionally distilled from the LLM's class
distribution). ``fit_target="head"`` freezes the language model and fits the threshold
head on the routing loss over (features, beta) pairs - the pairs a federated client has
collected from the LLM's verdicts, or computed on the fly from prompt batches when a
``teacher`` LLM is given (the centralised reference). :meth:`SLMModule.fit_head` is the
one-call path a client uses every round.

What :meth:`SLMModule.predict_step` routes is the SLM's *full* next-token distribution
(the paper's entropy is over the vocabulary; the top-k upload is of that distribution);
the class decision renormalises over the verbalisers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from fedhlm.models.classifier import Batch, NextTokenClassifier
from fedhlm.models.head_fit import quiet_lightning
from fedhlm.models.backbone import load_causal_lm, next_token_logits
from fedhlm.models.store import HEAD_FILE, resolve_model_path
from fedhlm.maths.speculative import VerifyMode, draft_from_topk, draft_distribution, rejection_probability
from fedhlm.maths.threshold import HeadMode, ThresholdHead, annealed_temperature, routing_loss
from fedhlm.maths.uncertainty import FEATURE_NAMES, features as uncertainty_features, topk_compress

log = logging.getLogger(__name__)

FitTarget = Literal["lm", "head"]


class SLMModule(NextTokenClassifier):
    """The SLM (a small HF causal LM) and its :class:`~fedhlm.maths.threshold.ThresholdHead`.

    Args (besides those of :class:`~fedhlm.models.classifier.NextTokenClassifier`; a ``pretrained``
    folder saved after a head fit also carries the trained head, which then replaces the
    head arguments below):
        fit_target: "lm" trains the language model; "head" freezes it and trains the head.
        head_mode: "scalar", "linear" or "mlp" (see ThresholdHead).
        tau: initial entropy threshold (nats, or units of log|V| with normalise_entropy).
        temperature: sigmoid temperature T of the head (steepness 1/T).
        learn_temperature: make T a parameter.
        anneal_to: anneal T geometrically towards this floor during head training; None = fixed.
        anneal_decay: per-step factor of the annealing.
        head_hidden: hidden units of the mlp head.
        freeze_to_scalar: keep a linear/mlp head exactly the scalar head.
        lam: price of one transmission in the routing loss.
        head_lr: Adam learning rate of the head.
        normalise_entropy: entropy feature divided by log|V|.
        samples: temperature samples of the sampling-based uncertainty (U-HLM).
        sample_temperature: their temperature.
        topk: entries of the distribution uploaded with an offloaded token.
        draft: "greedy" (class prediction) or "sample" (from the uploaded top-k).
        teacher: LLM folder for distillation ("lm") and for beta labels from prompts ("head").
        distill_weight: weight of the distillation term (0 = off).
        distill_temperature: temperature of the distillation softmax.
        verify_mode: how beta is defined from the teacher: "sample" (speculative) or "greedy".
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
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        seed: int = 0,
        fit_target: FitTarget = "lm",
        head_mode: HeadMode = "scalar",
        tau: float = 0.5,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        anneal_to: float | None = None,
        anneal_decay: float = 0.99,
        head_hidden: int = 8,
        freeze_to_scalar: bool = False,
        lam: float = 0.1,
        head_lr: float = 0.05,
        normalise_entropy: bool = False,
        samples: int = 16,
        sample_temperature: float = 1.0,
        topk: int = 8,
        draft: Literal["greedy", "sample"] = "greedy",
        teacher: str | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 2.0,
        verify_mode: VerifyMode = "sample",
    ) -> None:
        super().__init__(
            pretrained=pretrained, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            intermediate_size=intermediate_size, max_position=max_position, embeddings_from=embeddings_from,
            tokenizer=tokenizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed,
        )
        self.save_hyperparameters()
        if fit_target not in ("lm", "head"):
            raise ValueError(f"fit_target must be 'lm' or 'head', got {fit_target!r}")
        if draft not in ("greedy", "sample"):
            raise ValueError(f"draft must be 'greedy' or 'sample', got {draft!r}")
        self.head = ThresholdHead(
            mode=head_mode, num_features=len(FEATURE_NAMES), tau=tau, temperature=temperature,
            learn_temperature=learn_temperature, hidden=head_hidden, freeze_to_scalar=freeze_to_scalar,
        )
        self.fit_target: FitTarget = fit_target
        self.lam = lam
        self.head_lr = head_lr
        self.anneal = (temperature, anneal_to, anneal_decay) if anneal_to is not None else None
        self.normalise_entropy = normalise_entropy
        self.samples = samples
        self.sample_temperature = sample_temperature
        self.topk = topk
        self.draft = draft
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.verify_mode: VerifyMode = verify_mode
        self._aux: dict[str, Any] = {}  # unregistered: the teacher is neither trained nor checkpointed
        if teacher is not None:
            teacher_model = load_causal_lm(teacher)
            teacher_model.eval().requires_grad_(False)
            self._aux["teacher"] = teacher_model
        self._generator: torch.Generator | None = None
        self._log_head_steps = True
        if pretrained is not None:
            head_file = resolve_model_path(pretrained) / HEAD_FILE
            if head_file.is_file():
                self.load_head(head_file)

    def load_head(self, path: str | Path) -> bool:
        """Load a saved head state (``threshold_head.pt``); False (logged) when it is for another head shape."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.head.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            log.warning("not loading %s: saved head keys %s do not fit this %s head", path, sorted(state), self.head.mode)
            return False
        self.head.load_state_dict(state)
        return True

    def load_backbone(self, folder: str) -> None:
        """Replace the language model (and the head, when the folder holds one) by a saved fit."""
        super().load_backbone(folder)
        head_file = resolve_model_path(folder) / HEAD_FILE
        if head_file.is_file():
            self.load_head(head_file)

    # ---- routing view of a batch ------------------------------------------------------
    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(int(self.hparams.seed))
        return self._generator

    def route_view(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the client needs to route B tokens, from their full next-token logits [B, V].

        The draft is the class prediction (greedy over the verbalisers) or a sample from
        the uploaded top-k; a greedy draft missing from the top-k (an untrained model can
        put more mass elsewhere) replaces the k-th entry, so the upload always holds it.
        """
        gen = self._gen(logits.device)
        probs = torch.softmax(logits.float(), dim=-1)
        class_probs = torch.softmax(self.class_logits(logits).float(), dim=-1)
        class_pred = class_probs.argmax(dim=-1)
        ids, top, tail = topk_compress(probs, self.topk)
        if self.draft == "greedy":
            draft = self._verbalisers[class_pred]
            missing = ~(ids == draft.unsqueeze(-1)).any(dim=-1)
            if bool(missing.any()):
                ids, top = ids.clone(), top.clone()
                ids[missing, -1] = draft[missing]
                top[missing, -1] = probs[missing].gather(-1, draft[missing].unsqueeze(-1)).squeeze(-1)
                tail = (1.0 - top.sum(dim=-1)).clamp_min(0.0)
        else:
            draft = draft_from_topk(ids, top, generator=gen)
        feats = uncertainty_features(
            logits, normalise_entropy=self.normalise_entropy, samples=self.samples,
            temperature=self.sample_temperature, generator=gen,
        )
        p_draft = draft_distribution(ids, top, probs.shape[-1]).gather(-1, draft.unsqueeze(-1)).squeeze(-1)
        return {
            "draft_token": draft,
            "class_pred": class_pred,
            "class_probs": class_probs,
            "topk_ids": ids,
            "topk_probs": top,
            "tail_mass": tail,
            "p_draft": p_draft,
            "features": feats,
            "route_prob": self.head(feats),
            "route": self.head.route(feats),
        }

    def predict_step(self, batch: Batch, batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per input: draft token, class prediction and distribution, top-k ids/probs + tail mass,
        p'(draft), uncertainty features (order: FEATURE_NAMES), routing probability s and the
        hard route decision; ``labels``/``uid`` are passed through when present."""
        out = self.route_view(self.next_logits(batch))
        for key in ("labels", "uid"):
            if key in batch:
                out[key] = batch[key]
        return out

    @torch.no_grad()
    def route_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """predict_step in eval mode, outside a Trainer (what a client calls)."""
        with self.serving():
            return self.predict_step(batch)

    # ---- training ----------------------------------------------------------------------
    @property
    def teacher(self) -> torch.nn.Module | None:
        teacher = self._aux.get("teacher")
        if teacher is not None and next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        return teacher

    def set_teacher(self, model: torch.nn.Module | None) -> None:
        """Attach an LLM (a HF causal LM) for distillation / beta labels; it is never trained or saved."""
        if model is None:
            self._aux.pop("teacher", None)
        else:
            self._aux["teacher"] = model.eval().requires_grad_(False)

    def _teacher_logits(self, batch: Batch) -> torch.Tensor:
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("this needs a teacher LLM: pass teacher=<folder> or call set_teacher")
        with torch.no_grad():
            return next_token_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["last_index"]).float()

    def lm_target_loss(self, batch: Batch) -> torch.Tensor:
        """CE on the verbaliser token (+ distillation of the teacher's class distribution)."""
        logits = self.next_logits(batch)
        loss = self.lm_loss(logits, batch["labels"])
        if self.distill_weight > 0:
            t = self.distill_temperature
            student = F.log_softmax(self.class_logits(logits).float() / t, dim=-1)
            target = F.softmax(self.class_logits(self._teacher_logits(batch)) / t, dim=-1)
            loss = loss + self.distill_weight * (t * t) * F.kl_div(student, target, reduction="batchmean")
        return loss

    @torch.no_grad()
    def head_pairs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, beta) of a prompt batch: frozen SLM view + the teacher's verdict probability."""
        was_training = self.model.training
        self.model.eval()
        try:
            view = self.route_view(self.next_logits(batch))
        finally:
            self.model.train(was_training)
        q = torch.softmax(self._teacher_logits(batch), dim=-1)
        if self.verify_mode == "greedy":
            q = F.one_hot(q.argmax(dim=-1), q.shape[-1]).float()
        q_draft = q.gather(-1, view["draft_token"].unsqueeze(-1)).squeeze(-1)
        return view["features"], rejection_probability(view["p_draft"], q_draft)

    def head_loss(self, feats: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return routing_loss(self.head(feats), beta.float(), self.lam)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.fit_target == "head" and self.anneal is not None:
            start, end, decay = self.anneal
            self.head.set_temperature(annealed_temperature(self.global_step, start, end, decay))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fit_target == "lm":
            loss = self.lm_target_loss(batch)
            self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
            return loss
        if isinstance(batch, (tuple, list)):
            feats, beta = batch
        else:
            feats, beta = self.head_pairs(batch)
        loss = self.head_loss(feats, beta)
        if self._log_head_steps:  # fit_head turns this off: self.log is half the cost of a head step
            self.log("train_routing_loss", loss, prog_bar=True, batch_size=beta.shape[0])
            self.log("tau", self.head.effective_tau(), batch_size=beta.shape[0])
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.fit_target == "head" and self.teacher is not None:
            feats, beta = self.head_pairs(batch)
            self.log("val_routing_loss", self.head_loss(feats, beta), batch_size=beta.shape[0])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.fit_target == "head":
            return [p for p in self.head.parameters() if p.requires_grad]
        return super().trainable_parameters()

    def configure_optimizers(self) -> Any:
        if self.fit_target == "head":
            return torch.optim.Adam(self.trainable_parameters(), lr=self.head_lr)
        return super().configure_optimizers()

    def on_fit_start(self) -> None:
        frozen = self.fit_target == "head"
        self.model.requires_grad_(not frozen)
        if frozen:
            self.model.eval()

    def on_train_epoch_start(self) -> None:
        if self.fit_target == "head":
            self.model.eval()  # Lightning sets train mode on the whole module each epoch

    # ---- the federated client's path -----------------------------------------------------
    def fit_head(
        self,
        features: torch.Tensor,
        beta: torch.Tensor,
        lam: float | None = None,
        steps: int = 30,
        batch_size: int | None = None,
        lr: float | None = None,
    ) -> dict[str, float]:
        """Fit the head on recorded (features [N, F], beta [N]) with a quiet Lightning Trainer.

        Full-batch by default (a client holds few pairs). Returns the routing loss before
        and after, the effective tau and the wall time. The language model is untouched.
        """
        if features.shape[0] != beta.shape[0] or features.shape[0] == 0:
            raise ValueError(f"need as many (>0) feature rows as beta values, got {features.shape[0]} and {beta.shape[0]}")
        saved = (self.fit_target, self.lam, self.head_lr)
        self.fit_target, self._log_head_steps = "head", False
        self.lam = self.lam if lam is None else lam
        self.head_lr = self.head_lr if lr is None else lr
        feats, beta = features.float().cpu(), beta.float().cpu()
        try:
            with torch.no_grad():
                before = float(self.head_loss(feats.to(self.device), beta.to(self.device)))
            start = time.perf_counter()
            with quiet_lightning():
                trainer = Trainer(
                max_steps=steps, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                    enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0,
                )
                loader = head_dataloader(feats, beta, batch_size or feats.shape[0], steps=steps)
                trainer.fit(self, train_dataloaders=loader)
            elapsed = time.perf_counter() - start
            with torch.no_grad():
                after = float(self.head_loss(feats.to(self.device), beta.to(self.device)))
        finally:
            self.fit_target, self.lam, self.head_lr = saved
            self._log_head_steps = True
            self.model.requires_grad_(True)
        return {"loss_before": before, "loss_after": after, "tau": self.head.effective_tau(), "seconds": elapsed}


def head_dataloader(
    features: torch.Tensor, beta: torch.Tensor, batch_size: int, steps: int | None = None, seed: int = 0
) -> DataLoader:
    """(features [b, F], beta [b]) batches for the head target.

    With ``steps`` the loader yields exactly that many batches (reshuffling each pass),
    so a Trainer with ``max_steps=steps`` runs one epoch instead of paying the per-epoch
    overhead once per step when the pairs fit in one batch.
    """
    features, beta = features.float(), beta.float()
    if steps is None:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(features, beta), batch_size=batch_size, shuffle=True, generator=generator)
    n = features.shape[0]
    generator = torch.Generator().manual_seed(seed)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator) if batch_size < n else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batches.append((features[idx], beta[idx]))
            if len(batches) == steps:
                break
    return DataLoader(batches, batch_size=None)
