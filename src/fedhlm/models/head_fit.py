"""HeadModule: the threshold head alone as a LightningModule - the one place a head is trained.

A federated client trains only its head, on the (features, beta) pairs its LLM verdicts
gave it; it needs neither the SLM's weights nor a copy of them per client. `fit_head` runs
the module's `training_step` with the module's own optimiser (`OPTIMIZERS`) through a fit
engine (`FIT_ENGINES`): `LoopEngine` (`"loop"`, the default: a plain loop, ~1 ms a fit) or
`TrainerEngine` (`"trainer"`: the same steps and result through a quiet Lightning Trainer,
~8 ms a fit). A thousand simulated clients fit their heads every round, hence the loop.
Either way one fit runs at a time per process.

`CentralHeadModule` is the centralised reference that federated training is compared with
(`fedhlm fit --config configs/head.yaml`): the same head and loss, its pairs computed on
the fly from prompt batches by the frozen SLM and the teacher LLM's verdicts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from fedhlm.core.settings import RoutingSettings
from fedhlm.maths.route_features import feature_set
from fedhlm.maths.speculative import VerifyMode, verify_batch
from fedhlm.maths.threshold import HeadMode, ThresholdHead, annealed_temperature, routing_loss
from fedhlm.data.task import DEFAULT_TASK
from fedhlm.models.classifier import Batch
from fedhlm.models.slm import SLMModule

# name -> factory(params, lr=...) of the head's optimiser
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    # plain gradient steps: FedAvg of a few small local steps then follows the pooled loss's gradient,
    # so the federated threshold converges to the central optimum (Adam's sign-like steps vote instead)
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}

# Threads of one simulation take turns to fit: Lightning's Trainer touches process-wide state
# (loggers, seeds, warnings), and a thousand threads interleaving tiny torch ops thrash on the
# GIL (a 1 ms fit took seconds). One fit at a time is a millisecond of maths each.
_FIT_LOCK = threading.Lock()

class HeadModule(LightningModule):
    """Fits a ThresholdHead on the routing loss L = mean((1 - s) beta) + lam mean(s)."""

    def __init__(self, head: ThresholdHead, lam: float = 0.1, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.head = head
        self.lam = lam
        self.lr = lr
        self.make_optimizer = OPTIMIZERS[optimizer]

    def loss(self, features: torch.Tensor, beta: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return routing_loss(self.head(features), beta, self.lam, weights)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """batch: (features, beta) or (features, beta, weights)."""
        return self.loss(*batch)  # not self.log-ged: logging costs as much as the step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer([p for p in self.head.parameters() if p.requires_grad], lr=self.lr)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's banners and the expected warnings of tiny fits."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(val_dataloader|eval mode|LeafSpec|max_steps|num_workers|bottleneck).*")
            yield
    finally:
        logger.setLevel(level)


class Engine(Protocol):
    """Runs `steps` optimiser steps of `module.training_step` on one full batch."""

    def fit(self, module: HeadModule, batch: tuple[torch.Tensor, ...], steps: int) -> None: ...


class LoopEngine:
    """The module's own `training_step` and `configure_optimizers`, stepped without a Trainer."""

    def fit(self, module: HeadModule, batch: tuple[torch.Tensor, ...], steps: int) -> None:
        optimizer = module.configure_optimizers()
        module.train()
        for step in range(steps):
            optimizer.zero_grad()
            module.training_step(batch, step).backward()
            optimizer.step()


class TrainerEngine:
    """The same steps through a quiet Lightning Trainer: one epoch of `steps` full batches (no per-epoch overhead)."""

    def fit(self, module: HeadModule, batch: tuple[torch.Tensor, ...], steps: int) -> None:
        with quiet_lightning():
            trainer = Trainer(
                max_steps=steps, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0,
            )
            trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))


FIT_ENGINES: dict[str, type[Engine]] = {"loop": LoopEngine, "trainer": TrainerEngine}


