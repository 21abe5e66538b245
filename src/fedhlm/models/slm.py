"""SLMModule: the client's small language model plus the threshold head it routes with.

The module trains the language model only: cross-entropy on the verbaliser token,
optionally distilled from a teacher LLM's class distribution. The
:class:`~fedhlm.maths.threshold.ThresholdHead` it carries is trained elsewhere, always
through :class:`~fedhlm.models.head_fit.HeadModule` (a client's rounds, or the
centralised reference fit of ``configs/head.yaml``), and a saved head is loaded with the
model.

What :meth:`SLMModule.predict_step` routes is the SLM's *full* next-token distribution
(the paper's entropy is over the vocabulary; the top-k upload is of that distribution);
the class decision renormalises over the verbalisers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from fedhlm.data.task import DEFAULT_TASK
from fedhlm.models.classifier import Batch, NextTokenClassifier
from fedhlm.models.backbone import next_token_logits
from fedhlm.models.store import HEAD_FILE, resolve_model_path
from fedhlm.models.teacher import FrozenTeacher
from fedhlm.maths.distill import distill_kl
from fedhlm.maths.speculative import draft_from_topk, draft_distribution
from fedhlm.maths.threshold import HeadMode, ThresholdHead
from fedhlm.maths.uncertainty import FEATURE_NAMES, features as uncertainty_features, topk_compress

log = logging.getLogger(__name__)

# (probs [B, V], class draft [B], top-k ids [B, k], probs [B, k], tail [B], generator) -> (draft, ids, probs, tail)
DraftRule = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def greedy_draft(probs: torch.Tensor, class_draft: torch.Tensor, ids: torch.Tensor, top: torch.Tensor,
                 tail: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The class prediction's verbaliser. One the top-k misses (an untrained model can put more mass
    elsewhere) replaces the k-th entry, so the upload always holds the draft."""
    missing = ~(ids == class_draft.unsqueeze(-1)).any(dim=-1)
    if bool(missing.any()):
        ids, top = ids.clone(), top.clone()
        ids[missing, -1] = class_draft[missing]
        top[missing, -1] = probs[missing].gather(-1, class_draft[missing].unsqueeze(-1)).squeeze(-1)
        tail = (1.0 - top.sum(dim=-1)).clamp_min(0.0)
    return class_draft, ids, top, tail


