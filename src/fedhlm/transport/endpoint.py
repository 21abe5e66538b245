"""One role's MQTT v5 connection: typed publish/subscribe, request/response, Last Will, counters.

Every FedHLM role (client, edge, cloud, LLM worker) talks through one `Endpoint`. It owns
the paho-mqtt client and keeps its network thread free: payloads are decoded and handlers
run on a worker thread, so a slow or failing handler never stalls keep-alives or acks.
Subscriptions live in the endpoint and are (re)made in `on_connect`, so a reconnect after a
broker restart restores them; a persistent session (`persistent=True`) also keeps QoS 1
messages queued at the broker while the role is away.

    ep = Endpoint(address, persistent=True)
    ep.subscribe(topics.edge_update_filter("e0"), on_update)
    ep.start().wait_connected()
    ep.publish(topics.edge_model("e0"), model, qos=1, retain=True)
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedhlm.transport import topics
from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.codec import DecodeError, decode, encode, payload_type
from fedhlm.transport.messages import Message
from fedhlm.transport.netloop import NetworkLoop
from fedhlm.transport.serial import SerialExecutor

log = logging.getLogger(__name__)

KINDS = ("llm", "p2p", "fl", "status")
DEFAULT_SESSION_EXPIRY_S = 3600
# CONNACK reasons that retrying cannot fix: stop the reconnect loop instead of hammering the broker
_PERMANENT_REFUSALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}  # bad protocol/client id/credentials, not authorized, banned, bad auth
_FINISHED_IDS_KEPT = 10_000  # expired/answered correlation ids remembered to classify late replies
_REFUSALS_KEPT = 1_000
_UNACKED_PRUNE_AT = 10_000


@dataclass(frozen=True)
class Inbound:
    """A received, decoded message with what a handler needs to answer it."""

    topic: str
    message: Message
    response_topic: str | None
    correlation_data: bytes | None
    size: int  # payload bytes
    retain: bool


Handler = Callable[[Inbound], None]


@dataclass(frozen=True)
class TrafficStats:
    """A snapshot of one endpoint's counters. Bytes are payload bytes (MQTT framing excluded)."""

    sent_messages: dict[str, int]
    sent_bytes: dict[str, int]
    received_messages: dict[str, int]
    received_bytes: dict[str, int]
    dropped: Counter[str]  # reason -> count (decode reasons, late_reply, no_handler, not_connected, ...)
    handler_errors: int
    publish_refused: int  # QoS 1 publishes the broker answered with a failure reason (e.g. not authorized)


@dataclass
class _Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent_messages: Counter[str] = field(default_factory=Counter)
    sent_bytes: Counter[str] = field(default_factory=Counter)
    received_messages: Counter[str] = field(default_factory=Counter)
    received_bytes: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    handler_errors: int = 0
    publish_refused: int = 0

    def snapshot(self) -> TrafficStats:
        def full(counter: Counter[str]) -> dict[str, int]:
            return {kind: counter.get(kind, 0) for kind in KINDS} | {k: v for k, v in counter.items() if k not in KINDS}

        with self.lock:
            return TrafficStats(
                full(self.sent_messages), full(self.sent_bytes), full(self.received_messages),
                full(self.received_bytes), Counter(self.dropped), self.handler_errors, self.publish_refused,
            )


@dataclass
class _Subscription:
    handler: Handler | None  # None: replies to `request` only
    qos: int
    no_local: bool = False  # MQTT v5: the broker does not echo this endpoint's own publishes back


@dataclass
class _PendingRequest:
    response_topic: str
    done: threading.Event = field(default_factory=threading.Event)
    reply: Message | None = None


def _kind(topic: str) -> str:
    try:
        return topics.kind_of(topic)
    except ValueError:
        return "other"


