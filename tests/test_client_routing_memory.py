"""The client's routing on the in-memory network, in milliseconds: exploration, audits of peer hits,
importance weights, the fallback when no LLM answers, and peers answering each other.

A fake LLM (an endpoint on the memory network answering `TokenRequest` with `LLMVerdict`) and
fake peers (answering `PeerQuery`) stand in for the other roles; the head is the torch-free
`ScalarHead` (offload when the entropy feature exceeds tau).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from fedhlm.core.records import RoutedToken, TokenInput
from fedhlm.core.settings import ClientSettings, P2PSettings, RoutingSettings
from fedhlm.roles.client import Client
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Inbound
from fedhlm.transport.memory import MemoryEndpoint, MemoryNetwork
from fedhlm.transport.messages import LLMVerdict, PeerQuery, PeerReply, TokenRequest
from fedhlm_device.features import FEATURE_NAMES
from fedhlm_device.head import ScalarHead

DIM = 4  # embedding size: small, the cache does not care
LLM_TOKEN = 3  # what the fake LLM always answers
PEER_TOKEN = 7  # what a fake peer always answers
ANSWERED = np.array([1.0, 0.0, 0.0, 0.0], np.float32)  # a context the fake peer knows
UNKNOWN = np.array([0.0, 1.0, 0.0, 0.0], np.float32)  # one it does not


def class_of(token: int) -> int:
    return token if token < 10 else -1


def token(uid: int, entropy: float, embedding: np.ndarray | None = None, draft: int = 1) -> TokenInput:
    features = np.zeros(len(FEATURE_NAMES), np.float32)
    features[0] = entropy
    return TokenInput(uid=uid, context_ids=np.array([5, uid % 1000], np.int32), draft_token=draft,
                      topk_ids=np.array([draft, draft + 1], np.int32), topk_probs=np.array([0.6, 0.4], np.float32),
                      tail_mass=0.0, features=features, embedding=embedding)


class FakeLLM:
    """Answers every TokenRequest at once: LLM_TOKEN, beta = the entropy feature (clipped to [0, 1])."""

    def __init__(self, net: MemoryNetwork) -> None:
        self.reasons: Counter[str] = Counter()
        self.endpoint = net.endpoint(net.address("llm"))
        self.endpoint.subscribe(topics.llm_request_shared("workers"), self._serve)
        self.endpoint.start()

    def _serve(self, inbound: Inbound) -> None:
        req = inbound.message
        assert isinstance(req, TokenRequest)
        self.reasons[req.reason] += 1
        beta = float(np.clip(req.features[0], 0.0, 1.0))
        self.endpoint.reply(inbound, LLMVerdict(req.client_id, req.session_id, req.seq, accepted=req.draft_token == LLM_TOKEN,
                                                final_token=LLM_TOKEN, beta=beta, q_draft=1.0 - beta, llm_ms=0.0, worker="llm"))


class FakePeer:
    """A cluster member that knows the ANSWERED context and nothing else.

    With `answer_misses` it also answers the others, with their (too low) similarity, which the
    asker refuses at once instead of waiting out its deadline.
    """

    def __init__(self, net: MemoryNetwork, edge: str = "e0", peer_id: str = "c9", answer_misses: bool = True,
                 claims: str | None = None) -> None:
        self.queries = 0
        self.answer_misses = answer_misses
        self.claims = claims or peer_id  # the responder id it writes into its replies
        self.endpoint = net.endpoint(net.address(peer_id))
        self.endpoint.subscribe(topics.edge_p2p_query(edge), self._answer, qos=0, no_local=True)
        self.endpoint.start()
        self.id = peer_id

    def _answer(self, inbound: Inbound) -> None:
        q = inbound.message
        assert isinstance(q, PeerQuery)
        self.queries += 1
        similarity = float(np.dot(q.embedding.astype(np.float32), ANSWERED))
        if similarity >= q.delta or self.answer_misses:
            self.endpoint.reply(inbound, PeerReply(self.claims, q.seq, PEER_TOKEN, min(1.0, similarity)),
                                per_responder=True)


@dataclass
class Cluster:
    """Edge e0's cluster on one memory network: clients made by `client`, fakes made by the test."""

    net: MemoryNetwork = field(default_factory=MemoryNetwork)
    clients: list[Client] = field(default_factory=list)

    def client(self, cid: str = "c0", *, tau: float = 0.5, policy: str = "learned", routing: dict | None = None,
               p2p: dict | None = None, static_tau: float = 0.5) -> Client:
        """A started client whose head offloads above entropy `tau`; `routing`/`p2p` change those sections."""
        settings = ClientSettings(
            client_id=cid, edge_id="e0", policy=policy, static_tau=static_tau,  # type: ignore[arg-type]
            routing=RoutingSettings(**{"llm_timeout_s": 1.0, **(routing or {})}),
            p2p=P2PSettings(**{"enabled": False, "deadline_ms": 500.0, "resolver": "peers", **(p2p or {})}),
        )
        client = Client(settings, self.net.address(cid), ScalarHead(tau=tau), class_of, DIM, network=self.net)
        self.clients.append(client)
        return client.start(timeout_s=1.0)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    made = Cluster()
    yield made
    for client in made.clients:
        client.stop()
    made.net.close()


