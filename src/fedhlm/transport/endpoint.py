"""One role's MQTT v5 connection: typed publish/subscribe, request/response, Last Will, counters.

Every FedHLM role (client, edge, cloud, LLM worker) talks through one `Endpoint`. It owns
the paho-mqtt client and keeps its network thread free: payloads are decoded and handlers
run on a worker thread, so a slow or failing handler never stalls keep-alives or acks.
Subscriptions live in the endpoint and are (re)made in `on_connect`, so a reconnect after a
broker restart restores them; a persistent session (`persistent=True`) also keeps QoS 1
messages queued at the broker while the role is away.

This module keeps the paho side: life cycle, subscriptions and publishing. What any transport
shares lives beside it: `counters` (TrafficStats), `correlation` (request/reply ids, late
replies), `dispatch` (the receive path, Inbound) and `drivers` (own network thread or a
shared NetworkLoop, chosen once at construction).

    ep = Endpoint(address, persistent=True)
    ep.subscribe(topics.edge_update_filter("e0"), on_update)
    ep.start().wait_connected()
    ep.publish(topics.edge_model("e0"), model, qos=1, retain=True)
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import encode
from fedhlm.transport.correlation import Accept, Correlator
from fedhlm.transport.counters import KINDS, Counters, TrafficStats
from fedhlm.transport.dispatch import (
    Dispatcher,
    Handler,
    Inbound,
    Subscription,
    check_filter,
    check_qos,
    covered,
    first_handler,
    reply_filters,
)
from fedhlm.transport.drivers import make_driver
from fedhlm.transport.messages import Message
from fedhlm.transport.netloop import NetworkLoop

__all__ = ["DEFAULT_SESSION_EXPIRY_S", "KINDS", "Endpoint", "Handler", "Inbound", "TrafficStats"]

log = logging.getLogger(__name__)

DEFAULT_SESSION_EXPIRY_S = 3600
# CONNACK reasons that retrying cannot fix: stop the reconnect loop instead of hammering the broker
SESSION_TAKEN_OVER = 0x8E  # DISCONNECT from the broker: another connection came in with this client id
# Mosquitto 2.0 drops a taken-over connection without that DISCONNECT: this many drops within
# TAKEOVER_WINDOW_S, each less than TAKEOVER_SHORT_S after its CONNACK, are read as a take-over
# (a broker restart or an outage refuses the reconnects instead of accepting and dropping them)
TAKEOVER_DROPS, TAKEOVER_WINDOW_S, TAKEOVER_SHORT_S = 5, 10.0, 2.0
_PERMANENT_REFUSALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}  # bad protocol/client id/credentials, not authorized, banned, bad auth
_REFUSALS_KEPT = 1_000
_UNACKED_PRUNE_AT = 10_000
_HANDLER_CACHE_SIZE = 10_000


class Endpoint:
    """An MQTT v5 connection for one role; see the module docstring for the life cycle.

    Args:
        address: broker and credentials; the username is the role id.
        client_id: MQTT client id (default: the username). Must be unique on the broker.
        persistent: keep the session (subscriptions, queued QoS 1 messages) at the broker for
            `session_expiry_s` while disconnected; for roles that must not lose updates.
        will: (topic, message) the broker publishes retained at QoS 1 if this endpoint
            vanishes without a clean `close()`; typically the client's offline `ClientStatus`.
        reconnect_delay_s: (min, max) of the exponential back-off between reconnect attempts.
        workers: handler threads; 1 keeps handlers in arrival order.
        network_loop: drive the connection from this shared `NetworkLoop` instead of a network
            thread of its own (many endpoints in one process: a gateway, a large simulation).
        handler_pool: run handlers, still one at a time and in order, on this shared pool
            instead of `workers` threads of the endpoint's own.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        will: tuple[str, Message] | None = None,
        keepalive_s: int = 30,
        reconnect_delay_s: tuple[float, float] = (0.2, 10.0),
        workers: int = 1,
        network_loop: NetworkLoop | None = None,
        handler_pool: Executor | None = None,
    ) -> None:
        self.address = address
        self.client_id = topics.validate_id(client_id or address.client_id or address.username, "client_id")
        self.persistent = persistent
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if address.username:
            self._client.username_pw_set(address.username, address.password)
        if address.tls:
            self._client.tls_set(ca_certs=address.ca_certs)
        if will is not None:
            will_topic, will_message = will
            self._client.will_set(will_topic, encode(will_message), qos=1, retain=True)
        self._client.reconnect_delay_set(*reconnect_delay_s)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # SUBACKs
        self._subs: dict[str, Subscription] = {}
        self._handlers_by_topic: dict[str, Handler | None] = {}  # cleared whenever _subs changes
        self._confirmed: set[str] = set()  # filters the broker acknowledged in the current session
        self._sub_mids: dict[int, str] = {}  # SUBSCRIBE in flight: mid -> filter
        self._connect_mids: set[int] = set()  # the ones sent by on_connect (wait_connected waits for them)
        self._sub_errors: dict[str, str] = {}
        self._unacked: dict[int, tuple[str, mqtt.MQTTMessageInfo]] = {}
        self._refused: OrderedDict[int, tuple[float, str]] = OrderedDict()
        self._counters = Counters(self.client_id, log)
        self._requests = Correlator(self.client_id)
        self._connected = False
        self._ready = threading.Event()  # connected and on-connect subscriptions acknowledged
        self._refusal: str | None = None
        self._refused_event = threading.Event()
        self._started = False
        self._closed = False
        self._connects = 0  # successful CONNACKs so far
        self._connected_at = 0.0
        self._short_drops: list[float] = []  # when recent connections were dropped soon after their CONNACK
        self._connect_hooks: list[Callable[[bool], None]] = []
        self._driver = make_driver(f"fedhlm-{self.client_id}", workers=workers, network_loop=network_loop,
                                   handler_pool=handler_pool, reconnect_delay_s=reconnect_delay_s)
        self._dispatch = Dispatcher(self.client_id, self._counters, self._requests, self._driver.handlers,
                                    self._handler_for, log)

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> "Endpoint":
        """Connect in the background (and keep reconnecting); returns at once, see `wait_connected`."""
        if self._started:
            return self
        self._started = True
        properties = None
        if self.persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._session_expiry_s
        self._client.connect_async(
            self.address.host, self.address.port, keepalive=self._keepalive_s,
            clean_start=not self.persistent, properties=properties,
        )
        self._driver.start(self._client, lambda: not self._closed and not self._refused_event.is_set())
        log.info("%s: connecting to %s (persistent=%s)", self.client_id, self.address.public_url, self.persistent)
        return self

    def wait_connected(self, timeout_s: float = 10.0) -> "Endpoint":
        """Block until connected with every subscription acknowledged.

        Raises ConnectionRefusedError if the broker refused the credentials, TimeoutError otherwise.
        """
        if not self._started:
            self.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self._refused_event.is_set():
                raise ConnectionRefusedError(f"{self.client_id}: broker {self.address.public_url} refused: {self._refusal}")
            if time.monotonic() > deadline:
                last = f" (last refusal: {self._refusal})" if self._refusal else ""
                raise TimeoutError(f"{self.client_id}: not connected to {self.address.public_url} after {timeout_s} s{last}")
        return self

    @property
    def connected(self) -> bool:
        return self._connected

    def on_connected(self, hook: Callable[[bool], None]) -> None:
        """Call `hook(reconnected)` on the handler thread after every successful connect (False the first
        time): e.g. to publish a retained "online" status again after the Last Will marked the role offline."""
        self._connect_hooks.append(hook)

    def close(self, flush_timeout_s: float = 2.0) -> None:
        """Wait briefly for unacknowledged QoS 1 messages, then disconnect cleanly (no Last Will)."""
        if self._closed:
            return
        if self._started and self._connected:
            self.flush(flush_timeout_s)
        self._closed = True
        if self._started:
            self._client.disconnect()
            self._driver.stop(self._client, flush_timeout_s)
        self._shutdown()
        log.info("%s: closed", self.client_id)

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would: the broker publishes the Last Will."""
        if self._closed:
            return
        self._closed = True
        self._driver.abort(self._client, self._started)
        self._shutdown()
        log.info("%s: aborted", self.client_id)

    def _shutdown(self) -> None:
        self._connected = False
        self._ready.clear()
        self._requests.wake_all()  # wakes `request` (possibly inside a handler), which then sees no reply
        self._driver.handlers.shutdown()

    def __enter__(self) -> "Endpoint":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- subscribe -------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler | None, qos: int = 1, timeout_s: float = 5.0,
                  no_local: bool = False, always_retained: bool = False) -> None:
        """Route messages matching `topic_filter` to `handler` (on a worker thread).

        `no_local` asks the broker not to send back what this endpoint publishes on the same
        topic (a client's own peer query on its cluster's topic). `always_retained`: the broker sends the
        topic's retained message on every subscribe, also into a resumed session (a restarted role must
        read its edge's current model). Kept across reconnects. If connected, waits for the broker's SUBACK and raises
        PermissionError if the broker refused the filter (ACL). Overlapping filters: the
        first one subscribed wins. `handler=None` subscribes for `request` replies only.
        """
        check_qos(qos)
        check_filter(topic_filter)
        with self._lock:
            self._subs[topic_filter] = Subscription(handler, qos, no_local, always_retained)
            self._handlers_by_topic.clear()
            self._confirmed.discard(topic_filter)
            self._sub_errors.pop(topic_filter, None)
            if not self._connected:
                return  # made in on_connect
            mid = self._send_subscribe(topic_filter, self._subs[topic_filter])
            deadline = time.monotonic() + timeout_s
            while mid is not None and mid in self._sub_mids and self._connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.client_id}: no SUBACK for {topic_filter!r} after {timeout_s} s")
                self._changed.wait(remaining)
            error = self._sub_errors.get(topic_filter)
        if error:
            raise PermissionError(f"{self.client_id}: broker refused subscription {topic_filter!r}: {error}")

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
            self._handlers_by_topic.clear()
            self._confirmed.discard(topic_filter)
        self._client.unsubscribe(topic_filter)

    def _send_subscribe(self, topic_filter: str, sub: Subscription) -> int | None:
        """Send SUBSCRIBE (caller holds the lock). Retained messages only for a new subscription, so that
        re-subscribing into a resumed session does not replay them, unless the subscription asks for them."""
        handling = (SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE if sub.always_retained
                    else SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        options = SubscribeOptions(qos=sub.qos, noLocal=sub.no_local, retainHandling=handling)
        rc, mid = self._client.subscribe(topic_filter, options=options)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return None
        self._sub_mids[mid] = topic_filter
        return mid

    # -- publish ---------------------------------------------------------------------
    def publish(
        self, topic: str, message: Message, qos: int = 0, retain: bool = False, wait: bool = False, timeout_s: float = 10.0
    ) -> int:
        """Encode and publish `message`; returns the payload size in bytes.

        QoS 1 messages published while disconnected are queued and resent after the
        reconnect. `wait=True` blocks until the broker acknowledged (QoS 1) or the message
        was written (QoS 0), raising TimeoutError, or PermissionError if the broker refused it.
        A QoS 0 message cannot be sent while disconnected: it is counted as dropped and 0 returned.
        """
        return self._publish(topic, message, qos, retain, wait, timeout_s)

    def clear_retained(self, topic: str, timeout_s: float = 5.0) -> None:
        """Remove the retained message of `topic` (an empty retained publish, as MQTT defines it)."""
        check_filter(topic, concrete=True)
        info = self._client.publish(topic, b"", qos=1, retain=True)
        info.wait_for_publish(timeout_s)

    def reply(self, inbound: Inbound, message: Message, qos: int = 0, per_responder: bool = False) -> int:
        """Answer a request: publish to its Response Topic (`per_responder`: one level below it, at this
        endpoint's id, for a request that many may answer) with its Correlation Data."""
        topic = inbound.reply_topic() + (f"/{self.client_id}" if per_responder else "")
        return self._publish(topic, message, qos, False, correlation=inbound.correlation_data)

    def answer_on(self, topic: str, inbound: Inbound, message: Message, qos: int = 0) -> int:
        """Answer a request on `topic` (one of its `also_on` topics) with its Correlation Data."""
        return self._publish(topic, message, qos, False, correlation=inbound.correlation_data)

    def forward(self, topic: str, message: Message, inbound: Inbound, qos: int = 0) -> int:
        """Pass a request on to `topic` keeping its Response Topic, Correlation Data and what is left of its
        Message Expiry, so that whoever answers replies straight to the original requester, in its time."""
        return self._publish(topic, message, qos, False, response_topic=inbound.reply_topic("forward"),
                             correlation=inbound.correlation_data, expiry_s=inbound.expiry_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every QoS 1 message published so far is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            waiting = list(self._unacked.items())
        for mid, (_, info) in waiting:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if not info.is_published():
                    return False
            except (RuntimeError, ValueError):  # paho gave up on it (queue full, closed)
                return False
            with self._lock:
                if self._unacked.get(mid, (None, None))[1] is info:
                    del self._unacked[mid]
        return True

    def _publish(
        self, topic: str, message: Message, qos: int, retain: bool, wait: bool = False, timeout_s: float = 10.0,
        response_topic: str | None = None, correlation: bytes | None = None, expiry_s: float | None = None,
    ) -> int:
        if self._closed:
            raise RuntimeError(f"{self.client_id}: endpoint is closed")
        check_qos(qos)
        payload = encode(message)
        properties = None
        if response_topic is not None or correlation is not None or expiry_s is not None:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
            if expiry_s is not None:  # whole seconds on the wire; a request is never expired before its time
                properties.MessageExpiryInterval = max(1, math.ceil(expiry_s))
        started = time.monotonic()
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
            info.rc = mqtt.MQTT_ERR_SUCCESS  # paho keeps QoS 1 messages and resends them after the reconnect
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._counters.drop(topic, "not_connected", f"publish failed ({mqtt.error_string(info.rc)})")
            return 0
        self._counters.sent(topic, len(payload))
        if qos > 0:
            with self._lock:
                self._unacked[info.mid] = (topic, info)
                if len(self._unacked) > _UNACKED_PRUNE_AT:  # entries whose PUBACK beat their registration
                    self._unacked = {m: e for m, e in self._unacked.items() if not e[1].is_published()}
        if wait:
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise TimeoutError(f"{self.client_id}: no acknowledgement for {topic!r} after {timeout_s} s")
            with self._lock:
                refusal = self._refused.pop(info.mid, None)
            if refusal is not None and refusal[0] >= started:
                raise PermissionError(f"{self.client_id}: broker refused publish to {topic!r}: {refusal[1]}")
        return len(payload)

    # -- request / response ------------------------------------------------------------
    def request(
        self, topic: str, message: Message, response_topic: str, timeout_s: float = 5.0, qos: int = 0,
        also_on: tuple[str, ...] = (), per_responder: bool = False, accept: Accept | None = None,
        expiry_s: float | None = None,
    ) -> Message:
        """Publish `message` with a Response Topic and a fresh Correlation Data; return the first valid reply.

        `also_on`: other topics a reply with this Correlation Data may come on (an edge answers a
        resolve request on the p2p reply topic, the LLM on the Response Topic). `per_responder`: replies
        come one level below the Response Topic, at each responder's id (`reply(per_responder=True)`).
        `accept(topic, reply)` may refuse a reply with a reason (it is counted as a drop; the request
        keeps waiting for another). `expiry_s`: the MQTT v5 Message Expiry Interval (rounded up to whole
        seconds): a broker that still holds the request after it drops it, and a server sees how long is left.
        Raises TimeoutError if none arrives in time (later replies for it are dropped as "late_reply"),
        ConnectionError if the request could not be sent or the endpoint closed meanwhile.
        """
        for reply_filter in reply_filters(response_topic, also_on, per_responder):
            self._ensure_reply_subscription(reply_filter, timeout_s)
        return self._requests.request(
            topic, response_topic, timeout_s=timeout_s, closed=lambda: self._closed, also_on=frozenset(also_on),
            per_responder=per_responder, accept=accept,
            send=lambda correlation: self._publish(topic, message, qos, False, response_topic=response_topic,
                                                   correlation=correlation, expiry_s=expiry_s))

    def _ensure_reply_subscription(self, reply_filter: str, timeout_s: float) -> None:
        with self._lock:
            known = covered(self._subs, reply_filter)
        if not known:
            self.subscribe(reply_filter, None, qos=1, timeout_s=timeout_s)

    # -- counters ------------------------------------------------------------------------
    def stats(self) -> TrafficStats:
        """Messages and payload bytes per traffic kind, drops by reason."""
        return self._counters.snapshot()

    # -- paho callbacks (network thread: keep them short, never raise) ---------------------
    def _on_socket_open(self, client, userdata, sock) -> None:  # noqa: ANN001
        # Nagle would hold a PUBLISH queued behind an unacknowledged PUBACK for the peer's ~40 ms delayed ACK
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            log.debug("%s: could not set TCP_NODELAY", self.client_id)

    def _on_connect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:  # noqa: ANN001
        try:
            if reason_code.is_failure:
                self._refusal = str(reason_code)
                log.error("%s: broker %s refused the connection: %s", self.client_id, self.address.public_url, reason_code)
                if reason_code.value in _PERMANENT_REFUSALS:
                    self._refused_event.set()
                    client.disconnect()  # stop the reconnect loop: retrying cannot fix this
                return
            with self._lock:
                self._connected = True
                self._connected_at = time.monotonic()
                self._connects += 1
                reconnected = self._connects > 1
                if not flags.session_present:
                    self._confirmed.clear()
                for topic_filter, sub in self._subs.items():
                    if topic_filter not in self._confirmed:
                        mid = self._send_subscribe(topic_filter, sub)
                        if mid is not None:
                            self._connect_mids.add(mid)
                if not self._connect_mids:
                    self._ready.set()
            log.info("%s: connected to %s (session present: %s)", self.client_id, self.address.public_url,
                     flags.session_present)
            self._dispatch.connected(self._connect_hooks, reconnected)
        except Exception:  # an exception here would kill paho's network thread
            log.exception("%s: on_connect failed", self.client_id)

    @property
    def refusal(self) -> str | None:
        """Why this endpoint stopped trying (refused credentials, its client id taken over); None while it tries."""
        return self._refusal if self._refused_event.is_set() else None

    def _taken_over_by_drops(self) -> bool:
        now = time.monotonic()
        if self._connected_at and now - self._connected_at < TAKEOVER_SHORT_S:
            self._short_drops = [t for t in self._short_drops if now - t < TAKEOVER_WINDOW_S] + [now]
        return len(self._short_drops) >= TAKEOVER_DROPS

    def _on_disconnect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:  # noqa: ANN001
        with self._lock:
            self._connected = False
            self._ready.clear()
            self._sub_mids.clear()
            self._connect_mids.clear()
            self._changed.notify_all()
        if not self._closed and (getattr(reason_code, "value", None) == SESSION_TAKEN_OVER or self._taken_over_by_drops()):
            # two roles with one id would take the session from each other forever: one of them stops
            self._refusal = (f"client id {self.client_id!r} was taken over by another connection to "
                             f"{self.address.public_url}; is a second role running with this id?")
            self._refused_event.set()
            client.reconnect_delay_set(3600, 3600)  # the connection is already gone: keep paho's thread from retrying
            client.disconnect()
            log.error("%s: %s; not reconnecting", self.client_id, self._refusal)
            return
        if not self._closed and not self._refused_event.is_set():
            log.warning("%s: disconnected from %s (%s); reconnecting", self.client_id, self.address.public_url, reason_code)

    def _on_subscribe(self, client, userdata, mid: int, reason_codes: list[ReasonCode], properties) -> None:  # noqa: ANN001
        with self._lock:
            topic_filter = self._sub_mids.pop(mid, None)
            if topic_filter is not None:
                code = reason_codes[0]
                if code.is_failure:
                    self._sub_errors[topic_filter] = str(code)
                    log.error("%s: broker refused subscription %s: %s", self.client_id, topic_filter, code)
                else:
                    self._confirmed.add(topic_filter)
            if mid in self._connect_mids:
                self._connect_mids.discard(mid)
                if not self._connect_mids and self._connected:
                    self._ready.set()
            self._changed.notify_all()

    def _on_publish(self, client, userdata, mid: int, reason_code: ReasonCode, properties) -> None:  # noqa: ANN001
        # runs under paho's outgoing-message lock: only take our own lock, which is never held around paho calls
        with self._lock:
            topic = self._unacked.pop(mid, ("?", None))[0]
            if reason_code.is_failure:
                self._refused[mid] = (time.monotonic(), str(reason_code))
                while len(self._refused) > _REFUSALS_KEPT:
                    self._refused.popitem(last=False)
        if reason_code.is_failure:
            self._counters.publish_refused()
            log.warning("%s: broker refused publish to %s: %s", self.client_id, topic, reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:  # noqa: ANN001
        try:
            self._route(msg)
        except Exception:
            log.exception("%s: could not route a message", self.client_id)

    def _route(self, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._counters.drop(repr(msg._topic), "bad_topic", "topic is not UTF-8")
            return
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        self._dispatch.route(topic, bytes(msg.payload), response_topic, correlation, bool(msg.retain),
                             float(expiry) if expiry is not None else None)

    def _handler_for(self, topic: str) -> Handler | None:
        """The handler of the first matching filter, remembered per topic until the subscriptions change (an
        edge with a filter per member would otherwise match every message against all of them)."""
        with self._lock:
            if topic in self._handlers_by_topic:
                return self._handlers_by_topic[topic]
            if len(self._handlers_by_topic) >= _HANDLER_CACHE_SIZE:
                self._handlers_by_topic.clear()
            handler = self._handlers_by_topic[topic] = first_handler(self._subs, topic)
            return handler

    def __repr__(self) -> str:
        return f"Endpoint({self.client_id!r}, {self.address.public_url!r}, connected={self._connected})"
