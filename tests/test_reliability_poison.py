"""Poisoned threshold updates: absurd values are rejected end to end; a robust aggregate shrugs off a finite liar."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fedhlm.core.aggregation import WeightedParams, fedavg
from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment
from fedhlm.roles.edge import EdgeServer
from fedhlm.transport import topics
from fedhlm.transport.codec import encode
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import ThresholdUpdate
from test_reliability_support import T, assignment, federated_spec, round_inputs, users, wait_until

pytestmark = pytest.mark.reliability


def params(tau) -> dict[str, np.ndarray]:
    return {"tau": np.array(tau, np.float32), "temperature": np.array(T, np.float32)}


def with_tau_bytes(update: ThresholdUpdate, raw: bytes) -> bytes:
    """The update's wire bytes with tau's float32 replaced by `raw` (our own codec refuses to encode NaN)."""
    envelope = msgpack.unpackb(encode(update), raw=False)
    envelope["b"]["params"]["tau"]["data"] = raw
    return msgpack.packb(envelope, use_bin_type=True)


def publish_raw(broker: LocalBroker, user: str, topic: str, payloads: list[bytes]) -> None:
    """Publish bytes with a client's own credentials, as a client running modified code would."""
    address = broker.address(user)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user + "-raw", protocol=mqtt.MQTTv5)
    client.username_pw_set(address.username, address.password)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        for payload in payloads:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(5)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_nan_inf_and_out_of_range_thresholds_are_rejected_and_the_aggregate_ignores_them() -> None:
    members = {"c00": "e0", "c01": "e0", "c02": "e0"}
    broker = LocalBroker(users(members)).start()
    edge = EdgeServer("e0", broker.address("e0"), list(members), params(0.5), quorum=1.0, deadline_s=10.0,
                      cloud_every=1000, max_abs=1e3).start()
    ends = {c: Endpoint(broker.address(c)).start().wait_connected() for c in members}
    try:
        liar = ends["c02"]
        topic = topics.edge_update("e0", "c02")
        template = ThresholdUpdate("c02", "e0", 0, 10_000, params(0.5))
        publish_raw(broker, "c02", topic, [with_tau_bytes(template, np.array(x, "<f4").tobytes())
                                           for x in (np.nan, np.inf, -np.inf)])
        for poisoned in (params(1e6), params(-5e3), params([0.5, 0.5]),
                         {**params(0.5), "bias": np.array(1.0, np.float32)}):
            liar.publish(topic, ThresholdUpdate("c02", "e0", 0, 10_000, poisoned), qos=1, wait=True)
        assert wait_until(lambda: sum(edge.rejected.values()) == 4, 5)
        assert edge.endpoint.stats().dropped == {"non_finite": 3}  # NaN and inf never decode
        assert set(edge.rejected) == {"parameter 'tau' is out of range (|x| > 1000)",
                                      "parameter 'tau' has shape (2,), expected ()",
                                      "parameter names ['bias', 'tau', 'temperature'] differ from "
                                      "['tau', 'temperature']"}
        assert edge.round == 0  # none of it counted as c02's update
        honest = {"c00": (0.3, 10), "c01": (0.5, 30), "c02": (0.7, 10)}  # c02's own honest update still counts
        for cid, (tau, n) in honest.items():
            ends[cid].publish(topics.edge_update("e0", cid), ThresholdUpdate(cid, "e0", 0, n, params(tau)), qos=1,
                              wait=True)
        assert wait_until(lambda: edge.round == 1, 5)
        expected = fedavg([WeightedParams(params(tau), n) for tau, n in honest.values()])
        assert float(edge.params["tau"]) == pytest.approx(float(expected["tau"]))
        assert edge.history[0]["samples"] == 50
        print(f"\npoison: 3 non-finite dropped by the codec, 4 absurd updates rejected by check_params; "
              f"edge tau {float(edge.params['tau']):.4f} = FedAvg of the honest updates")
    finally:
        for endpoint in ends.values():
            endpoint.close()
        edge.stop()
        broker.cleanup()