def llm_records(records: list[RoutedToken]) -> list[RoutedToken]:
    """The tokens that got an LLM verdict, in the order their labels were added."""
    return [r for r in records if r.route == "llm" and r.reason != "fallback"]


def test_confident_tokens_are_explored_at_the_exploration_rate(cluster: Cluster) -> None:
    llm = FakeLLM(cluster.net)
    client = cluster.client(tau=10.0, routing={"exploration": 0.2})  # nothing is uncertain
    rng = np.random.default_rng(0)
    records = client.run_round(0, [token(i, float(u)) for i, u in enumerate(rng.uniform(0, 1, 500))])

    explored = [r for r in records if r.route == "llm"]
    assert 70 <= len(explored) <= 130, len(explored)  # 100 expected, sd 9
    assert {r.reason for r in explored} == {"exploration"} and llm.reasons == {"exploration": len(explored)}
    assert all(r.route == "local" and r.final == r.draft == 1 for r in records if r not in explored)
    assert all(r.final == LLM_TOKEN == r.llm_final for r in explored)
    assert client.endpoint.stats().sent_messages["llm"] == len(explored)


def test_a_policy_that_does_not_explore_sends_no_confident_token(cluster: Cluster) -> None:
    llm = FakeLLM(cluster.net)
    client = cluster.client(policy="static", static_tau=10.0, routing={"exploration": 0.5})
    records = client.run_round(0, [token(i, 0.5) for i in range(50)])
    assert {r.route for r in records} == {"local"} and not llm.reasons
    assert client.pairs()[1].size == 0


def test_peer_hits_are_audited_at_the_audit_rate(cluster: Cluster) -> None:
    llm = FakeLLM(cluster.net)
    peer = FakePeer(cluster.net)
    # everything is uncertain; the peer's token differs from the LLM's, so it must not be excluded here
    client = cluster.client(tau=-1.0, p2p={"enabled": True, "audit": 0.25, "exclude_after": 0})
    records = client.run_round(0, [token(i, 0.8, ANSWERED) for i in range(200)])

    audits = [r for r in records if r.route == "llm"]
    hits = [r for r in records if r.route == "peer"]
    assert 30 <= len(audits) <= 70, len(audits)  # 50 expected, sd 6
    assert len(audits) + len(hits) == 200 and peer.queries == 200
    assert {r.reason for r in audits} == {"audit"} and llm.reasons == {"audit": len(audits)}
    assert all(r.peer_token == PEER_TOKEN for r in records)
    assert all(r.final == PEER_TOKEN for r in hits) and all(r.final == r.llm_final == LLM_TOKEN for r in audits)
    assert client.counters.peer_queries == client.counters.peer_hits == 200


def test_a_peer_whose_audited_answers_disagree_with_the_llm_is_excluded(cluster: Cluster) -> None:
    llm = FakeLLM(cluster.net)
    FakePeer(cluster.net)  # answers PEER_TOKEN, the LLM says LLM_TOKEN: every audit disagrees
    client = cluster.client(tau=-1.0, p2p={"enabled": True, "audit": 1.0, "exclude_after": 3, "deadline_ms": 50.0})
    records = client.run_round(0, [token(i, 0.8, ANSWERED) for i in range(6)])
    assert [r.reason for r in records] == ["audit"] * 3 + ["uncertain"] * 3  # its answers are no longer taken
    assert all(r.final == LLM_TOKEN for r in records) and llm.reasons == {"audit": 3, "uncertain": 3}
    assert client.counters.peers_excluded == 1 and client.endpoint.stats().dropped["excluded_peer"] == 3


def test_a_reply_whose_responder_id_is_not_its_topics_is_dropped(cluster: Cluster) -> None:
    FakeLLM(cluster.net)
    FakePeer(cluster.net, peer_id="c9", claims="c1")  # answers at its own id, claiming to be c1
    client = cluster.client(tau=-1.0, p2p={"enabled": True, "audit": 0.0, "deadline_ms": 50.0})
    records = client.run_round(0, [token(0, 0.8, ANSWERED)])
    assert records[0].route == "llm" and records[0].reason == "uncertain" and client.counters.peer_hits == 0
    assert client.endpoint.stats().dropped["responder_mismatch"] == 1


def test_an_unanswered_peer_query_goes_on_to_the_llm_as_uncertain(cluster: Cluster) -> None:
    llm = FakeLLM(cluster.net)
    FakePeer(cluster.net, answer_misses=False)
    client = cluster.client(tau=0.5, p2p={"enabled": True, "deadline_ms": 50.0, "audit": 0.0})
    records = client.run_round(0, [token(0, 0.9, UNKNOWN), token(1, 0.9, ANSWERED)])
    assert [(r.route, r.reason) for r in records] == [("llm", "uncertain"), ("peer", "uncertain")]
    assert llm.reasons == {"uncertain": 1} and client.counters.peer_hits == 1


