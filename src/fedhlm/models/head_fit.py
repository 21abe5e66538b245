"""HeadModule: the threshold head alone as a LightningModule, for a client's local training each round.

A federated client trains only its head, on the (features, beta) pairs its LLM verdicts
gave it; it needs neither the SLM's weights nor a copy of them per client. `fit_head` runs
the module's `training_step` with the module's own optimiser, either in a plain loop
(`engine="loop"`, the default: ~1 ms a fit) or through a quiet Lightning Trainer
(`engine="trainer"`: the same steps and result, ~8 ms a fit, one fit at a time per
process). A thousand simulated clients fit their heads every round, hence the loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from fedhlm.maths.threshold import ThresholdHead, routing_loss

OPTIMIZERS = ("sgd", "adam")
FIT_ENGINES = ("loop", "trainer")

# Threads of one simulation take turns to fit: Lightning's Trainer touches process-wide state
# (loggers, seeds, warnings), and a thousand threads interleaving tiny torch ops thrash on the
# GIL (a 1 ms fit took seconds). One fit at a time is a millisecond of maths each.
_FIT_LOCK = threading.Lock()


class HeadModule(LightningModule):
    """Fits a ThresholdHead on the routing loss L = mean((1 - s) beta) + lam mean(s)."""

    def __init__(self, head: ThresholdHead, lam: float = 0.1, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.head = head
        self.lam = lam
        self.lr = lr
        self.optimizer = optimizer

    def loss(self, features: torch.Tensor, beta: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return routing_loss(self.head(features), beta, self.lam, weights)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """batch: (features, beta) or (features, beta, weights)."""
        return self.loss(*batch)  # not self.log-ged: logging costs as much as the step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.head.parameters() if p.requires_grad]
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        # plain gradient steps: FedAvg of a few small local steps then follows the pooled loss's gradient,
        # so the federated threshold converges to the central optimum (Adam's sign-like steps vote instead)
        return torch.optim.SGD(params, lr=self.lr)


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


def fit_head(
    head: ThresholdHead,
    features: torch.Tensor,
    beta: torch.Tensor,
    *,
    lam: float,
    steps: int = 30,
    lr: float = 0.05,
    optimizer: str = "sgd",
    engine: str = "loop",
    weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """Full-batch fit of `head` in place on the (weighted) routing loss; returns loss before/after, tau and seconds."""
    if engine not in FIT_ENGINES:
        raise ValueError(f"engine must be one of {FIT_ENGINES}, got {engine!r}")
    if features.ndim != 2 or features.shape[0] != beta.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need [N, F] features and [N] beta with N > 0, got {tuple(features.shape)} and {tuple(beta.shape)}")
    module = HeadModule(head, lam=lam, lr=lr, optimizer=optimizer)
    feats, beta = features.float(), beta.float()
    batch = (feats, beta) if weights is None else (feats, beta, weights.float())
    with torch.no_grad():
        before = float(module.loss(*batch))
    start = time.perf_counter()
    if steps > 0 and engine == "loop":
        with _FIT_LOCK:
            _fit_loop(module, batch, steps)
    elif steps > 0:
        batches = [batch] * steps  # one epoch of `steps` full batches: no per-epoch overhead
        with _FIT_LOCK, quiet_lightning():
            trainer = Trainer(
                max_steps=steps, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0,
            )
            trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    with torch.no_grad():
        after = float(module.loss(*batch))
    return {"loss_before": before, "loss_after": after, "tau": head.effective_tau(),
            "seconds": time.perf_counter() - start}


def _fit_loop(module: HeadModule, batch: tuple[torch.Tensor, ...], steps: int) -> None:
    """The module's own `training_step` and `configure_optimizers`, stepped without a Trainer."""
    optimizer = module.configure_optimizers()
    module.train()
    for step in range(steps):
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()


class TorchHead:
    """A ThresholdHead behind the numpy interface a client routes and learns through (`roles.client.RoutingHead`)."""

    def __init__(self, module: ThresholdHead, engine: str = "loop") -> None:
        if engine not in FIT_ENGINES:
            raise ValueError(f"engine must be one of {FIT_ENGINES}, got {engine!r}")
        self.module = module
        self.engine = engine

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
