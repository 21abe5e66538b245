"""Security: a hostile client cannot speak for others, TLS carries the roles, no password reaches a log or file."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment
from fedhlm.roles.edge import EdgeServer
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import ClientStatus, LLMVerdict, PeerQuery, PeerReply, ThresholdModel, ThresholdUpdate
from fedhlm.transport.netloop import NetworkLoop
import test_p2p
from test_endpoint import Inbox
from test_reliability_support import T, assignment, federated_spec, round_inputs, users, wait_until

pytestmark = pytest.mark.reliability


def params(tau: float) -> dict[str, np.ndarray]:
    return {"tau": np.array(tau, np.float32), "temperature": np.array(T, np.float32)}


def test_hostile_client_cannot_forge_updates_models_replies_or_status_and_the_aggregate_is_unchanged() -> None:
    members = {"c00": "e0", "c01": "e0", "c02": "e0"}
    broker = LocalBroker(users(members)).start()
    edge = EdgeServer("e0", broker.address("e0"), list(members), params(0.5), quorum=1.0, deadline_s=10.0,
                      cloud_every=1000).start()
    bus = Inbox()
    spy = Endpoint(broker.address("admin"))
    spy.subscribe("fedhlm/v1/#", bus)
    spy.start().wait_connected()
    ends = {c: Endpoint(broker.address(c)).start().wait_connected() for c in members}
    hostile = ends["c02"]
    try:
        forgeries = [  # what c02 would need to steer the run, each refused by the broker (ACL)
            (topics.edge_update("e0", "c00"), ThresholdUpdate("c00", "e0", 0, 10_000, params(900.0))),
            (topics.edge_model("e0"), ThresholdModel("e0", "edge", 0, 10_000, params(900.0))),
            (topics.global_model(), ThresholdModel("cloud", "global", 0, 10_000, params(900.0))),
            (topics.client_llm_reply("c00"), LLMVerdict("c00", "s", 1, True, 1, 1.0, 1.0, 0.0, "llm")),
            (topics.client_status("c00"), ClientStatus("c00", False, "e0", time.time())),  # "c00 is dead"
        ]
        for topic, message in forgeries:
            with pytest.raises(PermissionError, match="Not authorized"):
                hostile.publish(topic, message, qos=1, wait=True)
        # on its own topic it may publish, but an update in c00's name is not c00's update
        hostile.publish(topics.edge_update("e0", "c02"), ThresholdUpdate("c00", "e0", 0, 10_000, params(900.0)),
                        qos=1, wait=True)
        for cid, tau, n in (("c00", 0.3, 10), ("c01", 0.5, 30), ("c02", 0.7, 10)):
            ends[cid].publish(topics.edge_update("e0", cid), ThresholdUpdate(cid, "e0", 0, n, params(tau)), qos=1,
                              wait=True)
        assert wait_until(lambda: edge.round == 1, 5)
        assert float(edge.params["tau"]) == pytest.approx((0.3 * 10 + 0.5 * 30 + 0.7 * 10) / 50)
        assert edge.history[0]["participants"] == ["c00", "c01", "c02"] and edge.history[0]["samples"] == 50
        assert sum(edge.rejected.values()) == 1 and edge.absent == set()
        assert hostile.stats().publish_refused == len(forgeries)
        time.sleep(0.2)
        forged = [i.topic for i in bus.items if any(np.any(np.asarray(v) == 900.0) for v in
                                                    getattr(i.message, "params", {}).values())]
        assert forged == [topics.edge_update("e0", "c02")]  # the one the edge rejected; none on others' topics
        assert not [i for i in bus.items if isinstance(i.message, (ClientStatus, LLMVerdict))]
        assert [i.topic for i in bus.items if isinstance(i.message, ThresholdModel)] == [topics.edge_model("e0")]
    finally:
        for endpoint in (*ends.values(), spy):
            endpoint.close()
        edge.stop()
        broker.cleanup()


def make_certificates(folder: Path, cn: str = "FedHLM test CA") -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl CLI); (certfile, keyfile, cafile)."""
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt, ext = folder / "server.key", folder / "server.csr", folder / "server.crt", folder / "san.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "1", "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "1", "-extfile", str(ext))
    return crt, key, ca_crt


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is needed to make test certificates")
@pytest.mark.parametrize("shared_loop", [False, True], ids=["own-threads", "shared-loop"])
def test_tls_listener_carries_roles_and_refuses_plain_or_untrusted_connections(tmp_path, shared_loop: bool) -> None:
    certs = make_certificates(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca = make_certificates(tmp_path / "other", cn="Another CA")[2]
    loop = NetworkLoop().start() if shared_loop else None
    with LocalBroker(users({"c00": "e0"}), tls=certs) as broker:
        assert broker.tls_port is not None and broker.tls_port != broker.port
        inbox = Inbox()
        edge = Endpoint(broker.address("e0", tls=True), network_loop=loop)
        edge.subscribe(topics.edge_update_filter("e0"), inbox)
        client = Endpoint(broker.address("c00", tls=True), network_loop=loop)
        try:
            edge.start().wait_connected(5)
            client.start().wait_connected(5)
            update = ThresholdUpdate("c00", "e0", 0, 10, params(0.25))
            client.publish(topics.edge_update("e0", "c00"), update, qos=1, wait=True)
            (got,) = inbox.wait_for(1)
            assert got.message == update and broker.address("c00", tls=True).public_url.startswith("mqtts://")
            # a burst of QoS 1 updates and their acks through TLS (on the shared loop: read while bytes wait)
            burst = [ThresholdUpdate("c00", "e0", r, 10, params(0.25)) for r in range(1, 51)]
            for message in burst:
                client.publish(topics.edge_update("e0", "c00"), message, qos=1)
            assert client.flush(5)
            got_all = inbox.wait_for(51, timeout_s=5)
            assert sorted(i.message.round for i in got_all) == list(range(51))
        finally:
            client.close()
            edge.close()
        address = broker.address("c00", tls=True)
        refused = {
            "plain MQTT on the TLS port": BrokerAddress(address.host, address.port, "c00", address.password),
            "a CA that did not sign the broker": BrokerAddress(address.host, address.port, "c00", address.password,
                                                               tls=True, ca_certs=str(other_ca)),
        }
        for why, bad in refused.items():
            endpoint = Endpoint(bad, reconnect_delay_s=(1.0, 1.0), network_loop=loop)
            try:
                with pytest.raises(TimeoutError):
                    endpoint.start().wait_connected(1.0)
            finally:
                endpoint.close()
        assert "alert unknown ca" in broker.log_file.read_text()  # the client refused the broker's certificate
    if loop is not None:
        assert len(loop) == 0
        loop.stop()


def test_no_password_reaches_logs_or_run_files(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    assign = assignment(2, 1)
    broker = LocalBroker(users(assign), run_dir=tmp_path / "broker").start()
    passwords = [broker.address(u).password for u in users(assign)]
    dep = Deployment(federated_spec(assign, tmp_path / "ckpt", routing=dict(llm_timeout_s=1.0)), broker.address).start()
    try:
        dep.run_round(0, round_inputs(assign, 0, 8))
        broker.restart()  # disconnects and reconnects log the broker address on every role
        dep.run_round(1, round_inputs(assign, 1, 8))
        bad = Endpoint(broker.address("c00").with_credentials("c00", "wrong-" + passwords[0]), client_id="intruder")
        with pytest.raises(ConnectionRefusedError):
            bad.start().wait_connected(5)
        bad.close()
        summary = json.dumps({e: edge.history for e, edge in dep.edges.items()}) + repr(broker.address("c00"))
        summary += "".join(repr(c.endpoint) for c in dep.clients.values())
    finally:
        dep.stop()
        broker.stop()
    assert "disconnected from mqtt://" in caplog.text and "refused" in caplog.text  # the paths that print addresses
    files = {p.name: p.read_bytes() for p in (tmp_path).rglob("*") if p.is_file()}
    assert "passwd" in files and "mosquitto.log" in files and "e0.json" in files
    for password in passwords:
        assert password and password not in caplog.text and password not in summary
        assert not [name for name, data in files.items() if password.encode() in data]
    broker.cleanup()


def test_with_known_clusters_a_client_cannot_read_or_write_another_clusters_peer_queries() -> None:
    """Issue 19, item 5: c02 (cluster e1) neither reads e0's peer queries (its members' context embeddings) nor
    posts into them; c00 and c01 (e0) still exchange theirs."""
    members = {"c00": "e0", "c01": "e0", "c02": "e1"}
    broker = LocalBroker(users(members), clusters=members).start()
    spy_inbox, member_inbox = Inbox(), Inbox()
    spy = Endpoint(broker.address("c02"))
    spy.subscribe(topics.edge_p2p_query("e0"), spy_inbox)
    member = Endpoint(broker.address("c01"))
    member.subscribe(topics.edge_p2p_query("e0"), member_inbox)
    asker = Endpoint(broker.address("c00"))
    try:
        for ep in (spy, member, asker):
            ep.start().wait_connected(5)
        asker.publish(topics.edge_p2p_query("e0"), PeerQuery("c00", "e0", 1, "minilm", [0.6, 0.8], hops=0, delta=0.9),
                      qos=1, wait=True)
        assert len(member_inbox.wait_for(1, timeout_s=3)) == 1
        with pytest.raises(PermissionError):  # the broker refuses c02's post into e0's queries
            spy.publish(topics.edge_p2p_query("e0"), PeerQuery("c02", "e1", 1, "minilm", [0.6, 0.8], hops=0, delta=0.9),
                        qos=1, wait=True)
        time.sleep(0.5)
        assert not spy_inbox.items, "a client of another cluster read e0's peer query"
        assert len(member_inbox.items) == 1
    finally:
        for ep in (spy, member, asker):
            ep.close()
        broker.stop()


def test_a_peer_answers_only_under_its_own_login_and_a_lying_peer_is_excluded() -> None:
    """Issue 19, item 5: c003, a member of e0, answers every peer query with class 3 at similarity 1.0 (the LLM
    says 2). The broker refuses its reply written under c001's name; the asker reads the responder from the
    reply topic, and after three audited disagreements takes nothing from c003 any more."""
    members = {**test_p2p.ASSIGNMENT, "c003": "e0"}
    roles = {**dict.fromkeys(members, "client"), "e0": "edge", "e1": "edge", "cloud": "cloud", "llm": "llm"}
    with LocalBroker(roles, clusters=members) as broker:
        liar = Endpoint(broker.address("c003"))
        liar.subscribe(topics.edge_p2p_query("e0"), lambda inbound: liar.reply(
            inbound, PeerReply("c003", inbound.message.seq, token=3, similarity=1.0), per_responder=True), qos=0,
            no_local=True)
        liar.start().wait_connected(5)
        with pytest.raises(PermissionError):  # a reply at another member's id: that level is c001's login
            liar.publish(topics.client_p2p_reply("c000", "c001"), PeerReply("c001", 1, 3, 1.0), qos=1, wait=True)
        dep = test_p2p.deployment(broker, audit=0.25)
        try:
            rng = np.random.default_rng(7)
            records = dep.clients["c000"].run_round(0, [test_p2p.token(i, rng.normal(size=test_p2p.DIM))
                                                        for i in range(60)])
        finally:
            dep.stop()
            liar.close()
    victim = dep.clients["c000"]
    lied = [i for i, r in enumerate(records) if r.final == 3]
    assert victim.counters.peers_excluded == 1
    assert lied and max(lied) < 40 and len(lied) < 20, lied  # without exclusion: 48 of 60 wrong, to the end
    assert all(r.final == 2 for r in records[max(lied) + 1:])
    assert victim.endpoint.stats().dropped["excluded_peer"] >= 10


def test_a_retained_status_for_another_edge_does_not_steer_a_fresh_edge() -> None:
    """Issue 19, minor: an earlier run left c01 "offline" in cluster e9 (retained); a fresh e0 that has c01 as a
    member ignores it, and still follows a status that names e0."""
    members = {"c00": "e0", "c01": "e0"}
    broker = LocalBroker(users(members)).start()
    admin = Endpoint(broker.address("admin")).start().wait_connected()
    try:
        admin.publish(topics.client_status("c01"), ClientStatus("c01", False, "e9", 1.0), qos=1, retain=True, wait=True)
        admin.publish(topics.client_status("c00"), ClientStatus("c00", False, "e0", 1.0), qos=1, retain=True, wait=True)
        edge = EdgeServer("e0", broker.address("e0"), list(members), params(0.5), quorum=1.0, deadline_s=10.0,
                          cloud_every=1000).start()
        try:
            assert wait_until(lambda: edge.absent == {"c00"}, 5.0), edge.absent
            assert wait_until(lambda: edge.rejected["other edge's status"] == 1, 5.0)
        finally:
            edge.stop()
    finally:
        admin.close()
        broker.stop()
