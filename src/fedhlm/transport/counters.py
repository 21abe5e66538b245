"""Per-kind traffic counters of one endpoint: what the byte accounting of a run is made of.

Kinds are those of `topics.KINDS` ("llm", "p2p", "fl", "status"); a topic outside the tree
counts as "other". Bytes are payload bytes, the codec's output, whichever transport carried them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

from fedhlm.transport import topics

KINDS = ("llm", "p2p", "fl", "status")


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


def kind_of(topic: str) -> str:
    """The traffic kind of `topic`, "other" outside the FedHLM tree (never raises: it runs on every message)."""
    name = topics.name_of(topic)
    return topics.KINDS[name] if name is not None else "other"


class Counters:
    """Thread-safe counters of one endpoint; drops are logged once here, by `owner`, on `logger`."""

    def __init__(self, owner: str, logger: logging.Logger) -> None:
        self._owner = owner
        self._log = logger
        self._lock = threading.Lock()
        self._sent_messages: Counter[str] = Counter()
        self._sent_bytes: Counter[str] = Counter()
        self._received_messages: Counter[str] = Counter()
        self._received_bytes: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._handler_errors = 0
        self._publish_refused = 0

    def sent(self, topic: str, size: int) -> None:
        kind = kind_of(topic)
        with self._lock:
            self._sent_messages[kind] += 1
            self._sent_bytes[kind] += size

    def received(self, topic: str, size: int) -> None:
        kind = kind_of(topic)
        with self._lock:
            self._received_messages[kind] += 1
            self._received_bytes[kind] += size

    # reasons that are part of normal operation: every answer after the first to a query broadcast to a
    # cluster is a late reply; they are counted, and logged at INFO (a run with broadcast peers has hundreds)
    ROUTINE = frozenset({"late_reply"})

    # a flood of junk must not flood the log: the first LOGGED_FIRST drops of each reason are logged, then
    # every LOGGED_EVERY-th with the count so far (all of them are counted)
    LOGGED_FIRST, LOGGED_EVERY = 5, 1000

    def drop(self, topic: str, reason: str, detail: str) -> None:
        """Count a payload that was not delivered (or not sent), and say why in the log (rate-limited)."""
        with self._lock:
            self._dropped[reason] += 1
            n = self._dropped[reason]
        if n > self.LOGGED_FIRST and n % self.LOGGED_EVERY:
            return
        level = logging.INFO if reason in self.ROUTINE else logging.WARNING
        more = f"; {n} dropped for this reason so far" if n > self.LOGGED_FIRST else ""
        self._log.log(level, "%s: dropped payload on %s: %s (%s%s)", self._owner, topic, reason, detail, more)

    def handler_error(self) -> None:
        with self._lock:
            self._handler_errors += 1

    def publish_refused(self) -> None:
        with self._lock:
            self._publish_refused += 1

    def snapshot(self) -> TrafficStats:
        def full(counter: Counter[str]) -> dict[str, int]:
            return {kind: counter.get(kind, 0) for kind in KINDS} | {k: v for k, v in counter.items() if k not in KINDS}

        with self._lock:
            return TrafficStats(
                full(self._sent_messages), full(self._sent_bytes), full(self._received_messages),
                full(self._received_bytes), Counter(self._dropped), self._handler_errors, self._publish_refused,
            )
