"""Client-to-edge assignment rules."""

from __future__ import annotations

import numpy as np
import pytest

from fedhlm.simulation.clustering import assign_clients

CLIENTS = [f"c{i:03d}" for i in range(6)]


def test_round_robin_spreads_clients() -> None:
    a = assign_clients(CLIENTS, 3)
    assert [a[c] for c in CLIENTS] == ["e0", "e1", "e2", "e0", "e1", "e2"]


def test_kmeans_on_label_histograms_groups_similar_clients() -> None:
    sports = [0.05, 0.85, 0.05, 0.05]
    world = [0.85, 0.05, 0.05, 0.05]
    profiles = np.array([sports, world, sports, world, sports, world])
    a = assign_clients(CLIENTS, 2, "kmeans_labels", profiles=profiles)
    assert a["c000"] == a["c002"] == a["c004"]
    assert a["c001"] == a["c003"] == a["c005"]
    assert a["c000"] != a["c001"]


def test_given_assignment_is_checked() -> None:
    given = {c: "e0" for c in CLIENTS}
    assert set(assign_clients(CLIENTS, 1, "given", given=given).values()) == {"e0"}
    with pytest.raises(ValueError, match="no edge for client c005"):
        assign_clients(CLIENTS, 1, "given", given={c: "e0" for c in CLIENTS[:5]})
    with pytest.raises(ValueError, match="unknown edge e9"):
        assign_clients(CLIENTS, 1, "given", given={c: "e9" for c in CLIENTS})


def test_more_edges_than_clients_is_refused() -> None:
    with pytest.raises(ValueError, match="edges <= clients"):
        assign_clients(CLIENTS[:2], 3)
