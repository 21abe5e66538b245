"""The threshold head and its routing loss: what each client learns and federated learning averages.

A token with uncertainty features f is offloaded with probability
s = sigmoid((w . f + g(f) - tau) / T). In the scalar form (FedHLM's learned threshold)
w is the unit vector on the entropy column and g = 0, so s = sigmoid((u - tau) / T) and
the hard decision "offload iff s > 1/2" is "offload iff u > tau". The local loss

    L(tau) = mean[(1 - s) * beta] + lambda * mean[s]

prices keeping a token by the LLM's rejection probability beta and sending one by
lambda; its optimum sits where E[beta | u = tau] = lambda. U-HLM's closed-form threshold
(arXiv 2412.12687) is the case of a linear fit beta = a u + b; :func:`central_threshold`
minimises the same loss over pooled data and is the reference that federated training is
measured against.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedhlm.maths.uncertainty import ENTROPY_INDEX, FEATURE_NAMES

HeadMode = Literal["scalar", "linear", "mlp"]
HEAD_MODES: tuple[str, ...] = ("scalar", "linear", "mlp")


class ThresholdHead(nn.Module):
    """Uncertainty features [..., F] -> routing probability s [...] in (0, 1).

    Modes:
      * ``scalar``: s = sigmoid((f_entropy - tau) / T). Parameters: tau (and T if learnable).
      * ``linear``: s = sigmoid((w . f - tau) / T), w initialised to the entropy unit
        vector, so at initialisation it *is* the scalar head.
      * ``mlp``: ``linear`` plus a tiny residual MLP g(f) whose last layer starts at zero,
        so again exactly the scalar head at initialisation.
    ``freeze_to_scalar=True`` (or :meth:`freeze_to_scalar`) pins w to the entropy unit
    vector and g to zero, leaving only tau (and T) to learn.

    ``state_dict`` is what clients upload and servers average; every entry is float32:

      ============== ======= ===============================================
      key            shape   meaning
      ============== ======= ===============================================
      ``tau``        []      threshold (logit offset), in entropy units
      ``temperature``[]      T, the sigmoid's width; steepness k = 1/T
      ``weight``     [F]     linear/mlp only: feature weights
      ``mlp.0.weight`` [H,F] mlp only: hidden layer
      ``mlp.0.bias`` [H]     mlp only
      ``mlp.2.weight`` [1,H] mlp only: output layer, zero at initialisation
      ``mlp.2.bias`` [1]     mlp only, zero at initialisation
      ============== ======= ===============================================

    T is a buffer (fixed, set by :meth:`set_temperature` for annealing) unless
    ``learn_temperature`` makes it a parameter; either way the key is ``temperature``.
    """

    def __init__(
        self,
        mode: HeadMode = "scalar",
        num_features: int = len(FEATURE_NAMES),
        entropy_index: int = ENTROPY_INDEX,
        tau: float = 1.0,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        hidden: int = 8,
        freeze_to_scalar: bool = False,
        min_temperature: float = 1e-3,
    ) -> None:
        super().__init__()
        if mode not in HEAD_MODES:
            raise ValueError(f"mode must be one of {HEAD_MODES}, got {mode!r}")
        if not 0 <= entropy_index < num_features:
            raise ValueError(f"entropy_index {entropy_index} outside 0..{num_features - 1}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mode = mode
        self.num_features = num_features
        self.entropy_index = entropy_index
        self.min_temperature = min_temperature
        self.tau = nn.Parameter(torch.tensor(float(tau), dtype=torch.float32))
        t = torch.tensor(float(temperature), dtype=torch.float32)
        if learn_temperature:
            self.temperature = nn.Parameter(t)
        else:
            self.register_buffer("temperature", t)
        if mode in ("linear", "mlp"):
            self.weight = nn.Parameter(self._entropy_unit_vector())
        if mode == "mlp":
            self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        if freeze_to_scalar:
            self.freeze_to_scalar()

    def _entropy_unit_vector(self) -> torch.Tensor:
        e = torch.zeros(self.num_features, dtype=torch.float32)
        e[self.entropy_index] = 1.0
        return e

    def _check(self, f: torch.Tensor) -> None:
        if f.dim() == 0 or f.shape[-1] != self.num_features:
            raise ValueError(f"features must have shape [..., {self.num_features}], got {tuple(f.shape)}")

    def score(self, f: torch.Tensor) -> torch.Tensor:
        """The un-tempered score whose crossing of tau is the decision: f_entropy, w . f, or w . f + g(f)."""
        self._check(f)
        f = f.float()
        if self.mode == "scalar":
            return f[..., self.entropy_index]
        z = f @ self.weight
        if self.mode == "mlp":
            z = z + self.mlp(f).squeeze(-1)
        return z

    def logit(self, f: torch.Tensor) -> torch.Tensor:
        """(score - tau) / T, the argument of the sigmoid."""
        return (self.score(f) - self.tau) / self.temperature.clamp_min(self.min_temperature)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Routing probability s for each row of features."""
        return torch.sigmoid(self.logit(f))

    @torch.no_grad()
    def route(self, f: torch.Tensor) -> torch.Tensor:
        """Hard decision used at inference: offload where s > 1/2 (score > tau)."""
        return self.score(f) > self.tau

    def effective_tau(self) -> float:
        """The entropy threshold: tau for the scalar head; tau / w_entropy otherwise.

        For linear/mlp heads this is the entropy at which s = 1/2 when the other
        features and g contribute nothing, which is exact once frozen to the scalar form.
        """
        tau = float(self.tau.detach())
        if self.mode == "scalar":
            return tau
        w = float(self.weight.detach()[self.entropy_index])
        if w == 0.0:
            raise ValueError("entropy weight is 0: the head no longer thresholds entropy")
        return tau / w

    @torch.no_grad()
    def set_temperature(self, value: float) -> None:
        """Set T (annealing); k = 1/T is the sigmoid's steepness."""
        if value <= 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        self.temperature.fill_(float(value))

    @torch.no_grad()
    def freeze_to_scalar(self) -> None:
        """Pin w to the entropy unit vector and g to 0: only tau (and a learnable T) still train."""
        if self.mode in ("linear", "mlp"):
            self.weight.copy_(self._entropy_unit_vector())
            self.weight.requires_grad_(False)
        if self.mode == "mlp":
            for p in self.mlp.parameters():
                p.requires_grad_(False)
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)


