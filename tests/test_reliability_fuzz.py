"""Hostile bytes on every topic a role listens to: >= 10,000 malformed payloads, 0 crashes, each dropped once.

Hypothesis draws ways to break a payload (truncated, wrong version, wrong type tag, wrong
field types, missing and extra fields, broken arrays, NaN, random bytes) and each is
applied to the message of every topic; payloads over the codec's limit are added. Each
one must fail to decode with a `DecodeError` and nothing else (the few that stay valid by
chance are not sent). They are then published (QoS 0, as admin, so the ACL lets them
through) to a running deployment while it trains; every role must drop each of them with
the reason the codec gives and finish with exactly the thresholds of the same run without
the fuzz.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter

import msgpack
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment
from fedhlm.transport import topics
from fedhlm.transport.codec import MAX_PAYLOAD_BYTES, DecodeError, decode, encode, payload_type
from fedhlm.transport.counters import Counters
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import MESSAGE_TYPES, Message, ThresholdUpdate
from fedhlm.transport.vectors import golden_messages
from test_endpoint import Inbox
from test_reliability_support import assignment, federated_spec, round_inputs, users, wait_until

pytestmark = pytest.mark.reliability

ASSIGN = assignment(4, 2)  # c00, c02 on e0; c01, c03 on e1
ROUNDS = 2
EXAMPLES, PER_EXAMPLE = 60, 20  # 1,200 recipes x 9 topics = 10,800 payloads (a few stay valid)
OVERSIZED_PER_TOPIC = 2

# every topic a role subscribes to -> the endpoints that receive it ("c00" = client c00's endpoint, ...)
FUZZ_TOPICS: dict[str, list[str]] = {
    # reply topics: no request waits for these, dropped before decoding at the client; e0's cache reads its
    # members' verdicts (p2p.resolver edge) and decodes them
    topics.client_llm_reply("c00"): ["c00", "e0"],
    topics.client_p2p_reply("c00", "e0"): ["c00"],
    topics.edge_model("e0"): ["c00", "c02"],
    topics.edge_resolve("e0"): ["e0"],
    topics.edge_update("e0", "c00"): ["e0"],
    topics.client_status("c00"): ["e0"],
    topics.global_model(): ["e0", "e1"],
    topics.global_update("e0"): ["cloud"],
    topics.llm_request(): ["llm"],
}
REPLY_TOPICS = {topics.client_llm_reply("c00"), topics.client_p2p_reply("c00", "e0")}

EXAMPLE_OF: dict[type[Message], Message] = {}
for _message in golden_messages().values():
    EXAMPLE_OF.setdefault(type(_message), _message)

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
    st.binary(max_size=8), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)


def envelope(message: Message) -> dict:
    return msgpack.unpackb(encode(message), raw=False)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# How to break a payload, drawn once and applied to the message of every topic (so each topic gets each break).
Recipe = tuple


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    how = draw(st.sampled_from(["bytes", "truncated", "version", "type_tag", "other_type", "field_value",
                                "missing_field", "extra_field", "array", "non_map", "envelope_keys"]))
    if how == "bytes":
        return how, draw(st.binary(max_size=96))
    if how in ("truncated", "missing_field", "other_type"):
        return how, draw(st.integers(0, 10**6))
    if how in ("version", "non_map", "envelope_keys"):
        return how, draw(st.text(max_size=4)), draw(st.one_of(st.lists(ANY_VALUE, max_size=3), ANY_VALUE))
    if how == "type_tag":
        return how, draw(st.one_of(st.text(max_size=16), ANY_VALUE))
    if how == "field_value":
        return how, draw(st.integers(0, 10**6)), draw(ANY_VALUE)
    if how == "extra_field":
        return how, draw(st.text(min_size=1, max_size=8)), draw(ANY_VALUE)
    part = draw(st.sampled_from(["data", "dtype", "shape", "nan"]))
    value = {"data": st.binary(max_size=24), "dtype": st.sampled_from(["<f8", ">f4", "<i8", "|u1", "object", ""]),
             "shape": st.one_of(ANY_VALUE, st.lists(st.integers(-2, 5), max_size=3)), "nan": st.none()}[part]
    return how, draw(st.integers(0, 10**6)), part, draw(value)


def apply(recipe: Recipe, expected: type[Message]) -> bytes:
    """The payload `recipe` makes of the example message of type `expected` (it may by chance stay valid)."""
    good = EXAMPLE_OF[expected]
    env = copy.deepcopy(envelope(good))
    body, how = env["b"], recipe[0]
    fields = sorted(body)
    if how == "bytes":
        return recipe[1]
    if how == "truncated":
        data = encode(good)
        return data[: recipe[1] % len(data)]
    if how == "version":
        env["v"] = recipe[2]
    elif how == "type_tag":
        env["t"] = recipe[1]
    elif how == "other_type":
        others = [c for c in MESSAGE_TYPES.values() if c is not expected]
        env = envelope(EXAMPLE_OF[others[recipe[1] % len(others)]])
    elif how == "field_value":
        body[fields[recipe[1] % len(fields)]] = recipe[2]
    elif how == "missing_field":
        del body[fields[recipe[1] % len(fields)]]
    elif how == "extra_field":
        body[recipe[1]] = recipe[2]
    elif how == "non_map":
        return pack(recipe[2])
    elif how == "envelope_keys":
        env[recipe[1]] = recipe[2]
    else:  # a broken array: bytes, dtype, shape, or a NaN in a float array
        _, index, part, value = recipe
        arrays = [body[k] for k in fields if isinstance(body[k], dict) and "data" in body[k]]
        arrays += [a for k in fields if isinstance(body[k], dict) and "data" not in body[k] for a in body[k].values()]
        if not arrays:
            return pack(value)
        array = arrays[index % len(arrays)]
        if part != "nan":
            array[part] = value
        elif array["dtype"].startswith("<f") and array["data"]:
            nan = b"\x00\x7e" if array["dtype"] == "<f2" else b"\x00\x00\xc0\x7f"
            array["data"] = nan + array["data"][len(nan):]
        else:
            array["data"] = array["data"][:-1]
    return pack(env)


def fuzz_cases() -> list[tuple[str, bytes, str]]:
    """(topic, payload, the codec's reason) for >= 10,000 payloads that every one fails to decode."""
    cases: list[tuple[str, bytes, str]] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(recipes(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def collect(batch: list[Recipe]) -> None:
        for recipe in batch:
            for topic in sorted(FUZZ_TOPICS):
                payload = apply(recipe, payload_type(topic))
                try:
                    decode(payload, payload_type(topic))
                except DecodeError as err:  # the only exception decoding may raise
                    cases.append((topic, payload, err.reason))

    collect()
    for topic in sorted(FUZZ_TOPICS):  # beyond the codec's limit, still within the broker's 256 KiB
        for extra in range(1, OVERSIZED_PER_TOPIC + 1):
            cases.append((topic, b"\x00" * (MAX_PAYLOAD_BYTES + 97 * extra), "too_large"))
    return cases


def expected_drops(cases: list[tuple[str, bytes, str]]) -> dict[str, Counter[str]]:
    """What each endpoint must count as dropped: the codec's reason, 'no_handler' on unsolicited replies."""
    drops: dict[str, Counter[str]] = {}
    for topic, _, reason in cases:
        for receiver in FUZZ_TOPICS[topic]:
            unsolicited = topic in REPLY_TOPICS and receiver == "c00"
            drops.setdefault(receiver, Counter())["no_handler" if unsolicited else reason] += 1
    return drops


def admin_publisher(broker: LocalBroker) -> mqtt.Client:
    addr = broker.address("admin")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer", protocol=mqtt.MQTTv5)
    client.username_pw_set(addr.username, addr.password)
    client.connect(addr.host, addr.port)
    client.loop_start()
    return client


def run(cases: list[tuple[str, bytes, str]] | None) -> dict:
    """Two rounds of a 2-edge deployment, with the fuzz published while it trains; the thresholds it ends with."""
    broker = LocalBroker(users(ASSIGN)).start()
    spec = federated_spec(ASSIGN, routing=dict(local_steps=5, llm_timeout_s=10.0), p2p=dict(enabled=True))
    dep = Deployment(spec, broker.address).start()
    endpoints = {**{c: dep.clients[c].endpoint for c in ("c00", "c02")}, "e0": dep.edges["e0"].endpoint,
                 "e1": dep.edges["e1"].endpoint, "cloud": dep.cloud.endpoint, "llm": dep.llm[0].endpoint}
    for reply_topic in REPLY_TOPICS:  # what c00's first LLM request and peer query would subscribe to
        dep.clients["c00"].endpoint.subscribe(reply_topic, None)
    fuzzer = admin_publisher(broker) if cases else None
    out: dict = {}
    try:
        def publish_all() -> None:
            for i, (topic, payload, _) in enumerate(cases or []):
                fuzzer.publish(topic, payload, qos=0)
                if i % 500 == 499:
                    time.sleep(0.05)  # spread over the rounds

        spray = threading.Thread(target=publish_all)
        t0 = time.monotonic()
        spray.start()
        for r in range(ROUNDS):
            dep.run_round(r, round_inputs(ASSIGN, r, 12))
        spray.join()
        out["publish_s"] = time.monotonic() - t0
        if cases:
            fuzzer.publish(topics.llm_request(), b"barrier", qos=1).wait_for_publish(10)
            expected = expected_drops(cases)
            expected["llm"]["not_msgpack"] += 1
            total = sum(sum(c.values()) for c in expected.values())
            wait_until(lambda: sum(sum(ep.stats().dropped.values()) for ep in endpoints.values()) >= total, 30)
            time.sleep(0.2)
            out["expected"] = expected
            out["dropped"] = {name: ep.stats().dropped for name, ep in endpoints.items()}
            out["handler_errors"] = sum(ep.stats().handler_errors for ep in endpoints.values())
        out["edges"] = {e: [h["tau"] for h in edge.history] for e, edge in dep.edges.items()}
        out["cloud"] = {k: v.tolist() for k, v in dep.cloud.params.items()}
        out["clients"] = {c: client.tau_history for c, client in dep.clients.items()}
        out["fallbacks"] = sum(c.counters.fallbacks for c in dep.clients.values())
        out["rejected"] = sum(sum(edge.rejected.values()) for edge in dep.edges.values())
    finally:
        if fuzzer is not None:
            fuzzer.disconnect()
            fuzzer.loop_stop()
        dep.stop()
        broker.cleanup()
    return out


def test_10000_malformed_payloads_on_every_topic_are_dropped_and_change_no_result(caplog) -> None:
    t0 = time.monotonic()
    cases = fuzz_cases()
    generate_s = time.monotonic() - t0
    assert len(cases) >= 10_000
    clean = run(None)
    caplog.set_level(logging.WARNING, logger="fedhlm.transport.endpoint")
    fuzzed = run(cases)

    for name, expected in fuzzed["expected"].items():
        assert fuzzed["dropped"][name] == expected, name  # one drop per payload, with the codec's reason
    total = sum(sum(c.values()) for c in fuzzed["expected"].values())
    drop_lines = [r for r in caplog.records if "dropped payload" in r.getMessage()]
    # logged with its reason: the first LOGGED_FIRST of each reason at each endpoint, then every LOGGED_EVERY-th
    first, every = Counters.LOGGED_FIRST, Counters.LOGGED_EVERY
    logged = sum(min(n, first) + n // every for c in fuzzed["expected"].values() for n in c.values())
    assert len(drop_lines) == logged < total / 10
    assert fuzzed["handler_errors"] == 0 and fuzzed["rejected"] == 0 and fuzzed["fallbacks"] == clean["fallbacks"] == 0
    for key in ("edges", "cloud", "clients"):
        assert fuzzed[key] == clean[key], key  # the same thresholds, round by round, as without the fuzz
    reasons = Counter(reason for _, _, reason in cases)
    print(f"\nfuzz: {len(cases)} payloads over {len(FUZZ_TOPICS)} topics (generated in {generate_s:.1f} s, "
          f"published during {ROUNDS} rounds in {fuzzed['publish_s']:.1f} s, {clean['publish_s']:.1f} s without); {total} drops at "
          f"{len(fuzzed['expected'])} endpoints; reasons {dict(reasons.most_common())}")


def test_payload_over_the_broker_limit_never_reaches_a_role(caplog) -> None:
    """Mosquitto's max_packet_size (256 KiB) refuses it and drops the sender's connection."""
    broker = LocalBroker(users({"c00": "e0"})).start()
    inbox = Inbox()
    edge = Endpoint(broker.address("e0"))
    edge.subscribe(topics.edge_update_filter("e0"), inbox)
    edge.start().wait_connected()
    gone = threading.Event()
    reasons: list[str] = []
    sender = admin_publisher(broker)
    sender.on_disconnect = lambda client, userdata, flags, rc, props: (reasons.append(str(rc)), gone.set())
    try:
        assert wait_until(sender.is_connected, 5)
        sender.publish(topics.edge_update("e0", "c00"), b"\x00" * (300 * 1024), qos=1)
        assert gone.wait(5), "the broker kept the connection of a sender of a 300 KiB packet"
        sender.loop_stop()
        legit = Endpoint(broker.address("c00")).start().wait_connected()
        legit.publish(topics.edge_update("e0", "c00"), ThresholdUpdate("c00", "e0", 0, 1, {"tau": [0.5]}), qos=1,
                      wait=True)
        (got,) = inbox.wait_for(1)
        time.sleep(0.2)
        assert len(inbox.items) == 1 and got.size < 1024
        assert edge.stats().received_messages["fl"] == 1 and not edge.stats().dropped
        legit.close()
        log = broker.log_file.read_text()
        print(f"\noversized: sender disconnected ({reasons[0]}); broker log: "
              f"{[line.split(': ', 1)[-1] for line in log.splitlines() if 'fuzzer' in line][-1:]}")
    finally:
        edge.close()
        broker.cleanup()

