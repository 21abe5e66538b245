"""MemoryNetwork: the endpoint interface without a broker (filters, shared groups, retained, no_local,
request/reply, counters, bad payloads, Last Will), each test in milliseconds."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import msgpack
import pytest

from fedhlm.transport import topics
from fedhlm.transport.codec import encode
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.memory import MemoryEndpoint, MemoryNetwork
from fedhlm.transport.messages import PeerQuery, ThresholdModel
from fedhlm.transport.network import NETWORKS, make_network
from test_endpoint import Inbox, status, token_request, update, verdict_for

# The broker-independent tests of the real Endpoint, run here on the memory network (with the
# `connect` below): the same interface passes the same tests.
from test_endpoint import (  # noqa: F401
    test_aborted_client_last_will_marks_it_offline_but_a_clean_close_does_not,
    test_handler_exception_is_logged_and_the_next_message_still_arrives,
    test_peer_query_forwarded_by_an_edge_is_answered_straight_to_the_asker,
    test_pubsub_and_request_reply_between_three_endpoints,
    test_request_timeout_then_late_reply_is_dropped_and_counted,
    test_shared_subscription_gives_each_request_to_one_worker,
)

Connect = Callable[..., MemoryEndpoint]


@pytest.fixture
def net() -> Iterator[MemoryNetwork]:
    """A memory network; endpoints still open at the end are closed with it."""
    network = MemoryNetwork()
    yield network
    network.close()


@pytest.fixture
def broker() -> None:
    """None: two of the reused tests ask for a broker but only use `connect`."""


@pytest.fixture
def connect(net: MemoryNetwork) -> Connect:
    """connect(role, {filter: handler}, client_id=..., **endpoint kwargs) -> a connected endpoint,
    as test_endpoint's fixture gives (closed with the network)."""

    def make(role: str, subscriptions: dict[str, Callable[[Inbound], None]] | None = None,
             client_id: str | None = None, **kwargs: object) -> MemoryEndpoint:
        address = net.address(role) if client_id is None else net.address(role).for_role(client_id)
        endpoint = net.endpoint(address, **kwargs)  # type: ignore[arg-type]
        for topic_filter, handler in (subscriptions or {}).items():
            endpoint.subscribe(topic_filter, handler)
        return endpoint.start().wait_connected()

    return make


def test_registered_as_memory() -> None:
    network = make_network("memory")
    assert NETWORKS["memory"] is MemoryNetwork and isinstance(network, MemoryNetwork)
    network.close()


def test_wildcard_filters_route_each_topic_to_the_matching_subscribers_only(connect: Connect) -> None:
    every_update, e0_updates, all_status, everything = Inbox(), Inbox(), Inbox(), Inbox()
    connect("e0", {topics.edge_update_filter("e0"): e0_updates, "fedhlm/v1/client/+/status": all_status})
    connect("admin", {"fedhlm/v1/#": everything})
    connect("cloud", {"fedhlm/v1/edge/+/update/+": every_update})
    c0 = connect("c0")
    c0.publish(topics.edge_update("e0", "c0"), update("c0", "e0", 1), qos=1)
    c0.publish(topics.edge_update("e1", "c0"), update("c0", "e1", 2), qos=1)
    c0.publish(topics.client_status("c0"), status("c0", True))
    assert [i.message.round for i in e0_updates.wait_for(1)] == [1]
    assert [i.message.round for i in every_update.wait_for(2)] == [1, 2]
    assert [i.topic for i in all_status.wait_for(1)] == [topics.client_status("c0")]
    assert len(everything.wait_for(3)) == 3
    assert len(e0_updates.items) == 1  # nothing else reached e0


