"""Routing policies: what decides, per token, whether a client keeps its draft or offloads it.

A policy is a small class in `POLICIES`; the client, the deployment and the simulation ask it
(`federated`, `explores`, `offload`) instead of comparing names, so a new policy (U-HLM's
sampling rule, a learned MLP router) is one class here and nothing else changes. Flower's
`FedMedian(FedAvg)` is the model: a variant overrides the one method that differs.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np

ENTROPY_INDEX = 0  # the first uncertainty feature is the entropy of the next-token distribution


class Router(Protocol):
    """The part of a threshold head a policy may consult."""

    def route(self, features: np.ndarray) -> bool: ...


class RoutingPolicy:
    """Base: keep every token, learn nothing, explore never."""

    name: ClassVar[str] = ""
    federated: ClassVar[bool] = False  # fits a head every round and averages it with the edge
    explores: ClassVar[bool] = False  # sends a share of confident tokens too, for unbiased labels
    sends: ClassVar[bool] = True  # may send anything at all (False: needs no network)

    @classmethod
    def build(cls, static_tau: float) -> "RoutingPolicy":
        """An instance from the client's settings (only a static policy reads its threshold)."""
        return cls()

    def offload(self, features: np.ndarray, head: Router) -> bool:
        """The hard routing decision for one token's uncertainty features."""
        return False


class NeverOffload(RoutingPolicy):
    """The SLM alone."""

    name = "never"
    sends = False


class AlwaysOffload(RoutingPolicy):
    """Every token to the LLM (the LLM-only baseline)."""

    name = "always"

    def offload(self, features: np.ndarray, head: Router) -> bool:
        return True


class StaticThreshold(RoutingPolicy):
    """U-HLM: offload when the entropy exceeds a threshold calibrated once, centrally."""

    name = "static"

    def __init__(self, tau: float) -> None:
        self.tau = float(tau)

    @classmethod
    def build(cls, static_tau: float) -> "StaticThreshold":
        return cls(static_tau)

    def offload(self, features: np.ndarray, head: Router) -> bool:
        return float(features[ENTROPY_INDEX]) > self.tau


class LearnedThreshold(RoutingPolicy):
    """FedHLM: the client's own threshold head decides, and is learned with the edge and the cloud."""

    name = "learned"
    federated = True
    explores = True

    def offload(self, features: np.ndarray, head: Router) -> bool:
        return bool(head.route(np.asarray(features, dtype=np.float32)))


POLICIES: dict[str, type[RoutingPolicy]] = {
    cls.name: cls for cls in (NeverOffload, AlwaysOffload, StaticThreshold, LearnedThreshold)
}


def make_policy(name: str, *, static_tau: float = 0.5) -> RoutingPolicy:
    """The policy registered as `name`; `static_tau` is the threshold a static policy uses."""
    return policy_class(name).build(static_tau)


def policy_class(name: str) -> type[RoutingPolicy]:
    """The class behind a policy name, for questions asked before any client exists (is it federated?)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]
