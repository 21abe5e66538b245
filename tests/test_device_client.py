"""DeviceClients beside Python Clients over a real Mosquitto: same routing, same records, same aggregation.

The LLM is the synthetic q function of test_federated_roles (rejection grows with the draft's
entropy), verified greedily, so a run is deterministic: a deployment where half the clients
are DeviceClients must produce exactly the TokenRecords and the edge/cloud thresholds of the
all-Python deployment.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment, DeploymentSpec
from fedhlm.core.records import TokenInput
from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings
from fedhlm.roles.edge import EdgeServer
from fedhlm.maths.threshold import ThresholdHead
from fedhlm.models.head_fit import TorchHead
from fedhlm.transport import topics
from fedhlm.transport.codec import encode
from fedhlm.transport.messages import ThresholdUpdate
from fedhlm.maths.uncertainty import FEATURE_NAMES
from fedhlm_device.client import DeviceClient, DeviceSettings
from fedhlm_device.head import ScalarHead

VOCAB = 8
CLIENTS = ["c000", "c001", "c002", "c003"]
DEVICES = ["c001", "c002"]
EDGES = ["e0", "e1"]
LAM, T, TAU0, P_DRAFT = 0.3, 0.1, 0.8, 0.7


def q_fn(input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    u = input_ids[:, 1].double().numpy() / 1000.0
    q_draft = torch.from_numpy(P_DRAFT * (1.0 - np.clip(1.5 * (u - 0.2), 0.0, 1.0))).float()
    q = torch.zeros(input_ids.shape[0], VOCAB)
    q[:, 0], q[:, 1] = q_draft, 1.0 - q_draft
    return q


def make_inputs(rng: np.random.Generator, n: int, start_uid: int) -> list[TokenInput]:
    out = []
    for i, u in enumerate(rng.uniform(0.0, 1.0, n)):
        f = np.zeros(len(FEATURE_NAMES), np.float32)
        f[0] = u
        out.append(TokenInput(uid=start_uid + i, context_ids=np.array([1, round(u * 1000)], np.int32),
                              draft_token=0, topk_ids=np.array([0, 1], np.int32),
                              topk_probs=np.array([P_DRAFT, 1 - P_DRAFT], np.float32), tail_mass=0.0, features=f))
    return out


def spec() -> DeploymentSpec:
    settings = ClientSettings(client_id="x", edge_id="x",
                              routing=RoutingSettings(exploration=0.3, lam=LAM, local_steps=20, lr=1.0, lr_decay=1.0,
                                                      verify="greedy"),
                              federation=FederationSettings(quorum=1.0, round_deadline_s=10.0, cloud_every=2),
                              p2p=P2PSettings(enabled=False))
    return DeploymentSpec(assignment={c: EDGES[i % 2] for i, c in enumerate(CLIENTS)}, client=settings,
                          head_factory=lambda: TorchHead(ThresholdHead(tau=TAU0, temperature=T)), q_fn=q_fn,
                          class_of=lambda t: t if t < 2 else -1)


def users() -> dict[str, str]:
    return {**{c: "client" for c in CLIENTS}, **{e: "edge" for e in EDGES}, "cloud": "cloud", "llm": "llm"}


def as_device(dep: Deployment, cid: str, broker: LocalBroker, **changes: object) -> DeviceClient:
    """Replace a started Python Client by a DeviceClient with the same id and settings."""
    old = dep.clients[cid]
    old.stop()
    settings = DeviceSettings(**{f.name: getattr(old.s, f.name) for f in dataclasses.fields(old.s)}, **changes)
    device = DeviceClient(settings, broker.address(cid), ScalarHead(TAU0, T), dep.spec.class_of).start()
    dep.clients[cid] = device  # type: ignore[assignment]  # Deployment only calls the shared methods
    return device


def run(broker: LocalBroker, devices: list[str], rounds: int = 4) -> tuple[list, list, dict]:
    rng = np.random.default_rng(0)
    dep = Deployment(spec(), broker.address).start()
    try:
        for cid in devices:
            as_device(dep, cid, broker)
        records = []
        for r in range(rounds):
            records += dep.run_round(r, {c: make_inputs(rng, 25, (r * 10 + i) * 100) for i, c in enumerate(CLIENTS)})
        history = {e: [(h["round"], sorted(h["participants"])) for h in dep.edges[e].history] for e in EDGES}
        taus = [float(dep.cloud.params["tau"])] + [float(dep.edges[e].params["tau"]) for e in EDGES]
        taus += [dep.clients[c].head.effective_tau() for c in CLIENTS]
        bytes_up = dep.byte_counts().summary()["uplink_by_kind"]
    finally:
        dep.stop()
    key = [(t.client_id, t.round, t.uid, t.draft, t.final, t.route, t.reason, t.llm_final) for t in records]
    return key, taus, {"history": history, "bytes": bytes_up}


@pytest.mark.slow
def test_mixed_deployment_matches_the_all_python_one() -> None:
    with LocalBroker(users()) as broker:
        python_records, python_taus, python_info = run(broker, [])
    with LocalBroker(users()) as broker:
        mixed_records, mixed_taus, mixed_info = run(broker, DEVICES)
    assert len(mixed_records) == 4 * 25 * len(CLIENTS)
    routes = {r: sum(1 for k in mixed_records if k[5] == r) for r in ("local", "llm")}
    assert routes["local"] > 50 and routes["llm"] > 50  # both branches, exploration included
    assert mixed_records == python_records  # every decision, verdict and class, token for token
    np.testing.assert_allclose(mixed_taus, python_taus, atol=1e-5)
    assert abs(mixed_taus[0] - TAU0) > 0.05  # the thresholds did move
    # the devices' updates were aggregated like the others: every edge round lists both members
    for edge, members in (("e0", ["c000", "c002"]), ("e1", ["c001", "c003"])):
        assert mixed_info["history"][edge] == [(r, members) for r in range(4)]
    assert mixed_info["bytes"] == python_info["bytes"]  # same payloads, byte for byte


def test_update_left_in_the_outbox_is_resent_and_aggregated_at_start(tmp_path) -> None:
    init = {"tau": np.array(0.5, np.float32), "temperature": np.array(T, np.float32)}
    with LocalBroker(users()) as broker:
        edge = EdgeServer("e0", broker.address("e0"), ["c000"], init, quorum=1.0, deadline_s=5.0, cloud_every=100).start()
        settings = DeviceSettings("c000", "e0", state_dir=str(tmp_path), federation=FederationSettings(round_deadline_s=2.5))
        device = DeviceClient(settings, broker.address("c000"), ScalarHead(0.5, T), lambda t: -1)
        # a power cut after the update was written but before its PUBACK: it is on disk, not at the edge
        lost = ThresholdUpdate("c000", "e0", 0, 7, {"tau": np.array(0.25, np.float32),
                                                    "temperature": np.array(T, np.float32)})
        device.outbox.put(topics.edge_update("e0", "c000"), encode(lost))
        try:
            device.start()
            assert device.updates_resent == 1 and len(device.outbox) == 0  # PUBACK removed it
            deadline = time.monotonic() + 5
            while edge.round < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert edge.round == 1 and float(edge.params["tau"]) == pytest.approx(0.25)
            assert edge.history[-1]["participants"] == ["c000"]
            model = device.wait_model(0, 5.0)
            assert model is not None and float(model.params["tau"]) == pytest.approx(0.25)
            # the next update goes through the outbox too and is gone once acknowledged
            device.add_label(np.array([0.9, 0, 0, 0], np.float32), 1.0)
            device.finish_round(1)
            assert len(device.outbox) == 0 and edge.round == 2
        finally:
            device.stop()
            edge.stop()


def test_a_device_refuses_a_richer_head_naming_the_setting() -> None:
    """A device runs the numpy scalar head on the four basic scores; a richer config fails before it connects."""
    with pytest.raises(ValueError, match="routing.head / routing.features"):
        DeviceSettings.from_sections({"routing": {"head": "linear"}}, client_id="c0", edge_id="e0")
    with pytest.raises(ValueError, match="routing.head / routing.features"):
        DeviceSettings.from_sections({"routing": {"features": "label"}}, client_id="c0", edge_id="e0")
    assert DeviceSettings.from_sections({"routing": {"lam": 0.2}}, client_id="c0", edge_id="e0").routing.lam == 0.2