def test_retained_message_reaches_a_late_subscriber_flagged_and_clearing_it_stops_that(
    net: MemoryNetwork, connect: Connect
) -> None:
    e0 = connect("e0")
    live = Inbox()
    connect("c0", {topics.edge_model("e0"): live})
    model = ThresholdModel(source_id="e0", level="edge", round=2, num_samples=30, params={"tau": 0.375})
    e0.publish(topics.edge_model("e0"), model, qos=1, retain=True, wait=True)
    (now,) = live.wait_for(1)
    assert now.message == model and not now.retain  # live delivery: not flagged retained

    late = Inbox()
    c1 = connect("c1", {topics.edge_model("e0"): late})
    (got,) = late.wait_for(1)
    assert got.message == model and got.retain and got.size == len(encode(model))
    c1.subscribe(topics.edge_model("e0"), late)  # the same filter again: no second copy
    shared = Inbox()
    shared_ep = connect("c3", {f"$share/g/{topics.edge_model('e0')}": shared})  # a shared subscription gets no retained message

    e0.clear_retained(topics.edge_model("e0"))
    after = Inbox()
    connect("c2", {topics.edge_model("e0"): after})
    assert after.wait_for(1, timeout_s=0.05) == [] and len(late.items) == 1 and shared.items == []
    # the empty clearing payload is delivered as MQTT does, and dropped as no message
    assert c1.stats().dropped == Counter({"not_msgpack": 1}) and shared_ep.stats().dropped == Counter({"not_msgpack": 1})


def test_no_local_keeps_an_endpoints_own_publishes_away_from_it(connect: Connect) -> None:
    mine, theirs, echo = Inbox(), Inbox(), Inbox()
    query = PeerQuery("c0", "e0", 1, "minilm", [0.6, 0.8], hops=0, delta=0.9)
    c0 = connect("c0")
    c0.subscribe(topics.edge_p2p_query("e0"), mine, qos=0, no_local=True)
    connect("c1", {topics.edge_p2p_query("e0"): theirs})
    c2 = connect("c2", {topics.edge_p2p_query("e0"): echo})  # no no_local: its own comes back
    c0.publish(topics.edge_p2p_query("e0"), query)
    c2.publish(topics.edge_p2p_query("e0"), query)
    assert len(theirs.wait_for(2)) == 2 and len(echo.wait_for(2)) == 2
    assert len(mine.wait_for(1)) == 1 and mine.items[0].message == query  # c2's, not its own


def test_a_handler_may_block_in_a_request_of_its_own(connect: Connect) -> None:
    llm: MemoryEndpoint

    def serve(inbound: Inbound) -> None:
        llm.reply(inbound, verdict_for(inbound.message))

    llm = connect("llm", {topics.llm_request(): serve})
    c0 = connect("c0")
    verdicts: list[int] = []

    def on_model(inbound: Inbound) -> None:  # the reply is resolved on the bus, not on this (busy) thread
        request = token_request("c0", inbound.message.round)
        verdicts.append(c0.request(topics.llm_request(), request, topics.client_llm_reply("c0"), timeout_s=2).seq)

    done = Inbox()
    c0.subscribe(topics.edge_model("e0"), on_model)
    c0.subscribe(topics.edge_model("e1"), done)
    e0 = connect("e0")
    for round_ in range(3):
        e0.publish(topics.edge_model("e0"), ThresholdModel("e0", "edge", round_, 1, {"tau": 0.5}))
    e0.publish(topics.edge_model("e1"), ThresholdModel("e1", "edge", 0, 1, {"tau": 0.5}))
    done.wait_for(1)
    assert verdicts == [0, 1, 2]


def test_counters_are_the_codec_sizes_per_kind(connect: Connect) -> None:
    llm: MemoryEndpoint

    def serve(inbound: Inbound) -> None:
        llm.reply(inbound, verdict_for(inbound.message))

    llm = connect("llm", {topics.llm_request_shared("workers"): serve})
    e0 = connect("e0", {topics.edge_update_filter("e0"): lambda inbound: None})
    c0 = connect("c0")
    requests = [token_request("c0", seq, draft=seq) for seq in range(3)]
    replies = [c0.request(topics.llm_request(), r, topics.client_llm_reply("c0"), timeout_s=2) for r in requests]
    sent = c0.publish(topics.edge_update("e0", "c0"), update("c0", "e0", 4), qos=1)
    assert sent == len(encode(update("c0", "e0", 4)))
    assert c0.flush(1)

    stats = c0.stats()
    assert stats.sent_messages == {"llm": 3, "p2p": 0, "fl": 1, "status": 0}
    assert stats.sent_bytes["llm"] == sum(len(encode(r)) for r in requests) == llm.stats().received_bytes["llm"]
    assert stats.received_bytes["llm"] == sum(len(encode(v)) for v in replies) == llm.stats().sent_bytes["llm"]
    assert stats.sent_bytes["fl"] == sent == e0.stats().received_bytes["fl"]
    assert not stats.dropped and stats.handler_errors == 0


