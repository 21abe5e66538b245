"""Fair access to a shared server (the LLM): one bounded queue per client, served round-robin.

A single FIFO lets one client that sends 10,000 requests push every other client's request
behind its own; here each batch takes at most one request per client per turn, so a flood
costs the others one slot per batch, not the whole queue. Each client's queue is bounded (the
oldest request is dropped when a new one would not fit) and a request is dropped unserved past
its deadline (`max_age_s` after it was queued, or the `ttl_s` it came with if that is sooner):
its client has already timed out and kept its own token. Pure state with an explicit clock;
the LLM service feeds it and counts what it dropped.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-client FIFOs of at most `per_client` items, taken round-robin; thread-safe."""

    def __init__(self, per_client: int = 64, max_age_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_client < 1:
            raise ValueError(f"per_client must be >= 1, got {per_client}")
        self.per_client = per_client
        self.max_age_s = max_age_s
        self.clock = clock
        self._queues: OrderedDict[str, deque[tuple[float, T]]] = OrderedDict()  # (deadline, item), round-robin order
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = {"overflow": 0, "expired": 0}

    def __len__(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def put(self, client: str, item: T, ttl_s: float | None = None) -> bool:
        """Queue `item` for `client` until `ttl_s` (or `max_age_s`, whichever is sooner) from now; False when
        it pushed out that client's oldest item (its queue was full)."""
        lives = [t for t in (self.max_age_s, ttl_s) if t is not None]
        deadline = self.clock() + min(lives) if lives else float("inf")
        with self._cond:
            q = self._queues.setdefault(client, deque())
            full = len(q) >= self.per_client
            if full:
                q.popleft()
                self.dropped["overflow"] += 1
            q.append((deadline, item))
            self._cond.notify()
            return not full

    def close(self) -> None:
        """Wake every waiting `take`, which then returns what is left (possibly nothing)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, max_items: int, timeout_s: float | None = None, linger_s: float = 0.0) -> list[T]:
        """Up to `max_items`, one per client per turn in round-robin order, expired ones dropped.

        Blocks until something is queued (or `timeout_s`, or `close`), then waits up to `linger_s`
        for a fuller batch.
        """
        deadline = None if timeout_s is None else self.clock() + timeout_s
        with self._cond:
            while not self._closed and not self._expire_and_count():
                remaining = None if deadline is None else deadline - self.clock()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining if remaining is not None else 0.5)
            if linger_s > 0 and not self._closed and self._expire_and_count() < max_items:
                self._cond.wait(linger_s)
            return self._take_round_robin(max_items)

    def _expire_and_count(self) -> int:
        """Drop items past their deadline (their clients gave up on them); the number left."""
        now = self.clock()
        for q in self._queues.values():  # from the front only (cheap); `_take_round_robin` skips the rest
            while q and q[0][0] < now:
                q.popleft()
                self.dropped["expired"] += 1
        return sum(len(q) for q in self._queues.values())

    def _take_round_robin(self, max_items: int) -> list[T]:
        out: list[T] = []
        now = self.clock()
        while len(out) < max_items and self._queues:
            client, q = next(iter(self._queues.items()))
            self._queues.move_to_end(client)  # this client's next turn comes after everyone else's
            while q and q[0][0] < now:  # a shorter-lived request queued behind a longer-lived one
                q.popleft()
                self.dropped["expired"] += 1
            if q:
                out.append(q.popleft()[1])
            if not q:
                del self._queues[client]
        return out
