"""FedHLM's MQTT transport: topic builders, typed messages, the payload codec, the Endpoint
and its in-memory twin (`MemoryNetwork`, for unit tests without a broker).

Roles import from here; `topics` is the only place topic strings are formatted and
`codec` the only place payload bytes are produced or parsed.
"""

from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import MAX_PAYLOAD_BYTES, SCHEMA_VERSION, DecodeError, decode, encode, payload_type
from fedhlm.transport.endpoint import Endpoint, Inbound, TrafficStats
from fedhlm.transport.memory import MemoryEndpoint, MemoryNetwork
from fedhlm.transport.messages import (
    MESSAGE_TYPES,
    ClientStatus,
    LLMVerdict,
    Message,
    PeerQuery,
    PeerReply,
    ThresholdModel,
    ThresholdUpdate,
    TokenRequest,
)

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "BrokerAddress",
    "ClientStatus",
    "DecodeError",
    "Endpoint",
    "Inbound",
    "LLMVerdict",
    "MemoryEndpoint",
    "MemoryNetwork",
    "Message",
    "PeerQuery",
    "PeerReply",
    "ThresholdModel",
    "ThresholdUpdate",
    "TokenRequest",
    "TrafficStats",
    "decode",
    "encode",
    "payload_type",
    "topics",
]
