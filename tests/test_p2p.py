"""Peer-to-peer token resolution over a real Mosquitto: reuse within a cluster and across clusters."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment, DeploymentSpec
from fedhlm.core.records import TokenInput
from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings
from fedhlm.maths.threshold import ThresholdHead
from fedhlm.models.head_fit import TorchHead
from fedhlm.maths.uncertainty import FEATURE_NAMES

DIM = 16
VOCAB = 8
ASSIGNMENT = {"c000": "e0", "c001": "e0", "c002": "e1"}


def q_fn(input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The LLM prefers token 2 after every context."""
    q = torch.full((input_ids.shape[0], VOCAB), 0.01)
    q[:, 2] = 1.0
    return q / q.sum(dim=1, keepdim=True)


def token(uid: int, embedding: np.ndarray) -> TokenInput:
    f = np.zeros(len(FEATURE_NAMES), np.float32)
    f[0] = 1.0
    return TokenInput(uid=uid, context_ids=np.array([1, 5, uid % 7], np.int32), draft_token=0,
                      topk_ids=np.array([0, 1], np.int32), topk_probs=np.array([0.6, 0.4], np.float32),
                      tail_mass=0.0, features=f, embedding=(embedding / np.linalg.norm(embedding)).astype(np.float32))


def deployment(broker: LocalBroker, scope: str = "cluster", deadline_s: float = 0.1, audit: float = 0.0,
               **overrides) -> Deployment:
    settings = ClientSettings(client_id="-", edge_id="-", policy="always", embedder_name="test-emb",
                              p2p=P2PSettings(enabled=True, resolver="peers", delta=0.9, deadline_ms=1000 * deadline_s,
                                              scope=scope, audit=audit),
                              federation=FederationSettings(round_deadline_s=5.0))
    spec = DeploymentSpec(assignment=ASSIGNMENT, client=settings,
                          head_factory=lambda: TorchHead(ThresholdHead(tau=0.5)),
                          q_fn=q_fn, class_of=lambda t: t if t < 4 else -1, embedding_dim=DIM,
                          client_overrides=overrides)
    return Deployment(spec, broker.address).start()


@pytest.fixture
def p2p_broker():
    users = {**{c: "client" for c in ASSIGNMENT}, "e0": "edge", "e1": "edge", "cloud": "cloud", "llm": "llm"}
    with LocalBroker(users) as broker:
        yield broker


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM)


def test_context_resolved_by_one_client_is_reused_by_its_peer(p2p_broker) -> None:
    dep = deployment(p2p_broker)
    try:
        a = _vec(0)
        first = dep.clients["c000"].run_round(0, [token(1, a)])[0]
        assert first.route == "llm" and first.final == 2
        second = dep.clients["c001"].run_round(0, [token(2, a + 0.01 * _vec(1))])[0]
        assert second.route == "peer" and second.final == 2 and second.peer_token == 2
        assert dep.llm[0].stats.requests == 1  # the second token never reached the LLM
        assert dep.clients["c000"].counters.peer_answers == 1
        time.sleep(0.2)  # let the echoes of the clients' own queries arrive
        for client in dep.clients.values():  # no echo of its own query (noLocal), no "late reply"
            assert client.endpoint.stats().dropped["late_reply"] == 0
        # each sent one query; without noLocal each would also receive its own back
        assert dep.clients["c000"].endpoint.stats().received_messages["p2p"] == 1  # c001's query
        assert dep.clients["c001"].endpoint.stats().received_messages["p2p"] == 2  # c000's query + the reply
    finally:
        dep.stop()


def test_dissimilar_context_is_not_reused(p2p_broker) -> None:
    dep = deployment(p2p_broker)
    try:
        dep.clients["c000"].run_round(0, [token(1, _vec(0))])
        other = dep.clients["c001"].run_round(0, [token(2, _vec(99))])[0]
        assert other.route == "llm"
        assert dep.llm[0].stats.requests == 2
        assert dep.clients["c001"].counters.peer_hits == 0
    finally:
        dep.stop()


def test_without_an_answer_the_client_escalates_after_the_deadline(p2p_broker) -> None:
    deadline = 0.15
    dep = deployment(p2p_broker, deadline_s=deadline)
    try:
        client = dep.clients["c001"]
        client.run_round(0, [token(7, _vec(5))])  # warm up the reply subscriptions
        t0 = time.perf_counter()
        rec = client.run_round(0, [token(8, _vec(6))])[0]
        elapsed = time.perf_counter() - t0
        assert rec.route == "llm"
        assert client.counters.peer_ms[-1] >= deadline * 1000 * 0.95  # it did wait for peers
        assert elapsed < deadline + 2.0  # and then only the LLM round trip
    finally:
        dep.stop()


def test_neighbour_scope_finds_an_entry_in_another_cluster(p2p_broker) -> None:
    dep = deployment(p2p_broker, scope="neighbours")
    try:
        a = _vec(3)
        dep.clients["c000"].run_round(0, [token(1, a)])  # cluster e0 resolves it
        rec = dep.clients["c002"].run_round(0, [token(2, a)])[0]  # cluster e1 asks
        assert rec.route == "peer" and rec.final == 2
        assert dep.edges["e1"].forwarded >= 1
        assert dep.llm[0].stats.requests == 1
    finally:
        dep.stop()


def test_query_from_a_different_embedding_model_is_ignored(p2p_broker) -> None:
    dep = deployment(p2p_broker, c001={"embedder_name": "another-model"})
    try:
        a = _vec(0)
        dep.clients["c000"].run_round(0, [token(1, a)])
        rec = dep.clients["c001"].run_round(0, [token(2, a)])[0]
        assert rec.route == "llm"
        assert dep.clients["c000"].counters.peer_refused == 1
    finally:
        dep.stop()
