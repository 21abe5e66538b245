"""Clients that die mid-round: their Last Will marks them offline, rounds close without them, they come back later."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment
from fedhlm.roles.client import Client
from fedhlm.roles.edge import EdgeServer
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import ClientStatus, ThresholdUpdate
from test_endpoint import Inbox
from test_reliability_support import T, assignment, federated_spec, round_inputs, users, wait_until

pytestmark = pytest.mark.reliability

ASSIGN = assignment(10, 2)  # 5 clients per edge
VICTIMS = ["c00", "c01"]  # 20 %: one per edge
DEADLINE_S = 6.0


def run_round_with_kills(dep: Deployment, round_: int, victims: list[str], skip: set[str]) -> float:
    """Every live client routes and trains; each victim routes half its tokens, then dies without a DISCONNECT."""
    inputs = round_inputs(dep.clients, round_, 10)

    def one(cid: str) -> None:
        client = dep.clients[cid]
        if cid in victims:
            client.run_round(round_, inputs[cid][:5])
            client.endpoint.abort()  # as a crash: the broker publishes its Last Will
            return
        client.run_round(round_, inputs[cid])
        client.finish_round(round_)

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(dep.clients)) as pool:
        list(pool.map(one, [c for c in dep.clients if c not in skip]))
    return time.monotonic() - t0


def test_20_percent_of_clients_killed_mid_round_rounds_close_and_they_rejoin_later(tmp_path) -> None:
    broker = LocalBroker(users(ASSIGN)).start()
    spec = federated_spec(ASSIGN, tmp_path, federation=dict(quorum=0.75, round_deadline_s=DEADLINE_S))
    dep = Deployment(spec, broker.address).start()
    presence = Inbox()
    watcher = Endpoint(broker.address("admin"))
    watcher.subscribe("fedhlm/v1/client/+/status", presence)
    watcher.start().wait_connected()
    try:
        run_round_with_kills(dep, 0, [], set())
        killed_round_s = run_round_with_kills(dep, 1, VICTIMS, set())
        dead_round_s = run_round_with_kills(dep, 2, [], set(VICTIMS))

        # their Last Will: retained offline status, and the edges stopped waiting for them
        assert wait_until(lambda: all(any(i.message.client_id == v and not i.message.online for i in presence.items)
                                      for v in VICTIMS), 5)
        assert {e: edge.absent for e, edge in dep.edges.items()} == {"e0": {"c00"}, "e1": {"c01"}}
        for edge_id, edge in dep.edges.items():
            alive = sorted(c for c, e in ASSIGN.items() if e == edge_id and c not in VICTIMS)
            assert [h["participants"] for h in edge.history[1:3]] == [alive, alive]
        # closed as soon as every live client reported (not at the deadline); no client waited in vain
        assert killed_round_s < DEADLINE_S / 2 and dead_round_s < DEADLINE_S / 2
        assert all(c.counters.rounds_without_model == 0 for cid, c in dep.clients.items() if cid not in VICTIMS)

        # the victims come back (a fresh process each) and join the round the edges are collecting
        for cid in VICTIMS:
            settings = dataclasses.replace(spec.client, client_id=cid, edge_id=ASSIGN[cid])
            dep.clients[cid] = Client(settings, broker.address(cid), spec.head_factory(), spec.class_of).start()
        assert all(wait_until(lambda c=c: dep.clients[c].current_round() == 3, 5) for c in VICTIMS)
        assert wait_until(lambda: all(not edge.absent for edge in dep.edges.values()), 5)
        back_round_s = run_round_with_kills(dep, 3, [], set())
        for edge_id, edge in dep.edges.items():
            members = sorted(c for c, e in ASSIGN.items() if e == edge_id)
            assert edge.round == 4 and edge.history[3]["participants"] == members
            assert edge.rejected == {}  # nothing stale: the returners did not replay old rounds
        print(f"\nclient loss: 4/4 rounds completed with {len(VICTIMS)}/{len(ASSIGN)} clients killed in round 1; "
              f"round times {killed_round_s:.2f} s (kill), {dead_round_s:.2f} s (without them), "
              f"{back_round_s:.2f} s (back); deadline {DEADLINE_S} s")
    finally:
        watcher.close()
        dep.stop()
        broker.cleanup()


# A client as its own process: an Endpoint with its Last Will that announces itself and then idles.
CLIENT_PROCESS = textwrap.dedent("""
    import json, sys, time
    from fedhlm.transport import topics
    from fedhlm.transport.address import BrokerAddress
    from fedhlm.transport.endpoint import Endpoint
    from fedhlm.transport.messages import ClientStatus
    cfg = json.loads(sys.stdin.readline())  # credentials on stdin, never on the command line
    cid, edge = cfg["client_id"], cfg["edge_id"]
    address = BrokerAddress(cfg["host"], cfg["port"], cid, cfg["password"])
    will = (topics.client_status(cid), ClientStatus(cid, False, edge, time.time()))
    ep = Endpoint(address, persistent=True, will=will).start().wait_connected(10)
    ep.publish(topics.client_status(cid), ClientStatus(cid, True, edge, time.time()), qos=1, retain=True, wait=True)
    print("ready", flush=True)
    time.sleep(600)
