"""Endpoint against a real private Mosquitto: pub/sub, request/response, Last Will, persistence, ACL, bad payloads."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack
import paho.mqtt.client as mqtt
import pytest

from fedhlm.transport.broker import LocalBroker
from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import encode
from fedhlm.transport.endpoint import Endpoint, Inbound
from fedhlm.transport.netloop import NetworkLoop
from fedhlm.transport.messages import (
    ClientStatus,
    LLMVerdict,
    PeerQuery,
    PeerReply,
    ThresholdModel,
    ThresholdUpdate,
    TokenRequest,
)

class Inbox:
    """A handler that keeps what it receives; `wait_for(n)` blocks until n messages arrived."""

    def __init__(self) -> None:
        self.items: list[Inbound] = []
        self._cond = threading.Condition()

    def __call__(self, inbound: Inbound) -> None:
        with self._cond:
            self.items.append(inbound)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[Inbound]:
        return self.wait_until(lambda items: len(items) >= n, timeout_s)

    def wait_until(self, done: Callable[[list[Inbound]], bool], timeout_s: float = 5.0) -> list[Inbound]:
        with self._cond:
            self._cond.wait_for(lambda: done(self.items), timeout_s)
            return list(self.items)


Connect = Callable[..., Endpoint]


@pytest.fixture(params=["own-threads", "shared-loop"])
def connect(broker: LocalBroker, request: pytest.FixtureRequest) -> Iterator[Connect]:
    """connect(user, {filter: handler}, **Endpoint kwargs) -> a connected Endpoint, closed after the test.

    Every test runs twice: endpoints with a network thread and a handler thread of their own,
    and endpoints sharing one NetworkLoop and one handler pool (how a large simulation runs).
    """
    made: list[Endpoint] = []
    loop = NetworkLoop().start() if request.param == "shared-loop" else None
    pool = ThreadPoolExecutor(max_workers=4) if request.param == "shared-loop" else None

    def make(user: str, subscriptions: dict[str, Callable[[Inbound], None]] | None = None, **kwargs: object) -> Endpoint:
        endpoint = Endpoint(broker.address(user), network_loop=loop, handler_pool=pool, **kwargs)  # type: ignore[arg-type]
        for topic_filter, handler in (subscriptions or {}).items():
            endpoint.subscribe(topic_filter, handler)
        made.append(endpoint)
        return endpoint.start().wait_connected(5)

    yield make
    for endpoint in made:
        endpoint.close(flush_timeout_s=0.5)
    if loop is not None:
        assert len(loop) == 0, "a closed endpoint is still on the network loop"
        loop.stop()
    if pool is not None:
        pool.shutdown()


def token_request(client_id: str, seq: int, draft: int = 100) -> TokenRequest:
    return TokenRequest(
        client_id=client_id, session_id="s", seq=seq, round=0, context_ids=[101, draft], draft_token=draft,
        topk_ids=[draft, draft + 1], topk_probs=[0.5, 0.25], tail_mass=0.25, features=[0.7], reason="uncertain",
    )


def update(client_id: str, edge_id: str, round_: int) -> ThresholdUpdate:
    return ThresholdUpdate(client_id=client_id, edge_id=edge_id, round=round_, num_samples=10 + round_,
                           params={"tau": [round_ / 8]})


def status(client_id: str, online: bool) -> ClientStatus:
    return ClientStatus(client_id=client_id, online=online, edge_id="e0", ts=1767225600.0 + online)


def raw_publish(broker: LocalBroker, topic: str, payloads: list[bytes]) -> None:
    """Publish arbitrary bytes as admin with plain paho, bypassing the codec (malformed-payload tests)."""
    addr = broker.address("admin")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-admin", protocol=mqtt.MQTTv5)
    client.username_pw_set(addr.username, addr.password)
    client.connect(addr.host, addr.port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def verdict_for(request: TokenRequest, worker: str = "llm") -> LLMVerdict:
    return LLMVerdict(client_id=request.client_id, session_id=request.session_id, seq=request.seq, accepted=False,
                      final_token=request.draft_token + 1, beta=0.5, q_draft=0.25, llm_ms=float(len(worker)), worker="llm")


# -- pub/sub and request/response ------------------------------------------------------------------


def test_pubsub_and_request_reply_between_three_endpoints(connect: Connect) -> None:
    llm: Endpoint

    def serve(inbound: Inbound) -> None:
        llm.reply(inbound, verdict_for(inbound.message))

    llm = connect("llm", {topics.llm_request_shared("workers"): serve})
    c0, c1 = connect("c0"), connect("c1")
    results: dict[str, list[LLMVerdict]] = {"c0": [], "c1": []}

    def ask(endpoint: Endpoint) -> None:
        for seq in range(5):
            request = token_request(endpoint.client_id, seq, draft=1000 * (endpoint.client_id == "c1") + seq)
            reply = endpoint.request(topics.llm_request(), request, topics.client_llm_reply(endpoint.client_id), timeout_s=5)
            results[endpoint.client_id].append(reply)

    threads = [threading.Thread(target=ask, args=(ep,)) for ep in (c0, c1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [(v.client_id, v.seq, v.final_token) for v in results["c0"]] == [("c0", s, s + 1) for s in range(5)]
    assert [(v.client_id, v.seq, v.final_token) for v in results["c1"]] == [("c1", s, 1001 + s) for s in range(5)]

    # retained model: a late subscriber still gets it, flagged as retained
    e0 = connect("e0")
    model = ThresholdModel(source_id="e0", level="edge", round=2, num_samples=30, params={"tau": 0.375})
    e0.publish(topics.edge_model("e0"), model, qos=1, retain=True, wait=True)
    inbox = Inbox()
    c0.subscribe(topics.edge_model("e0"), inbox)
    (got,) = inbox.wait_for(1)
    assert got.message == model and got.retain and got.topic == topics.edge_model("e0")

    sent = c0.stats()
    request_bytes = sum(len(encode(token_request("c0", s, draft=s))) for s in range(5))
    assert sent.sent_messages["llm"] == 5 and sent.sent_bytes["llm"] == request_bytes
    assert sent.received_messages["llm"] == 5 and sent.received_messages["fl"] == 1
    assert sent.received_bytes["fl"] == len(encode(model)) == got.size
    assert llm.stats().received_messages["llm"] == 10 and llm.stats().sent_messages["llm"] == 10
    assert not sent.dropped and not llm.stats().dropped


def test_peer_query_forwarded_by_an_edge_is_answered_straight_to_the_asker(connect: Connect) -> None:
    e0: Endpoint
    c2: Endpoint

    def forward(inbound: Inbound) -> None:  # e0 passes its cluster's query on to the neighbour cluster
        q = inbound.message
        e0.forward(topics.edge_p2p_query("e1"), PeerQuery(q.client_id, q.edge_id, q.seq, q.model_name, q.embedding,
                                                          q.hops + 1, q.delta), inbound)

    def answer(inbound: Inbound) -> None:  # a peer of cluster e1 with a cache hit
        c2.reply(inbound, PeerReply("c2", inbound.message.seq, token=4242, similarity=0.96875), per_responder=True)

    e0 = connect("e0", {topics.edge_p2p_query("e0"): forward})
    c2 = connect("c2", {topics.edge_p2p_query("e1"): answer})
    c0 = connect("c0")
    query = PeerQuery("c0", "e0", 9, "minilm", [0.6, 0.8], hops=1, delta=0.9)
    reply = c0.request(topics.edge_p2p_query("e0"), query, topics.client_p2p_replies("c0"), timeout_s=5,
                       per_responder=True)
    assert reply == PeerReply("c2", 9, token=4242, similarity=0.96875)
    assert c0.stats().sent_messages["p2p"] == 1 and c0.stats().received_bytes["p2p"] == len(encode(reply))
    assert e0.stats().sent_messages["p2p"] == 1 and c2.stats().received_messages["p2p"] == 1


def test_shared_subscription_gives_each_request_to_one_worker(broker: LocalBroker, connect: Connect) -> None:
    handled: Counter[str] = Counter()
    workers: dict[str, Endpoint] = {}

    def serve_as(name: str) -> Callable[[Inbound], None]:
        def serve(inbound: Inbound) -> None:
            handled[name] += 1
            workers[name].reply(inbound, verdict_for(inbound.message, name))
        return serve

    for name in ("llm", "llm-2"):
        workers[name] = connect(name, {topics.llm_request_shared("workers"): serve_as(name)})
    c0 = connect("c0")
    answers = [c0.request(topics.llm_request(), token_request("c0", seq), topics.client_llm_reply("c0"), timeout_s=5)
               for seq in range(20)]
    assert [a.seq for a in answers] == list(range(20))
    assert sum(handled.values()) == 20 and all(handled[name] > 0 for name in workers), handled
    assert Counter(a.llm_ms for a in answers) == {3.0: handled["llm"], 5.0: handled["llm-2"]}


def test_request_timeout_then_late_reply_is_dropped_and_counted(connect: Connect) -> None:
    llm: Endpoint

    def slow_on_seq_0(inbound: Inbound) -> None:
        if inbound.message.seq == 0:
            time.sleep(0.6)
        llm.reply(inbound, verdict_for(inbound.message))

    llm = connect("llm", {topics.llm_request(): slow_on_seq_0})
    c0 = connect("c0")
    with pytest.raises(TimeoutError):
        c0.request(topics.llm_request(), token_request("c0", 0), topics.client_llm_reply("c0"), timeout_s=0.2)
    deadline = time.monotonic() + 5
    while c0.stats().dropped["late_reply"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c0.stats().dropped == Counter({"late_reply": 1})
    reply = c0.request(topics.llm_request(), token_request("c0", 1), topics.client_llm_reply("c0"), timeout_s=5)
    assert reply.seq == 1 and reply.final_token == 101


# -- presence ----------------------------------------------------------------------------------------


@pytest.mark.reliability
def test_aborted_client_last_will_marks_it_offline_but_a_clean_close_does_not(broker: LocalBroker, connect: Connect) -> None:
    inbox = Inbox()
    connect("e0", {"fedhlm/v1/client/+/status": inbox})
    c0 = connect("c0", will=(topics.client_status("c0"), status("c0", online=False)))
    c1 = connect("c1", will=(topics.client_status("c1"), status("c1", online=False)))
    for endpoint in (c0, c1):
        endpoint.publish(topics.client_status(endpoint.client_id), status(endpoint.client_id, True), qos=1, retain=True)
    assert len(inbox.wait_for(2)) == 2

    c1.close()
    c0.abort()
    received = inbox.wait_for(3)
    time.sleep(1.0)  # give a (wrong) Will of the cleanly closed c1 time to show up
    presence = [(i.message.client_id, i.message.online) for i in inbox.items]
    assert sorted(presence[:2]) == [("c0", True), ("c1", True)]
    assert presence[2:] == [("c0", False)], presence
    assert received[2].topic == topics.client_status("c0") and received[2].message == status("c0", online=False)

    late = Inbox()  # the retained status is the Will now
    connect("admin", {topics.client_status("c0"): late})
    (retained,) = late.wait_for(1)
    assert retained.retain and retained.message.online is False


# -- persistence and restarts ----------------------------------------------------------------------------


@pytest.mark.reliability
def test_persistent_subscriber_receives_all_100_updates_sent_while_offline(broker: LocalBroker, connect: Connect) -> None:
    away = Endpoint(broker.address("e0"), persistent=True)
    away.subscribe(topics.edge_update_filter("e0"), lambda inbound: None)
    away.start().wait_connected(5)
    away.close()
    forgetful = Endpoint(broker.address("e1"))  # clean start: the control that loses everything
    forgetful.subscribe(topics.edge_update_filter("e1"), lambda inbound: None)
    forgetful.start().wait_connected(5)
    forgetful.close()

    clients = [connect(f"c{i}") for i in range(4)]
    for round_ in range(25):
        for client in clients:
            client.publish(topics.edge_update("e0", client.client_id), update(client.client_id, "e0", round_), qos=1)
            client.publish(topics.edge_update("e1", client.client_id), update(client.client_id, "e1", round_), qos=1)
    assert all(client.flush(10) for client in clients)

    inbox, control = Inbox(), Inbox()
    back = connect("e0", {topics.edge_update_filter("e0"): inbox}, persistent=True)
    connect("e1", {topics.edge_update_filter("e1"): control})
    expected = {(f"c{c}", r) for c in range(4) for r in range(25)}
    received = inbox.wait_until(lambda items: {(i.message.client_id, i.message.round) for i in items} >= expected, 10)
    keys = {(i.message.client_id, i.message.round) for i in received}
    assert len(keys) == 100 and keys == expected
    assert all(i.topic == topics.edge_update("e0", i.message.client_id) for i in received)
    assert back.stats().received_messages["fl"] == len(received)
    time.sleep(0.3)
    assert control.items == []


@pytest.mark.reliability
def test_broker_restart_mid_stream_loses_no_qos1_update(broker: LocalBroker, connect: Connect) -> None:
    total, restart_after = 200, 60
    inbox, watch = Inbox(), Inbox()
    e0 = connect("e0", {topics.edge_update_filter("e0"): inbox}, persistent=True)
    watcher = connect("admin", {topics.edge_update_filter("e0"): watch})  # clean session: must re-subscribe
    c0 = connect("c0")
    published = threading.Semaphore(0)
    offline_publishes = []

    def stream() -> None:
        for round_ in range(total):
            if not c0.connected:
                offline_publishes.append(round_)
            c0.publish(topics.edge_update("e0", "c0"), update("c0", "e0", round_), qos=1)  # no wait: paho queues
            published.release()
            time.sleep(0.004)

    publisher = threading.Thread(target=stream)
    publisher.start()
    for _ in range(restart_after):
        published.acquire()
    broker.stop()
    time.sleep(0.5)
    broker.start()
    publisher.join(30)

    assert c0.flush(20), "some QoS 1 updates were never acknowledged"
    watcher.wait_connected(10)
    c0.publish(topics.edge_update("e0", "c0"), update("c0", "e0", total), qos=1, wait=True)
    expected = set(range(total + 1))
    received = inbox.wait_until(lambda items: {i.message.round for i in items} >= expected, timeout_s=20)
    rounds = {i.message.round for i in received}  # QoS 1 is at least once: resent updates may repeat
    assert rounds == expected, f"missing {sorted(expected - rounds)[:20]}"
    assert offline_publishes, "the restart did not happen mid-stream"
    assert e0.connected and c0.connected
    # the clean-session watcher lost what was queued during the outage but is subscribed again
    assert total in {i.message.round for i in watch.wait_until(lambda items: total in {i.message.round for i in items})}


# -- bad input ---------------------------------------------------------------------------------------------


def test_malformed_and_wrong_version_payloads_are_dropped_with_a_logged_reason(
    broker: LocalBroker, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()
    e0 = connect("e0", {topics.edge_update_filter("e0"): inbox})
    topic = topics.edge_update("e0", "c0")
    wrong_version = msgpack.packb({"v": 2, "t": "threshold_update", "b": {}}, use_bin_type=True)
    caplog.set_level(logging.WARNING, logger="fedhlm.transport.endpoint")
    raw_publish(broker, topic, [b"\xc1 not msgpack", wrong_version, encode(token_request("c0", 0))])
    connect("c0").publish(topic, update("c0", "e0", 7), qos=1, wait=True)

    (delivered,) = inbox.wait_for(1)
    time.sleep(0.2)
    assert len(inbox.items) == 1 and delivered.message == update("c0", "e0", 7)
    assert e0.stats().dropped == Counter({"not_msgpack": 1, "version": 1, "unexpected_type": 1})
    assert e0.stats().received_messages["fl"] == 4
    drops = [r.getMessage() for r in caplog.records if "dropped payload" in r.getMessage()]
    assert len(drops) == 3 and all(topic in line for line in drops)
    assert [reason for reason in ("not_msgpack", "version", "unexpected_type") if any(reason in d for d in drops)] == [
        "not_msgpack", "version", "unexpected_type"]


def test_handler_exception_is_logged_and_the_next_message_still_arrives(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()

    def fragile(inbound: Inbound) -> None:
        if inbound.message.round == 0:
            raise RuntimeError("handler bug")
        inbox(inbound)

    e0 = connect("e0", {topics.edge_update_filter("e0"): fragile})
    c0 = connect("c0")
    for round_ in (0, 1):
        c0.publish(topics.edge_update("e0", "c0"), update("c0", "e0", round_), qos=1, wait=True)
    (got,) = inbox.wait_for(1)
    assert got.message.round == 1 and e0.stats().handler_errors == 1
    assert "handler bug" in caplog.text


# -- authentication and ACL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_loop", [False, True], ids=["own-thread", "shared-loop"])
def test_anonymous_and_wrong_password_connections_are_refused(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture, shared_loop: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    loop = NetworkLoop().start() if shared_loop else None
    good = broker.address("c0")
    for address in (BrokerAddress(broker.host, broker.port), good.with_credentials("c0", "not-the-password")):
        endpoint = Endpoint(address, client_id="c0", network_loop=loop)
        try:
            with pytest.raises(ConnectionRefusedError, match="Not authorized|Bad user name"):
                endpoint.start().wait_connected(5)
        finally:
            endpoint.close()
    with Endpoint(good, network_loop=loop) as endpoint:
        endpoint.wait_connected(5)
    if loop is not None:
        assert len(loop) == 0  # refused connections do not linger in the loop, retrying
        loop.stop()
    assert good.password and good.password not in caplog.text and "not-the-password" not in caplog.text


def test_client_cannot_publish_on_another_clients_topics(connect: Connect) -> None:
    inbox = Inbox()
    connect("admin", {"fedhlm/v1/#": inbox})
    c0 = connect("c0")
    forbidden = [
        (topics.edge_update("e0", "c1"), update("c1", "e0", 1)),  # c1's update slot
        (topics.client_llm_reply("c1"), verdict_for(token_request("c1", 0))),  # forging the LLM
        (topics.edge_model("e0"), ThresholdModel("e0", "edge", 1, 10, params={"tau": 0.5})),  # forging the edge
        (topics.client_status("c1"), status("c1", online=False)),
    ]
    for topic, message in forbidden:
        with pytest.raises(PermissionError, match="Not authorized"):
            c0.publish(topic, message, qos=1, wait=True)
        c0.publish(topic, message, qos=0, wait=True)  # QoS 0: no answer from the broker, silently discarded
    c0.publish(topics.edge_update("e0", "c0"), update("c0", "e0", 1), qos=1, wait=True)

    (got,) = inbox.wait_for(1, timeout_s=2)
    time.sleep(1.0)
    assert [i.topic for i in inbox.items] == [topics.edge_update("e0", "c0")] and got.message == update("c0", "e0", 1)
    assert c0.stats().publish_refused == 4


def test_a_flood_of_junk_is_counted_in_full_and_logged_a_few_times(
    broker: LocalBroker, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19, minor: 3,000 junk payloads on one topic were 3,000 WARNING lines; now the first few of each
    reason and then every 1000th, with the count so far."""
    e0 = connect("e0", {topics.edge_update_filter("e0"): Inbox()})
    caplog.set_level(logging.WARNING, logger="fedhlm.transport.endpoint")
    raw_publish(broker, topics.edge_update("e0", "c0"), [b"\xc1 junk"] * 3000)
    def drops() -> list[str]:
        return [r.getMessage() for r in caplog.records if "dropped payload" in r.getMessage()]

    deadline = time.monotonic() + 10  # the 3000th is counted a moment before it is logged: wait for both
    while (e0.stats().dropped["not_msgpack"] < 3000 or len(drops()) < 8) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # a ninth line (there must be none) would come now
    assert e0.stats().dropped["not_msgpack"] == 3000
    assert len(drops()) == 5 + 3 and drops()[-1].endswith("3000 dropped for this reason so far)")
