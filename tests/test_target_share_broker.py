"""`routing.target_share` over a real broker: the clients' quantile thresholds, federated by the edges and the
cloud, send the asked share of tokens (exploration included) once the first local fit has placed them."""

from __future__ import annotations

import pytest

from fedhlm.roles.deployment import Deployment
from fedhlm.transport.broker import LocalBroker
from test_reliability_support import assignment, federated_spec, round_inputs, users

ASSIGN = assignment(4, 2)


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_a_target_share_is_what_the_federation_sends(target: float) -> None:
    spec = federated_spec(ASSIGN, routing=dict(target_share=target, exploration=0.05, lam=0.0, local_steps=1),
                          federation=dict(cloud_every=1))
    with LocalBroker(users(ASSIGN)) as broker:
        dep = Deployment(spec, broker.address).start()
        try:
            sent = total = 0
            for r in range(4):
                records = dep.run_round(r, round_inputs(ASSIGN, r, 150))
                if r:  # round 0 routes with the initial heads
                    sent += sum(1 for t in records if t.route == "llm")
                    total += len(records)
            taus = {round(c.head.effective_tau(), 6) for c in dep.clients.values()}
        finally:
            dep.stop()
    assert len(taus) == 1  # every client ends on the one global threshold
    assert abs(sent / total - target) <= 0.05, sent / total


def _scaled_inputs(round_: int, n: int, scales: dict[str, float]) -> dict:
    """Client i's uncertainties spread over [0, scales[i]]: non-IID clients whose own quantiles differ."""
    from dataclasses import replace

    out = {}
    for cid, items in round_inputs(ASSIGN, round_, n).items():
        fixed = []
        for t in items:
            f = t.features.copy()
            f[0] *= scales[cid]
            fixed.append(replace(t, features=f))
        out[cid] = fixed
    return out


def test_a_target_share_holds_for_non_iid_clients_because_the_share_curve_is_pooled() -> None:
    """The mean of the clients' own quantiles is not the quantile of their pooled tokens: with one client's
    uncertainties over [0, 0.05] and three over [0, 8] it would send 34 % for a 25 % target. The pooled share
    curve sends 25 %."""
    scales = {"c00": 0.05, "c01": 8.0, "c02": 8.0, "c03": 8.0}
    target = 0.25
    spec = federated_spec(ASSIGN, routing=dict(target_share=target, exploration=0.05, lam=0.0, local_steps=1),
                          federation=dict(cloud_every=1))
    with LocalBroker(users(ASSIGN)) as broker:
        dep = Deployment(spec, broker.address).start()
        try:
            sent = total = 0
            for r in range(4):
                records = dep.run_round(r, _scaled_inputs(r, 150, scales))
                if r:
                    sent += sum(1 for t in records if t.route == "llm")
                    total += len(records)
            tau = dep.clients["c00"].head.effective_tau()
        finally:
            dep.stop()
    # what averaging the clients' own thresholds would send: each places tau at its own quantile
    above = (target - 0.05) / 0.95  # the share the threshold sends; exploration adds the rest
    mean_of_quantiles = sum((1 - above) * s for s in scales.values()) / 4
    share = sum(max(0.0, 1 - mean_of_quantiles / s) for s in scales.values()) / 4
    assert abs(share + 0.05 * (1 - share) - target) > 0.08  # the naive federation misses by this much
    assert abs(sent / total - target) <= 0.05, (sent / total, tau)
