"""A broker per edge site bridged to a cloud broker (issue 17, item 1), with real Mosquittos.

The same federation runs over one broker and over bridged site brokers and must learn the same
thresholds; a site's broker only ever sees its own clients; a client of one site cannot reach another
site's subtree through the bridges; and a bridge that drops for longer than its keepalive loses no
threshold update and answers no token twice.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import numpy as np
import pytest

from fedhlm.roles.deployment import Deployment
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import ClientStatus, LLMVerdict, ThresholdUpdate
from fedhlm.transport.topology import BridgedBrokers, FlatBrokers
from test_endpoint import Inbox
from test_reliability_llm_requests import bad_request
from test_reliability_support import assignment, federated_spec, round_inputs, users

ASSIGN = assignment(4, 2)  # c00, c02 -> e0; c01, c03 -> e1
ROUNDS = 4


def run(topology, rounds: int = ROUNDS, between=None) -> dict:  # noqa: ANN001
    """`rounds` rounds of a learned-threshold federation over `topology`; what it learned and sent."""
    spec = federated_spec(ASSIGN, routing=dict(local_steps=5), federation=dict(cloud_every=2))
    with topology:
        dep = Deployment(spec, topology.address).start()
        routed = []
        try:
            for r in range(rounds):
                if between is not None:
                    between(r, topology)
                routed += dep.run_round(r, round_inputs(ASSIGN, r, 12))
        finally:
            dep.stop()
        logs = {name: b.log_file.read_text() for name, b in topology.brokers().items()}
    return {"edges": {e: [h["tau"] for h in edge.history] for e, edge in dep.edges.items()},
            "cloud": [h["tau"] for h in dep.cloud.history], "routed": routed, "logs": logs,
            "llm_requests": sum(w.stats.requests for w in dep.llm),
            "cloud_duplicates": dep.cloud.duplicates, "edge_duplicates": sum(e.duplicates for e in dep.edges.values()),
            "late": sum(c.endpoint.stats().dropped["late_reply"] for c in dep.clients.values()),
            "clients": dep.clients}


def connected_ids(log: str) -> set[str]:
    return set(re.findall(r"New client connected from \S+ as (\S+) ", log))


def test_bridged_site_brokers_carry_the_federation_as_one_broker_does() -> None:
    flat = run(FlatBrokers(users(ASSIGN), ASSIGN))
    bridged = run(BridgedBrokers(users(ASSIGN), ASSIGN))
    assert bridged["edges"] == flat["edges"] and bridged["cloud"] == flat["cloud"]  # the same thresholds, round by round
    assert len(bridged["cloud"]) == ROUNDS // 2
    assert bridged["llm_requests"] == flat["llm_requests"] > 0
    assert Counter(t.route for t in bridged["routed"]) == Counter(t.route for t in flat["routed"])
    assert not [t for t in bridged["routed"] if t.reason == "fallback"]
    # where each role connected: a site broker sees its own clients and edge (and the bridge's local side)
    logs = bridged["logs"]
    assert {"c00", "c02", "e0"} <= connected_ids(logs["e0"]) and not {"c01", "c03", "e1"} & connected_ids(logs["e0"])
    assert {"c01", "c03", "e1"} <= connected_ids(logs["e1"]) and not {"c00", "c02", "e0"} & connected_ids(logs["e1"])
    assert connected_ids(logs["cloud"]) == {"cloud", "llm", "bridge-e0", "bridge-e1"}


@pytest.mark.reliability
def test_a_client_of_one_site_cannot_reach_another_sites_subtree_through_the_bridges() -> None:
    """c00 (site e0) writes into e1's update, model and resolve topics, c01's verdicts and status, and the global
    update of e1, on its own broker: nothing of it reaches site e1 or the cloud. Its LLM request does go up."""
    with BridgedBrokers(users(ASSIGN), ASSIGN) as topo:
        at_e1, at_cloud = Inbox(), Inbox()
        spies = [Endpoint(topo.site_admin("e1")), Endpoint(topo.address("admin"))]
        spies[0].subscribe("fedhlm/v1/#", at_e1)
        spies[1].subscribe("fedhlm/v1/#", at_cloud)
        attacker = Endpoint(topo.address("c00"))
        try:
            for ep in (*spies, attacker):
                ep.start().wait_connected(5)
            update = ThresholdUpdate("c00", "e1", 0, 5, {"tau": np.array(9.0, np.float32)})
            forged = LLMVerdict("c01", "s", 1, True, 1, 0.5, 0.5, 1.0, "llm")
            attempts = [(topics.edge_update("e1", "c00"), update), (topics.global_update("e1"), update),
                        (topics.client_llm_reply("c01"), forged), (topics.client_status("c01"),
                                                                    ClientStatus("c01", False, "e1", 1.0))]
            for topic, message in attempts:
                try:
                    attacker.publish(topic, message, qos=1, wait=True, timeout_s=3)
                except PermissionError:
                    pass  # refused by its own site's ACL already
            time.sleep(1.5)
            crossed = [i.topic for i in at_e1.items + at_cloud.items if i.topic.startswith("fedhlm/v1/")
                       and not i.topic.endswith("/state")]
            assert not crossed, crossed
            # the bridge does carry what it must: an LLM request from site e0 reaches the cloud broker
            attacker._publish(topics.llm_request(), bad_request(0), 1,
                              False, response_topic=topics.client_llm_reply("c00"), correlation=b"x")
            assert at_cloud.wait_for(1, timeout_s=5)[0].topic == topics.llm_request()
            assert not at_e1.items
            # and site e0's bridge account cannot write site e1's aggregate at the cloud (its ACL: e0's only)
            with Endpoint(topo.cloud.address("bridge-e0")) as bridge_creds:
                bridge_creds.wait_connected(5)
                with pytest.raises(PermissionError):
                    bridge_creds.publish(topics.global_update("e1"), update, qos=1, wait=True)
                bridge_creds.publish(topics.global_update("e0"), ThresholdUpdate("c00", "e0", 0, 5, update.params),
                                     qos=1, wait=True)  # its own site's: allowed
        finally:
            for ep in (*spies, attacker):
                ep.close()


@pytest.mark.reliability
def test_a_bridge_down_longer_than_its_keepalive_loses_no_update_and_answers_no_token_twice() -> None:
    """The cloud broker is stopped for 8 s (bridge keepalive 5 s) while round 2 runs, then restarted from its
    persistence: tokens sent meanwhile fall back to the SLM (counted), none gets two verdicts, every threshold
    update still reaches its edge, and every edge aggregate reaches the cloud (the bridge queued it)."""
    outage: dict[str, float] = {}

    def cut(r: int, topo: BridgedBrokers) -> None:
        if r != 2:
            return
        topo.cloud.stop()
        outage["down"] = time.monotonic()

        def back() -> None:
            time.sleep(8.0)
            topo.cloud.start()
            outage["up"] = time.monotonic()
        threading.Thread(target=back, daemon=True).start()

    topo = BridgedBrokers(users(ASSIGN), ASSIGN, keepalive_s=5)
    out = run(topo, rounds=ROUNDS, between=cut)
    routed = out["routed"]
    assert outage["up"] - outage["down"] >= 8.0
    fallbacks = [t for t in routed if t.reason == "fallback"]
    assert fallbacks and all(t.round == 2 for t in fallbacks)  # only while the cloud was away
    assert len({(t.client_id, t.uid) for t in routed}) == len(routed)  # one outcome per token
    assert out["late"] == out["edge_duplicates"] == out["cloud_duplicates"] == 0  # no second answer, no update twice
    assert all(len(taus) == ROUNDS for taus in out["edges"].values())  # every round closed at every edge
    assert len(out["cloud"]) == ROUNDS // 2  # both cloud rounds, the second after the outage
    assert len(re.findall(r"New client connected from \S+ as bridge-e0 ", out["logs"]["cloud"])) >= 2  # bridge back


@pytest.mark.reliability
def test_a_site_broker_restart_between_rounds_costs_no_update_and_the_bridge_comes_back() -> None:
    """Site e0's Mosquitto is stopped for 3 s and restarted from its persistence before round 2: its clients, its
    edge and its bridge reconnect (persistent sessions on both sides), every round closes at every edge with every
    member, and both cloud rounds aggregate both edges."""
    def restart(r: int, topo: BridgedBrokers) -> None:
        if r == 2:
            topo.sites["e0"].stop()
            time.sleep(3.0)
            topo.sites["e0"].start()
            topo.wait_bridged("e0", 10.0)

    out = run(BridgedBrokers(users(ASSIGN), ASSIGN, keepalive_s=5), rounds=ROUNDS, between=restart)
    assert all(len(taus) == ROUNDS for taus in out["edges"].values())
    assert out["edge_duplicates"] == out["cloud_duplicates"] == 0
    assert len(out["cloud"]) == ROUNDS // 2
    assert not [t for t in out["routed"] if t.reason == "fallback"]  # nothing was in flight across the restart
    assert len(re.findall(r"New client connected from \S+ as e0 ", out["logs"]["e0"])) >= 2  # e0 came back to it
