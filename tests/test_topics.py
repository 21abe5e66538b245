"""Topic builders: exact strings, parse as their inverse, ids that cannot break the topic tree."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from fedhlm.transport import topics


def test_builders_give_the_design_topic_tree() -> None:
    assert topics.client_status("c0") == "fedhlm/v1/client/c0/status"
    assert topics.edge_p2p_query("e1") == "fedhlm/v1/edge/e1/p2p/query"
    assert topics.client_p2p_replies("c2") == "fedhlm/v1/client/c2/p2p/reply"  # a query's Response Topic
    assert topics.client_p2p_reply("c2", "c5") == "fedhlm/v1/client/c2/p2p/reply/c5"  # c5 answers it there
    assert topics.llm_request() == "fedhlm/v1/llm/request"
    assert topics.llm_request_shared("workers") == "$share/workers/fedhlm/v1/llm/request"
    assert topics.client_llm_reply("c3") == "fedhlm/v1/client/c3/llm/reply"
    assert topics.edge_update("e0", "c1") == "fedhlm/v1/edge/e0/update/c1"
    assert topics.edge_update_filter("e0") == "fedhlm/v1/edge/e0/update/+"
    assert topics.edge_model("e0") == "fedhlm/v1/edge/e0/model"
    assert topics.global_update("e1") == "fedhlm/v1/global/update/e1"
    assert topics.global_update_filter() == "fedhlm/v1/global/update/+"
    assert topics.global_model() == "fedhlm/v1/global/model"


@pytest.mark.parametrize(
    ("topic", "name", "ids", "kind"),
    [
        (topics.client_status("c0"), "client_status", {"client_id": "c0"}, "status"),
        (topics.edge_p2p_query("e1"), "edge_p2p_query", {"edge_id": "e1"}, "p2p"),
        (topics.client_p2p_reply("c2", "e0"), "client_p2p_reply", {"client_id": "c2", "responder_id": "e0"}, "p2p"),
        (topics.llm_request(), "llm_request", {}, "llm"),
        (topics.client_llm_reply("c3"), "client_llm_reply", {"client_id": "c3"}, "llm"),
        (topics.edge_update("e0", "c1"), "edge_update", {"edge_id": "e0", "client_id": "c1"}, "fl"),
        (topics.edge_model("e0"), "edge_model", {"edge_id": "e0"}, "fl"),
        (topics.global_update("e1"), "global_update", {"edge_id": "e1"}, "fl"),
        (topics.global_model(), "global_model", {}, "fl"),
    ],
)
def test_parse_recovers_name_and_ids_and_kind(topic: str, name: str, ids: dict[str, str], kind: str) -> None:
    parsed_name, parsed_ids = topics.parse(topic)
    assert (parsed_name, parsed_ids) == (name, ids)
    assert topics.kind_of(topic) == kind
    assert topics.TEMPLATES[name].format(**ids) == topic


def test_ids_named_like_topic_levels_do_not_confuse_parse() -> None:
    assert topics.parse(topics.client_status("status")) == ("client_status", {"client_id": "status"})
    assert topics.parse(topics.edge_update("update", "model")) == ("edge_update", {"edge_id": "update", "client_id": "model"})


@pytest.mark.parametrize(
    "topic",
    ["fedhlm/v2/global/model", "fedhlm/v1/global/model/extra", "fedhlm/v1/client//status", "/fedhlm/v1/llm/request",
     "fedhlm/v1/edge/+/model", "fedhlm/v1/client/c0/unknown", "$share/g/fedhlm/v1/llm/request"],
)
def test_parse_refuses_topics_outside_the_tree(topic: str) -> None:
    with pytest.raises(ValueError, match="not a FedHLM"):
        topics.parse(topic)


@pytest.mark.parametrize(
    ("bad", "message"),
    [("", "empty"), ("a/b", "forbidden"), ("c+", "forbidden"), ("#", "forbidden"), ("c\0", "forbidden"),
     ("c\n1", "forbidden"), ("x" * 65, "longer than 64"), ("$SYS", "reserved"), (7, "expected a string")],
)
def test_invalid_ids_are_refused_naming_the_field(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"client_id: .*{message}"):
        topics.client_status(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="edge_id"):
        topics.edge_update(bad, "c0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group"):
        topics.llm_request_shared(bad)  # type: ignore[arg-type]


def test_filters_match_exactly_their_topics() -> None:
    assert mqtt.topic_matches_sub(topics.edge_update_filter("e0"), topics.edge_update("e0", "c3"))
    assert not mqtt.topic_matches_sub(topics.edge_update_filter("e0"), topics.edge_update("e1", "c3"))
    assert not mqtt.topic_matches_sub(topics.edge_update_filter("e0"), topics.edge_model("e0"))
    assert mqtt.topic_matches_sub(topics.global_update_filter(), topics.global_update("e1"))
    assert not mqtt.topic_matches_sub(topics.global_update_filter(), topics.global_model())


def test_all_templates_cover_every_builder_once() -> None:
    templates = topics.all_topic_templates()
    assert len(templates) == len(set(templates)) == 17
    assert all(t.startswith(topics.PREFIX + "/") for t in templates)
    assert set(topics.KINDS) == set(topics.TEMPLATES)


def test_session_topics_are_llm_traffic_that_a_shared_subscription_matches() -> None:
    assert topics.llm_session_shared("llm") == "$share/llm/" + topics.llm_session()
    assert topics.parse(topics.client_llm_miss("c0")) == ("client_llm_miss", {"client_id": "c0"})
    assert {topics.kind_of(t) for t in (topics.llm_session(), topics.llm_session_end(), topics.client_llm_miss("c0"))} \
        == {"llm"}


def test_a_workers_session_topics_name_it_and_are_llm_traffic() -> None:
    assert topics.parse(topics.llm_worker_session("llm1")) == ("llm_worker_session", {"worker_id": "llm1"})
    assert topics.parse(topics.llm_worker_session_end("llm1")) == ("llm_worker_session_end", {"worker_id": "llm1"})
    assert topics.kind_of(topics.llm_worker_session("llm1")) == "llm"
    with pytest.raises(ValueError, match="worker_id"):
        topics.llm_worker_session("a/b")
