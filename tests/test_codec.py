"""Messages validate themselves; the codec round-trips them deterministically and names why it refuses bytes."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedhlm.transport import topics
from fedhlm.transport.codec import MAX_PAYLOAD_BYTES, DecodeError, decode, encode, from_json, payload_type, to_json
from fedhlm.transport.messages import (
    ClientStatus,
    LLMVerdict,
    Message,
    PeerQuery,
    PeerReply,
    SessionToken,
    ThresholdModel,
    ThresholdUpdate,
    TokenRequest,
)

REQUEST = dict(
    client_id="c0", session_id="s1", seq=3, round=1, context_ids=[101, 7592, 102], draft_token=7592,
    topk_ids=[7592, 2088], topk_probs=[0.75, 0.125], tail_mass=0.125, features=[0.5, 1.5], reason="uncertain",
)


def request(**changes: Any) -> TokenRequest:
    return TokenRequest(**(REQUEST | changes))


def envelope(message: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(message), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- message validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(topk_probs=[0.75, 0.5]), "TokenRequest.tail_mass"),  # sum 1.375
        (dict(tail_mass=1.5, topk_probs=[0.0, 0.0]), "TokenRequest.tail_mass"),
        (dict(topk_probs=[1.25, -0.375]), "TokenRequest.topk_probs"),
        (dict(topk_probs=[0.875]), "TokenRequest.topk_probs"),  # k mismatch
        (dict(topk_ids=[5, 5]), "TokenRequest.topk_ids"),
        (dict(topk_ids=[], topk_probs=[], tail_mass=1.0), "TokenRequest.topk_ids"),
        (dict(context_ids=[]), "TokenRequest.context_ids"),
        (dict(context_ids=[1, -2]), "TokenRequest.context_ids"),
        (dict(context_ids=[1.5, 2.0]), "TokenRequest.context_ids"),  # floats are not token ids
        (dict(context_ids=[[1, 2]]), "TokenRequest.context_ids"),  # 2-D
        (dict(context_ids=[2**40]), "TokenRequest.context_ids"),
        (dict(features=[0.5, float("nan")]), "TokenRequest.features"),
        (dict(features=[1e39]), "TokenRequest.features"),  # overflows float32
        (dict(features=["a"]), "TokenRequest.features"),
        (dict(reason="bored"), "TokenRequest.reason"),
        (dict(seq=-1), "TokenRequest.seq"),
        (dict(seq=True), "TokenRequest.seq"),
        (dict(seq=1.0), "TokenRequest.seq"),
        (dict(draft_token=2**31), "TokenRequest.draft_token"),
        (dict(tail_mass=float("inf")), "TokenRequest.tail_mass"),
        (dict(client_id="c/0"), "TokenRequest.client_id"),
        (dict(session_id=""), "TokenRequest.session_id"),
        (dict(session_id=5), "TokenRequest.session_id"),
    ],
)
def test_token_request_refuses_bad_fields_naming_them(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        request(**changes)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: LLMVerdict("c0", "s", 1, True, 5, beta=1.5, q_draft=0.5, llm_ms=1.0, worker="llm"), "LLMVerdict.beta"),
        (lambda: LLMVerdict("c0", "s", 1, 1, 5, beta=1.0, q_draft=0.5, llm_ms=1.0, worker="llm"), "LLMVerdict.accepted"),
        (lambda: LLMVerdict("c0", "s", 1, True, 5, beta=1.0, q_draft=0.5, llm_ms=-2.0, worker="llm"), "LLMVerdict.llm_ms"),
        (lambda: PeerQuery("c0", "e0", 1, "m", [0.5, 0.5], hops=0, delta=0.9), "PeerQuery.embedding"),  # norm 0.71
        (lambda: PeerQuery("c0", "e0", 1, "m", [], hops=0, delta=0.9), "PeerQuery.embedding"),
        (lambda: PeerQuery("c0", "e0", 1, "m", [1.0, 0.0], hops=0, delta=1.5), "PeerQuery.delta"),
        (lambda: PeerQuery("c0", "", 1, "m", [1.0, 0.0], hops=0, delta=0.5), "PeerQuery.edge_id"),
        (lambda: PeerReply("c1", 1, 5, similarity=-1.5), "PeerReply.similarity"),
        (lambda: ThresholdUpdate("c0", "e0", 1, 10, params={}), "ThresholdUpdate.params"),
        (lambda: ThresholdUpdate("c0", "e0", 1, 10, params={"tau": []}), "ThresholdUpdate.params"),
        (lambda: ThresholdUpdate("c0", "e0", 1, 10, params={"tau": [float("inf")]}), "ThresholdUpdate.params"),
        (lambda: ThresholdUpdate("c0", "e0", 1, 10, params={"": [1.0]}), "ThresholdUpdate.params"),
        (lambda: ThresholdModel("e0", "cluster", 1, 10, params={"tau": 0.5}), "ThresholdModel.level"),
        (lambda: ClientStatus("c0", True, "e0", ts=-1.0), "ClientStatus.ts"),
        (lambda: ClientStatus("c0", "yes", "e0", ts=1.0), "ClientStatus.online"),
    ],
)
def test_other_messages_refuse_bad_fields_naming_them(build: Any, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        build()


def test_messages_hold_read_only_copies_in_the_wire_dtype() -> None:
    ids = np.array([101, 7592, 102], dtype=np.int64)
    message = request(context_ids=ids)
    ids[0] = 0
    assert message.context_ids.dtype == np.dtype("<i4") and message.context_ids[0] == 101
    assert message.topk_probs.dtype == np.dtype("<f4") and message.features.dtype == np.dtype("<f4")
    with pytest.raises(ValueError):
        message.context_ids[0] = 5
    assert message == request() and message != request(seq=4)


# -- encode --------------------------------------------------------------------------------


def test_envelope_layout_and_packed_arrays() -> None:
    env = envelope(request())
    assert list(env) == ["v", "t", "b"] and env["v"] == 1 and env["t"] == "token_request"
    assert list(env["b"]) == list(REQUEST)  # declaration order
    ids = env["b"]["context_ids"]  # token ids below 65,536 travel as uint16
    assert ids == {"dtype": "<u2", "shape": [3], "data": np.array([101, 7592, 102], "<u2").tobytes()}
    assert len(env["b"]["topk_probs"]["data"]) == 2 * 4
    query = PeerQuery("c0", "e0", 1, "m", [0.6, 0.8], hops=0, delta=0.9)
    assert envelope(query)["b"]["embedding"]["dtype"] == "<f2" and len(envelope(query)["b"]["embedding"]["data"]) == 4


def test_token_ids_take_two_bytes_when_they_fit_and_four_when_they_do_not() -> None:
    small = request(context_ids=list(range(100, 164)))
    large = request(context_ids=[70_000 + i for i in range(64)])
    assert envelope(small)["b"]["context_ids"]["dtype"] == "<u2" and envelope(large)["b"]["context_ids"]["dtype"] == "<i4"
    assert len(encode(large)) - len(encode(small)) >= 64 * 2  # the context at half the bytes
    for message in (small, large):
        back = decode(encode(message))
        assert back == message and back.context_ids.dtype == np.int32
    # a decoder also takes small ids sent as int32 (another implementation's choice), but no other dtype
    as_int32 = body(context_ids={"dtype": "<i4", "shape": [3], "data": np.array([101, 7592, 102], "<i4").tobytes()})
    assert decode(pack({"v": 1, "t": "token_request", "b": as_int32})) == request()
    for bad, reason in (({"dtype": "<f4", "shape": [1], "data": bytes(4)}, "field_type"),
                        ({"dtype": "<u2", "shape": [2], "data": bytes(3)}, "array_length"),
                        ({"dtype": "<u4", "shape": [1], "data": bytes(4)}, "field_type")):
        with pytest.raises(DecodeError) as err:
            decode(pack({"v": 1, "t": "token_request", "b": body(context_ids=bad)}))
        assert err.value.reason == reason, bad
    with pytest.raises(DecodeError, match="field_type"):  # uint16 is for token ids only
        decode(pack({"v": 1, "t": "token_request", "b": body(features={"dtype": "<u2", "shape": [1], "data": bytes(2)})}))


def test_encoding_is_deterministic_whatever_the_param_order() -> None:
    a = ThresholdUpdate("c0", "e0", 2, 10, params={"tau": 0.5, "bias": [0.25, 1.0]})
    b = ThresholdUpdate("c0", "e0", 2, 10, params={"bias": np.array([0.25, 1.0]), "tau": np.float32(0.5)})
    assert encode(a) == encode(b)
    assert list(envelope(a)["b"]["params"]) == ["bias", "tau"]


def test_encode_refuses_payloads_the_broker_would_refuse() -> None:
    big = ThresholdUpdate("c0", "e0", 1, 1, params={"w": np.zeros(MAX_PAYLOAD_BYTES // 4 + 1, np.float32)})
    with pytest.raises(ValueError, match="exceeds"):
        encode(big)


# -- decode errors ---------------------------------------------------------------------------


def body(**changes: Any) -> dict[str, Any]:
    return envelope(request())["b"] | changes


def test_an_integer_where_the_schema_says_number_decodes_as_a_float() -> None:
    """JavaScript msgpack encoders write 0 and 1 as integers; the schema's `number` allows them (issue 19, 10)."""
    full = request(topk_ids=np.array([5, 7], np.int32), topk_probs=np.array([0.75, 0.25], np.float32), tail_mass=0.0,
                   draft_token=5)
    b = envelope(full)["b"] | {"tail_mass": 0}
    msg = decode(pack({"v": 1, "t": "token_request", "b": b}))
    assert msg.tail_mass == 0.0 and isinstance(msg.tail_mass, float) and msg == full


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1", "not_msgpack"),  # never-used msgpack byte
        (b"", "not_msgpack"),
        (pack({"v": 1}) + b"\x00", "not_msgpack"),  # trailing bytes
        (pack([1, "token_request", {}]), "bad_envelope"),
        (pack({"v": 1, "t": "token_request"}), "bad_envelope"),
        (pack({"v": 1, "t": "token_request", "b": {}, "x": 0}), "bad_envelope"),
        (pack({"v": 1, "t": "token_request", "b": []}), "bad_envelope"),
        (pack({"v": 2, "t": "token_request", "b": {}}), "version"),
        (pack({"v": True, "t": "token_request", "b": {}}), "version"),
        (pack({"v": 1, "t": "model_weights", "b": {}}), "unknown_type"),
        (pack({"v": 1, "t": "token_request", "b": {k: v for k, v in body().items() if k != "seq"}}), "missing_field"),
        (pack({"v": 1, "t": "token_request", "b": body(extra=1)}), "extra_field"),
        (pack({"v": 1, "t": "token_request", "b": body(seq="3")}), "field_type"),
        (pack({"v": 1, "t": "token_request", "b": body(seq=True)}), "field_type"),
        (pack({"v": 1, "t": "token_request", "b": body(tail_mass=True)}), "field_type"),  # a bool is no number
        (pack({"v": 1, "t": "token_request", "b": body(tail_mass=2**60)}), "field_type"),  # not exactly a float
        (pack({"v": 1, "t": "token_request", "b": body(context_ids=[101, 102])}), "field_type"),
        (pack({"v": 1, "t": "token_request", "b": body(topk_probs={"dtype": "<f8", "shape": [2], "data": bytes(16)})}), "field_type"),
        (pack({"v": 1, "t": "token_request", "b": body(topk_probs={"dtype": "<f4", "shape": [2], "data": "text"})}), "field_type"),
        (pack({"v": 1, "t": "token_request", "b": body(topk_probs={"dtype": "<f4", "shape": [2], "data": bytes(7)})}), "array_length"),
        (pack({"v": 1, "t": "token_request", "b": body(topk_probs={"dtype": "<f4", "shape": [3], "data": bytes(8)})}), "array_length"),
        # shapes numpy itself refuses with a plain ValueError (issue 19): 65 dimensions, an extent past 2**63
        (pack({"v": 1, "t": "token_request", "b": body(topk_probs={"dtype": "<f4", "shape": [1] * 65, "data": bytes(4)})}), "field_type"),
        (pack({"v": 1, "t": "token_request", "b": body(topk_probs={"dtype": "<f4", "shape": [0, 2**64 - 1], "data": b""})}), "field_type"),
        (pack({"v": 1, "t": "token_request", "b": body(tail_mass=float("nan"))}), "non_finite"),
        (pack({"v": 1, "t": "token_request", "b": body(features={"dtype": "<f4", "shape": [1],
                                                                "data": np.array([np.inf], "<f4").tobytes()})}), "non_finite"),
        (pack({"v": 1, "t": "token_request", "b": body(tail_mass=0.5)}), "invalid"),  # probabilities sum to 1.375
        (pack({"v": 1, "t": "token_request", "b": body(client_id="c/0")}), "invalid"),
        (b"\x00" * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    ],
)
def test_decode_names_the_reason_for_every_bad_payload(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(data)
    assert caught.value.reason == reason, caught.value


def test_decode_refuses_a_valid_message_on_the_wrong_topic() -> None:
    data = encode(request())
    assert decode(data, payload_type(topics.llm_request())) == request()
    with pytest.raises(DecodeError) as caught:
        decode(data, payload_type(topics.edge_update("e0", "c0")))
    assert caught.value.reason == "unexpected_type"
    assert decode(data, (ThresholdUpdate, TokenRequest)) == request()


def test_payload_type_of_every_topic() -> None:
    assert payload_type(topics.client_status("c0")) is ClientStatus
    assert payload_type(topics.edge_p2p_query("e0")) is PeerQuery
    assert payload_type(topics.client_p2p_reply("c0", "c1")) is PeerReply
    assert payload_type(topics.llm_request()) is TokenRequest
    assert payload_type(topics.client_llm_reply("c0")) is LLMVerdict
    assert payload_type(topics.edge_update("e0", "c0")) is ThresholdUpdate
    assert payload_type(topics.edge_model("e0")) is ThresholdModel
    assert payload_type(topics.global_update("e0")) is ThresholdModel
    assert payload_type(topics.global_model()) is ThresholdModel
    assert payload_type("other/topic") is None


def test_json_view_round_trips() -> None:
    message = ThresholdUpdate("c1", "e0", 3, 120, params={"w": [[0.5, -0.25]], "tau": np.float32(0.25)})
    obj = to_json(message)
    assert obj["b"]["params"] == {"tau": 0.25, "w": [[0.5, -0.25]]}
    assert from_json(obj) == message
    with pytest.raises(ValueError, match="version"):
        from_json(obj | {"v": 2})
    with pytest.raises(ValueError, match="threshold_update"):
        from_json(obj | {"b": {"client_id": "c1"}})


# -- property tests -----------------------------------------------------------------------------

ids = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/+#$\0", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
              min_size=1, max_size=12).filter(str.isprintable)
