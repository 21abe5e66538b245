"""A client's federated learning: its (features, beta) pairs, the local fit, the update and the edge's model.

Every LLM verdict is a labelled pair; the labels over-represent uncertain tokens (all of
them are sent, only a share of the rest), so each pair weighs 1 / P(it was labelled). At the
end of a round the head is fitted on the weighted routing loss, the update goes to the
edge at QoS 1, and the edge's cluster model (retained) is adopted.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from fedhlm.core.aggregation import check_params, personalise
from fedhlm.core.operating_point import CURVE_PARAM, operating_point, with_curve
from fedhlm.core.policies import ENTROPY_INDEX
from fedhlm.core.settings import ClientSettings
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.messages import ThresholdModel

log = logging.getLogger(__name__)


class Learner:
    """The learning half of one client; the client routes, this learns from what routing labelled."""

    def __init__(self, settings: ClientSettings, head, noise_rng: np.random.Generator, counters) -> None:  # noqa: ANN001
        self.s = settings
        self.head = head
        self._noise_rng = noise_rng  # a stream of its own: the routing draws are the same with and without noise
        self._features: list[np.ndarray] = []
        self._beta: list[float] = []
        self._weights: list[float] = []  # inverse probability that the pair was labelled at all
        self._model_lock = threading.Condition()
        self._model: ThresholdModel | None = None
        self._curve: np.ndarray | None = None  # this client's share (or risk) curve for a target operating point
        self.counters = counters

    # -- labels ----------------------------------------------------------------------
    def add_label(self, features: np.ndarray, beta: float, reason: str = "uncertain", round_: int = 0) -> None:
        """Keep one (features, beta) pair for the local fits, weighted for why (and in which round) it was sent."""
        self._features.append(np.asarray(features, dtype=np.float32))
        self._beta.append(float(beta))
        self._weights.append(self.label_weight(reason, round_))

    def label_weight(self, reason: str, round_: int = 0) -> float:
        """1 / P(a token like this one gets an LLM label): 1 for a token sent because it was uncertain,
        1/exploration (that round's rate) for a confident token sent to explore, 1/audit for an audited peer hit.

        Without it the pairs over-represent uncertain tokens (all of them are labelled, only a share
        `exploration` of the rest), and the threshold fitted to them is biased towards sending.
        """
        if not self.s.routing.importance_weights:
            return 1.0
        rate = {"exploration": self.s.routing.exploration_rate(round_), "audit": self.s.p2p.audit}.get(reason, 1.0)
        return 1.0 / rate if rate > 0 else 1.0

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (features [N, F], beta [N], weights [N]) learned from so far (this client's training data)."""
        if not self._features:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
        return (np.stack(self._features), np.asarray(self._beta, np.float32), np.asarray(self._weights, np.float32))

    # -- local fit and upload --------------------------------------------------------------
    def fit(self, round_: int) -> dict[str, float] | None:
        """Local steps on the weighted routing loss, lr / (1 + lr_decay * round); None without pairs."""
        r = self.s.routing
        features, beta, weights = self.pairs()
        if not beta.size or r.local_steps <= 0:
            return None
        lr = r.lr / (1.0 + r.lr_decay * round_)
        stats = self.head.fit(features, beta, lam=r.lam, steps=r.local_steps, lr=lr, optimizer=r.optimizer,
                              weights=weights)
        point = operating_point(r)
        u = features[:, ENTROPY_INDEX]
        tau = point.tau(u, beta, weights, r.exploration_rate(round_ + 1))
        if tau is not None:
            stats = {**(stats or {}), "tau": self.set_tau(tau)}
        self._curve = point.curve(u, beta, weights)
        return stats

    def model_params(self) -> dict[str, np.ndarray]:
        """The head's parameters as the federation trades them (with the target's curve, if any)."""
        params = with_curve(self.head.params(), self.s.routing)
        if CURVE_PARAM in params and self._curve is not None:
            params[CURVE_PARAM] = self._curve.astype(np.float32)
        return params

    def set_tau(self, tau: float) -> float:
        """Put the head's entropy threshold where the operating point says (target share or agreement); the edge
        then averages these taus like any other update."""
        params = self.head.params()
        if "tau" not in params:
            raise ValueError("routing.target_share / target_agreement place the entropy threshold tau: this head has none")
        params["tau"] = np.full_like(params["tau"], tau)
        self.head.load(params)
        return float(tau)

    def sample_count(self) -> int:
        """FedAvg weight: the tokens the pairs stand for (their weights), not just how many were labelled."""
        return int(round(float(np.sum(self._weights)))) if self._weights else 0

    def upload_params(self) -> dict[str, np.ndarray]:
        """What goes to the edge: the head's parameters, with N(0, noise_std^2) added to the trainable ones.

        The noise blurs what one update says about the client's data; the local head keeps
        its exact values, and FedAvg over n clients shrinks the noise by sqrt(n).
        """
        params = self.model_params()
        noise_std = self.s.routing.noise_std
        if noise_std > 0:
            for name in self.head.trainable():
                noise = self._noise_rng.normal(0.0, noise_std, size=params[name].shape)
                params[name] = (params[name] + noise).astype(np.float32)
        return params

    # -- the edge's model --------------------------------------------------------------------
    def current_round(self) -> int:
        """The round the edge is collecting as far as this client knows: one past the newest cluster model."""
        with self._model_lock:
            return 0 if self._model is None else self._model.round + 1

    def on_model(self, inbound: Inbound, client_id: str) -> None:
        model = inbound.message
        if not isinstance(model, ThresholdModel):
            return
        reason = check_params(model.params, self.model_params())
        if reason:
            log.warning("%s: rejected model from %s: %s", client_id, model.source_id, reason)
            return
        with self._model_lock:
            if self._model is None or model.round >= self._model.round:
                self._model = model
                self.counters.models_received += 1
            self._model_lock.notify_all()

    def wait_model(self, round_: int, timeout_s: float) -> ThresholdModel | None:
        deadline = time.monotonic() + timeout_s
        with self._model_lock:
            while self._model is None or self._model.round < round_:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._model_lock.wait(remaining)
            return self._model

    def adopt(self, model: ThresholdModel) -> None:
        """Load the edge's model; for a target operating point, tau is read off the pooled curve (the curve of
        every token the federation labelled, not the mean of the clients' own quantiles)."""
        mixed = personalise(self.model_params(), model.params, self.s.federation.personalise)
        curve = mixed.pop(CURVE_PARAM, None)
        self.head.load(mixed)
        if curve is not None and model.num_samples > 0:
            r = self.s.routing
            tau = operating_point(r).tau_from_curve(curve, r.exploration_rate(model.round + 1))
            if tau is not None:
                self.set_tau(tau)
