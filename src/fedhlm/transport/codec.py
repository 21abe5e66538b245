"""Payload codec: typed messages <-> deterministic MessagePack bytes.

Wire form (see transport/asyncapi.yaml and transport/README.md):

    {"v": SCHEMA_VERSION, "t": <type tag>, "b": {<field>: <value>, ...}}

Fields appear in declaration order; arrays are maps {"dtype": "<f4", "shape": [n], "data":
<raw little-endian bytes>}; token ids go as "<u2" when every id is below 65,536, else as
"<i4" (a decoder takes either; the encoder's choice is fixed by the values); threshold parameters are a map name -> array, sorted by name;
floats are float64. The same message therefore always gives the same bytes, which is what
the golden vectors in transport/vectors/ pin down. Decoding never trusts the sender:
every failure is a `DecodeError` with a short `reason` that roles count and log.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from fedhlm.core.wire import SCHEMA_VERSION
from fedhlm.transport import topics
from fedhlm.transport.messages import (
    MAX_TOKEN_ID,
    MESSAGE_TYPES,
    CacheEntry,
    ClientStatus,
    FieldSpec,
    LLMVerdict,
    Message,
    PeerQuery,
    PeerReply,
    ResolveRequest,
    SessionEnd,
    SessionMiss,
    SessionResolve,
    SessionToken,
    ThresholdModel,
    ThresholdUpdate,
    TokenRequest,
)

# Mosquitto refuses packets over 256 KiB (broker/mosquitto.conf); keep 1 KiB for topic and properties.
MAX_PAYLOAD_BYTES = 255 * 1024
MAX_ARRAY_DIMS = 4  # no field has more than 2; numpy refuses more than 64 with a plain ValueError

# which message each topic carries (the channel -> message map of the AsyncAPI document)
TOPIC_PAYLOADS: dict[str, type[Message]] = {
    "client_status": ClientStatus,
    "edge_p2p_query": PeerQuery,
    "client_p2p_reply": PeerReply,
    "edge_resolve": ResolveRequest,
    "edge_session_resolve": SessionResolve,
    "edge_p2p_entry": CacheEntry,
    "llm_request": TokenRequest,
    "client_llm_reply": LLMVerdict,
    "llm_session": SessionToken,
    "llm_session_end": SessionEnd,
    "llm_worker_session": SessionToken,
    "llm_worker_session_end": SessionEnd,
    "client_llm_miss": SessionMiss,
    "edge_update": ThresholdUpdate,
    "edge_model": ThresholdModel,
    "global_update": ThresholdModel,
    "global_model": ThresholdModel,
}

DECODE_REASONS = (
    "too_large",  # payload above MAX_PAYLOAD_BYTES, not even parsed
    "not_msgpack",  # not one well-formed MessagePack object
    "bad_envelope",  # not a {"v", "t", "b"} map
    "version",  # schema version this code does not speak
    "unknown_type",  # type tag not in MESSAGE_TYPES
    "unexpected_type",  # a known type, but not the one this topic carries
    "missing_field",
    "extra_field",
    "field_type",  # wrong MessagePack type or array dtype for a field
    "array_length",  # array bytes do not fit the dtype and shape
    "non_finite",  # NaN or infinity in a float field
    "invalid",  # the message's own validation refused the values
)


class DecodeError(ValueError):
    """A payload that is not a valid FedHLM message; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def payload_type(topic: str) -> type[Message] | None:
    """The message type a concrete FedHLM topic carries, or None for a topic outside the tree."""
    name = topics.name_of(topic)
    return TOPIC_PAYLOADS[name] if name is not None else None


# -- encode ---------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """The wire bytes of `message`; ValueError if they would exceed MAX_PAYLOAD_BYTES."""
    if not isinstance(message, Message):
        raise TypeError(f"expected a FedHLM message, got {type(message).__name__}")
    specs = message.field_specs()
    body: dict[str, Any] | list[Any] = (
        [_pack_positional(spec, getattr(message, spec.name)) for spec in specs] if message.POSITIONAL
        else {spec.name: _pack_field(spec, getattr(message, spec.name)) for spec in specs})
    data = msgpack.packb({"v": SCHEMA_VERSION, "t": message.TYPE, "b": body}, use_bin_type=True)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{type(message).__name__}: encoded size {len(data)} B exceeds {MAX_PAYLOAD_BYTES} B")
    return data


def _pack_array(array: np.ndarray, dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(array.shape), "data": np.ascontiguousarray(array, dtype=dtype).tobytes()}


TOKEN_WIRE_DTYPES = ("<u2", "<i4")  # the compact form first


