"""Every FedHLM topic string, built and parsed in one place.

The topic tree is part of the wire contract (`transport/asyncapi.yaml`): roles never
format topics themselves, they call the builders here, and handlers recover the ids of a
received topic with `parse`. Ids become topic levels, so they are checked before use.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

PREFIX = "fedhlm/v1"
MAX_ID_LENGTH = 64
_FORBIDDEN = "/+#\0"

# topic name -> template; the ids in braces are MQTT topic levels.
TEMPLATES: dict[str, str] = {
    "client_status": PREFIX + "/client/{client_id}/status",
    "edge_p2p_query": PREFIX + "/edge/{edge_id}/p2p/query",
    "client_p2p_reply": PREFIX + "/client/{client_id}/p2p/reply/{responder_id}",
    "edge_resolve": PREFIX + "/edge/{edge_id}/resolve",
    "edge_session_resolve": PREFIX + "/edge/{edge_id}/session/resolve",
    "edge_p2p_entry": PREFIX + "/edge/{edge_id}/p2p/entry",
    "llm_request": PREFIX + "/llm/request",
    "client_llm_reply": PREFIX + "/client/{client_id}/llm/reply",
    "llm_session": PREFIX + "/llm/session",
    "llm_session_end": PREFIX + "/llm/session/end",
    "llm_worker_session": PREFIX + "/llm/worker/{worker_id}/session",
    "llm_worker_session_end": PREFIX + "/llm/worker/{worker_id}/session/end",
    "client_llm_miss": PREFIX + "/client/{client_id}/llm/miss",
    "edge_update": PREFIX + "/edge/{edge_id}/update/{client_id}",
    "edge_model": PREFIX + "/edge/{edge_id}/model",
    "global_update": PREFIX + "/global/update/{edge_id}",
    "global_model": PREFIX + "/global/model",
}

# topic name -> traffic kind, the unit of byte accounting
KINDS: dict[str, str] = {
    "client_status": "status",
    "edge_p2p_query": "p2p",
    "client_p2p_reply": "p2p",
    "edge_resolve": "llm",  # an LLM request that the edge may answer from its cache
    "edge_session_resolve": "llm",  # a generation token that the edge may answer from its cache
    "edge_p2p_entry": "p2p",
    "llm_request": "llm",
    "client_llm_reply": "llm",
    "llm_session": "llm",
    "llm_session_end": "llm",
    "llm_worker_session": "llm",
    "llm_worker_session_end": "llm",
    "client_llm_miss": "llm",
    "edge_update": "fl",
    "edge_model": "fl",
    "global_update": "fl",
    "global_model": "fl",
}

_PATTERNS = {
    name: re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")
    for name, template in TEMPLATES.items()
}


class ParsedTopic(NamedTuple):
    """A concrete topic split into its template name (e.g. "edge_update") and its ids."""

    name: str
    ids: dict[str, str]


def validate_id(value: object, field: str = "id") -> str:
    """An id that is safe as one topic level: 1-64 characters, none of '/', '+', '#', NUL, no leading '$'."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string id, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{field}: id is empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{field}: id {value[:16]!r}... is longer than {MAX_ID_LENGTH} characters")
    bad = sorted({c for c in value if c in _FORBIDDEN or not c.isprintable()})
    if bad:
        raise ValueError(f"{field}: id {value!r} contains forbidden characters {bad} (no '/', '+', '#', NUL, control)")
    if value.startswith("$"):
        raise ValueError(f"{field}: id {value!r} starts with '$' (reserved for broker topics)")
    return value


def _build(name: str, **ids: str) -> str:
    return TEMPLATES[name].format(**{key: validate_id(value, key) for key, value in ids.items()})


def client_status(client_id: str) -> str:
    """Retained online/offline status of one client (also its Last Will)."""
    return _build("client_status", client_id=client_id)


def edge_p2p_query(edge_id: str) -> str:
    """Peer queries inside one edge cluster."""
    return _build("edge_p2p_query", edge_id=edge_id)


def client_p2p_reply(client_id: str, responder_id: str) -> str:
    """One responder's peer answers to one client. The responder's id is a topic level that the broker's ACL
    binds to its login (`pattern write .../p2p/reply/%u`), so the asker knows who answered from the topic,
    not from a payload field that anyone can fill in."""
    return _build("client_p2p_reply", client_id=client_id, responder_id=responder_id)


def client_p2p_replies(client_id: str) -> str:
    """The Response Topic a peer query carries: each responder answers one level below it, at its own id
    (`client_p2p_reply`); the asker subscribes to `client_p2p_replies(c) + "/+"`."""
    return TEMPLATES["client_p2p_reply"].format(client_id=validate_id(client_id, "client_id"), responder_id="")[:-1]


