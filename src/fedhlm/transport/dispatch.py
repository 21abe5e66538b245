"""The receive path every endpoint shares, whatever carries the bytes (paho, the in-memory bus).

A message arrives as topic, payload bytes and the MQTT v5 request properties. It is counted,
handed to a waiting request if it is that request's reply (decoded on the spot: replies are
small), dropped with a reason if nobody wants it, and otherwise decoded and given to its
handler on the endpoint's handler thread, in arrival order. Filters are checked here too, so
both transports refuse the same mistakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from fedhlm.transport.codec import DecodeError, decode, payload_type
from fedhlm.transport.correlation import Correlator, PendingRequest
from fedhlm.transport.counters import Counters
from fedhlm.transport.messages import Message


@dataclass(frozen=True)
class Inbound:
    """A received, decoded message with what a handler needs to answer it."""

    topic: str
    message: Message
    response_topic: str | None
    correlation_data: bytes | None
    size: int  # payload bytes
    retain: bool
    expiry_s: float | None = None  # MQTT v5 Message Expiry Interval left when it arrived (None: never expires)

    def reply_topic(self, purpose: str = "reply to") -> str:
        """Its Response Topic; ValueError if it has none (it is not a request)."""
        if not self.response_topic:
            raise ValueError(f"message on {self.topic!r} carries no response topic to {purpose}")
        return self.response_topic


Handler = Callable[[Inbound], None]


@dataclass
class Subscription:
    handler: Handler | None  # None: replies to `request` only
    qos: int
    no_local: bool = False  # MQTT v5: the broker does not echo this endpoint's own publishes back
    always_retained: bool = False  # the retained message on every (re)subscribe, even into a resumed session


class Submitter(Protocol):
    """Runs tasks one at a time, in order; RuntimeError once shut down."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> None: ...


def check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise ValueError(f"qos must be 0 or 1, got {qos}")


def check_filter(topic_filter: str, concrete: bool = False) -> None:
    """Refuse filters MQTT would reject, so the mistake surfaces here and not as a silent disconnect."""
    if not isinstance(topic_filter, str) or not topic_filter or "\0" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise ValueError(f"invalid topic filter {topic_filter!r}: wildcard inside level {level!r}")
    if concrete and ("+" in levels or "#" in levels or topic_filter.startswith("$")):
        raise ValueError(f"{topic_filter!r} must be a concrete topic, not a filter")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """("group", "filter") of `$share/group/filter`, (None, filter) for a plain one."""
    parts = topic_filter.split("/", 2)
    if parts[0] == "$share" and len(parts) == 3:
        return parts[1], parts[2]
    return None, topic_filter


def filter_matches(topic_filter: str, topic: str) -> bool:
    return mqtt.topic_matches_sub(split_shared(topic_filter)[1], topic)


def first_handler(subscriptions: dict[str, Subscription], topic: str) -> Handler | None:
    """The handler of the first filter subscribed that matches `topic` (overlapping filters: the first wins)."""
    return next((s.handler for f, s in subscriptions.items() if filter_matches(f, topic)), None)


def covered(filters: Iterable[str], topic: str) -> bool:
    """Does one of `filters` already bring in `topic` (a request's response topic)?"""
    return any(f == topic or filter_matches(f, topic) for f in filters)


def reply_filters(response_topic: str, also_on: Iterable[str], per_responder: bool) -> list[str]:
    """What a request must be subscribed to for its replies: its Response Topic (or every responder's level
    below it) and its `also_on` topics; ValueError for a filter where a topic belongs."""
    for topic in (response_topic, *also_on):
        check_filter(topic, concrete=True)
    return [response_topic + "/+" if per_responder else response_topic, *also_on]


class Dispatcher:
    """Routes received payloads of one endpoint; see the module docstring.

    `handler_for(topic)` is the endpoint's subscription lookup (the first matching filter wins).
    """

    def __init__(self, owner: str, counters: Counters, requests: Correlator, handlers: Submitter,
                 handler_for: Callable[[str], Handler | None], logger: logging.Logger) -> None:
        self._owner = owner
        self._counters = counters
        self._requests = requests
        self._handlers = handlers
        self._handler_for = handler_for
        self._log = logger

    def route(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None,
              retain: bool, expiry_s: float | None = None) -> None:
        """Called on the transport's receiving thread: counts, resolves replies, queues the rest."""
        self._counters.received(topic, len(payload))
        match = self._requests.match(correlation, topic)
        if match.pending is not None:
            self._resolve(match.pending, topic, payload)  # small reply: decoded here, no handler involved
            return
        if match.late:
            self._counters.drop(topic, "late_reply", "reply for an expired or already answered request")
            return
        handler = self._handler_for(topic)
        if handler is None:
            reason = "unknown_correlation" if correlation is not None else "no_handler"
            self._counters.drop(topic, reason, "no handler for this topic")
            return
        try:
            self._handlers.submit(self._deliver, handler, topic, payload, response_topic, correlation, retain, expiry_s)
        except RuntimeError:  # handlers shut down: we are closing
            self._counters.drop(topic, "closing", "endpoint is closing")

    def connected(self, hooks: Iterable[Callable[[bool], None]], reconnected: bool) -> None:
        """Queue the connect hooks behind the messages already received."""
        for hook in hooks:
            self._handlers.submit(self._run_hook, hook, reconnected)

    def _resolve(self, pending: PendingRequest, topic: str, payload: bytes) -> None:
        try:
            reply = decode(payload, payload_type(topic))
        except DecodeError as err:
            self._counters.drop(topic, err.reason, err.detail)  # keep waiting: another responder may answer validly
            return
        refused = pending.accept(topic, reply) if pending.accept is not None else None
        if refused is not None:
            self._counters.drop(topic, refused, "the request does not take this reply")  # keep waiting for another
            return
        if not self._requests.resolve(pending, reply):
            self._counters.drop(topic, "late_reply", "reply for an expired or already answered request")

    # -- handler thread ----------------------------------------------------------------
    def _run_hook(self, hook: Callable[[bool], None], reconnected: bool) -> None:
        try:
            hook(reconnected)
        except Exception:
            self._counters.handler_error()
            self._log.exception("%s: connect hook failed", self._owner)

    def _deliver(self, handler: Handler, topic: str, payload: bytes, response_topic: str | None,
                 correlation: bytes | None, retain: bool, expiry_s: float | None) -> None:
        try:
            message = decode(payload, payload_type(topic))
        except DecodeError as err:
            self._counters.drop(topic, err.reason, err.detail)
            return
        inbound = Inbound(topic, message, response_topic, correlation, len(payload), retain, expiry_s)
        try:
            handler(inbound)
        except Exception:
            self._counters.handler_error()
            self._log.exception("%s: handler for %s failed", self._owner, topic)