POISON_TAU = 900.0  # finite and within max_abs (1e3): validation lets it through, only the aggregate can resist


@pytest.mark.parametrize("method", ["fedavg", "median", "trimmed_mean"])
def test_one_poisoning_client_drags_fedavg_but_not_median_or_trimmed_mean(method: str) -> None:
    assign = assignment(5, 1)
    broker = LocalBroker(users(assign)).start()
    spec = federated_spec(assign, federation=dict(aggregation=method, trim_fraction=0.2, cloud_every=1000))
    dep = Deployment(spec, broker.address).start()
    try:
        liar = dep.clients["c04"]
        liar.upload_params = lambda: params(POISON_TAU)  # modified client code: it lies about its head
        honest = {c: client.head.effective_tau() for c, client in dep.clients.items() if c != "c04"}
        t0 = time.monotonic()
        dep.run_round(0, round_inputs(assign, 0, 10))
        edge = dep.edges["e0"]
        tau = float(edge.params["tau"])
        adopted = [c.head.effective_tau() for cid, c in dep.clients.items() if cid != "c04"]
        print(f"\n{method}: honest taus {[round(t, 3) for t in sorted(honest.values())]}, "
              f"one client sends {POISON_TAU}; edge tau {tau:.4f} ({time.monotonic() - t0:.2f} s)")
        assert edge.history[0]["participants"] == sorted(assign)  # the liar took part: nothing rejected it
        assert adopted == [pytest.approx(tau)] * 4  # and every honest client now routes with this tau
        if method == "fedavg":
            assert tau > 50.0  # dragged: no token has entropy that high, nothing would be offloaded
        else:
            assert min(honest.values()) <= tau <= max(honest.values())
    finally:
        dep.stop()
        broker.cleanup()


def test_a_member_cannot_set_its_clusters_threshold_by_claiming_samples_or_flooding_future_rounds() -> None:
    """Issue 19, item 2: an honest round aggregates as it should while one member, with its own credentials,
    floods updates for far-future rounds, claims 2^62 samples behind tau 50, and claims 10^6 samples behind
    tau 5 (within every bound): refused, refused, and capped at 10x the round's median weight."""
    members = {"c00": "e0", "c01": "e0", "c02": "e0"}
    broker = LocalBroker(users(members)).start()
    edge = EdgeServer("e0", broker.address("e0"), list(members), params(0.5), quorum=1.0, deadline_s=10.0,
                      cloud_every=1000, max_samples=10_000_000, max_weight_ratio=10.0).start()
    try:
        topic = topics.edge_update("e0", "c02")
        flood = [encode(ThresholdUpdate("c02", "e0", r, 100, params(9.0))) for r in range(2, 2002)]
        publish_raw(broker, "c02", topic, [*flood, encode(ThresholdUpdate("c02", "e0", 0, 2**62, params(50.0)))])
        publish_raw(broker, "c02", topic, [encode(ThresholdUpdate("c02", "e0", 0, 1_000_000, params(5.0)))])
        for c in ("c00", "c01"):
            publish_raw(broker, c, topics.edge_update("e0", c), [encode(ThresholdUpdate(c, "e0", 0, 100, params(0.5)))])
        assert wait_until(lambda: edge.round == 1, timeout_s=10)
        tau = float(edge.params["tau"])
        assert edge.rejected["future"] == 2000 and edge.rejected["implausible_samples"] == 1
        assert sum(len(b) for b in edge.collector._pending.values()) == 0
    finally:
        edge.stop()
        broker.stop()
    capped = (1000 * 5.0 + 200 * 0.5) / 1200  # c02 weighs 10 x the median count (100), not 10^6
    print(f"\nedge tau after the attack: {tau:.4f} (capped FedAvg {capped:.4f}; uncapped it would be "
          f"{(1_000_000 * 5.0 + 200 * 0.5) / 1_000_200:.4f}; honest 0.5)")
    assert tau == pytest.approx(capped, rel=1e-4)