def annealed_temperature(step: int, start: float, end: float, decay: float) -> float:
    """T after ``step`` steps of geometric annealing from ``start`` towards ``end`` (a floor)."""
    return max(end, start * decay**step)


def routing_loss(s: torch.Tensor, beta: torch.Tensor, lam: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L = mean((1 - s) * beta) + lam * mean(s): rejection risk of keeping vs price of sending.

    `weights` make it a weighted mean: a client sees beta for every token it sends but only
    for a share eps of the ones it keeps (exploration); weighting those by 1/eps makes the
    loss over its labelled tokens an unbiased estimate of the loss over all its tokens.
    """
    if s.shape != beta.shape:
        raise ValueError(f"s and beta shapes differ: {tuple(s.shape)} vs {tuple(beta.shape)}")
    per_token = (1.0 - s) * beta + lam * s
    if weights is None:
        return per_token.mean()
    if weights.shape != s.shape:
        raise ValueError(f"weights and s shapes differ: {tuple(weights.shape)} vs {tuple(s.shape)}")
    return (weights * per_token).sum() / weights.sum()


def hard_routing_loss(u: torch.Tensor | np.ndarray, beta: torch.Tensor | np.ndarray, tau: float, lam: float) -> float:
    """The same loss with the hard decision: keep u <= tau, send u > tau."""
    u, beta = _as_numpy(u), _as_numpy(beta)
    send = u > tau
    return float(np.mean(np.where(send, lam, beta)))


def fit_linear_beta(u: torch.Tensor | np.ndarray, beta: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """Least-squares fit beta ~ a * u + b (U-HLM's uncertainty -> rejection line)."""
    u, beta = _as_numpy(u), _as_numpy(beta)
    if u.size < 2 or np.ptp(u) == 0:
        raise ValueError("need at least two distinct uncertainty values to fit a line")
    a, b = np.polyfit(u, beta, 1)
    return float(a), float(b)


def closed_form_tau(u: torch.Tensor | np.ndarray, beta: torch.Tensor | np.ndarray, lam: float) -> float:
    """U-HLM's threshold: with beta = a u + b, E[beta | u = tau] = lam gives tau = (lam - b) / a."""
    a, b = fit_linear_beta(u, beta)
    if a <= 0:
        raise ValueError(f"rejection does not grow with uncertainty (slope {a:.4g}): no threshold")
    return (lam - b) / a


def uhlm_threshold(u: torch.Tensor | np.ndarray, beta: torch.Tensor | np.ndarray, lam: float) -> dict[str, Any]:
    """U-HLM's static threshold with its fit, made safe to deploy.

    When beta does not grow with u the line says "send everything" (mean beta > lam) or
    "send nothing"; a nearly flat line puts (lam - b) / a far outside the data. Either way
    the threshold is clipped to just beyond the observed u, which is the same decision on
    the data and keeps tau inside the range servers accept.
    """
    u, beta = _as_numpy(u), _as_numpy(beta)
    a, b = fit_linear_beta(u, beta)
    try:
        tau, degenerate = closed_form_tau(u, beta, lam), False
    except ValueError:
        tau = -np.inf if float(beta.mean()) > lam else np.inf
        degenerate = True
    span = 1e-6 * max(float(np.ptp(u)), 1.0)
    clipped = float(np.clip(tau, float(u.min()) - span, float(u.max()) + span))
    corr = float(np.corrcoef(u, beta)[0, 1]) if u.size > 2 and beta.std() > 0 else float("nan")
    return {"tau": clipped, "slope": a, "intercept": b, "degenerate_fit": degenerate,
            "clipped": bool(clipped != tau), "corr_entropy_beta": corr}


def central_threshold(
    u: torch.Tensor | np.ndarray,
    beta: torch.Tensor | np.ndarray,
    lam: float,
    method: Literal["hard", "sigmoid"] = "hard",
    temperature: float = 0.1,
    grid: int = 512,
    weights: torch.Tensor | np.ndarray | None = None,
) -> float:
    """The pooled-data optimum of the (optionally weighted, see `routing_loss`) routing loss:
    the reference for federated convergence.

    ``hard``: exact minimiser of :func:`hard_routing_loss` over all split points (sort +
    cumulative sum, O(n log n)); the returned tau is the midpoint between the last kept
    and the first sent uncertainty. ``sigmoid``: the minimiser of :func:`routing_loss`
    at fixed ``temperature``, by a grid then golden-section refinement.
    """
    u, beta = _as_numpy(u), _as_numpy(beta)
    if u.shape != beta.shape or u.size == 0:
        raise ValueError(f"u and beta must be equal, non-empty shapes, got {u.shape} and {beta.shape}")
    w = np.ones_like(u) if weights is None else _as_numpy(weights)
    if w.shape != u.shape or (w <= 0).any():
        raise ValueError(f"weights must be positive, one per pair, got shape {w.shape}")
    if method == "hard":
        return _central_hard(u, beta, lam, w)
    if method == "sigmoid":
        return _central_sigmoid(u, beta, lam, temperature, grid, w)
    raise ValueError(f"method must be 'hard' or 'sigmoid', got {method!r}")


def _central_hard(u: np.ndarray, beta: np.ndarray, lam: float, w: np.ndarray) -> float:
    order = np.argsort(u, kind="stable")
    us, bs, ws = u[order], beta[order], w[order]
    n = us.size
    kept_w = np.concatenate([[0.0], np.cumsum(ws)])  # weight of the i smallest, which are kept
    loss = (np.concatenate([[0.0], np.cumsum(ws * bs)]) + lam * (kept_w[-1] - kept_w)) / kept_w[-1]
    # only split between distinct values
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = us[1:] > us[:-1]
    i = int(np.argmin(np.where(valid, loss, np.inf)))
    spread = max(float(us[-1] - us[0]), 1.0)
    if i == 0:
        return float(us[0] - 1e-6 * spread)
    if i == n:
        return float(us[-1] + 1e-6 * spread)
    return float(0.5 * (us[i - 1] + us[i]))


def _central_sigmoid(u: np.ndarray, beta: np.ndarray, lam: float, temperature: float, grid: int,
                     w: np.ndarray) -> float:
    def loss(tau: np.ndarray) -> np.ndarray:
        s = 1.0 / (1.0 + np.exp(-np.clip((u[None, :] - tau[:, None]) / temperature, -60, 60)))
        return (((1.0 - s) * beta[None, :] + lam * s) * w[None, :]).sum(axis=1) / w.sum()

    lo, hi = float(u.min()) - 5 * temperature, float(u.max()) + 5 * temperature
    taus = np.linspace(lo, hi, grid)
    j = int(np.argmin(loss(taus)))
    a, b = taus[max(j - 1, 0)], taus[min(j + 1, grid - 1)]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if loss(np.array([c]))[0] < loss(np.array([d]))[0]:
            b = d
        else:
            a = c
    return float(0.5 * (a + b))


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)