def edge_session_resolve(edge_id: str) -> str:
    """An uncertain generation token through the edge's cluster cache (a SessionResolve)."""
    return _build("edge_session_resolve", edge_id=edge_id)


def edge_resolve(edge_id: str) -> str:
    """Uncertain tokens through their edge (its semantic cache first, then the LLM)."""
    return _build("edge_resolve", edge_id=edge_id)


def edge_p2p_entry(edge_id: str) -> str:
    """Entries an edge added to its cluster cache, for the other edges (p2p scope neighbours)."""
    return _build("edge_p2p_entry", edge_id=edge_id)


def edge_p2p_entry_filter() -> str:
    """Subscription filter for every edge's new cache entries."""
    return TEMPLATES["edge_p2p_entry"].format(edge_id="+")


def llm_request() -> str:
    """Uncertain tokens for the LLM refiner."""
    return TEMPLATES["llm_request"]


def llm_request_shared(group: str) -> str:
    """Subscription filter that spreads LLM requests over the workers of `group` (MQTT v5 shared subscription)."""
    return f"$share/{validate_id(group, 'group')}/{llm_request()}"


def client_llm_reply(client_id: str) -> str:
    """LLM verdicts for one client (its Response Topic for LLM requests)."""
    return _build("client_llm_reply", client_id=client_id)


def llm_session() -> str:
    """Drafted tokens of generations, verified in the LLM's per-sequence sessions (KV caches)."""
    return TEMPLATES["llm_session"]


def llm_session_shared(group: str) -> str:
    """The workers' shared subscription to session tokens: where a sequence's first token goes (any worker may
    open its session; its verdict names the worker, and the later tokens go to `llm_worker_session`)."""
    return f"$share/{validate_id(group, 'group')}/{llm_session()}"


def llm_session_end() -> str:
    """A client's explicit end of a generation session."""
    return TEMPLATES["llm_session_end"]


def llm_session_end_shared(group: str) -> str:
    """The workers' shared subscription to session ends (the end reaches one worker; another's copy expires)."""
    return f"$share/{validate_id(group, 'group')}/{llm_session_end()}"


def llm_worker_session(worker_id: str) -> str:
    """The later tokens of the sessions one LLM worker holds: only that worker reads it (session affinity)."""
    return _build("llm_worker_session", worker_id=worker_id)


def llm_worker_session_end(worker_id: str) -> str:
    """The end of a session that one LLM worker holds."""
    return _build("llm_worker_session_end", worker_id=worker_id)


def client_llm_miss(client_id: str) -> str:
    """Where the LLM tells one client that it does not hold a session at the position asked."""
    return _build("client_llm_miss", client_id=client_id)


def edge_update(edge_id: str, client_id: str) -> str:
    """One client's threshold update to its edge."""
    return _build("edge_update", edge_id=edge_id, client_id=client_id)


def edge_update_filter(edge_id: str) -> str:
    """Subscription filter for every client update of one edge."""
    return TEMPLATES["edge_update"].format(edge_id=validate_id(edge_id, "edge_id"), client_id="+")


def edge_model(edge_id: str) -> str:
    """Retained cluster threshold model of one edge."""
    return _build("edge_model", edge_id=edge_id)


def global_update(edge_id: str) -> str:
    """One edge's aggregate to the cloud."""
    return _build("global_update", edge_id=edge_id)


def global_update_filter() -> str:
    """Subscription filter for every edge aggregate."""
    return TEMPLATES["global_update"].format(edge_id="+")


def global_model() -> str:
    """Retained global threshold model."""
    return TEMPLATES["global_model"]


def all_topic_templates() -> list[str]:
    """Every concrete topic template the builders produce (filters derive from these)."""
    return list(TEMPLATES.values())


def parse(topic: str) -> ParsedTopic:
    """The template name and ids of a concrete FedHLM topic; ValueError for anything else."""
    for name, pattern in _PATTERNS.items():
        match = pattern.match(topic)
        if match:
            ids = match.groupdict()
            try:
                for key, value in ids.items():
                    validate_id(value, key)
            except ValueError as err:
                raise ValueError(f"topic {topic!r} is not a FedHLM {PREFIX} topic: {err}") from None
            return ParsedTopic(name, ids)
    raise ValueError(f"topic {topic!r} is not a FedHLM {PREFIX} topic")


@functools.lru_cache(maxsize=65_536)
def name_of(topic: str) -> str | None:
    """The template name of a concrete FedHLM topic, None for anything else; cached, because every message
    received and sent asks it (for its byte accounting and its payload type) and topics repeat."""
    try:
        return parse(topic).name
    except ValueError:
        return None


def kind_of(topic: str) -> str:
    """Traffic kind of a concrete topic: "llm", "p2p", "fl" or "status"."""
    name = name_of(topic)
    if name is None:
        raise ValueError(f"topic {topic!r} is not a FedHLM {PREFIX} topic")
    return KINDS[name]