@pytest.mark.parametrize("weighted", [True, False], ids=["importance-weights", "unweighted"])
def test_each_label_weighs_one_over_the_chance_it_was_sent(cluster: Cluster,
                                                            weighted: bool) -> None:
    FakeLLM(cluster.net)
    FakePeer(cluster.net)
    # sampled verification: a peer's token decides no label, so only LLM verdicts are labels
    client = cluster.client(tau=0.5, routing={"exploration": 0.25, "importance_weights": weighted, "verify": "sample"},
                         p2p={"enabled": True, "audit": 0.5, "exclude_after": 0})
    inputs = ([token(i, 0.1) for i in range(80)]  # confident: some explored
              + [token(100 + i, 0.9, ANSWERED) for i in range(20)]  # peer hits: some audited
              + [token(200 + i, 0.7, UNKNOWN) for i in range(5)])  # uncertain, no peer knows them
    labelled = llm_records(client.run_round(0, inputs))
    reasons = Counter(r.reason for r in labelled)
    assert set(reasons) == {"exploration", "audit", "uncertain"} and reasons["uncertain"] == 5

    expected = {"exploration": 4.0, "audit": 2.0, "uncertain": 1.0} if weighted else dict.fromkeys(reasons, 1.0)
    assert {reason: client.label_weight(reason) for reason in reasons} == expected
    features, beta, weights = client.pairs()
    assert features.shape == (len(labelled), len(FEATURE_NAMES))
    by_uid = {inp.uid: inp for inp in inputs}
    assert np.array_equal(features, np.stack([by_uid[r.uid].features for r in labelled]))
    assert np.allclose(beta, features[:, 0])  # the fake LLM's beta is the entropy feature
    assert weights.tolist() == [expected[r.reason] for r in labelled]
    assert client.learner.sample_count() == round(sum(expected[r.reason] for r in labelled))


def test_under_greedy_verification_every_peer_hit_is_a_label_weighed_as_its_token(cluster: Cluster) -> None:
    FakeLLM(cluster.net)
    FakePeer(cluster.net)
    client = cluster.client(tau=0.5, p2p={"enabled": True, "audit": 0.5, "exclude_after": 0})
    records = client.run_round(0, [token(100 + i, 0.9, ANSWERED, draft=PEER_TOKEN if i % 2 else 1) for i in range(20)])
    audited = [r for r in records if r.reason == "audit"]
    assert audited and len(audited) < 20 and all(r.route == "peer" for r in records if r.reason != "audit")
    _, beta, weights = client.pairs()
    assert beta.size == 20 and weights.tolist() == [1.0] * 20  # every hit labelled: each weighs 1
    by_uid = {r.uid: r for r in records}
    expected = [0.9 if by_uid[100 + i].reason == "audit" else float(i % 2 == 0) for i in range(20)]
    assert beta.tolist() == pytest.approx(expected)  # the LLM's beta where audited, else the peer's token vs the draft


def test_no_llm_means_fallback_to_the_draft_then_one_attempt_a_token_until_it_is_back(cluster: Cluster) -> None:
    client = cluster.client(tau=0.5, routing={"llm_timeout_s": 0.02, "llm_retries": 1})
    records = client.run_round(0, [token(i, 0.9, draft=2) for i in range(4)])
    assert all(r.route == "llm" and r.reason == "fallback" and r.final == r.draft == 2 for r in records)
    assert client.counters.fallbacks == 4 and client.counters.llm_retries == 1  # retried for the first token only
    assert client.endpoint.stats().sent_messages["llm"] == 5 and client.pairs()[1].size == 0

    FakeLLM(cluster.net)
    (back,) = client.run_round(1, [token(9, 0.9, draft=2)])
    assert (back.route, back.reason, back.final) == ("llm", "uncertain", LLM_TOKEN)
    assert client.counters.fallbacks == 4 and client.pairs()[1].size == 1


def test_clients_of_a_cluster_answer_each_others_queries_from_their_caches(cluster: Cluster) -> None:
    llm = FakeLLM(cluster.net)
    p2p = {"enabled": True, "audit": 0.0, "deadline_ms": 100.0}
    first = cluster.client("c0", tau=0.5, p2p=p2p)
    second = cluster.client("c1", tau=0.5, p2p=p2p)
    (asked,) = first.run_round(0, [token(0, 0.9, ANSWERED)])  # nobody knows it yet: the LLM, then c0's cache
    (reused,) = second.run_round(0, [token(1, 0.9, ANSWERED)])
    assert (asked.route, asked.final) == ("llm", LLM_TOKEN) and llm.reasons == {"uncertain": 1}
    assert (reused.route, reused.final, reused.peer_token) == ("peer", LLM_TOKEN, LLM_TOKEN)
    assert first.counters.peer_answers == 1 and second.counters.peer_answers == 0  # no_local: c1 never saw its own
    assert second.counters.peer_hits == 1 and first.counters.peer_hits == 0


def test_a_client_endpoint_is_a_memory_endpoint(cluster: Cluster) -> None:
    client = cluster.client()
    assert isinstance(client.endpoint, MemoryEndpoint) and client.endpoint.connected
