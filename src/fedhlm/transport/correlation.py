"""Request/reply bookkeeping: MQTT v5 Correlation Data ids, the requests waiting on them, late replies.

A request gets a fresh 16-byte id and waits for the first valid reply that carries it on its
Response Topic (or, for a request many may answer, one level below it, at the responder's id: the
topic then says who answered, and the broker's ACL says the responder is who it claims). Answered and expired ids are remembered for a while, so that a reply arriving
after its request gave up is told apart (dropped as "late_reply") from a message nobody asked for.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fedhlm.transport.messages import Message

# (reply topic, decoded reply) -> why the request refuses it, or None to take it
Accept = Callable[[str, Message], "str | None"]
FINISHED_IDS_KEPT = 10_000  # expired/answered correlation ids remembered to classify late replies


@dataclass
class PendingRequest:
    """One request waiting for its reply."""

    correlation: bytes
    response_topic: str
    also_on: frozenset[str] = frozenset()  # other topics a reply may come on (an edge's cache hit)
    per_responder: bool = False  # replies come on response_topic/<responder id>
    accept: Accept | None = None
    done: threading.Event = field(default_factory=threading.Event)
    reply: Message | None = None

    def answered_on(self, topic: str) -> bool:
        """Is `topic` one this request's replies come on?"""
        if topic == self.response_topic or topic in self.also_on:
            return True
        prefix = self.response_topic + "/"
        return self.per_responder and topic.startswith(prefix) and "/" not in topic[len(prefix):]


@dataclass(frozen=True)
class Match:
    """What an incoming message is to the requests of this endpoint."""

    pending: PendingRequest | None  # the request it answers, if one is waiting for it
    late: bool  # it carries the id of a finished request, on that request's response topic


class Correlator:
    """The pending and recently finished requests of one endpoint (`owner` names it in errors)."""

    def __init__(self, owner: str, kept: int = FINISHED_IDS_KEPT) -> None:
        self._owner = owner
        self._kept = kept
        self._lock = threading.Lock()
        self._pending: dict[bytes, PendingRequest] = {}
        self._finished: OrderedDict[bytes, PendingRequest] = OrderedDict()  # answered or expired, by correlation id

    def request(self, topic: str, response_topic: str, send: Callable[[bytes], int], timeout_s: float,
                closed: Callable[[], bool], also_on: frozenset[str] = frozenset(), per_responder: bool = False,
                accept: Accept | None = None) -> Message:
        """`send(correlation)` the request (0: not sent), then wait for its reply; see `Endpoint.request`."""
        pending = PendingRequest(uuid.uuid4().bytes, response_topic, frozenset(also_on), per_responder, accept)
        with self._lock:
            self._pending[pending.correlation] = pending
        try:
            if not send(pending.correlation):
                raise ConnectionError(f"{self._owner}: not connected, request to {topic!r} not sent")
            pending.done.wait(timeout_s)
            if pending.reply is None and closed():
                raise ConnectionError(f"{self._owner}: endpoint closed while waiting for a reply on {response_topic!r}")
            if pending.reply is None:
                raise TimeoutError(f"{self._owner}: no reply on {response_topic!r} within {timeout_s} s")
            return pending.reply
        finally:
            with self._lock:
                if self._pending.pop(pending.correlation, None) is not None:
                    self._finish(pending)

    def match(self, correlation: bytes | None, topic: str) -> Match:
        """Is a message on `topic` with this Correlation Data a reply, a late reply, or neither?

        Our own request echoed back on a topic we also subscribe to (a peer query on the cluster
        topic) carries the id too, but is not a reply: only the response topic (and the request's
        `also_on` topics) count.
        """
        if correlation is None:
            return Match(None, False)
        with self._lock:
            pending = self._pending.get(correlation)
            finished = self._finished.get(correlation)
        late = finished is not None and finished.answered_on(topic)
        replies = pending is not None and pending.answered_on(topic)
        return Match(pending if replies else None, late)

    def resolve(self, pending: PendingRequest, reply: Message) -> bool:
        """Hand `reply` to its waiting request; False if another reply (or the timeout) came first."""
        with self._lock:
            if self._pending.pop(pending.correlation, None) is None:
                return False
            self._finish(pending)
        pending.reply = reply
        pending.done.set()
        return True

    def wake_all(self) -> None:
        """Wake every waiting request (the endpoint is closing): each then finds no reply."""
        with self._lock:
            pending = list(self._pending.values())
        for request in pending:
            request.done.set()

    def _finish(self, pending: PendingRequest) -> None:
        """Remember an answered or expired id (caller holds the lock)."""
        self._finished[pending.correlation] = pending
        while len(self._finished) > self._kept:
            self._finished.popitem(last=False)