def fit_engine(engine: str | Engine) -> Engine:
    """The engine registered as `engine` in `FIT_ENGINES` (an engine object is returned as it is)."""
    if not isinstance(engine, str):
        return engine
    if engine not in FIT_ENGINES:
        raise ValueError(f"engine must be one of {tuple(FIT_ENGINES)}, got {engine!r}")
    return FIT_ENGINES[engine]()


def fit_head(
    head: ThresholdHead,
    features: torch.Tensor,
    beta: torch.Tensor,
    *,
    lam: float,
    steps: int = 30,
    lr: float = 0.05,
    optimizer: str = "sgd",
    engine: str | Engine = "loop",
    weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """Full-batch fit of `head` in place on the (weighted) routing loss; returns loss before/after, tau and seconds."""
    engine = fit_engine(engine)
    if features.ndim != 2 or features.shape[0] != beta.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need [N, F] features and [N] beta with N > 0, got {tuple(features.shape)} and {tuple(beta.shape)}")
    module = HeadModule(head, lam=lam, lr=lr, optimizer=optimizer)
    feats, beta = features.float(), beta.float()
    batch = (feats, beta) if weights is None else (feats, beta, weights.float())
    with torch.no_grad():
        before = float(module.loss(*batch))
    start = time.perf_counter()
    if steps > 0:
        with _FIT_LOCK:
            engine.fit(module, batch, steps)
    with torch.no_grad():
        after = float(module.loss(*batch))
    return {"loss_before": before, "loss_after": after, "tau": head.effective_tau(),
            "seconds": time.perf_counter() - start}


def routing_head(routing: RoutingSettings, tau: float, seed: int = 0) -> ThresholdHead:
    """The head `routing` asks for (mode, feature count), starting at the entropy threshold tau.

    Seeded: every role of a run builds the same initial head (an mlp's random first layer included),
    so the heads FedAvg averages all started from one model, as the round-0 global model.
    """
    num_features = feature_set(routing.features, routing.hidden_dim).num_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ThresholdHead(mode=routing.head, num_features=num_features, tau=tau, temperature=routing.temperature,
                             hidden=routing.head_hidden)


# how a head is fitted on pooled pairs (the round-0 warm start on the calibration split, the central reference
# on the run's pairs): full batch, Adam, from the head's start; `steps` is the caller's
POOLED_FIT_LR = 0.02


def fit_pooled(head: ThresholdHead, features: np.ndarray, beta: np.ndarray, *, lam: float, steps: int,
               weights: np.ndarray | None = None) -> dict[str, float]:
    """`head` fitted in place on all of `features`/`beta` at once (Adam, `POOLED_FIT_LR`): what a server holding
    every pair would fit. The federated head is judged against this; a simulation's round-0 head is this fit on
    the calibration split."""
    w = None if weights is None else torch.from_numpy(np.asarray(weights, np.float32))
    return fit_head(head, torch.from_numpy(np.asarray(features, np.float32)),
                    torch.from_numpy(np.asarray(beta, np.float32)), lam=lam, steps=steps, lr=POOLED_FIT_LR,
                    optimizer="adam", weights=w)


def warm_head_params(routing: RoutingSettings, tau: float, seed: int, features: np.ndarray | None,
                     beta: np.ndarray | None) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
    """The round-0 head of a simulation and how it was fitted (None: not fitted).

    The scalar head is U-HLM's calibrated threshold `tau`. A linear or mlp head is fitted on the calibration
    pairs (every one labelled, so unweighted) for `routing.warm_fit_steps` steps from the entropy unit vector at
    `tau`, then brought to unit |w| (`unit_scale`). Measured on the paper setting with the quick pair (linear
    head, label features): the federated head's pooled hard routing loss 2.7 % above the central fit's, the
    lowest of the three starts (entropy unit vector 2.5 % above a higher optimum; the fitted head left steep,
    27 % above).
    """
    head = routing_head(routing, tau, seed)
    fitted = None
    if routing.head != "scalar" and routing.warm_fit_steps > 0 and features is not None and len(features):
        fitted = {**fit_pooled(head, features, beta, lam=routing.lam, steps=routing.warm_fit_steps),
                  "pairs": int(len(features)), "scale": unit_scale(head)}
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}, fitted