def sampled_draft(probs: torch.Tensor, class_draft: torch.Tensor, ids: torch.Tensor, top: torch.Tensor,
                  tail: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A sample from the uploaded top-k (the distribution verification assumes)."""
    return draft_from_topk(ids, top, generator=generator), ids, top, tail


DRAFTS: dict[str, DraftRule] = {"greedy": greedy_draft, "sample": sampled_draft}


class SLMModule(NextTokenClassifier):
    """The SLM (a small HF causal LM), trained as a language model, and its :class:`~fedhlm.maths.threshold.ThresholdHead`.

    Args (besides those of :class:`~fedhlm.models.classifier.NextTokenClassifier`; a ``pretrained``
    folder saved after a head fit also carries the trained head, which then replaces the
    head arguments below):
        head_mode: "scalar", "linear" or "mlp" (see ThresholdHead).
        tau: initial entropy threshold (nats, or units of log|V| with normalise_entropy).
        temperature: sigmoid temperature T of the head (steepness 1/T).
        learn_temperature: make T a parameter.
        head_hidden: hidden units of the mlp head.
        freeze_to_scalar: keep a linear/mlp head exactly the scalar head.
        normalise_entropy: entropy feature divided by log|V|.
        samples: temperature samples of the sampling-based uncertainty (U-HLM).
        sample_temperature: their temperature.
        topk: entries of the distribution uploaded with an offloaded token.
        draft: "greedy" (class prediction) or "sample" (from the uploaded top-k); see DRAFTS.
        teacher: LLM folder to distil from (and whose verdicts label a central head fit); in a fit config,
            ``config:<llm YAML>`` names the cached LLM of that config (resolved before the module is built).
        distill_weight: weight of the distillation term (0 = off).
        distill_temperature: temperature of the distillation softmax.
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
        task: str = DEFAULT_TASK,
        lr_schedule: Literal["constant", "linear"] = "constant",
        head_mode: HeadMode = "scalar",
        tau: float = 0.5,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        head_hidden: int = 8,
        freeze_to_scalar: bool = False,
        normalise_entropy: bool = False,
        samples: int = 16,
        sample_temperature: float = 1.0,
        topk: int = 8,
        draft: Literal["greedy", "sample"] = "greedy",
        teacher: str | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 2.0,
    ) -> None:
        super().__init__(
            pretrained=pretrained, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            intermediate_size=intermediate_size, max_position=max_position, embeddings_from=embeddings_from,
            tokenizer=tokenizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed, task=task,
            lr_schedule=lr_schedule,
        )
        self.save_hyperparameters()
        if draft not in DRAFTS:
            raise ValueError(f"draft must be one of {tuple(DRAFTS)}, got {draft!r}")
        self.head = ThresholdHead(
            mode=head_mode, num_features=len(FEATURE_NAMES), tau=tau, temperature=temperature,
            learn_temperature=learn_temperature, hidden=head_hidden, freeze_to_scalar=freeze_to_scalar,
        )
        self.normalise_entropy = normalise_entropy
        self.samples = samples
        self.sample_temperature = sample_temperature
        self.topk = topk
        self.make_draft = DRAFTS[draft]
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self._teacher = FrozenTeacher(teacher)
        # the frozen teacher's class logits per training article (uid), computed on first sight: epochs after
        # the first cost no teacher forward pass (the teacher is in eval mode, so its logits do not change)
        self._teacher_memo: dict[int, torch.Tensor] = {}
        self._generator: torch.Generator | None = None
        if pretrained is not None:
            head_file = resolve_model_path(pretrained) / HEAD_FILE
            if head_file.is_file():
                self.load_head(head_file)

    # ---- the head's persistence ----------------------------------------------------------
    def load_head(self, path: str | Path) -> bool:
        """Load a saved head state (``threshold_head.pt``); False (logged) when it is for another head shape."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.head.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            log.warning("not loading %s: saved head keys %s do not fit this %s head", path, sorted(state), self.head.mode)
            return False
        self.head.load_state_dict(state)
        return True

    def save_head(self, folder: str | Path) -> Path:
        """Write the head's state as ``folder/threshold_head.pt`` (what ``pretrained=folder`` loads); only a
        trained head is worth saving, so :meth:`save_pretrained` leaves it out."""
        path = Path(folder) / HEAD_FILE
        torch.save({k: v.detach().cpu() for k, v in self.head.state_dict().items()}, path)
        return path

    def load_backbone(self, folder: str) -> None:
        """Replace the language model (and the head, when the folder holds one) by a saved fit."""
        super().load_backbone(folder)
        head_file = resolve_model_path(folder) / HEAD_FILE
        if head_file.is_file():
            self.load_head(head_file)

    # ---- routing view of a batch ------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The module's seeded generator on ``device``: sampled drafts and sampled features draw from it."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(int(self.hparams.seed))
        return self._generator

    def route_view(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the client needs to route B tokens, from their full next-token logits [B, V].

        The draft follows the ``draft`` rule (:data:`DRAFTS`); the upload always holds it.
        """
        gen = self.generator(logits.device)
        probs = torch.softmax(logits.float(), dim=-1)
        class_probs = torch.softmax(self.class_logits(logits).float(), dim=-1)
        class_pred = class_probs.argmax(dim=-1)
        ids, top, tail = topk_compress(probs, self.topk)
        draft, ids, top, tail = self.make_draft(probs, self._verbalisers[class_pred], ids, top, tail, gen)
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

    # ---- the teacher ---------------------------------------------------------------------
    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher.on(self.device)

    def set_teacher(self, model: torch.nn.Module | None) -> None:
        """Attach an LLM (a HF causal LM) to distil from; it is never trained or saved."""
        self._teacher_memo.clear()
        self._teacher.set(model)

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's full next-token logits [B, V] (float32, no autograd)."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("this needs a teacher LLM: pass teacher=<folder> or call set_teacher")
        with torch.no_grad():
            return next_token_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["last_index"]).float()

    def teacher_class_logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's class logits [B, C] of a training batch, from the memo where every uid is known."""
        uids = batch["uid"].tolist() if "uid" in batch else None
        if uids is not None and all(u in self._teacher_memo for u in uids):
            return torch.stack([self._teacher_memo[u] for u in uids]).to(self.device)
        out = self.class_logits(self.teacher_logits(batch))
        if uids is not None:
            self._teacher_memo.update({u: row.detach().cpu() for u, row in zip(uids, out)})
        return out

    # ---- training: the language model ------------------------------------------------------
    def lm_target_loss(self, batch: Batch) -> torch.Tensor:
        """CE on the verbaliser token (+ distillation of the teacher's class distribution)."""
        logits = self.next_logits(batch)
        loss = self.lm_loss(logits, batch["labels"])
        if self.distill_weight > 0:
            kl = distill_kl(self.class_logits(logits), self.teacher_class_logits(batch), self.distill_temperature)
            loss = loss + self.distill_weight * kl
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.lm_target_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def on_fit_start(self) -> None:
        self._teacher_memo.clear()  # uids name articles of one training split
        # Unlike the LLM, the SLM is not reseeded here: building its backbone seeded the generator
        # (BackboneSpec.seed) on both the CLI and get_or_train paths, and the cached SLMs were trained from that state.
        pass
