"""Broker restart in the middle of a federated round: every role reconnects, no update is lost or counted twice."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment
from test_reliability_support import assignment, federated_spec, round_inputs, users

pytestmark = pytest.mark.reliability

ASSIGN = assignment(6, 2)
ROUNDS = 4
RESTART_ROUND = 1
OUTAGE_S = 1.0


def test_broker_restart_mid_round_loses_no_update_and_aggregates_none_twice(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fedhlm")
    broker = LocalBroker(users(ASSIGN), run_dir=tmp_path / "broker").start()
    dep = Deployment(federated_spec(ASSIGN, tmp_path / "ckpt", routing=dict(llm_timeout_s=1.0)), broker.address).start()
    at_stop: dict = {}
    restarted = threading.Event()
    try:
        first = dep.clients["c00"]
        finish_round = first.finish_round

        def finish_round_across_a_restart(round_: int):
            """c00 sends its update of RESTART_ROUND while the broker is down (paho keeps it and resends it)."""
            if round_ == RESTART_ROUND:
                at_stop.update(rounds={e: edge.round for e, edge in dep.edges.items()},
                               accepted=sum(edge.updates_accepted for edge in dep.edges.values()))
                broker.stop()  # SIGTERM: Mosquitto writes its persistence file
                threading.Timer(OUTAGE_S, lambda: (broker.start(), restarted.set())).start()
            return finish_round(round_)

        first.finish_round = finish_round_across_a_restart
        t0 = time.monotonic()
        for r in range(ROUNDS):
            dep.run_round(r, round_inputs(ASSIGN, r, 10))
        elapsed = time.monotonic() - t0
        assert restarted.is_set() and broker.running

        published = sum(c.counters.updates_sent for c in dep.clients.values())
        aggregated = sum(len(h["participants"]) for edge in dep.edges.values() for h in edge.history)
        accepted = sum(edge.updates_accepted for edge in dep.edges.values())
        duplicates = sum(edge.duplicates for edge in dep.edges.values())
        fallbacks = sum(c.counters.fallbacks for c in dep.clients.values())
        retries = sum(c.counters.llm_retries for c in dep.clients.values())
        print(f"\nrestart: updates published {published}, accepted {accepted}, aggregated {aggregated}, "
              f"redelivered duplicates {duplicates}, LLM retries {retries}, fallbacks {fallbacks}, "
              f"{ROUNDS} rounds in {elapsed:.1f} s (outage {OUTAGE_S} s)")

        # the broker went down with c00's round open: e0 was collecting round 1 and c00's update not yet sent
        assert at_stop["rounds"]["e0"] == RESTART_ROUND
        assert at_stop["accepted"] < (RESTART_ROUND + 1) * len(ASSIGN)
        # 0 updates lost: every published update is in exactly one closed round, every round had all members
        assert published == ROUNDS * len(ASSIGN) == accepted == aggregated
        for edge_id, edge in dep.edges.items():
            members = sorted(c for c, e in ASSIGN.items() if e == edge_id)
            assert [h["round"] for h in edge.history] == list(range(ROUNDS))  # each round closed once
            assert all(h["participants"] == members for h in edge.history)
            assert edge.rejected == {}  # nothing stale, unknown or invalid
        assert dep.cloud is not None and dep.cloud.round == ROUNDS // 2
        assert all(h["participants"] == ["e0", "e1"] for h in dep.cloud.history)
        assert all(c.counters.rounds_without_model == 0 for c in dep.clients.values())
        assert all(c.tau_history[-1][1] == pytest.approx(float(dep.cloud.params["tau"])) for c in dep.clients.values())
    finally:
        dep.stop()
        broker.cleanup()

    # every role came back; the persistent ones (clients, edges, cloud) found their session at the broker
    persistent = [*ASSIGN, "e0", "e1", "cloud"]
    for role in persistent:
        assert re.search(rf"{role}: connected to \S+ \(session present: True\)", caplog.text), role
    for role in [*persistent, "llm"]:
        assert len(re.findall(rf"\b{role}: connected to ", caplog.text)) == 2, role