""")


def spawn_client(broker: LocalBroker, cid: str, edge: str) -> subprocess.Popen:
    address = broker.address(cid)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(dict(host=address.host, port=address.port, client_id=cid, edge_id=edge,
                                     password=address.password)) + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigkilled_client_process_is_marked_offline_and_the_round_closes_without_it(tmp_path) -> None:
    members = {"c00": "e0", "c01": "e0"}
    broker = LocalBroker(users(members)).start()
    init = {"tau": np.array(0.5, np.float32), "temperature": np.array(T, np.float32)}
    edge = EdgeServer("e0", broker.address("e0"), list(members), init, quorum=0.5, deadline_s=DEADLINE_S,
                      cloud_every=1000).start()
    c00 = Endpoint(broker.address("c00")).start().wait_connected()
    proc = spawn_client(broker, "c01", "e0")
    returned: Endpoint | None = None

    def send(endpoint: Endpoint, round_: int, tau: float) -> None:
        cid = endpoint.client_id
        update = ThresholdUpdate(cid, "e0", round_, 10, {"tau": np.array(tau, np.float32),
                                                          "temperature": np.array(T, np.float32)})
        endpoint.publish(topics.edge_update("e0", cid), update, qos=1, wait=True)

    try:
        assert wait_until(lambda: edge.absent == set(), 2)
        t_kill = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert wait_until(lambda: edge.absent == {"c01"}, 5), "no Last Will reached the edge"
        will_s = time.monotonic() - t_kill
        send(c00, 0, 0.3)
        assert wait_until(lambda: edge.round == 1, DEADLINE_S / 2), "the round waited for the dead process"
        closed_s = time.monotonic() - t_kill
        assert edge.history[0]["participants"] == ["c00"] and float(edge.params["tau"]) == pytest.approx(0.3)

        # c01 restarts (same id, its session kept at the broker): online again, its update counts in round 1
        returned = Endpoint(broker.address("c01"), persistent=True).start().wait_connected()
        returned.publish(topics.client_status("c01"), ClientStatus("c01", True, "e0", time.time()), qos=1,
                         retain=True, wait=True)
        assert wait_until(lambda: edge.absent == set(), 5)
        send(returned, 1, 0.7)
        send(c00, 1, 0.3)
        assert wait_until(lambda: edge.round == 2, 5)
        assert edge.history[1]["participants"] == ["c00", "c01"]
        assert float(edge.params["tau"]) == pytest.approx(0.5) and edge.rejected == {}
        print(f"\nSIGKILL: Last Will at the edge after {will_s * 1000:.0f} ms, round closed "
              f"{closed_s * 1000:.0f} ms after the kill (deadline {DEADLINE_S} s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for endpoint in (c00, returned):
            if endpoint is not None:
                endpoint.close()
        edge.stop()
        broker.cleanup()


def test_silent_but_online_client_is_waited_for_until_the_deadline_then_left_out() -> None:
    """No Will, no update (a hung client): only quorum and deadline can close the round."""
    members = {"c00": "e0", "c01": "e0", "c02": "e0"}
    broker = LocalBroker(users(members)).start()
    deadline_s = 1.0
    init = {"tau": np.array(0.5, np.float32), "temperature": np.array(T, np.float32)}
    t0 = time.monotonic()  # the round opens when the edge is made
    edge = EdgeServer("e0", broker.address("e0"), list(members), init, quorum=0.6, deadline_s=deadline_s,
                      cloud_every=1000).start()
    ends = {c: Endpoint(broker.address(c)).start().wait_connected() for c in members}
    try:
        ends["c02"].publish(topics.client_status("c02"), ClientStatus("c02", True, "e0", time.time()), qos=1,
                            retain=True, wait=True)
        for cid, tau in (("c00", 0.2), ("c01", 0.4)):
            update = ThresholdUpdate(cid, "e0", 0, 10, {"tau": np.array(tau, np.float32),
                                                         "temperature": np.array(T, np.float32)})
            ends[cid].publish(topics.edge_update("e0", cid), update, qos=1, wait=True)
        assert wait_until(lambda: edge.round == 1, 3 * deadline_s)
        closed_s = time.monotonic() - t0
        assert deadline_s <= closed_s < 2 * deadline_s  # it did wait for c02, but only until the deadline
        assert edge.history[0]["participants"] == ["c00", "c01"] and edge.absent == set()
        assert float(edge.params["tau"]) == pytest.approx(0.3)
    finally:
        for endpoint in ends.values():
            endpoint.close()
        edge.stop()
        broker.cleanup()


@pytest.mark.parametrize("shared_loop", [False, True], ids=["own-thread", "shared-loop"])
def test_client_back_after_a_dropped_connection_is_marked_online_again(shared_loop: bool) -> None:
    """A network blip: the broker publishes the Will ("offline", retained); the client reconnects by itself and
    must say "online" again, or its edge and every later subscriber would take it for gone."""
    from fedhlm.roles.client import ClientSettings
    from fedhlm.maths.threshold import ThresholdHead
    from fedhlm.models.head_fit import TorchHead
    from fedhlm.transport.network import OwnThreads, SharedLoop

    broker = LocalBroker(users({"c00": "e0"})).start()
    network = SharedLoop(handler_threads=2) if shared_loop else OwnThreads()
    watch = Inbox()
    watcher = Endpoint(broker.address("e0"))
    watcher.subscribe(topics.client_status("c00"), watch)
    watcher.start().wait_connected()
    settings = ClientSettings(client_id="c00", edge_id="e0", policy="always")
    client = Client(settings, broker.address("c00"), TorchHead(ThresholdHead(tau=0.5)), lambda t: t, network=network)
    try:
        client.start()
        assert watch.wait_until(lambda items: [i.message.online for i in items] == [True])
        client.endpoint._client.socket().shutdown(socket.SHUT_RDWR)  # the link dies; the endpoint lives on
        states = watch.wait_until(lambda items: [i.message.online for i in items][-2:] == [False, True], 10)
        assert [i.message.online for i in states] == [True, False, True], states
        late = Inbox()  # the retained status a newcomer sees is "online" again
        newcomer = Endpoint(broker.address("admin"))
        newcomer.subscribe(topics.client_status("c00"), late)
        newcomer.start().wait_connected()
        (retained,) = late.wait_for(1)
        assert retained.retain and retained.message.online is True
        newcomer.close()
    finally:
        client.stop()
        watcher.close()
        network.close()
        broker.cleanup()
