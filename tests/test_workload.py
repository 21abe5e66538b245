"""Repeat deliveries: Zipf popularity, locality within the cluster, no repeat before the first delivery."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.simulation.config import ConfigError, load_config
from fedhlm.simulation.workload import plan_repeats, workload_summary, zipf_popularity

ASSIGN = {f"c{i:03d}": f"e{i % 4}" for i in range(40)}


def _first(n: int, rounds: int = 10) -> list[tuple[str, int]]:
    rng = np.random.default_rng(1)
    ids = sorted(ASSIGN)
    return [(ids[int(rng.integers(40))], int(rng.integers(rounds))) for _ in range(n)]


def test_one_delivery_per_article_adds_no_repeat() -> None:
    assert plan_repeats(_first(100), ASSIGN, 10, deliveries=1.0, zipf_s=1.0, locality=0.8, seed=0) == []


def test_repeats_follow_popularity_locality_and_time() -> None:
    first = _first(400)
    reps = plan_repeats(first, ASSIGN, 10, deliveries=3.0, zipf_s=1.0, locality=0.8, seed=0)
    assert len(reps) == 800
    assert all(r.round >= first[r.index][1] for r in reps)  # never before the article first arrives
    assert all(r.client_id != first[r.index][0] for r in reps)  # at another client
    summary = workload_summary(reps, first, ASSIGN, deliveries=3.0, zipf_s=1.0, locality=0.8)
    assert abs(summary["repeats_same_cluster"] - 0.8) < 0.05
    assert summary["total_deliveries"] == 1200
    assert summary["max_deliveries_of_one_article"] > 30  # Zipf s=1 over 400: the top article takes ~12 %
    assert reps == plan_repeats(first, ASSIGN, 10, deliveries=3.0, zipf_s=1.0, locality=0.8, seed=0)
    uniform = plan_repeats(first, ASSIGN, 10, deliveries=3.0, zipf_s=0.0, locality=0.0, seed=0)
    assert workload_summary(uniform, first, ASSIGN, deliveries=3.0, zipf_s=0.0,
                            locality=0.0)["repeats_same_cluster"] == 0.0
    p = zipf_popularity(1000, 1.0, np.random.default_rng(0))
    assert p.sum() == pytest.approx(1.0) and p.max() / p.min() == pytest.approx(1000.0)


def test_add_repeats_appends_copies_under_new_uids_to_the_plan() -> None:
    from fedhlm.data.items import NewsItem
    from fedhlm.simulation.run import ClientPlan, add_repeats, plan_rounds

    cfg = load_config(None, ["federation.clients=4", "federation.edges=2", "federation.rounds=3",
                             "workload.deliveries=2.5", "data.inputs=8"])
    items = [NewsItem(uid=100 + i, label=i % 4, title=f"t{i}", description="d") for i in range(20)]
    parts = [list(range(i, 20, 4)) for i in range(4)]
    ids = ["c000", "c001", "c002", "c003"]
    plan = ClientPlan(plan_rounds(parts, ids, 3), {"c000": "e0", "c001": "e0", "c002": "e1", "c003": "e1"}, [])
    summary = add_repeats(cfg, items, plan)
    assert len(items) == 50 and summary["repeat_deliveries"] == 30
    assert len({it.uid for it in items}) == 50
    planned = sorted(i for by_client in plan.rounds for idx in by_client.values() for i in idx)
    assert planned == list(range(50))  # every delivery is in the plan exactly once
    for uid, article in plan.repeat_of.items():
        copy = next(it for it in items if it.uid == uid)
        original = next(it for it in items if it.uid == article)
        assert (copy.title, copy.label) == (original.title, original.label)


def test_a_bad_workload_names_its_field() -> None:
    with pytest.raises(ConfigError, match="workload.deliveries"):
        load_config(None, ["workload.deliveries=0.5"])
    with pytest.raises(ConfigError, match="workload.locality"):
        load_config(None, ["workload.locality=2"])