counts = st.integers(0, 2**63 - 1)
tokens = st.integers(0, 2**31 - 1)
unit = st.floats(0.0, 1.0)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def token_requests(draw: st.DrawFn) -> TokenRequest:
    k = draw(st.integers(1, 8))
    probs = np.array(draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=k, max_size=k)), np.float32)
    total = float(probs.astype(np.float64).sum())
    if total > 1.0:
        probs = (probs / np.float32(total * 1.0001)).astype(np.float32)
    tail = max(0.0, 1.0 - float(probs.astype(np.float64).sum()))
    return TokenRequest(
        client_id=draw(ids), session_id=draw(ids), seq=draw(counts), round=draw(counts),
        context_ids=draw(hnp.arrays(np.int32, st.integers(1, 32), elements=tokens)),
        draft_token=draw(tokens), topk_ids=draw(st.lists(tokens, min_size=k, max_size=k, unique=True)),
        topk_probs=probs, tail_mass=tail,
        features=draw(hnp.arrays(np.float32, st.integers(0, 6), elements=finite32)),
        reason=draw(st.sampled_from(["uncertain", "exploration", "audit"])),
    )


@st.composite
def peer_queries(draw: st.DrawFn) -> PeerQuery:
    raw = draw(hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(-1, 1)))
    if np.linalg.norm(raw) < 1e-3:
        raw = np.ones_like(raw)
    embedding = (raw / np.linalg.norm(raw)).astype(np.float16)
    return PeerQuery(draw(ids), draw(ids), draw(counts), draw(ids), embedding, draw(counts), draw(st.floats(-1, 1)))