@torch.no_grad()
def unit_scale(head: ThresholdHead) -> float:
    """Divide a linear/mlp head's score and tau by |w| (returned): the same decisions, at the sigmoid steepness
    the entropy unit vector starts with. The routing loss rewards a larger scale (a steeper sigmoid, nearer the
    hard loss), so a fitted head comes out steep, and the clients' SGD steps on it overshoot."""
    scale = float(head.weight.norm())
    if scale > 0:
        head.weight.div_(scale)
        head.tau.div_(scale)
        if head.mode == "mlp":
            head.mlp[2].weight.div_(scale)
            head.mlp[2].bias.div_(scale)
    return scale


def initial_head_params(routing: RoutingSettings, seed: int = 0) -> dict[str, np.ndarray]:
    """The round-0 head of a process deployment as plain arrays (edges and the cloud check updates against it),
    at `routing.process_tau`, with the operating point's empty curve."""
    from fedhlm.core.operating_point import with_curve

    head = routing_head(routing, routing.process_tau, seed)
    return with_curve({k: v.detach().numpy() for k, v in head.state_dict().items()}, routing)


class TorchHead:
    """A ThresholdHead behind the numpy interface a client routes and learns through (`roles.client.RoutingHead`)."""

    def __init__(self, module: ThresholdHead, engine: str | Engine = "loop") -> None:
        self.module = module
        self.engine = fit_engine(engine)

    @property
    def tau(self) -> float:
        return float(self.module.tau.detach())

    def route(self, features: np.ndarray) -> bool:
        with torch.no_grad():
            return bool(self.module.route(torch.from_numpy(np.asarray(features, dtype=np.float32))))

    def effective_tau(self) -> float:
        return self.module.effective_tau()

    def params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float32).reshape(v.shape)
                for k, v in self.module.state_dict().items()}

    def trainable(self) -> list[str]:
        return [name for name, p in self.module.named_parameters() if p.requires_grad]

    def load(self, params: dict[str, np.ndarray]) -> None:
        own = self.module.state_dict()
        self.module.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)).reshape(own[k].shape)
                                     for k, v in params.items()})

    def fit(self, features: np.ndarray, beta: np.ndarray, *, lam: float, steps: int, lr: float,
            optimizer: str = "sgd", weights: np.ndarray | None = None) -> dict[str, float]:
        w = None if weights is None else torch.from_numpy(np.asarray(weights, np.float32))
        return fit_head(self.module, torch.from_numpy(np.asarray(features, np.float32)),
                        torch.from_numpy(np.asarray(beta, np.float32)), lam=lam, steps=steps, lr=lr,
                        optimizer=optimizer, engine=self.engine, weights=w)


