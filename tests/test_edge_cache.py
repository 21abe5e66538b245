"""The edge's semantic cache over a real Mosquitto: repeats answered in one hop, no broadcast, per-cluster isolation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings
from fedhlm.core.sketch import SimHash
from fedhlm.maths.threshold import ThresholdHead
from fedhlm.models.head_fit import TorchHead
from fedhlm.roles.deployment import Deployment, DeploymentSpec
from fedhlm.transport import topics
from fedhlm.transport.broker import LocalBroker
from fedhlm.transport.messages import ResolveRequest
from test_p2p import ASSIGNMENT, DIM, q_fn, token

USERS = {**{c: "client" for c in ASSIGNMENT}, "e0": "edge", "e1": "edge", "cloud": "cloud", "llm": "llm",
         "admin": "admin"}


def deployment(broker: LocalBroker, *, enabled: bool = True, delta: float = 0.9, scope: str = "cluster",
               llm_timeout_s: float = 5.0, policy: str = "always", tau: float = 0.5, delta_floor: float | None = None,
               audit: float = 0.0, **routing) -> Deployment:
    settings = ClientSettings(client_id="-", edge_id="-", policy=policy, embedder_name="test-emb",
                              routing=RoutingSettings(llm_timeout_s=llm_timeout_s, **routing),
                              p2p=P2PSettings(enabled=enabled, resolver="edge", delta=delta, audit=audit, scope=scope,
                                              delta_floor=delta_floor),
                              federation=FederationSettings(round_deadline_s=5.0))
    spec = DeploymentSpec(assignment=ASSIGNMENT, client=settings, head_factory=lambda: TorchHead(ThresholdHead(tau=tau)),
                          q_fn=q_fn, class_of=lambda t: t if t < 4 else -1, embedding_dim=DIM)
    return Deployment(spec, broker.address).start()


@pytest.fixture
def broker():
    with LocalBroker(USERS, clusters=ASSIGNMENT) as b:
        yield b


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM)
    return v / np.linalg.norm(v)


def at_cosine(a: np.ndarray, cos: float, seed: int) -> np.ndarray:
    other = unit(seed)
    other -= (other @ a) * a
    other /= np.linalg.norm(other)
    return cos * a + np.sqrt(1 - cos**2) * other


def test_an_exact_repeat_at_another_client_is_answered_by_the_edge_without_the_llm_or_a_broadcast(broker) -> None:
    dep = deployment(broker)
    try:
        a = unit(0)
        first = dep.clients["c000"].run_round(0, [token(1, a)])[0]
        assert first.route == "llm" and first.final == 2
        deadline = time.monotonic() + 5
        while dep.edges["e0"].resolver.stats.learned < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the edge reads the verdict from c000's reply topic
        second = dep.clients["c001"].run_round(0, [token(2, a)])[0]
        assert second.route == "peer" and second.final == 2
        assert dep.llm[0].stats.requests == 1
        stats = dep.edges["e0"].resolver.stats
        assert (stats.requests, stats.hits, stats.forwarded, stats.learned) == (2, 1, 1, 1)
        # nobody was broadcast to: c000 received no peer traffic at all, c001 only the edge's answer
        assert dep.clients["c000"].endpoint.stats().received_messages["p2p"] == 0
        assert dep.clients["c001"].endpoint.stats().received_messages["p2p"] == 1
        assert dep.clients["c001"].counters.peer_answers == 0
    finally:
        dep.stop()


def _learned(dep: Deployment, edge: str = "e0", count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while dep.edges[edge].resolver.stats.learned < count and time.monotonic() < deadline:
        time.sleep(0.01)  # the edge reads the verdict from the member's reply topic


def test_a_cache_hit_is_the_routing_label_the_llm_would_have_given(broker) -> None:
    dep = deployment(broker)
    try:
        a = unit(10)
        dep.clients["c000"].run_round(0, [token(1, a)])
        _learned(dep)
        rec = dep.clients["c001"].run_round(0, [token(2, a)])[0]
        assert rec.route == "peer" and rec.reason == "uncertain"
        features, beta, weights = dep.clients["c001"].pairs()
        # greedy verification: the cached token (2) is the LLM's argmax, the draft (0) differs, so beta = 1
        assert beta.tolist() == [1.0] and weights.tolist() == [1.0] and features.shape[0] == 1
        assert dep.llm[0].stats.requests == 1
    finally:
        dep.stop()


def test_an_explored_text_is_explored_at_each_delivery_and_its_repeat_labelled_from_the_edge(broker) -> None:
    # tau 5: the head keeps every token (entropy feature 1.0); exploration 0.999: every text is explored
    dep = deployment(broker, policy="learned", tau=5.0, exploration=0.999)
    try:
        a = unit(11)
        first = dep.clients["c000"].run_round(0, [token(1, a)])[0]
        assert (first.route, first.reason) == ("llm", "exploration")
        _learned(dep)  # the edge forwarded the exploration token, so its verdict is an entry
        second = dep.clients["c001"].run_round(0, [token(1, a)])[0]
        assert (second.route, second.reason, second.final) == ("peer", "exploration", 2)
        assert dep.llm[0].stats.requests == 1
        _, beta, weights = dep.clients["c001"].pairs()
        assert beta.tolist() == [1.0] and weights == pytest.approx([1 / 0.999])
    finally:
        dep.stop()


@pytest.mark.parametrize("through_edge", [True, False])
def test_with_an_edge_cache_every_device_explores_the_same_texts(broker, through_edge: bool) -> None:
    # through the edge a repeat of an explored text is labelled from the cache: the draw is the text's; without
    # a cache exploring a text at every delivery would pay the LLM each time: a fresh draw per token
    dep = deployment(broker, policy="learned", tau=5.0, exploration=0.5, enabled=through_edge)
    try:
        tokens = [token(uid, unit(20 + uid)) for uid in range(7)]  # contexts [1, 5, uid % 7]: 7 distinct texts
        explored = [[r.reason == "exploration" for r in dep.clients[c].run_round(0, tokens)] for c in ("c000", "c002")]
        assert (explored[0] == explored[1]) is through_edge and 0 < sum(explored[0]) < 7
    finally:
        dep.stop()


def test_with_sampled_verification_exploration_goes_straight_to_the_llm(broker) -> None:
    # a cached token decides no sampled label: exploration, which is there for its label, skips the edge
    dep = deployment(broker, policy="learned", tau=5.0, exploration=0.999, verify="sample")
    try:
        a = unit(12)
        for client_id in ("c000", "c001"):
            rec = dep.clients[client_id].run_round(0, [token(1, a)])[0]
            assert (rec.route, rec.reason) == ("llm", "exploration")
        assert dep.edges["e0"].resolver.stats.requests == 0 and dep.llm[0].stats.requests == 2
    finally:
        dep.stop()


def test_a_client_answers_its_own_repeat_from_its_own_cache_first_and_while_its_edge_is_down(broker) -> None:
    dep = deployment(broker)
    try:
        a, b = unit(13), unit(14)
        c000 = dep.clients["c000"]
        c000.run_round(0, [token(1, a), token(2, b)])  # both resolved by the LLM through the edge
        again = c000.run_round(0, [token(3, a)])[0]
        assert (again.route, again.final) == ("peer", 2)
        assert dep.edges["e0"].resolver.stats.requests == 2  # its own cache answered: the edge never saw it
        dep.edges["e0"].stop()  # the edge goes away
        c000.peers.edge_failed(TimeoutError("edge gone"))
        rec = c000.run_round(0, [token(4, at_cosine(b, 0.98, 9)), token(5, unit(15))])
        assert [(r.route, r.final) for r in rec] == [("peer", 2), ("llm", 2)]  # own cache, else straight to the LLM
        assert dep.llm[0].stats.requests == 3 and c000.counters.peer_hits == 2
    finally:
        dep.stop()


def _near_repeats(broker: LocalBroker, floor: float | None) -> dict:
    """A context the LLM resolved, then 60 near versions of it (cosine 0.95) at the two clients of its cluster."""
    dep = deployment(broker, delta=0.99, delta_floor=floor)
    try:
        a = unit(30)
        dep.clients["c000"].run_round(0, [token(1, a)])
        _learned(dep)
        for i in range(60):
            client = dep.clients["c000" if i % 2 else "c001"]
            assert client.run_round(0, [token(100 + i, at_cosine(a, 0.95, 1000 + i))])[0].final == 2
            _learned(dep, count=dep.edges["e0"].resolver.stats.forwarded)
        return {**dep.edges["e0"].resolver.report(), "llm_requests": dep.llm[0].stats.requests}
    finally:
        dep.stop()


def test_an_edge_learns_a_lower_delta_where_its_misses_show_the_nearest_answer_beats_the_draft(broker) -> None:
    # the LLM answers 2 for every context and the drafts say 0: every miss's nearest entry (token 2) was right and
    # the draft wrong, so with a floor the edge lowers delta (0.99 at first) and answers more of the near versions
    fixed, learned = _near_repeats(broker, None), _near_repeats(broker, 0.9)
    assert fixed["delta"] == 0.99 and "delta_bands" not in fixed
    assert 0.9 <= learned["delta"] < 0.99 and sum(learned["delta_bands"]["pairs"]) >= 20
    assert learned["hits"] >= fixed["hits"] + 5  # 8 vs 0 when written: delta came down after ~40 misses
    assert learned["llm_requests"] == 61 - learned["hits"] and fixed["llm_requests"] == 61 - fixed["hits"]


@pytest.mark.parametrize(("cos", "reused"), [(0.98, True), (0.5, False)])
def test_a_near_repeat_is_reused_above_delta_and_not_below(broker, cos: float, reused: bool) -> None:
    dep = deployment(broker, delta=0.9)
    try:
        a = unit(1)
        dep.clients["c000"].run_round(0, [token(1, a)])
        deadline = time.monotonic() + 5
        while dep.edges["e0"].resolver.stats.learned < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        rec = dep.clients["c001"].run_round(0, [token(2, at_cosine(a, cos, 7))])[0]
        assert (rec.route == "peer") is reused
        assert dep.llm[0].stats.requests == (1 if reused else 2)
    finally:
        dep.stop()


def test_another_clusters_repeat_is_not_answered_from_this_clusters_cache(broker) -> None:
    dep = deployment(broker)
    try:
        a = unit(2)
        dep.clients["c000"].run_round(0, [token(1, a)])
        time.sleep(0.2)
        rec = dep.clients["c002"].run_round(0, [token(2, a)])[0]  # c002 belongs to e1
        assert rec.route == "llm"
        assert dep.edges["e1"].resolver.stats.requests == 1 and dep.edges["e1"].resolver.stats.hits == 0
        assert dep.edges["e0"].resolver.stats.requests == 1
    finally:
        dep.stop()


def test_with_the_neighbour_scope_a_repeat_in_another_cluster_is_answered_at_its_own_edge(broker) -> None:
    dep = deployment(broker, scope="neighbours")
    try:
        a = unit(4)
        dep.clients["c000"].run_round(0, [token(1, a)])  # cluster e0 asks the LLM; e0 shares the entry
        deadline = time.monotonic() + 5
        while dep.edges["e1"].resolver.stats.from_neighbours < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        rec = dep.clients["c002"].run_round(0, [token(2, a)])[0]  # c002 belongs to e1
        assert rec.route == "peer" and rec.final == 2
        assert dep.llm[0].stats.requests == 1
        assert dep.edges["e0"].resolver.stats.shared == 1 and dep.edges["e1"].resolver.stats.hits == 1
        assert dep.edges["e0"].resolver.stats.from_neighbours == 0  # its own entry does not come back (no_local)
    finally:
        dep.stop()


def _resolve_request(client_id: str, seq: int = 1) -> ResolveRequest:
    family = SimHash(128, DIM)
    return ResolveRequest(client_id=client_id, session_id="s", seq=seq, round=0, context_ids=[1, 2], draft_token=0,
                          topk_ids=[0, 1], topk_probs=[0.5, 0.5], tail_mass=0.0, features=[1.0], reason="uncertain",
                          family=family.fingerprint("embedder"), sketch=family.sketch(unit(3)))


def test_a_client_cannot_post_into_another_clusters_cache(broker) -> None:
    dep = deployment(broker)
    try:
        c000 = dep.clients["c000"].endpoint  # a member of e0 writing to e1's resolve topic: the broker refuses it
        with pytest.raises(PermissionError, match="Not authorized"):
            c000.publish(topics.edge_resolve("e1"), _resolve_request("c000"), qos=1, wait=True)
        c000.publish(topics.edge_resolve("e0"), _resolve_request("c000"), qos=1, wait=True)  # its own edge: allowed
        time.sleep(0.3)
        assert dep.edges["e0"].resolver.refused == {"not_request": 1}  # it arrived; without a response topic it is refused
        assert dep.edges["e1"].resolver.stats.requests == 0 and dep.edges["e1"].resolver.stats.refused == 0
    finally:
        dep.stop()


def test_a_client_cannot_forge_the_llm_verdict_its_edge_would_cache(broker) -> None:
    """The edge learns the cluster's entries from its members' llm/reply topics; only the LLM may write there."""
    from fedhlm.transport.messages import LLMVerdict

    dep = deployment(broker)
    try:
        forged = LLMVerdict(client_id="c000", session_id="s", seq=1, accepted=False, final_token=3, beta=1.0,
                            q_draft=0.0, llm_ms=1.0, worker="llm")
        with pytest.raises(PermissionError, match="Not authorized"):
            dep.clients["c000"].endpoint.publish(topics.client_llm_reply("c000"), forged, qos=1, wait=True)
    finally:
        dep.stop()


def test_the_edge_refuses_a_request_of_a_client_that_is_not_its_member() -> None:
    with LocalBroker(USERS) as open_broker:  # no clusters known to the broker: the edge's own check
        dep = deployment(open_broker)
        try:
            with pytest.raises(TimeoutError):  # c002 belongs to e1
                dep.clients["c002"].endpoint.request(topics.edge_resolve("e0"), _resolve_request("c002"),
                                                     topics.client_llm_reply("c002"), timeout_s=0.5)
            assert dep.edges["e0"].resolver.refused == {"not_member": 1} and dep.edges["e0"].resolver.stats.requests == 0
            assert dep.llm[0].stats.requests == 0
        finally:
            dep.stop()


def test_the_peer_step_through_the_edge_costs_only_the_sketch_on_the_uplink(broker) -> None:
    """Where nothing can hit, going through the edge sends the same one message per token as the LLM path,
    larger by the sketch and its family's fingerprint; no query, no reply, no deadline."""
    sent = {}
    for enabled in (False, True):
        dep = deployment(broker, enabled=enabled)
        try:
            dep.clients["c000"].run_round(0, [token(i, unit(10 + i)) for i in range(20)])
            stats = dep.clients["c000"].endpoint.stats()
            sent[enabled] = (stats.sent_messages["llm"], stats.sent_bytes["llm"], stats.sent_messages["p2p"])
        finally:
            dep.stop()
    assert sent[False][0] == sent[True][0] == 20 and sent[True][2] == 0
    extra = (sent[True][1] - sent[False][1]) / 20
    assert 16 <= extra <= 40, extra  # 16 bytes of SimHash-128 as bin, the family's 32-bit fingerprint, two keys


