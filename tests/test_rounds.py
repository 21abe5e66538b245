"""Round rules of the aggregators, with an explicit clock."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.core.aggregation import WeightedParams
from fedhlm.core.rounds import RoundCollector, ServerState, load_state, save_state


def _u(tau: float, n: int = 10) -> WeightedParams:
    return WeightedParams({"tau": np.array([tau], np.float32)}, n)


def test_round_closes_when_everyone_reported() -> None:
    c = RoundCollector({"a", "b", "c"}, quorum=0.5, deadline_s=100)
    for name, tau in zip("abc", (1.0, 2.0, 3.0)):
        assert not c.ready(0.0)
        assert c.add(name, 0, _u(tau)) == "accepted"
    assert c.ready(0.0)
    params, samples, who = c.close(0.0)
    assert params["tau"][0] == pytest.approx(2.0) and samples == 30 and who == ["a", "b", "c"]
    assert c.round == 1


def test_missing_participant_never_blocks_after_deadline_with_quorum() -> None:
    c = RoundCollector({"a", "b", "c", "d"}, quorum=0.5, deadline_s=5)
    c.add("a", 0, _u(1.0))
    c.add("b", 0, _u(3.0))
    assert not c.ready(4.9)
    assert c.ready(5.0)
    params, _, who = c.close(5.0)
    assert who == ["a", "b"] and params["tau"][0] == pytest.approx(2.0)


def test_no_quorum_is_overdue_not_ready() -> None:
    c = RoundCollector({"a", "b", "c", "d"}, quorum=0.75, deadline_s=1)
    c.add("a", 0, _u(1.0))
    assert not c.ready(10.0) and c.overdue(10.0)


def test_the_deadline_runs_from_the_rounds_first_update_not_from_its_opening() -> None:
    """An edge up minutes before its clients (a deployment of 10,000 starting): round 0 must not close at its
    first update as if the clients had been late; it waits the deadline from that update for the quorum."""
    c = RoundCollector({"a", "b", "c", "d"}, quorum=0.5, deadline_s=10, opened_at=0.0)
    assert not c.overdue(500.0) and c.waited(500.0) == 0.0  # nobody reported: nobody is held up
    c.add("a", 0, _u(1.0), now=300.0)
    assert not c.overdue(305.0) and c.overdue(310.0)
    c.add("b", 0, _u(3.0), now=301.0)
    assert not c.ready(309.9) and c.ready(310.0)
    c.add("c", 1, _u(2.0), now=309.0)  # a fast client's update for the next round
    c.close(310.0)
    assert c.started_at == 310.0 and c.waited(315.0) == 5.0  # round 1's clock starts at once: it has an update
    c.add("a", 1, _u(2.0), now=311.0)
    c.close(320.0)
    assert c.started_at is None  # round 2 has none yet


def test_duplicate_update_counts_once_and_does_not_change_aggregate() -> None:
    c = RoundCollector({"a", "b"}, deadline_s=1)
    assert c.add("a", 0, _u(1.0)) == "accepted"
    assert c.add("a", 0, _u(100.0)) == "duplicate"
    c.add("b", 0, _u(3.0))
    params, samples, _ = c.close(0.0)
    assert params["tau"][0] == pytest.approx(2.0) and samples == 20


def test_stale_future_and_unknown_updates() -> None:
    c = RoundCollector({"a", "b", "c"}, quorum=0.5, deadline_s=1)
    assert c.add("a", 1, _u(5.0)) == "accepted"  # early: kept for round 1
    assert c.add("x", 0, _u(5.0)) == "unknown"
    c.add("a", 0, _u(1.0))
    c.add("b", 0, _u(1.0))
    c.close(2.0)  # past the deadline with a quorum: c missed round 0
    assert c.add("c", 0, _u(9.0)) == "stale"  # late: never folded into a closed round
    assert c.add("b", 0, _u(9.0)) == "duplicate"  # a redelivered copy of what round 0 already holds
    assert set(c.received) == {"a"}  # the early update is now in the open round


def test_a_redelivery_is_recognised_for_a_few_closed_rounds_only() -> None:
    from fedhlm.core.rounds import CLOSED_ROUNDS_KEPT

    c = RoundCollector({"a"}, deadline_s=1)
    for r in range(CLOSED_ROUNDS_KEPT + 1):
        c.add("a", r, _u(1.0))
        c.close(0.0)
    assert c.add("a", 0, _u(1.0)) == "stale"  # forgotten: bounded memory
    assert c.add("a", 1, _u(1.0)) == "duplicate"


def test_bad_collector_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="quorum"):
        RoundCollector({"a"}, quorum=0.0)
    with pytest.raises(ValueError, match="deadline_s"):
        RoundCollector({"a"}, deadline_s=0)


def test_checkpoint_round_trip_and_corrupt_file(tmp_path) -> None:
    path = tmp_path / "edge.json"
    assert load_state(path) is None
    save_state(path, ServerState(round=7, params={"tau": np.array([0.3], np.float32)}, num_samples=42))
    state = load_state(path)
    assert state.round == 7 and state.num_samples == 42 and state.params["tau"][0] == pytest.approx(0.3)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt server checkpoint"):
        load_state(path)


def test_updates_far_ahead_are_refused_so_the_buffer_stays_bounded() -> None:
    c = RoundCollector({"a", "b"}, quorum=1.0, deadline_s=100)
    assert c.add("a", 1, _u(1.0)) == "accepted"  # a fast client one round ahead of its edge
    assert all(c.add("a", r, _u(9.0)) == "future" for r in range(2, 2000))
    assert sum(len(b) for b in c._pending.values()) == 1


def test_an_implausible_sample_count_is_refused_and_big_weights_are_capped() -> None:
    c = RoundCollector({"a", "b", "c"}, quorum=1.0, deadline_s=100, max_samples=10_000, max_weight_ratio=10)
    assert c.add("a", 0, _u(50.0, 2**62)) == "implausible_samples"
    assert c.add("a", 0, _u(0.0, -1)) == "implausible_samples"
    assert c.add("a", 0, _u(5.0, 10_000)) == "accepted"  # plausible, but 100x its peers
    c.add("b", 0, _u(1.0, 100))
    c.add("c", 0, _u(1.0, 100))
    params, samples, _ = c.close(0.0)
    # a's weight is capped at 10 x the median (100): (1000 * 5 + 200 * 1) / 1200, not (10000 * 5 + 200) / 10200
    assert params["tau"][0] == pytest.approx((1000 * 5 + 200) / 1200, rel=1e-5)