@st.composite
def session_tokens(draw: st.DrawFn) -> SessionToken:
    """Positional bodies (issue 18): ids up to int32, float16 probabilities summing with the tail to 1."""
    k = draw(st.integers(1, 8))
    probs = draw(hnp.arrays(np.float16, k, elements=st.floats(0, 0.125, width=16)))  # k * 0.125 <= 1
    return SessionToken(
        client_id=draw(ids), session_id=draw(ids), seq=draw(counts), start=draw(counts),
        new_ids=draw(hnp.arrays(np.int32, st.integers(1, 32), elements=tokens)), draft_token=draw(tokens),
        topk_ids=draw(st.lists(tokens, min_size=k, max_size=k, unique=True)), topk_probs=probs,
        tail_mass=max(0.0, 1.0 - float(probs.astype(np.float64).sum())))


params = st.dictionaries(
    ids, hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4), elements=finite32),
    min_size=1, max_size=4,
)
messages = st.one_of(
    token_requests(),
    session_tokens(),
    peer_queries(),
    st.builds(LLMVerdict, ids, ids, counts, st.booleans(), tokens, unit, unit, st.floats(0, 1e9), ids),
    st.builds(PeerReply, ids, counts, tokens, st.floats(-1, 1)),
    st.builds(ThresholdUpdate, ids, ids, counts, counts, params),
    st.builds(ThresholdModel, ids, st.sampled_from(["edge", "global"]), counts, counts, params),
    st.builds(ClientStatus, ids, st.booleans(), ids, st.floats(0, 4e9)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_every_valid_message_round_trips_byte_for_byte(message: Message) -> None:
    data = encode(message)
    decoded = decode(data, type(message))
    assert decoded == message
    assert encode(decoded) == data


@settings(max_examples=150, deadline=None)
@given(messages, st.data())
def test_corrupted_payloads_raise_only_decode_errors(message: Message, data: st.DataObject) -> None:
    payload = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 3))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    for candidate in (bytes(payload), bytes(payload[:cut])):
        try:
            decoded = decode(candidate)
        except DecodeError as err:
            assert err.reason in {"not_msgpack", "bad_envelope", "version", "unknown_type", "missing_field",
                                  "extra_field", "field_type", "array_length", "non_finite", "invalid"}
        else:  # the corruption happened to leave a valid message: it must be one in every respect
            assert decode(encode(decoded)) == decoded


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def session_token(**changes: Any) -> SessionToken:
    return SessionToken(**{**dict(client_id="c0", session_id="9f3a1c2e", seq=12, start=40, new_ids=[2054],
                                  draft_token=2003, topk_ids=[2003, 2001, 1996, 1037],
                                  topk_probs=np.array([0.5, 0.25, 0.125, 0.0625], np.float16), tail_mass=0.0625),
                           **changes})