class CentralHeadModule(HeadModule):
    """The centralised head fit: a frozen SLM and a teacher LLM label each prompt batch with (features, beta).

    The SLM's routing view of a prompt gives the features and the draft; the teacher's
    verdict on that draft (`verify_batch`, the LLM service's own maths) gives beta. Only the
    head trains; the SLM and the teacher stay frozen in eval mode (no dropout in the labels).
    Saved, the module is the SLM folder plus its trained head (``threshold_head.pt``).

    Args:
        pretrained: the SLM folder ("cache:slm" or a path); a head saved in it starts the fit.
        teacher: the LLM folder whose verdicts define beta.
        verify_mode: "sample" (beta = max(0, 1 - q(x)/p(x))) or "greedy" (beta = 1 iff x is not the LLM's argmax).
        head_mode: "scalar", "linear" or "mlp" (see ThresholdHead).
        tau: initial entropy threshold (nats, or units of log|V| with normalise_entropy).
        temperature: sigmoid temperature T of the head (steepness 1/T).
        learn_temperature: make T a parameter.
        head_hidden: hidden units of the mlp head.
        freeze_to_scalar: keep a linear/mlp head exactly the scalar head.
        anneal_to: anneal T geometrically towards this floor while training; None = fixed.
        anneal_decay: per-step factor of the annealing.
        lam: price of one transmission in the routing loss.
        lr: learning rate of the head.
        optimizer: a name in OPTIMIZERS.
        normalise_entropy, samples, sample_temperature, topk, draft, tokenizer, seed, task: the SLM's
            routing settings (see SLMModule); they decide the features and the draft.
    """

    def __init__(
        self,
        pretrained: str = "cache:slm",
        teacher: str = "cache:llm",
        verify_mode: VerifyMode = "sample",
        head_mode: HeadMode = "scalar",
        tau: float = 0.5,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        head_hidden: int = 8,
        freeze_to_scalar: bool = False,
        anneal_to: float | None = None,
        anneal_decay: float = 0.99,
        lam: float = 0.1,
        lr: float = 0.05,
        optimizer: str = "adam",
        normalise_entropy: bool = False,
        samples: int = 16,
        sample_temperature: float = 1.0,
        topk: int = 8,
        draft: Literal["greedy", "sample"] = "greedy",
        tokenizer: str | None = None,
        seed: int = 0,
        task: str = DEFAULT_TASK,
    ) -> None:
        slm = SLMModule(
            pretrained=pretrained, tokenizer=tokenizer, seed=seed, task=task, head_mode=head_mode, tau=tau,
            temperature=temperature, learn_temperature=learn_temperature, head_hidden=head_hidden,
            freeze_to_scalar=freeze_to_scalar, normalise_entropy=normalise_entropy, samples=samples,
            sample_temperature=sample_temperature, topk=topk, draft=draft, teacher=teacher,
        )
        super().__init__(slm.head, lam=lam, lr=lr, optimizer=optimizer)
        self.save_hyperparameters()
        slm.model.requires_grad_(False)
        self.slm = slm.eval()
        self.verify_mode: VerifyMode = verify_mode
        self.anneal = (temperature, anneal_to, anneal_decay) if anneal_to is not None else None

    def train(self, mode: bool = True) -> CentralHeadModule:
        """Lightning sets train mode on the whole module each epoch; the frozen SLM stays in eval mode."""
        super().train(mode)
        self.slm.eval()
        self.head.train(mode)
        return self

    @torch.no_grad()
    def head_pairs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, F], beta [B]) of a prompt batch: the SLM's routing view and the teacher's verdicts on its drafts."""
        view = self.slm.route_view(self.slm.next_logits(batch))
        q = torch.softmax(self.slm.teacher_logits(batch), dim=-1)
        verdicts = verify_batch(view["topk_ids"], view["topk_probs"], view["tail_mass"], q, view["draft_token"],
                                generator=self.slm.generator(q.device), mode=self.verify_mode)
        return view["features"], verdicts.beta

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.anneal is not None:
            start, end, decay = self.anneal
            self.head.set_temperature(annealed_temperature(self.global_step, start, end, decay))

    def _pairs_loss(self, batch: Batch, prefix: str) -> torch.Tensor:
        feats, beta = self.head_pairs(batch)
        loss = self.loss(feats, beta)
        n = beta.shape[0]
        self.log(f"{prefix}routing_loss", loss, prog_bar=True, batch_size=n)
        self.log(f"{prefix}offload_rate", self.head.route(feats).float().mean(), batch_size=n)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._pairs_loss(batch, "train_")
        self.log("tau", self.head.effective_tau(), batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._pairs_loss(batch, "val_")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._pairs_loss(batch, "test_")

    # ---- persistence: the SLM folder with its trained head ---------------------------------
    def save_pretrained(self, folder: str) -> str:
        saved = self.slm.save_pretrained(folder)
        self.slm.save_head(Path(saved))
        return saved

    def load_backbone(self, folder: str) -> None:
        """Load a saved fit (the SLM and its head) into this module."""
        self.slm.load_backbone(folder)

    def num_parameters(self) -> int:
        return self.slm.num_parameters()
