"""Shared pieces of the reliability tests (`pytest -m reliability`); this module holds no tests.

The deployments use the synthetic LLM of tests/test_federated_roles.py (its rejection
probability of a draft is a known function of the draft's entropy), so runs are fast,
deterministic and need no model download.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedhlm.core.records import TokenInput
from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings
from fedhlm.maths.threshold import ThresholdHead
from fedhlm.models.head_fit import TorchHead
from fedhlm.roles.deployment import DeploymentSpec
from test_federated_roles import LAM, T, make_inputs, q_fn

__all__ = ["LAM", "T", "assignment", "distinct_heads", "federated_spec", "make_inputs", "round_inputs", "users",
           "wait_until"]


def assignment(clients: int, edges: int) -> dict[str, str]:
    """Client ids c00, c01, ... dealt round-robin to edges e0, e1, ..."""
    return {f"c{i:02d}": f"e{i % edges}" for i in range(clients)}


def users(assign: dict[str, str], llm_workers: int = 1) -> dict[str, str]:
    """Broker users of a deployment: its clients, edges, the cloud, LLM workers llm, llm1, ... and an admin."""
    workers = {"llm" if i == 0 else f"llm{i}": "llm" for i in range(llm_workers)}
    return {**dict.fromkeys(assign, "client"), **dict.fromkeys(sorted(set(assign.values())), "edge"),
            "cloud": "cloud", **workers, "admin": "admin"}


def distinct_heads(start: float = 0.5, step: float = 0.01) -> Callable[[], TorchHead]:
    """A head factory whose heads start at different taus, so that an aggregate depends on who took part."""
    counter = itertools.count()
    return lambda: TorchHead(ThresholdHead(tau=start + step * next(counter), temperature=T))


def federated_spec(assign: dict[str, str], checkpoint_dir: Path | None = None, *, head_factory=None,
                   policy: str = "learned", routing: dict | None = None, federation: dict | None = None,
                   p2p: dict | None = None, deployment: dict | None = None) -> DeploymentSpec:
    """A learned-threshold deployment over the synthetic LLM; `routing`/`federation`/`p2p` change those sections."""
    sections = dict(
        routing=RoutingSettings(**{**dict(exploration=0.3, lam=LAM, local_steps=0, lr=1.0, lr_decay=2.0,
                                          llm_timeout_s=2.0, verify="greedy"), **(routing or {})}),
        federation=FederationSettings(**{**dict(quorum=1.0, round_deadline_s=20.0, cloud_every=2), **(federation or {})}),
        p2p=P2PSettings(**{"enabled": False, **(p2p or {})}),
    )
    options = dict(deployment or {})
    return DeploymentSpec(
        assignment=assign,
        client=ClientSettings(client_id="-", edge_id="-", policy=policy, **sections),
        head_factory=head_factory or distinct_heads(),
        q_fn=q_fn,
        class_of=lambda t: t if t < 2 else -1,
        checkpoint_dir=checkpoint_dir,
        **options,
    )


def round_inputs(clients, round_: int, n: int, seed: int = 0) -> dict[str, list[TokenInput]]:
    """n synthetic tokens per client for one round; the same for the same (round, seed)."""
    out = {}
    for i, cid in enumerate(sorted(clients)):
        rng = np.random.default_rng([seed, round_, i])
        out[cid] = make_inputs(rng, n, (round_ * 1000 + i) * n)
    return out


def wait_until(done: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.01) -> bool:
    """Poll `done` until it holds or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return done()
        time.sleep(poll_s)
    return True