def _filter_matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    return mqtt.topic_matches_sub(topic_filter, topic)


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
        self._reconnect_delay_s = reconnect_delay_s
        self._network_loop = network_loop
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # SUBACKs
        self._subs: dict[str, _Subscription] = {}
        self._confirmed: set[str] = set()  # filters the broker acknowledged in the current session
        self._sub_mids: dict[int, str] = {}  # SUBSCRIBE in flight: mid -> filter
        self._connect_mids: set[int] = set()  # the ones sent by on_connect (wait_connected waits for them)
        self._sub_errors: dict[str, str] = {}
        self._pending: dict[bytes, _PendingRequest] = {}
        self._finished: OrderedDict[bytes, str] = OrderedDict()  # correlation id -> its response topic
        self._unacked: dict[int, tuple[str, mqtt.MQTTMessageInfo]] = {}
        self._refused: OrderedDict[int, tuple[float, str]] = OrderedDict()
        self._counters = _Counters()
        self._connected = False
        self._ready = threading.Event()  # connected and on-connect subscriptions acknowledged
        self._refusal: str | None = None
        self._refused_event = threading.Event()
        self._started = False
        self._closed = False
        self._connects = 0  # successful CONNACKs so far
        self._connect_hooks: list[Callable[[bool], None]] = []
        self._worker_prefix = f"fedhlm-{self.client_id}"
        self._executor: ThreadPoolExecutor | SerialExecutor = (
            SerialExecutor(handler_pool, name=self._worker_prefix) if handler_pool is not None
            else ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self._worker_prefix))

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
        if self._network_loop is not None:
            self._network_loop.add(self._client, reconnect_delay_s=self._reconnect_delay_s,
                                   should_reconnect=lambda: not self._closed and not self._refused_event.is_set())
        else:
            self._client.loop_start()
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
            if self._network_loop is not None:
                self._network_loop.remove(self._client, timeout_s=flush_timeout_s)
            else:
                self._client.loop_stop()
        self._shutdown()
        log.info("%s: closed", self.client_id)

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would: the broker publishes the Last Will."""
        if self._closed:
            return
        self._closed = True
        if self._network_loop is not None:
            if self._started:
                self._network_loop.remove(self._client, abort=True)
            self._shutdown()
            log.info("%s: aborted", self.client_id)
            return
        self._client.reconnect_delay_set(3600, 3600)  # in case the network thread sees the drop first
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._started:
            self._client.loop_stop()
        if isinstance(sock, socket.socket):
            sock.close()
        self._shutdown()
        log.info("%s: aborted", self.client_id)

    def _shutdown(self) -> None:
        self._connected = False
        self._ready.clear()
        with self._lock:
            pending = list(self._pending.values())
        for request in pending:
            request.done.set()  # wakes `request` (possibly inside a handler), which then sees no reply
        if isinstance(self._executor, SerialExecutor):
            on_worker = self._executor.in_task()
        else:
            on_worker = threading.current_thread().name.startswith(self._worker_prefix + "_")
        self._executor.shutdown(wait=not on_worker, cancel_futures=True)

    def __enter__(self) -> "Endpoint":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- subscribe -------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler | None, qos: int = 1, timeout_s: float = 5.0,
                  no_local: bool = False) -> None:
        """Route messages matching `topic_filter` to `handler` (on a worker thread).

        `no_local` asks the broker not to send back what this endpoint publishes on the same
        topic (a client's own peer query on its cluster's topic). Kept across reconnects. If connected, waits for the broker's SUBACK and raises
        PermissionError if the broker refused the filter (ACL). Overlapping filters: the
        first one subscribed wins. `handler=None` subscribes for `request` replies only.
        """
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos}")
        _check_filter(topic_filter)
        with self._lock:
            self._subs[topic_filter] = _Subscription(handler, qos, no_local)
            self._confirmed.discard(topic_filter)
            self._sub_errors.pop(topic_filter, None)
            if not self._connected:
                return  # made in on_connect
            mid = self._send_subscribe(topic_filter, qos, no_local)
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
            self._confirmed.discard(topic_filter)
        self._client.unsubscribe(topic_filter)

    def _send_subscribe(self, topic_filter: str, qos: int, no_local: bool = False) -> int | None:
        """Send SUBSCRIBE (caller holds the lock). Retained messages only for a new subscription,
        so that re-subscribing into a resumed session does not replay them."""
        options = SubscribeOptions(qos=qos, noLocal=no_local, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
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
        _check_filter(topic, concrete=True)
        info = self._client.publish(topic, b"", qos=1, retain=True)
        info.wait_for_publish(timeout_s)

    def reply(self, inbound: Inbound, message: Message, qos: int = 0) -> int:
        """Answer a request: publish to its Response Topic with its Correlation Data."""
        if not inbound.response_topic:
            raise ValueError(f"message on {inbound.topic!r} carries no response topic to reply to")
        return self._publish(inbound.response_topic, message, qos, False, correlation=inbound.correlation_data)

    def forward(self, topic: str, message: Message, inbound: Inbound, qos: int = 0) -> int:
        """Pass a request on to `topic` keeping its Response Topic and Correlation Data,
        so that whoever answers replies straight to the original requester."""
        if not inbound.response_topic:
            raise ValueError(f"message on {inbound.topic!r} carries no response topic to forward")
        return self._publish(topic, message, qos, False, response_topic=inbound.response_topic,
                             correlation=inbound.correlation_data)

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
        response_topic: str | None = None, correlation: bytes | None = None,
    ) -> int:
        if self._closed:
            raise RuntimeError(f"{self.client_id}: endpoint is closed")
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos}")
        payload = encode(message)
        properties = None
        if response_topic is not None or correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        started = time.monotonic()
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
            info.rc = mqtt.MQTT_ERR_SUCCESS  # paho keeps QoS 1 messages and resends them after the reconnect
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._drop(topic, "not_connected", f"publish failed ({mqtt.error_string(info.rc)})")
            return 0
        kind = _kind(topic)
        with self._counters.lock:
            self._counters.sent_messages[kind] += 1
            self._counters.sent_bytes[kind] += len(payload)
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
        self, topic: str, message: Message, response_topic: str, timeout_s: float = 5.0, qos: int = 0
    ) -> Message:
        """Publish `message` with a Response Topic and a fresh Correlation Data; return the first valid reply.

        Raises TimeoutError if none arrives in time (later replies for it are dropped as "late_reply"),
        ConnectionError if the request could not be sent or the endpoint closed meanwhile.
        """
        _check_filter(response_topic, concrete=True)
        self._ensure_reply_subscription(response_topic, timeout_s)
        correlation = uuid.uuid4().bytes
        pending = _PendingRequest(response_topic)
        with self._lock:
            self._pending[correlation] = pending
        try:
            if not self._publish(topic, message, qos, False, response_topic=response_topic, correlation=correlation):
                raise ConnectionError(f"{self.client_id}: not connected, request to {topic!r} not sent")
            pending.done.wait(timeout_s)
            if pending.reply is None and self._closed:
                raise ConnectionError(f"{self.client_id}: endpoint closed while waiting for a reply on {response_topic!r}")
            if pending.reply is None:
                raise TimeoutError(f"{self.client_id}: no reply on {response_topic!r} within {timeout_s} s")
            return pending.reply
        finally:
            with self._lock:
                if self._pending.pop(correlation, None) is not None:
                    self._finish(correlation, response_topic)

    def _ensure_reply_subscription(self, response_topic: str, timeout_s: float) -> None:
        with self._lock:
            covered = any(_filter_matches(f, response_topic) for f in self._subs)
        if not covered:
            self.subscribe(response_topic, None, qos=1, timeout_s=timeout_s)

    def _finish(self, correlation: bytes, response_topic: str) -> None:
        """Remember an answered or expired correlation id (caller holds the lock)."""
        self._finished[correlation] = response_topic
        while len(self._finished) > _FINISHED_IDS_KEPT:
            self._finished.popitem(last=False)

    # -- counters ------------------------------------------------------------------------
    def stats(self) -> TrafficStats:
        """Messages and payload bytes per traffic kind, drops by reason."""
        return self._counters.snapshot()

    def _drop(self, topic: str, reason: str, detail: str) -> None:
        with self._counters.lock:
            self._counters.dropped[reason] += 1
        log.warning("%s: dropped payload on %s: %s (%s)", self.client_id, topic, reason, detail)

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
                self._connects += 1
                reconnected = self._connects > 1
                if not flags.session_present:
                    self._confirmed.clear()
                for topic_filter, sub in self._subs.items():
                    if topic_filter not in self._confirmed:
                        mid = self._send_subscribe(topic_filter, sub.qos, sub.no_local)
                        if mid is not None:
                            self._connect_mids.add(mid)
                if not self._connect_mids:
                    self._ready.set()
            log.info("%s: connected to %s (session present: %s)", self.client_id, self.address.public_url,
                     flags.session_present)
            for hook in self._connect_hooks:
                self._executor.submit(self._run_hook, hook, reconnected)
        except Exception:  # an exception here would kill paho's network thread
            log.exception("%s: on_connect failed", self.client_id)

    def _on_disconnect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:  # noqa: ANN001
        with self._lock:
            self._connected = False
            self._ready.clear()
            self._sub_mids.clear()
            self._connect_mids.clear()
            self._changed.notify_all()
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
            with self._counters.lock:
                self._counters.publish_refused += 1
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
            self._drop(repr(msg._topic), "bad_topic", "topic is not UTF-8")
            return
        payload = bytes(msg.payload)
        kind = _kind(topic)
        with self._counters.lock:
            self._counters.received_messages[kind] += 1
            self._counters.received_bytes[kind] += len(payload)
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        handler = None
        with self._lock:
            pending = self._pending.get(correlation) if correlation is not None else None
            # a late reply arrives on the request's response topic; our own request echoed back on a topic we
            # also subscribe to (a peer query on the cluster topic) carries the id too, but is not a reply
            late = correlation is not None and self._finished.get(correlation) == topic
            if pending is None or pending.response_topic != topic:
                handler = next((s.handler for f, s in self._subs.items() if _filter_matches(f, topic)), None)
        if pending is not None and pending.response_topic == topic:
            self._resolve(correlation, pending, topic, payload)  # small reply: decoded here, no handler involved
            return
        if late:
            self._drop(topic, "late_reply", "reply for an expired or already answered request")
            return
        if handler is None:
            reason = "unknown_correlation" if correlation is not None else "no_handler"
            self._drop(topic, reason, "no handler for this topic")
            return
        try:
            self._executor.submit(self._deliver, handler, topic, payload, response_topic, correlation, bool(msg.retain))
        except RuntimeError:  # executor shut down: we are closing
            self._drop(topic, "closing", "endpoint is closing")

    def _resolve(self, correlation: bytes, pending: _PendingRequest, topic: str, payload: bytes) -> None:
        try:
            reply = decode(payload, payload_type(topic))
        except DecodeError as err:
            self._drop(topic, err.reason, err.detail)  # keep waiting: another responder may answer validly
            return
        with self._lock:
            if self._pending.pop(correlation, None) is None:
                late = True
            else:
                late = False
                self._finish(correlation, topic)
        if late:
            self._drop(topic, "late_reply", "reply for an expired or already answered request")
            return
        pending.reply = reply
        pending.done.set()

    # -- worker thread -------------------------------------------------------------------
    def _run_hook(self, hook: Callable[[bool], None], reconnected: bool) -> None:
        try:
            hook(reconnected)
        except Exception:
            with self._counters.lock:
                self._counters.handler_errors += 1
            log.exception("%s: connect hook failed", self.client_id)

    def _deliver(
        self, handler: Handler, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None, retain: bool
    ) -> None:
        try:
            message = decode(payload, payload_type(topic))
        except DecodeError as err:
            self._drop(topic, err.reason, err.detail)
            return
        inbound = Inbound(topic, message, response_topic, correlation, len(payload), retain)
        try:
            handler(inbound)
        except Exception:
            with self._counters.lock:
                self._counters.handler_errors += 1
            log.exception("%s: handler for %s failed", self.client_id, topic)

    def __repr__(self) -> str:
        return f"Endpoint({self.client_id!r}, {self.address.public_url!r}, connected={self._connected})"


def _check_filter(topic_filter: str, concrete: bool = False) -> None:
    """Refuse filters MQTT would reject, so the mistake surfaces here and not as a silent disconnect."""
    if not isinstance(topic_filter, str) or not topic_filter or "\0" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise ValueError(f"invalid topic filter {topic_filter!r}: wildcard inside level {level!r}")
    if concrete and ("+" in levels or "#" in levels or topic_filter.startswith("$")):
        raise ValueError(f"{topic_filter!r} must be a concrete topic, not a filter")
