"""An in-memory network: the endpoint interface the roles use, without a broker, for millisecond tests.

    net = MemoryNetwork()
    llm = net.endpoint(net.address("llm"))
    llm.subscribe(topics.llm_request_shared("workers"), serve)
    llm.start().wait_connected()

What it does as MQTT v5 and the real `Endpoint` do: every payload goes through the codec
(so counters are real payload sizes and a malformed payload is dropped with the codec's
reason), topic filters with `+` and `#`, shared subscriptions (`$share/<group>/...`: each
message to one member, in turn), retained messages (sent to a new plain subscription;
an empty retained payload clears them), `no_local`, Response Topic and Correlation Data
(request/reply with timeouts and late replies), the Last Will on `abort`, and handlers run
one at a time in arrival order on a thread of each endpoint's own, so a handler may block
in a request of its own without stalling the bus.

What it does not, to stay small: QoS (each delivery happens at once and exactly once; qos
is checked, then ignored), sessions (`persistent` keeps nothing: a message published while
an endpoint is not connected is not queued for it, and its own publishes while not
connected are dropped as "not_connected"), ACLs, size limits beyond the codec's, and
session takeover (a second endpoint with a client id already connected is refused).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import encode
from fedhlm.transport.correlation import Accept, Correlator
from fedhlm.transport.counters import Counters, TrafficStats
from fedhlm.transport.dispatch import (
    Dispatcher,
    Handler,
    Inbound,
    Subscription,
    check_filter,
    check_qos,
    covered,
    filter_matches,
    first_handler,
    reply_filters,
    split_shared,
)
from fedhlm.transport.drivers import Handlers
from fedhlm.transport.messages import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packet:
    """One PUBLISH on the bus: payload bytes and the request properties."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_s: float | None = None  # delivered at once here: passed on as sent


