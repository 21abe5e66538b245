"""The LLM's fair queue: round-robin across clients, bounded per client, stale requests dropped."""

from __future__ import annotations

import pytest

from fedhlm.core.fair_queue import FairQueue


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_flooding_client_gets_one_slot_per_turn() -> None:
    q: FairQueue[str] = FairQueue(per_client=1000)
    for i in range(500):
        q.put("flood", f"f{i}")
    q.put("victim", "v0")
    q.put("victim", "v1")
    batch = q.take(4)
    assert batch == ["f0", "v0", "f1", "v1"]
    assert q.take(3) == ["f2", "f3", "f4"]


def test_a_full_client_queue_drops_its_own_oldest() -> None:
    q: FairQueue[int] = FairQueue(per_client=3)
    assert all(q.put("a", i) for i in range(3))
    assert not q.put("a", 3)
    q.put("b", 100)
    assert q.take(10) == [1, 100, 2, 3] and q.dropped["overflow"] == 1


def test_requests_older_than_their_clients_timeout_are_dropped_unserved() -> None:
    clock = Clock()
    q: FairQueue[str] = FairQueue(max_age_s=1.0, clock=clock)
    q.put("a", "old")
    clock.t = 0.8
    q.put("b", "fresh")
    clock.t = 1.5
    assert q.take(10, timeout_s=0) == ["fresh"] and q.dropped["expired"] == 1
    assert q.take(10, timeout_s=0) == []


def test_take_returns_on_close_and_refuses_a_bad_bound() -> None:
    q: FairQueue[int] = FairQueue()
    q.close()
    assert q.take(5) == []
    with pytest.raises(ValueError, match="per_client"):
        FairQueue(per_client=0)


def test_a_request_lives_as_long_as_its_own_expiry_when_that_is_sooner() -> None:
    """The client says how long it waits (MQTT v5 Message Expiry): a 1 s request behind a 10 s one expires."""
    clock = Clock()
    q: FairQueue[str] = FairQueue(max_age_s=5.0, clock=clock)
    q.put("a", "patient", ttl_s=10.0)  # lives until 5 (max_age_s is sooner)
    q.put("a", "hasty", ttl_s=1.0)  # until 1
    q.put("b", "plain")  # until 5
    clock.t = 2.0
    assert q.take(10, timeout_s=0) == ["patient", "plain"] and q.dropped["expired"] == 1
    q.put("c", "late", ttl_s=10.0)  # until 2 + 5
    clock.t = 7.5
    assert q.take(10, timeout_s=0) == [] and q.dropped["expired"] == 2
