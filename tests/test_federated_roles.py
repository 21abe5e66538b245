"""Hierarchical federated threshold learning over a real Mosquitto: 3 edges x 4 clients.

The LLM here is a synthetic q function whose rejection probability of the draft grows
with the draft's entropy (beta = g(u), known), so the optimum of the routing loss is
known (g(tau) = lambda at tau = 0.4); the real models go through the same roles in the
end-to-end simulation test.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment, DeploymentSpec
from fedhlm.core.records import TokenInput
from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings
from fedhlm.maths.threshold import ThresholdHead, central_threshold
from fedhlm.models.head_fit import TorchHead
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import ThresholdUpdate
from fedhlm.maths.uncertainty import FEATURE_NAMES

VOCAB = 8
CLIENTS = [f"c{i:03d}" for i in range(12)]
EDGES = ["e0", "e1", "e2"]
LAM = 0.3
T = 0.1
P_DRAFT = 0.7


def disagreement(u: np.ndarray) -> np.ndarray:
    """E[beta | u]: the LLM disagrees more often with uncertain drafts; crosses LAM at u = 0.4."""
    return np.clip(1.5 * (u - 0.2), 0.0, 1.0)


def q_fn(input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The context carries u (in thousandths); q(draft) = p(draft) (1 - E[beta | u]), so beta = E[beta | u]."""
    u = input_ids[:, 1].double().numpy() / 1000.0
    q_draft = torch.from_numpy(P_DRAFT * (1.0 - disagreement(u))).float()
    q = torch.zeros(input_ids.shape[0], VOCAB)
    q[:, 0] = q_draft
    q[:, 1] = 1.0 - q_draft
    return q


def make_inputs(rng: np.random.Generator, n: int, start_uid: int) -> list[TokenInput]:
    u = rng.uniform(0.0, 1.0, n)
    out = []
    for i in range(n):
        f = np.zeros(len(FEATURE_NAMES), np.float32)
        f[0] = u[i]
        out.append(TokenInput(
            uid=start_uid + i, context_ids=np.array([1, round(u[i] * 1000)], np.int32),
            draft_token=0, topk_ids=np.array([0, 1], np.int32), topk_probs=np.array([P_DRAFT, 1 - P_DRAFT], np.float32),
            tail_mass=0.0, features=f,
        ))
    return out


def users() -> dict[str, str]:
    return {**{c: "client" for c in CLIENTS}, **{e: "edge" for e in EDGES}, "cloud": "cloud", "llm": "llm",
            "admin": "admin"}


def spec(tmp_path, **routing_changes) -> DeploymentSpec:
    routing = RoutingSettings(**{**dict(exploration=0.3, lam=LAM, local_steps=20, lr=1.0, lr_decay=2.0,
                                        llm_timeout_s=10.0,
                                        verify="sample"),  # soft beta = max(0, 1 - q/p): E[beta | u] without label noise
                                 **routing_changes})
    settings = ClientSettings(client_id="x", edge_id="x", policy="learned", routing=routing, p2p=P2PSettings(enabled=False),
                              federation=FederationSettings(quorum=0.75, round_deadline_s=3.0, cloud_every=2))
    return DeploymentSpec(
        assignment={c: EDGES[i % 3] for i, c in enumerate(CLIENTS)},
        client=settings,
        head_factory=lambda: TorchHead(ThresholdHead(tau=0.8, temperature=T)),
        q_fn=q_fn,
        class_of=lambda t: t if t < 2 else -1,
        checkpoint_dir=tmp_path,
    )


@pytest.fixture
def fed_broker():
    with LocalBroker(users()) as broker:
        yield broker


@pytest.mark.slow
def test_thresholds_converge_to_the_central_optimum(fed_broker, tmp_path) -> None:
    rng = np.random.default_rng(0)
    dep = Deployment(spec(tmp_path), fed_broker.address).start()
    try:
        uid = 0
        for r in range(8):
            inputs = {}
            for c in CLIENTS:
                inputs[c] = make_inputs(rng, 40, uid)
                uid += 40
            records = dep.run_round(r, inputs)
            assert len(records) == 40 * len(CLIENTS)
        feats = np.concatenate([c.pairs()[0] for c in dep.clients.values()])
        beta = np.concatenate([c.pairs()[1] for c in dep.clients.values()])
        weights = np.concatenate([c.pairs()[2] for c in dep.clients.values()])  # exploration pairs weigh 1/eps
        central = central_threshold(feats[:, 0], beta, LAM, method="sigmoid", temperature=T,
                                    weights=weights)  # the same loss
        assert dep.cloud is not None and dep.cloud.round == 4  # 8 edge rounds, a cloud round every 2
        global_tau = float(dep.cloud.params["tau"])
        client_taus = [c.head.effective_tau() for c in dep.clients.values()]
    finally:
        dep.stop()
    hard = central_threshold(feats[:, 0], beta, LAM, method="hard", weights=weights)
    assert abs(hard - 0.4) < 0.03, f"pooled hard optimum {hard} far from the analytic g(tau) = lambda at 0.4"
    assert abs(global_tau - central) <= 0.05 * central, f"global tau {global_tau} vs central {central}"
    assert max(abs(t - global_tau) for t in client_taus) < 1e-4  # every client adopted the global model


