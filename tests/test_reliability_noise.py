"""Gaussian noise on uploaded thresholds (ClientSettings.noise_std): what each update reveals vs. how well FL converges.

Three edges train side by side, each with its own noise level and no cloud mixing, on the
synthetic LLM whose optimum is known; the test measures the noise on the wire and each
cluster's distance to the pooled optimum of its own clients' data.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment
from fedhlm.roles.client import Client
from fedhlm.maths.threshold import ThresholdHead, central_threshold
from fedhlm.models.head_fit import TorchHead
from test_reliability_support import LAM, T, assignment, federated_spec, round_inputs, users

pytestmark = pytest.mark.reliability

NOISE = {"e0": 0.0, "e1": 0.05, "e2": 0.2}
ROUNDS = 6


def spy_on_uploads(client: Client, gaps: list[float], temperatures: list[float]) -> None:
    """Record what the client uploads against its local head at that moment."""
    upload = client.upload_params

    def recorded() -> dict[str, np.ndarray]:
        sent = upload()
        gaps.append(float(sent["tau"]) - float(client.head_params()["tau"]))
        temperatures.append(float(sent["temperature"]))
        return sent

    client.upload_params = recorded


def test_noise_std_blurs_each_uploaded_threshold_and_fedavg_still_converges(tmp_path) -> None:
    assign = assignment(9, 3)
    overrides = {cid: {"routing": {"noise_std": NOISE[edge]}} for cid, edge in assign.items()}
    spec = federated_spec(
        assign, head_factory=lambda: TorchHead(ThresholdHead(tau=0.8, temperature=T)),
        routing=dict(local_steps=20, lr=1.0, lr_decay=2.0, exploration=0.3, verify="sample"),
        federation=dict(cloud_every=1000), deployment=dict(client_overrides=overrides),
    )
    gaps: dict[str, list[float]] = {e: [] for e in NOISE}
    temperatures: list[float] = []
    with LocalBroker(users(assign)) as broker:
        dep = Deployment(spec, broker.address).start()
        try:
            for client in dep.clients.values():
                spy_on_uploads(client, gaps[client.s.edge_id], temperatures)
            for r in range(ROUNDS):
                dep.run_round(r, round_inputs(assign, r, 30))
            result = {}
            for edge_id, edge in dep.edges.items():
                members = [c for c in dep.clients.values() if c.s.edge_id == edge_id]
                u = np.concatenate([c.pairs()[0][:, 0] for c in members])
                beta = np.concatenate([c.pairs()[1] for c in members])
                weights = np.concatenate([c.pairs()[2] for c in members])
                central = central_threshold(u, beta, LAM, method="sigmoid", temperature=T, weights=weights)
                result[edge_id] = dict(taus=[h["tau"] for h in edge.history], central=central,
                                       local=[c.head.effective_tau() for c in members])
        finally:
            dep.stop()

    print("\nnoise_std -> std of (uploaded - local tau), edge tau per round, pooled optimum, final error:")
    for edge_id, std in NOISE.items():
        r, g = result[edge_id], np.array(gaps[edge_id])
        error = abs(r["taus"][-1] - r["central"])
        r["error"] = error
        print(f"  {std:4.2f}: measured {g.std():.3f} over {g.size} uploads; taus {[round(t, 3) for t in r['taus']]}; "
              f"optimum {r['central']:.3f}; |error| {error:.3f}")
    assert temperatures == [pytest.approx(T)] * len(temperatures)  # only trainable parameters are noised
    assert all(len(gaps[e]) == 3 * ROUNDS for e in NOISE)
    assert np.all(np.array(gaps["e0"]) == 0.0)  # noise_std 0: the upload is the head, bit for bit
    for edge_id in ("e1", "e2"):
        measured = np.std(gaps[edge_id])
        assert 0.5 * NOISE[edge_id] < measured < 1.6 * NOISE[edge_id], (edge_id, measured)
    for r in result.values():  # every client holds the cluster model, not a noised copy of its own head
        assert r["local"] == [pytest.approx(r["taus"][-1])] * 3
    assert result["e0"]["error"] < 0.05  # without noise: at the pooled optimum
    assert result["e1"]["error"] < 0.15  # averaging 3 noisy updates a round keeps it near
    assert result["e2"]["error"] < 0.5  # sd 0.2 per update: FedAvg shrinks it by sqrt(3), still bounded
