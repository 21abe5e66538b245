"""The scalar threshold head and its local training in numpy (what `ThresholdHead` + `fit_head` do in PyTorch).

s = sigmoid((u - tau) / T) with u the entropy feature; the hard decision is u > tau. Local
training is plain full-batch gradient descent on the routing loss

    L(tau) = mean((1 - s) beta) + lam mean(s),   dL/dtau = mean((beta - lam) s (1 - s)) / T

in float32, step for step what torch.optim.SGD does to ThresholdHead.tau (test_device_head.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fedhlm_device.features import ENTROPY_INDEX, FEATURE_NAMES


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def routing_loss(s: np.ndarray, beta: np.ndarray, lam: float, weights: np.ndarray | None = None) -> float:
    """L = mean((1 - s) beta + lam s), weighted by `weights` when given (as `fedhlm.maths.threshold.routing_loss`)."""
    s, beta = np.asarray(s, np.float32), np.asarray(beta, np.float32)
    if s.shape != beta.shape:
        raise ValueError(f"s and beta shapes differ: {s.shape} vs {beta.shape}")
    per_token = (np.float32(1.0) - s) * beta + np.float32(lam) * s
    if weights is None:
        return float(per_token.mean(dtype=np.float32))
    w = np.asarray(weights, np.float32)
    if w.shape != s.shape:
        raise ValueError(f"weights and s shapes differ: {w.shape} vs {s.shape}")
    return float((w * per_token).sum(dtype=np.float32) / w.sum(dtype=np.float32))


@dataclass
class ScalarHead:
    """tau and T as float32 scalars; `params()` has the keys and shapes of ThresholdHead.state_dict()."""

    tau: float = 1.0
    temperature: float = 0.1
    min_temperature: float = 1e-3
    entropy_index: int = ENTROPY_INDEX
    num_features: int = len(FEATURE_NAMES)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.tau = float(np.float32(self.tau))
        self.temperature = float(np.float32(self.temperature))

    @classmethod
    def from_json(cls, obj: dict) -> "ScalarHead":
        """From the head.json that `fedhlm export` writes."""
        if obj.get("mode") != "scalar":
            raise ValueError(f"head.json: mode {obj.get('mode')!r}, a device runs scalar heads only")
        params = obj.get("params", {})
        missing = {"tau", "temperature"} - set(params)
        if missing:
            raise ValueError(f"head.json: params lack {sorted(missing)}")
        return cls(float(params["tau"]), float(params["temperature"]), float(obj.get("min_temperature", 1e-3)),
                   int(obj.get("entropy_index", ENTROPY_INDEX)))

    def _score(self, f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, np.float32)
        if f.ndim == 0 or f.shape[-1] != self.num_features:
            raise ValueError(f"features must have shape [..., {self.num_features}], got {f.shape}")
        return f[..., self.entropy_index]

    def _t(self) -> np.float32:
        return np.float32(max(self.temperature, self.min_temperature))

    def __call__(self, f: np.ndarray) -> np.ndarray:
        """Routing probability s per row."""
        return _sigmoid((self._score(f) - np.float32(self.tau)) / self._t())

    def route(self, f: np.ndarray) -> np.ndarray | bool:
        """Offload where the entropy exceeds tau (s > 1/2)."""
        out = self._score(f) > np.float32(self.tau)
        return bool(out) if np.ndim(out) == 0 else out

    def effective_tau(self) -> float:
        return self.tau

    def params(self) -> dict[str, np.ndarray]:
        return {"tau": np.array(self.tau, np.float32), "temperature": np.array(self.temperature, np.float32)}

    def trainable(self) -> list[str]:
        return ["tau"]  # T is fixed on a device, as in the scalar ThresholdHead without learn_temperature

    def fit(self, features: np.ndarray, beta: np.ndarray, *, lam: float, steps: int, lr: float,
            optimizer: str = "sgd", weights: np.ndarray | None = None) -> dict[str, float]:
        """`fit_sgd` behind the interface a client learns through (plain gradient steps only)."""
        if optimizer != "sgd":
            raise ValueError(f"optimizer: a device trains its head with 'sgd' only, got {optimizer!r}")
        start = time.perf_counter()
        result = fit_sgd(self, features, beta, lam=lam, steps=steps, lr=lr, weights=weights)
        result["seconds"] = time.perf_counter() - start
        return result

    def load(self, params: dict[str, np.ndarray]) -> None:
        if set(params) != {"tau", "temperature"}:
            raise ValueError(f"scalar head parameters are tau and temperature, got {sorted(params)}")
        self.tau = float(np.float32(np.asarray(params["tau"]).reshape(())))
        self.temperature = float(np.float32(np.asarray(params["temperature"]).reshape(())))


def fit_sgd(head: ScalarHead, features: np.ndarray, beta: np.ndarray, *, lam: float, steps: int = 30,
            lr: float = 0.05, weights: np.ndarray | None = None) -> dict[str, float]:
    """Full-batch SGD on tau, in place; returns loss before/after and tau (as `fedhlm.models.head_fit.fit_head`)."""
    f = np.asarray(features, np.float32)
    b = np.asarray(beta, np.float32)
    if f.ndim != 2 or f.shape[0] != b.shape[0] or f.shape[0] == 0:
        raise ValueError(f"need [N, F] features and [N] beta with N > 0, got {f.shape} and {b.shape}")
    before = routing_loss(head(f), b, lam, weights)
    u = head._score(f)
    t = head._t()
    tau = np.float32(head.tau)
    lam32, lr32 = np.float32(lam), np.float32(lr)
    share = None if weights is None else np.asarray(weights, np.float32) / np.asarray(weights, np.float32).sum()
    for _ in range(steps):
        s = _sigmoid((u - tau) / t)
        g = (b - lam32) * s * (np.float32(1.0) - s)
        grad = (g.mean(dtype=np.float32) if share is None else (share * g).sum(dtype=np.float32)) / t
        tau = np.float32(tau - lr32 * grad)
    head.tau = float(tau)
    return {"loss_before": before, "loss_after": routing_loss(head(f), b, lam, weights), "tau": head.tau}
