"""The language-neutral wire contract: AsyncAPI document and golden vectors agree with the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedhlm.transport import topics, vectors
from fedhlm.transport.codec import SCHEMA_VERSION, TOKEN_WIRE_DTYPES, TOPIC_PAYLOADS, decode, encode, from_json, to_json
from fedhlm.transport.messages import MESSAGE_TYPES

ROOT = Path(__file__).resolve().parents[1]
ASYNCAPI = ROOT / "transport" / "asyncapi.yaml"
VECTORS = ROOT / "transport" / "vectors"
ARRAY_SCHEMAS = {"<f4": "Float32Array", "<f2": "Float16Array"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return yaml.safe_load(ASYNCAPI.read_text())


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        assert node["$ref"].startswith("#/"), node["$ref"]
        target: Any = doc
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def test_every_topic_template_is_a_channel_and_every_channel_a_template(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"].startswith("3.0")
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert addresses == set(topics.all_topic_templates())
    for name, channel in doc["channels"].items():
        assert channel["address"] == topics.TEMPLATES[name]  # channel ids are the builder names
        params = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert set(channel.get("parameters", {})) == params, name
        for param in params:
            assert resolve(doc, channel["parameters"][param])["description"]


def test_each_channel_carries_the_message_the_codec_expects(doc: dict[str, Any]) -> None:
    for name, channel in doc["channels"].items():
        (message,) = channel["messages"].values()
        envelope = resolve(doc, resolve(doc, message)["payload"])
        assert envelope["required"] == ["v", "t", "b"]
        assert resolve(doc, envelope["properties"]["v"])["const"] == SCHEMA_VERSION
        assert envelope["properties"]["t"]["const"] == TOPIC_PAYLOADS[name].TYPE, name


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
def test_body_schemas_list_the_dataclass_fields_in_wire_order(doc: dict[str, Any], tag: str) -> None:
    cls = MESSAGE_TYPES[tag]
    schema = doc["components"]["schemas"][cls.__name__]
    names = [spec.name for spec in cls.field_specs()]
    if cls.POSITIONAL:  # an array of the values in field order, each item titled with its field's name
        assert schema["type"] == "array" and schema["items"] is False
        assert [item["title"] for item in schema["prefixItems"]] == names
        assert schema["minItems"] == schema["maxItems"] == len(names)
        return
    assert list(schema["properties"]) == names and schema["required"] == names
    assert schema["additionalProperties"] is False
    for spec in cls.field_specs():
        prop = schema["properties"][spec.name]
        if spec.kind == "array":
            assert prop["$ref"].endswith("/" + ARRAY_SCHEMAS[spec.dtype]), spec.name
            assert resolve(doc, prop)["properties"]["dtype"]["const"] == spec.dtype
        elif spec.kind == "tokens":
            assert prop["$ref"].endswith("/TokenIds"), spec.name
            assert resolve(doc, prop)["properties"]["dtype"]["enum"] == list(TOKEN_WIRE_DTYPES)
        elif spec.kind == "params":
            assert prop["$ref"].endswith("/Params")
        elif spec.kind == "choice":
            assert prop["enum"] == list(spec.choices)
        elif spec.kind == "float":
            assert prop["type"] == "number"
        elif spec.kind == "bool":
            assert prop["type"] == "boolean"
        else:
            assert resolve(doc, prop)["type"] in {"string", "integer"}, spec.name


def test_operations_cover_both_directions_with_mqtt_bindings(doc: dict[str, Any]) -> None:
    actions: dict[str, set[str]] = {name: set() for name in doc["channels"]}
    for op in doc["operations"].values():
        channel = op["channel"]["$ref"].removeprefix("#/channels/")
        actions[channel].add(op["action"])
        assert op["bindings"]["mqtt"]["qos"] in (0, 1)
        if op["action"] == "send":
            kind = topics.KINDS[channel]
            # QoS 1 where a loss costs a round or a token's LLM answer; peer traffic has a deadline instead
            assert op["bindings"]["mqtt"]["qos"] == (1 if kind in ("fl", "status", "llm") else 0), channel
            assert op["bindings"]["mqtt"]["retain"] == (channel in ("client_status", "edge_model", "global_model"))
        if "reply" in op:
            assert op["reply"]["channel"]["$ref"].removeprefix("#/channels/") in actions
    assert all(found == {"send", "receive"} for found in actions.values()), actions


def test_vectors_cover_every_message_type() -> None:
    tags = {json.loads(path.read_text())["t"] for path in VECTORS.glob("*.json")}
    assert tags == set(MESSAGE_TYPES)
    assert sorted(p.stem for p in VECTORS.glob("*.json")) == sorted(p.stem for p in VECTORS.glob("*.msgpack"))


@pytest.mark.parametrize("name", sorted(p.stem for p in VECTORS.glob("*.json")))
def test_codec_reproduces_each_vector_byte_for_byte_and_back(name: str) -> None:
    obj = json.loads((VECTORS / f"{name}.json").read_text())
    data = (VECTORS / f"{name}.msgpack").read_bytes()
    assert encode(from_json(obj)) == data
    assert to_json(decode(data)) == obj


def test_vector_files_match_their_generator() -> None:
    assert vectors.compare(VECTORS) == []


def schema_validator(doc: dict[str, Any], name: str):  # noqa: ANN201
    """A JSON Schema 2020-12 validator of components.schemas[name] in which MessagePack bin (Python bytes) is what
    `type: string, format: binary` means, as a device implementation reading the document would take it."""
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:fedhlm:asyncapi", Resource(contents=doc, specification=DRAFT202012))
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "string", lambda _, value: isinstance(value, (str, bytes)))
    formats = jsonschema.FormatChecker()
    formats.checks("binary")(lambda value: isinstance(value, bytes))
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    return cls({"$ref": f"urn:fedhlm:asyncapi#/components/schemas/{name}"}, registry=registry, format_checker=formats)


def envelope_schema_name(doc: dict[str, Any], tag: str) -> str:
    names = [n for n, s in doc["components"]["schemas"].items()
             if n.endswith("Envelope") and resolve(doc, s.get("properties", {}).get("t", {})).get("const") == tag]
    assert len(names) == 1, (tag, names)
    return names[0]


@pytest.mark.parametrize("name", sorted(p.stem for p in VECTORS.glob("*.msgpack")))
def test_every_vector_validates_against_its_asyncapi_schema(doc: dict[str, Any], name: str) -> None:
    """Issue 19, item 10: the decoded bytes a device receives satisfy the document it builds from."""
    import msgpack

    obj = msgpack.unpackb((VECTORS / f"{name}.msgpack").read_bytes(), raw=False)
    validator = schema_validator(doc, envelope_schema_name(doc, obj["t"]))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    assert errors == []


def test_the_schema_refuses_what_the_decoder_refuses(doc: dict[str, Any]) -> None:
    import msgpack

    obj = msgpack.unpackb((VECTORS / "llm_verdict_accepted.msgpack").read_bytes(), raw=False)
    validator = schema_validator(doc, envelope_schema_name(doc, "llm_verdict"))
    assert validator.is_valid(obj)
    assert validator.is_valid(obj | {"b": obj["b"] | {"beta": 1}})  # an integer is a number, and the decoder agrees
    assert not validator.is_valid(obj | {"b": obj["b"] | {"beta": 1.5}})
    assert not validator.is_valid(obj | {"b": obj["b"] | {"seq": -1}})
    assert not validator.is_valid(obj | {"b": {k: v for k, v in obj["b"].items() if k != "seq"}})
    request = msgpack.unpackb((VECTORS / "token_request_uncertain.msgpack").read_bytes(), raw=False)
    text_data = request["b"] | {"context_ids": request["b"]["context_ids"] | {"data": "not bytes"}}
    assert not schema_validator(doc, envelope_schema_name(doc, "token_request")).is_valid(request | {"b": text_data})


def test_a_positional_body_is_refused_by_the_schema_where_the_decoder_refuses_it(doc: dict[str, Any]) -> None:
    import msgpack

    obj = msgpack.unpackb((VECTORS / "session_token_continue.msgpack").read_bytes(), raw=False)
    validator = schema_validator(doc, envelope_schema_name(doc, "session_token"))
    assert validator.is_valid(obj)
    assert not validator.is_valid(obj | {"b": obj["b"][:-1]})  # a value missing
    assert not validator.is_valid(obj | {"b": obj["b"] + [0]})  # one too many
    assert not validator.is_valid(obj | {"b": obj["b"][:4] + [[-1]] + obj["b"][5:]})  # a negative token id
