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