def token_wire_dtype(ids: np.ndarray) -> str:
    """uint16 when every id fits (the common vocabulary sizes), int32 otherwise."""
    return "<u2" if ids.size == 0 or int(ids.max()) < 2**16 else "<i4"


def _pack_field(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "array":
        return _pack_array(value, spec.dtype or "")
    if spec.kind == "tokens":
        return _pack_array(value, token_wire_dtype(value))
    if spec.kind == "params":
        return {name: _pack_array(value[name], spec.dtype or "") for name in sorted(value)}
    if spec.kind == "float":
        return float(value)
    return value


def _pack_positional(spec: FieldSpec, value: Any) -> Any:
    """A positional body's value: token ids as a list of integers (MessagePack's smallest form each), a 1-D
    array as the raw bytes of its wire dtype (its length gives its shape), anything else as in a map body."""
    if spec.kind == "tokens":
        return [int(t) for t in value]
    if spec.kind == "array":
        return np.ascontiguousarray(value, dtype=spec.dtype).tobytes()
    return _pack_field(spec, value)


# -- decode ---------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview, expected: type[Message] | tuple[type[Message], ...] | None = None) -> Message:
    """The message in `data`; DecodeError (with a reason) for anything that is not exactly one valid message.

    `expected` restricts the accepted types, e.g. to what the topic carries (`payload_type`).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("not_msgpack", f"payload is {type(data).__name__}, not bytes")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise DecodeError("too_large", f"{len(data)} B exceeds {MAX_PAYLOAD_BYTES} B")
    try:
        envelope = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as err:  # msgpack raises several unrelated types (ExtraData, ValueError, ...)
        raise DecodeError("not_msgpack", f"{type(err).__name__}: {err}") from None
    if not isinstance(envelope, dict) or not {"v", "t", "b"} <= envelope.keys():
        raise DecodeError("bad_envelope", "expected a map with keys 'v', 't', 'b'")
    if set(envelope) != {"v", "t", "b"}:
        raise DecodeError("bad_envelope", f"unexpected envelope keys {sorted(set(envelope) - {'v', 't', 'b'})}")
    version, tag, body = envelope["v"], envelope["t"], envelope["b"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise DecodeError("version", f"schema version {version!r}, this code speaks {SCHEMA_VERSION}")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise DecodeError("unknown_type", f"type tag {tag!r}")
    allowed = expected if isinstance(expected, tuple) else (expected,) if expected else None
    if allowed is not None and cls not in allowed:
        raise DecodeError("unexpected_type", f"{tag!r} where {[c.TYPE for c in allowed]} was expected")
    if cls.POSITIONAL:
        return _build(cls, _named_body(cls, body))
    if not isinstance(body, dict):
        raise DecodeError("bad_envelope", "body 'b' is not a map")
    return _build(cls, body)


def _named_body(cls: type[Message], body: Any) -> dict[str, Any]:
    """A positional body's values under their field names, each turned back into what a map body holds."""
    specs = cls.field_specs()
    if not isinstance(body, list):
        raise DecodeError("bad_envelope", f"{cls.TYPE}: body 'b' is not an array")
    if len(body) < len(specs):
        raise DecodeError("missing_field", f"{cls.TYPE}: missing {[s.name for s in specs[len(body):]]}")
    if len(body) > len(specs):
        raise DecodeError("extra_field", f"{cls.TYPE}: {len(body) - len(specs)} values after the last field")
    named = {}
    for spec, value in zip(specs, body):
        where = f"{cls.TYPE}.{spec.name}"
        if spec.kind == "tokens":
            if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                       0 <= t <= MAX_TOKEN_ID for t in value):
                raise DecodeError("field_type", f"{where}: expected an array of token ids in [0, {MAX_TOKEN_ID}]")
            value = _pack_array(np.asarray(value, dtype="<i4"), "<i4")
        elif spec.kind == "array":
            if not isinstance(value, bytes):
                raise DecodeError("field_type", f"{where}: expected bin, got {type(value).__name__}")
            itemsize = np.dtype(spec.dtype).itemsize
            if len(value) % itemsize:
                raise DecodeError("array_length", f"{where}: {len(value)} B is not a multiple of {spec.dtype}")
            value = {"dtype": spec.dtype, "shape": [len(value) // itemsize], "data": value}
        named[spec.name] = value
    return named


def _build(cls: type[Message], body: dict[str, Any]) -> Message:
    specs = cls.field_specs()
    names = [spec.name for spec in specs]
    missing = [name for name in names if name not in body]
    if missing:
        raise DecodeError("missing_field", f"{cls.TYPE}: missing {missing}")
    extra = sorted(str(key) for key in body if key not in names)
    if extra:
        raise DecodeError("extra_field", f"{cls.TYPE}: unexpected {extra}")
    values = {spec.name: _unpack_field(spec, body[spec.name], f"{cls.TYPE}.{spec.name}") for spec in specs}
    try:
        return cls(**values)
    except ValueError as err:
        raise DecodeError("invalid", str(err)) from None


# a float field takes a msgpack integer too: the schema says `number`, and JavaScript encoders write 0 and 1 as ints
_WIRE_TYPES: dict[str, tuple[type, ...]] = {"id": (str,), "str": (str,), "choice": (str,), "int": (int,),
                                            "float": (float, int), "bool": (bool,), "bytes": (bytes,)}


def _unpack_field(spec: FieldSpec, value: Any, where: str) -> Any:
    if spec.kind == "array":
        return _unpack_array(value, spec.dtype or "", where)
    if spec.kind == "tokens":
        wire = value.get("dtype") if isinstance(value, dict) else None
        dtype = wire if wire in TOKEN_WIRE_DTYPES else TOKEN_WIRE_DTYPES[-1]  # anything else: refused as not <i4
        return _unpack_array(value, dtype, where).astype(spec.dtype or "<i4")
    if spec.kind == "params":
        if not isinstance(value, dict):
            raise DecodeError("field_type", f"{where}: expected a map of parameter name -> array")
        return {name: _unpack_array(array, spec.dtype or "", f"{where}[{name!r}]") for name, array in value.items()}
    wire = _WIRE_TYPES[spec.kind]
    if not isinstance(value, wire) or (spec.kind in ("int", "float") and isinstance(value, bool)):
        raise DecodeError("field_type", f"{where}: expected {spec.kind}, got {type(value).__name__}")
    if spec.kind == "float":
        if isinstance(value, int) and abs(value) > 2**53:
            raise DecodeError("field_type", f"{where}: integer {value} is not exactly a float")
        value = float(value)
        if not math.isfinite(value):
            raise DecodeError("non_finite", f"{where}: {value}")
    return value


def _unpack_array(value: Any, dtype: str, where: str) -> np.ndarray:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise DecodeError("field_type", f"{where}: expected an array map with keys dtype, shape, data")
    if value["dtype"] != dtype:
        raise DecodeError("field_type", f"{where}: dtype {value['dtype']!r}, expected {dtype!r}")
    shape, data = value["shape"], value["data"]
    if not isinstance(data, bytes):
        raise DecodeError("field_type", f"{where}: data is {type(data).__name__}, expected bin")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise DecodeError("field_type", f"{where}: shape must be a list of non-negative integers")
    if len(shape) > MAX_ARRAY_DIMS or any(n > MAX_PAYLOAD_BYTES for n in shape):
        raise DecodeError("field_type", f"{where}: shape {shape[:MAX_ARRAY_DIMS + 1]} has more than {MAX_ARRAY_DIMS} "
                                        f"dimensions or an extent no payload can fill")
    itemsize = np.dtype(dtype).itemsize
    if len(data) % itemsize:
        raise DecodeError("array_length", f"{where}: {len(data)} B is not a multiple of {dtype} ({itemsize} B)")
    if len(data) != math.prod(shape) * itemsize:
        raise DecodeError("array_length", f"{where}: {len(data)} B do not fill shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DecodeError("non_finite", f"{where}: NaN or infinity in the array")
    return array


# -- JSON mirror (golden vectors, logs) -------------------------------------------


def to_json(message: Message) -> dict[str, Any]:
    """The envelope with plain JSON values: arrays as (nested) lists, parameters sorted by name."""
    body: dict[str, Any] = {}
    for spec in message.field_specs():
        value = getattr(message, spec.name)
        if spec.kind in ("array", "tokens"):
            value = value.tolist()
        elif spec.kind == "bytes":
            value = value.hex()
        elif spec.kind == "params":
            value = {name: value[name].tolist() for name in sorted(value)}
        body[spec.name] = value
    return {"v": SCHEMA_VERSION, "t": message.TYPE, "b": body}


def from_json(obj: dict[str, Any]) -> Message:
    """The message of a `to_json` envelope; ValueError naming the problem otherwise."""
    if not isinstance(obj, dict) or obj.get("v") != SCHEMA_VERSION:
        raise ValueError(f"expected a version {SCHEMA_VERSION} envelope, got v={obj.get('v') if isinstance(obj, dict) else obj!r}")
    cls = MESSAGE_TYPES.get(obj.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown type tag {obj.get('t')!r}")
    body = obj.get("b")
    if not isinstance(body, dict):
        raise ValueError("envelope body 'b' is not an object")
    try:
        return cls(**body)
    except TypeError as err:  # missing or unexpected field names
        raise ValueError(f"{cls.TYPE}: {err}") from None