def test_a_session_token_travels_as_a_positional_body_of_at_most_122_bytes() -> None:
    """Issue 18's uplink goal (1/1000 of a full fp32 distribution) for a token after the session's first: the
    values in field order, token ids as integers, the float16 probabilities as one bin."""
    message = session_token()
    data = encode(message)
    assert len(data) <= 122 and decode(data, SessionToken) == message
    body = msgpack.unpackb(data, raw=False)["b"]
    assert isinstance(body, list) and body[:4] == ["c0", "9f3a1c2e", 12, 40] and body[4] == [2054]
    assert body[7] == np.array([0.5, 0.25, 0.125, 0.0625], "<f2").tobytes()
    big = session_token(new_ids=[70_000], topk_ids=[70_000, 1], draft_token=70_000,
                        topk_probs=np.array([0.5, 0.25], np.float16), tail_mass=0.25)
    assert decode(encode(big)) == big  # ids past uint16 need no other form


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"client_id": "c0"}, "bad_envelope"),  # a map where the type is positional
        (["c0", "9f3a1c2e", 12, 40, [2054], 2003, [2003], b"\x00\x38"], "missing_field"),
        (["c0", "9f3a1c2e", 12, 40, [2054], 2003, [2003], b"\x00\x3c", 0.0, 1], "extra_field"),
        (["c0", "9f3a1c2e", 12, 40, [-1], 2003, [2003], b"\x00\x3c", 0.0], "field_type"),
        (["c0", "9f3a1c2e", 12, 40, [True], 2003, [2003], b"\x00\x3c", 0.0], "field_type"),
        (["c0", "9f3a1c2e", 12, 40, [2054], 2003, [2003], [1.0], 0.0], "field_type"),
        (["c0", "9f3a1c2e", 12, 40, [2054], 2003, [2003], b"\x00", 0.0], "array_length"),
        (["c0", "9f3a1c2e", 12, 40, [2054], 2003, [2003], b"\x00\x3c", 0.5], "invalid"),  # 1.0 + 0.5
    ],
)
def test_a_bad_positional_body_is_dropped_with_its_reason(body: Any, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(pack({"v": 1, "t": "session_token", "b": body}))
    assert caught.value.reason == reason, caught.value