def test_killed_client_does_not_block_the_round(fed_broker, tmp_path) -> None:
    rng = np.random.default_rng(1)
    dep = Deployment(spec(tmp_path), fed_broker.address).start()
    try:
        victim = dep.clients["c000"]
        victim.endpoint.abort()  # gone without DISCONNECT: no update for this round
        t0 = time.monotonic()
        inputs = {c: make_inputs(rng, 10, i * 10) for i, c in enumerate(CLIENTS)}
        dep.run_round(0, inputs, skip={"c000"})
        elapsed = time.monotonic() - t0
        edge = dep.edges["e0"]
        assert edge.round == 1 and "c000" not in edge.history[-1]["participants"]
        assert len(edge.history[-1]["participants"]) == 3
        assert elapsed < 3.0 * 3  # closed by quorum + deadline, not by waiting for the dead client
    finally:
        dep.stop()


def test_duplicate_update_does_not_change_the_aggregate(fed_broker, tmp_path) -> None:
    from fedhlm.roles.edge import EdgeServer

    members = ["c000", "c003"]
    init = {"tau": np.array(0.5, np.float32), "temperature": np.array(T, np.float32)}
    edge = EdgeServer("e0", fed_broker.address("e0"), members, init, quorum=1.0, deadline_s=5.0, cloud_every=100,
                      checkpoint=tmp_path / "e0.json").start()
    senders = {c: Endpoint(fed_broker.address(c)).start().wait_connected() for c in members}
    try:
        def send(c: str, tau: float, n: int) -> None:
            upd = ThresholdUpdate(c, "e0", 0, n, {"tau": np.array(tau, np.float32),
                                                  "temperature": np.array(T, np.float32)})
            senders[c].publish(topics.edge_update("e0", c), upd, qos=1, wait=True)

        send("c000", 0.2, 10)
        send("c000", 0.2, 10)  # the same update again
        send("c000", 0.9, 1000)  # a conflicting one for the same round
        send("c003", 0.6, 30)
        deadline = time.monotonic() + 5
        while edge.round < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert edge.round == 1
        assert float(edge.params["tau"]) == pytest.approx((0.2 * 10 + 0.6 * 30) / 40, rel=1e-5)
        assert edge.duplicates == 2
    finally:
        for ep in senders.values():
            ep.close()
        edge.stop()


def test_restarted_edge_resumes_at_its_round(fed_broker, tmp_path) -> None:
    from fedhlm.roles.edge import EdgeServer

    init = {"tau": np.array(0.5, np.float32), "temperature": np.array(T, np.float32)}
    sender = Endpoint(fed_broker.address("c000")).start().wait_connected()

    def start_edge() -> EdgeServer:
        return EdgeServer("e0", fed_broker.address("e0"), ["c000"], init, quorum=1.0, deadline_s=5.0,
                          cloud_every=100, checkpoint=tmp_path / "e0.json").start()

    edge = start_edge()
    try:
        for r in range(3):
            upd = ThresholdUpdate("c000", "e0", r, 5, {"tau": np.array(0.1 * (r + 1), np.float32),
                                                       "temperature": np.array(T, np.float32)})
            sender.publish(topics.edge_update("e0", "c000"), upd, qos=1, wait=True)
            deadline = time.monotonic() + 5
            while edge.round < r + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert edge.round == 3
        edge.stop()
        edge = start_edge()
        assert edge.round == 3 and float(edge.params["tau"]) == pytest.approx(0.3)
        stale = ThresholdUpdate("c000", "e0", 1, 5, {"tau": np.array(9.0, np.float32),
                                                     "temperature": np.array(T, np.float32)})
        sender.publish(topics.edge_update("e0", "c000"), stale, qos=1, wait=True)
        time.sleep(0.3)
        assert edge.rejected["stale"] == 1 and edge.round == 3
    finally:
        sender.close()
        edge.stop()


def test_labels_weigh_the_inverse_of_their_chance_to_be_sent() -> None:
    """Every uncertain token is labelled, only a share `exploration` of the confident ones (and `audit` of peer
    hits): weighting each pair by 1/P(labelled) makes the local loss an unbiased estimate over all tokens."""
    from fedhlm.roles.client import Client
    from fedhlm.transport.address import BrokerAddress

    def client(weighted: bool) -> Client:
        settings = ClientSettings(client_id="c0", edge_id="e0", policy="learned", p2p=P2PSettings(audit=0.5),
                                  routing=RoutingSettings(exploration=0.25, importance_weights=weighted))
        return Client(settings, BrokerAddress("127.0.0.1", 1, username="c0"), TorchHead(ThresholdHead(tau=0.5)),
                      lambda t: t)

    c = client(True)
    for reason in ("uncertain", "exploration", "audit"):
        c.add_label(np.array([0.5, 0, 0, 0], np.float32), 0.3, reason)
    f, beta, w = c.pairs()
    assert f.shape == (3, 4) and beta.tolist() == pytest.approx([0.3] * 3) and w.tolist() == [1.0, 4.0, 2.0]
    assert [client(False).label_weight(r) for r in ("uncertain", "exploration", "audit")] == [1.0, 1.0, 1.0]