BAD_UPDATES = {  # codec reason -> a payload on an update topic that fails with it
    "not_msgpack": b"\xc1 not msgpack",
    "bad_envelope": msgpack.packb([1, 2, 3]),
    "version": msgpack.packb({"v": 2, "t": "threshold_update", "b": {}}, use_bin_type=True),
    "missing_field": msgpack.packb({"v": 1, "t": "threshold_update", "b": {}}, use_bin_type=True),
    "unexpected_type": encode(token_request("c0", 0)),
}


def test_malformed_payloads_are_dropped_with_the_codec_reason_counted_and_logged(
    net: MemoryNetwork, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()
    e0 = connect("e0", {topics.edge_update_filter("e0"): inbox})
    topic = topics.edge_update("e0", "c0")
    caplog.set_level(logging.WARNING, logger="fedhlm.transport")
    for payload in BAD_UPDATES.values():
        net.publish_raw(topic, payload)
    assert connect("c0").publish(topic, update("c0", "e0", 7), qos=1) > 0
    assert [i.message for i in inbox.wait_for(1)] == [update("c0", "e0", 7)]
    stats = e0.stats()
    assert stats.dropped == Counter(dict.fromkeys(BAD_UPDATES, 1)) and stats.received_messages["fl"] == 6
    drops = [r.getMessage() for r in caplog.records if "dropped payload" in r.getMessage()]
    assert [next(reason for reason in BAD_UPDATES if reason in line) for line in drops] == list(BAD_UPDATES)


def test_a_malformed_reply_is_dropped_and_the_request_still_takes_the_valid_one(
    net: MemoryNetwork, connect: Connect
) -> None:
    llm: MemoryEndpoint

    def garbage_then_answer(inbound: Inbound) -> None:
        assert inbound.response_topic is not None
        net.publish_raw(inbound.response_topic, b"\xc1", correlation=inbound.correlation_data)
        llm.reply(inbound, verdict_for(inbound.message))

    llm = connect("llm", {topics.llm_request(): garbage_then_answer})
    c0 = connect("c0")
    reply = c0.request(topics.llm_request(), token_request("c0", 4), topics.client_llm_reply("c0"), timeout_s=2)
    assert reply == verdict_for(token_request("c0", 4))
    assert c0.stats().dropped == Counter({"not_msgpack": 1}) and c0.stats().received_messages["llm"] == 2


def test_life_cycle_hooks_and_refusals(net: MemoryNetwork, connect: Connect) -> None:
    hooks: list[bool] = []
    ep = net.endpoint(net.address("c0"))
    ep.on_connected(hooks.append)
    assert ep.publish(topics.client_status("c0"), status("c0", True)) == 0  # not connected: dropped
    assert ep.stats().dropped == Counter({"not_connected": 1})
    ep.start()
    with pytest.raises(ConnectionRefusedError):
        net.endpoint(net.address("c0")).start()  # its client id is taken
    with pytest.raises(ValueError):
        ep.subscribe("fedhlm/v1/#/x", None)
    with pytest.raises(ValueError):
        ep.publish(topics.client_status("c0"), status("c0", True), qos=2)
    waiting: list[BaseException] = []

    def ask() -> None:
        try:
            ep.request(topics.llm_request(), token_request("c0", 0), topics.client_llm_reply("c0"), timeout_s=5)
        except BaseException as exc:  # noqa: BLE001
            waiting.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    threading.Event().wait(0.02)
    ep.close()
    asker.join(2)
    assert hooks == [False] and len(waiting) == 1 and isinstance(waiting[0], ConnectionError)
    with pytest.raises(RuntimeError):
        ep.publish(topics.client_status("c0"), status("c0", True))
    connect("c0")  # the id is free again
