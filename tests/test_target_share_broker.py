"""`routing.target_share` over a real broker: the clients' share curves, pooled by the edges and the cloud,
send the asked share of tokens (exploration included) once the first local fit has placed them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from fedhlm.roles.deployment import Deployment
from fedhlm.transport.broker import LocalBroker
from test_reliability_support import assignment, federated_spec, round_inputs, users

ASSIGN = assignment(4, 2)


def _share_after_round_0(target: float, inputs: Callable[[int], dict]) -> tuple[float, set[float]]:
    """Four rounds of a 4-client, 2-edge federation at `target`; the share sent after round 0 (which routes
    with the initial heads) and the taus the clients end with."""
    spec = federated_spec(ASSIGN, routing=dict(target_share=target, exploration=0.05, lam=0.0, local_steps=1),
                          federation=dict(cloud_every=1))
    with LocalBroker(users(ASSIGN)) as broker:
        dep = Deployment(spec, broker.address).start()
        try:
            sent = total = 0
            for r in range(4):
                records = dep.run_round(r, inputs(r))
                if r:
                    sent += sum(1 for t in records if t.route == "llm")
                    total += len(records)
            taus = {round(c.head.effective_tau(), 6) for c in dep.clients.values()}
        finally:
            dep.stop()
    return sent / total, taus


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_a_target_share_is_what_the_federation_sends(target: float) -> None:
    share, taus = _share_after_round_0(target, lambda r: round_inputs(ASSIGN, r, 150))
    assert len(taus) == 1  # every client ends on the one global threshold
    assert abs(share - target) <= 0.05, share


def test_a_target_share_holds_for_non_iid_clients_because_the_share_curve_is_pooled() -> None:
    """The mean of the clients' own quantiles is not the quantile of their pooled tokens: with one client's
    uncertainties over [0, 0.05] and three over [0, 8] it would send 34 % for a 25 % target. The pooled share
    curve sends 25 %."""
    scales = {"c00": 0.05, "c01": 8.0, "c02": 8.0, "c03": 8.0}
    target = 0.25

    def scaled(r: int) -> dict:
        out = {}
        for cid, items in round_inputs(ASSIGN, r, 150).items():
            out[cid] = [replace(t, features=t.features * [scales[cid], *([1.0] * (t.features.size - 1))]) for t in items]
        return out

    share, taus = _share_after_round_0(target, scaled)
    # what averaging the clients' own thresholds would send: each places tau at its own quantile
    above = (target - 0.05) / 0.95  # the share the threshold sends; exploration adds the rest
    mean_of_quantiles = sum((1 - above) * s for s in scales.values()) / 4
    naive = sum(max(0.0, 1 - mean_of_quantiles / s) for s in scales.values()) / 4
    assert abs(naive + 0.05 * (1 - naive) - target) > 0.08  # the naive federation misses by this much
    assert abs(share - target) <= 0.05, (share, taus)