def test_with_its_edge_down_a_client_asks_the_llm_directly_and_loses_no_token(broker) -> None:
    dep = deployment(broker, llm_timeout_s=1.0)
    try:
        dep.edges["e0"].stop()
        client = dep.clients["c000"]
        first, second = client.run_round(0, [token(1, unit(5)), token(2, unit(6))])
        assert first.route == second.route == "llm" and first.final == second.final == 2
        assert client.counters.fallbacks == 0
        assert dep.llm[0].stats.requests == 2
        assert second.latency_ms < 1000  # after one timeout the client stops trying its edge for a while
    finally:
        dep.stop()


def test_an_exact_repeat_is_not_audited_a_near_one_is(broker) -> None:
    # greedy verification: the LLM gave the cached token to this very context and would give it again
    dep = deployment(broker, audit=1.0)
    try:
        a = unit(40)
        dep.clients["c000"].run_round(0, [token(1, a)])
        _learned(dep)
        exact, near = dep.clients["c001"].run_round(0, [token(2, a), token(3, at_cosine(a, 0.98, 41))])
        assert (exact.route, exact.reason) == ("peer", "uncertain")
        assert (near.route, near.reason, near.peer_token, near.llm_final) == ("llm", "audit", 2, 2)
        assert dep.llm[0].stats.requests == 2
    finally:
        dep.stop()
