"""A richer head learns, federated over a real Mosquitto, a signal the scalar entropy head cannot see.

The LLM rejects the draft exactly where a non-entropy column (the label-entropy slot of the `label`
feature set) is high; the entropy column is noise. The scalar head can only send everything or
nothing (and at lambda above the mean beta it keeps nearly all), while the linear head, averaged
by the edges and the cloud, learns to send the tokens whose signal is high. If the features were
ignored (the head saw only the entropy), the linear head would fail like the scalar one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhlm.core.records import TokenInput
from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings
from fedhlm.maths.route_features import feature_set
from fedhlm.models.head_fit import TorchHead, routing_head, warm_head_params
from fedhlm.roles.deployment import Deployment, DeploymentSpec
from fedhlm.transport.broker import LocalBroker

VOCAB = 8
CLIENTS = [f"c{i}" for i in range(4)]
EDGES = ["e0", "e1"]
P_DRAFT = 0.7
SIGNAL = 4  # the column that says the SLM is wrong (label_entropy in the `label` set)
WIDTH = feature_set("label").num_features


def q_fn(input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The context carries the signal (thousandths); the LLM rejects the draft (beta = 1) iff it is above 0.7."""
    wrong = torch.from_numpy(input_ids[:, 1].numpy() / 1000.0 > 0.7)
    q = torch.zeros(input_ids.shape[0], VOCAB)
    q[:, 0] = torch.where(wrong, 0.0, P_DRAFT)
    q[:, 1] = 1.0 - q[:, 0]
    return q


def make_inputs(rng: np.random.Generator, n: int, start_uid: int) -> list[TokenInput]:
    out = []
    for i in range(n):
        f = rng.uniform(0.0, 1.0, WIDTH).astype(np.float32)  # entropy and the other columns: noise
        out.append(TokenInput(
            uid=start_uid + i, context_ids=np.array([1, round(float(f[SIGNAL]) * 1000)], np.int32), draft_token=0,
            topk_ids=np.array([0, 1], np.int32), topk_probs=np.array([P_DRAFT, 1 - P_DRAFT], np.float32),
            tail_mass=0.0, features=f))
    return out


def run(broker, tmp_path, head: str, rounds: int = 6) -> dict[str, float]:  # noqa: ANN001
    routing = RoutingSettings(head=head, features="label", exploration=0.2, lam=0.2, local_steps=30, lr=2.0,
                              lr_decay=0.2, llm_timeout_s=10.0, verify="sample", temperature=0.25)
    settings = ClientSettings(client_id="x", edge_id="x", policy="learned", routing=routing,
                              p2p=P2PSettings(enabled=False),
                              federation=FederationSettings(quorum=1.0, round_deadline_s=5.0, cloud_every=1))
    spec = DeploymentSpec(assignment={c: EDGES[i % 2] for i, c in enumerate(CLIENTS)}, client=settings,
                          head_factory=lambda: TorchHead(routing_head(routing, 0.5, seed=0)), q_fn=q_fn,
                          class_of=lambda t: t if t < 2 else -1, checkpoint_dir=tmp_path / head)
    rng = np.random.default_rng(0)
    dep = Deployment(spec, broker.address).start()
    try:
        uid, last = 0, []
        for r in range(rounds):
            inputs = {c: make_inputs(rng, 60, uid + 60 * i) for i, c in enumerate(CLIENTS)}
            uid += 60 * len(CLIENTS)
            records = dep.run_round(r, inputs)
            by_uid = {t.uid: t for t in records}
            last = [(float(inp.features[SIGNAL]) > 0.7, by_uid[inp.uid].route == "llm" and by_uid[inp.uid].reason != "exploration")
                    for batch in inputs.values() for inp in batch]
        assert dep.cloud is not None and dep.cloud.history, "the cloud closed no round"
        weight = dep.cloud.params.get("weight")
    finally:
        dep.stop()
    wrong = [sent for is_wrong, sent in last if is_wrong]
    right = [sent for is_wrong, sent in last if not is_wrong]
    return {"sent_of_wrong": float(np.mean(wrong)), "sent_of_right": float(np.mean(right)),
            "signal_weight": None if weight is None else float(np.ravel(weight)[SIGNAL])}


@pytest.mark.slow
def test_a_linear_head_learns_a_signal_the_entropy_threshold_cannot_federated(tmp_path) -> None:
    users = {**{c: "client" for c in CLIENTS}, **{e: "edge" for e in EDGES}, "cloud": "cloud", "llm": "llm",
             "admin": "admin"}
    with LocalBroker(users) as broker:
        linear = run(broker, tmp_path, "linear")
        scalar = run(broker, tmp_path, "scalar")
    print(f"\nlast round, sent because uncertain: linear {linear}, scalar {scalar}")
    assert linear["sent_of_wrong"] >= 0.8 and linear["sent_of_wrong"] - linear["sent_of_right"] >= 0.6
    assert linear["signal_weight"] > 1.0  # the global model weighs the signal column, which started at 0
    # the entropy is noise: whatever the scalar head sends, it sends wrong and right drafts alike
    assert abs(scalar["sent_of_wrong"] - scalar["sent_of_right"]) <= 0.2


def calibration_pairs(n: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Calibration-split pairs of the same world: beta = 1 exactly where the signal column is above 0.7."""
    rng = np.random.default_rng(seed)
    feats = rng.uniform(0.0, 1.0, (n, WIDTH)).astype(np.float32)
    return feats, (feats[:, SIGNAL] > 0.7).astype(np.float32)


def test_a_richer_heads_round0_model_is_its_fit_on_the_calibration_pairs() -> None:
    """The warm start: a linear head fitted on calibration pairs weighs the signal column before any round, and
    routes the wrong drafts where the entropy unit vector it started as cannot."""
    feats, beta = calibration_pairs()
    routing = RoutingSettings(head="linear", features="label", lam=0.2, temperature=0.25)
    params, fitted = warm_head_params(routing, 0.5, 0, feats, beta)
    assert fitted is not None and fitted["pairs"] == len(beta) and fitted["loss_after"] < 0.7 * fitted["loss_before"]
    # the signal column weighs most, at unit norm: the same decisions at the unit vector's sigmoid steepness
    assert int(np.argmax(np.abs(params["weight"]))) == SIGNAL and np.linalg.norm(params["weight"]) == pytest.approx(1.0)
    assert fitted["scale"] > 1.0
    head = TorchHead(routing_head(routing, 0.5, seed=0))
    head.load(params)
    sent = np.array([head.route(f) for f in feats])
    assert sent[beta == 1].mean() >= 0.9 and sent[beta == 0].mean() <= 0.1


@pytest.mark.parametrize("routing", [RoutingSettings(head="scalar", features="label"),
                                     RoutingSettings(head="linear", features="label", warm_fit_steps=0)])
def test_no_warm_fit_for_the_scalar_head_or_zero_steps_the_start_is_the_threshold(routing) -> None:  # noqa: ANN001
    feats, beta = calibration_pairs()
    params, fitted = warm_head_params(routing, 0.5, 0, feats, beta)
    assert fitted is None and float(params["tau"]) == pytest.approx(0.5)
    if "weight" in params:
        assert np.array_equal(params["weight"], np.eye(WIDTH, dtype=np.float32)[0])