class MemoryNetwork:
    """The bus: connected endpoints, retained messages, turns of the shared groups. One lock orders it all."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entered when a delivery looks up the receiver's handler
        self._online: dict[str, MemoryEndpoint] = {}
        self._retained: dict[str, Packet] = {}
        self._turns: Counter[tuple[str, str]] = Counter()  # (group, filter) -> deliveries so far
        self._made: list[MemoryEndpoint] = []

    @staticmethod
    def address(role_id: str) -> BrokerAddress:
        """An address whose username is `role_id`, as `LocalBroker.address` gives (nothing here checks passwords)."""
        return BrokerAddress("memory", 0, username=topics.validate_id(role_id, "role_id"))

    def endpoint(self, address: BrokerAddress, *, persistent: bool = False,
                 will: tuple[str, Message] | None = None) -> "MemoryEndpoint":
        ep = MemoryEndpoint(self, address, persistent=persistent, will=will)
        with self._lock:
            self._made.append(ep)
        return ep

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False, response_topic: str | None = None,
                    correlation: bytes | None = None) -> None:
        """Put arbitrary bytes on the bus, past the codec, as an admin with plain MQTT would (malformed-payload tests)."""
        check_filter(topic, concrete=True)
        self._send(None, Packet(topic, bytes(payload), response_topic, correlation), retain)

    def close(self) -> None:
        """Close the endpoints still open, cleanly (no Last Will)."""
        with self._lock:
            made = list(self._made)
        for ep in made:
            ep.close()

    # -- what the endpoints call ----------------------------------------------------------
    def _connect(self, ep: "MemoryEndpoint") -> None:
        with self._lock:
            if self._online.get(ep.client_id, ep) is not ep:
                raise ConnectionRefusedError(f"{ep.client_id}: client id already connected to this memory network")
            self._online[ep.client_id] = ep
            ep._online()
            for topic_filter in list(ep._subs):
                self._send_retained(ep, topic_filter)

    def _disconnect(self, ep: "MemoryEndpoint", will: Packet | None) -> None:
        with self._lock:
            if self._online.get(ep.client_id) is not ep:
                return
            del self._online[ep.client_id]
            if will is not None:
                self._send(None, will, retain=True)

    def _send_retained(self, ep: "MemoryEndpoint", topic_filter: str) -> None:
        """The retained messages a new subscription brings (none for a shared one, as MQTT v5 says)."""
        if split_shared(topic_filter)[0] is not None:
            return
        with self._lock:
            for packet in list(self._retained.values()):
                if filter_matches(topic_filter, packet.topic):
                    ep._receive(packet, retain=True)

    def _send(self, sender: "MemoryEndpoint | None", packet: Packet, retain: bool) -> None:
        with self._lock:
            if retain and packet.payload:
                self._retained[packet.topic] = packet
            elif retain:
                self._retained.pop(packet.topic, None)  # and delivered as it is, as MQTT does
            for ep in self._receivers(sender, packet.topic):
                ep._receive(packet, retain=False)

    def _receivers(self, sender: "MemoryEndpoint | None", topic: str) -> list["MemoryEndpoint"]:
        """Each endpoint with a matching plain subscription (not the sender's own `no_local` ones),
        then one member of each shared group, in turn."""
        plain: list[MemoryEndpoint] = []
        groups: defaultdict[tuple[str, str], list[MemoryEndpoint]] = defaultdict(list)
        for ep in self._online.values():
            wants = False
            for topic_filter, sub in ep._subs.items():
                group, inner = split_shared(topic_filter)
                if not filter_matches(inner, topic):
                    continue
                if group is not None:
                    groups[(group, inner)].append(ep)
                elif not (sub.no_local and ep is sender):
                    wants = True
            if wants:
                plain.append(ep)
        for key, members in groups.items():
            plain.append(members[self._turns[key] % len(members)])
            self._turns[key] += 1
        return plain


class MemoryEndpoint:
    """One role's endpoint on a `MemoryNetwork`: the `Endpoint` interface; see the module docstring."""

    def __init__(self, network: MemoryNetwork, address: BrokerAddress, *, persistent: bool = False,
                 will: tuple[str, Message] | None = None) -> None:
        self.address = address
        self.client_id = topics.validate_id(address.client_id or address.username, "client_id")
        self.persistent = persistent  # for the interface: no session outlives a connection here
        self._network = network
        self._will = None if will is None else Packet(will[0], encode(will[1]))
        self._subs: dict[str, Subscription] = {}  # guarded by the network's lock
        self._hooks: list[Callable[[bool], None]] = []
        self._counters = Counters(self.client_id, log)
        self._requests = Correlator(self.client_id)
        self._handlers = Handlers(f"memory-{self.client_id}")
        self._dispatch = Dispatcher(self.client_id, self._counters, self._requests, self._handlers,
                                    self._handler_for, log)
        self._started = False
        self._connected = False
        self._closed = False

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> "MemoryEndpoint":
        """Join the bus: connect hooks run, then the retained messages of the subscriptions arrive."""
        if self._closed:
            raise RuntimeError(f"{self.client_id}: endpoint is closed")
        if not self._started:
            self._network._connect(self)
            self._started = True
        return self

    def wait_connected(self, timeout_s: float = 10.0) -> "MemoryEndpoint":
        return self.start()

    @property
    def connected(self) -> bool:
        return self._connected

    def on_connected(self, hook: Callable[[bool], None]) -> None:
        """`hook(False)` on the handler thread when `start` joins the bus (there are no reconnects here)."""
        self._hooks.append(hook)

    def close(self, flush_timeout_s: float = 2.0) -> None:
        """Leave the bus cleanly: no Last Will."""
        self._leave(None)

    def abort(self) -> None:
        """Vanish as a crash would: the network publishes the Last Will (retained) if this endpoint was connected."""
        self._leave(self._will)

    def _online(self) -> None:
        self._connected = True
        self._dispatch.connected(self._hooks, False)

    def _leave(self, will: Packet | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected = False
        self._network._disconnect(self, will)
        self._requests.wake_all()  # a request waiting (perhaps in a handler) then sees no reply
        self._handlers.shutdown()

    def __enter__(self) -> "MemoryEndpoint":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- subscribe -------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler | None, qos: int = 1, timeout_s: float = 5.0,
                  no_local: bool = False, always_retained: bool = False) -> None:
        """Route messages matching `topic_filter` to `handler`; a new plain filter brings its retained messages
        (`always_retained`: every subscribe does)."""
        check_qos(qos)
        check_filter(topic_filter)
        with self._network._lock:
            new = topic_filter not in self._subs or always_retained
            self._subs[topic_filter] = Subscription(handler, qos, no_local, always_retained)
            if new and self._connected:
                self._network._send_retained(self, topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._network._lock:
            self._subs.pop(topic_filter, None)

    def _handler_for(self, topic: str) -> Handler | None:
        with self._network._lock:
            return first_handler(self._subs, topic)

    # -- publish ---------------------------------------------------------------------------
    def publish(self, topic: str, message: Message, qos: int = 0, retain: bool = False, wait: bool = False,
                timeout_s: float = 10.0) -> int:
        """Encode and deliver `message` now; the payload size, or 0 (dropped) when not connected."""
        return self._publish(topic, message, qos, retain)

    def clear_retained(self, topic: str, timeout_s: float = 5.0) -> None:
        check_filter(topic, concrete=True)
        self._network._send(self, Packet(topic, b""), retain=True)

    def reply(self, inbound: Inbound, message: Message, qos: int = 0, per_responder: bool = False) -> int:
        """Answer a request: publish to its Response Topic (`per_responder`: one level below it, at this
        endpoint's id, for a request that many may answer) with its Correlation Data."""
        topic = inbound.reply_topic() + (f"/{self.client_id}" if per_responder else "")
        return self._publish(topic, message, qos, False, correlation=inbound.correlation_data)

    def answer_on(self, topic: str, inbound: Inbound, message: Message, qos: int = 0) -> int:
        return self._publish(topic, message, qos, False, correlation=inbound.correlation_data)

    def forward(self, topic: str, message: Message, inbound: Inbound, qos: int = 0) -> int:
        return self._publish(topic, message, qos, False, response_topic=inbound.reply_topic("forward"),
                             correlation=inbound.correlation_data, expiry_s=inbound.expiry_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Nothing is ever in flight here."""
        return True

    def request(self, topic: str, message: Message, response_topic: str, timeout_s: float = 5.0,
                qos: int = 0, also_on: tuple[str, ...] = (), per_responder: bool = False,
                accept: Accept | None = None, expiry_s: float | None = None) -> Message:
        """As `Endpoint.request`: the first valid reply, TimeoutError, or ConnectionError."""
        for reply_filter in reply_filters(response_topic, also_on, per_responder):
            with self._network._lock:
                if not covered(self._subs, reply_filter):
                    self._subs[reply_filter] = Subscription(None, 1)

        def send(correlation: bytes) -> int:
            return self._publish(topic, message, qos, False, response_topic, correlation, expiry_s)

        return self._requests.request(topic, response_topic, send, timeout_s, lambda: self._closed,
                                      also_on=frozenset(also_on), per_responder=per_responder, accept=accept)

    def _publish(self, topic: str, message: Message, qos: int, retain: bool, response_topic: str | None = None,
                 correlation: bytes | None = None, expiry_s: float | None = None) -> int:
        if self._closed:
            raise RuntimeError(f"{self.client_id}: endpoint is closed")
        check_qos(qos)
        check_filter(topic, concrete=True)
        payload = encode(message)
        if not self._connected:
            self._counters.drop(topic, "not_connected", "not connected to the memory network")
            return 0
        self._counters.sent(topic, len(payload))
        self._network._send(self, Packet(topic, payload, response_topic, correlation, expiry_s), retain)
        return len(payload)

    # -- receive ---------------------------------------------------------------------------
    def _receive(self, packet: Packet, retain: bool) -> None:
        self._dispatch.route(packet.topic, packet.payload, packet.response_topic, packet.correlation, retain,
                             packet.expiry_s)

    def stats(self) -> TrafficStats:
        """Messages and payload bytes per traffic kind, drops by reason."""
        return self._counters.snapshot()

    def __repr__(self) -> str:
        return f"MemoryEndpoint({self.client_id!r}, connected={self._connected})"
