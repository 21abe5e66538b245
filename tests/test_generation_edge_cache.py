"""The peer step for generation tokens over a real Mosquitto (issues 16 and 18): an uncertain token goes through
the client's edge keyed by its prompt's sketch and the tokens generated so far; a repeat of a sequence is
written from the edge's cache without the LLM, a miss is forwarded to the session's worker in one hop."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fedhlm.core.records import ModelLimits
from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings
from fedhlm.core.sketch import prefix_key
from fedhlm.data import load_tokenizer
from fedhlm.maths.threshold import ThresholdHead
from fedhlm.models.backbone import BackboneSpec, build_bert_decoder, save_model
from fedhlm.models.generation import SLMSequenceDrafter
from fedhlm.models.head_fit import TorchHead
from fedhlm.models.kv_cache import RefinerSessions
from fedhlm.models.llm import LLMRefiner
from fedhlm.reporting.generation import generation_summary
from fedhlm.roles.deployment import Deployment, DeploymentSpec
from fedhlm.roles.generation import SessionRouter
from fedhlm.transport import topics
from fedhlm.transport.broker import LocalBroker
from fedhlm.transport.messages import LLMVerdict, PeerReply, SessionMiss, SessionToken
from test_edge_cache import at_cosine, unit
from test_p2p import DIM

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "embeddings_from": None}
ASSIGNMENT = {"c000": "e0", "c001": "e0", "c002": "e1"}
USERS = {**{c: "client" for c in ASSIGNMENT}, "e0": "edge", "e1": "edge", "cloud": "cloud", "llm": "llm",
         "admin": "admin"}
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tokenizer) -> LLMRefiner:
    model = build_bert_decoder(BackboneSpec(**TINY, seed=1), vocab_size=len(tokenizer))
    return LLMRefiner(pretrained=str(save_model(model, tmp_path_factory.mktemp("llm"), tokenizer))).eval()


@pytest.fixture(scope="module")
def slm(tokenizer) -> torch.nn.Module:
    return build_bert_decoder(BackboneSpec(**TINY, seed=2), vocab_size=len(tokenizer)).eval()


@pytest.fixture
def broker():
    with LocalBroker(USERS, clusters=ASSIGNMENT) as b:
        yield b


def deployment(broker: LocalBroker, llm: LLMRefiner, *, audit: float = 0.0, delta: float = 0.9,
               policy: str = "always", tau: float = 0.5, exploration: float = 0.0) -> Deployment:
    llm.sessions.clear()
    settings = ClientSettings(client_id="-", edge_id="-", policy=policy, embedder_name="test-emb",
                              routing=RoutingSettings(exploration=exploration, llm_timeout_s=5.0, top_k=4),
                              p2p=P2PSettings(resolver="edge", delta=delta, audit=audit),
                              federation=FederationSettings(round_deadline_s=5.0))
    q_fn = lambda ids, mask, last: llm.q_probs({"input_ids": ids, "attention_mask": mask, "last_index": last})  # noqa: E731
    config = llm.model.config
    spec = DeploymentSpec(assignment=ASSIGNMENT, client=settings, head_factory=lambda: TorchHead(ThresholdHead(tau=tau)),
                          q_fn=q_fn, class_of=lambda t: t, llm_sessions=RefinerSessions(llm), session_ttl_s=5.0,
                          llm_limits=ModelLimits(int(config.vocab_size), int(config.max_position_embeddings)),
                          embedding_dim=DIM)
    return Deployment(spec, broker.address).start()


def prompt(tokenizer, text: str = "stocks rallied on tuesday as investors") -> list[int]:
    return [tokenizer.cls_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def write(dep: Deployment, client_id: str, slm, ids: list[int], context: np.ndarray | None):  # noqa: ANN001, ANN201
    return SessionRouter(dep.clients[client_id]).generate(SLMSequenceDrafter(slm, top_k=4), ids, NEW_TOKENS,
                                                          context=context)


def wait_learned(dep: Deployment, edge: str, n: int) -> None:
    deadline = time.monotonic() + 5
    while dep.edges[edge].resolver.stats.learned < n and time.monotonic() < deadline:
        time.sleep(0.01)  # the edge reads the verdicts from its member's reply topic


def test_a_repeat_at_another_client_of_the_cluster_is_written_from_the_edge_without_the_llm(broker, llm, slm,
                                                                                            tokenizer) -> None:
    dep = deployment(broker, llm)
    try:
        context = unit(0)
        first = write(dep, "c000", slm, prompt(tokenizer), context)
        assert all(s.route == "llm" for s in first.steps)  # nothing cached yet: every miss forwarded to the LLM
        wait_learned(dep, "e0", len(first.tokens))
        verified = dep.llm[0].stats.session_tokens
        second = write(dep, "c001", slm, prompt(tokenizer), context)
        assert second.tokens == first.tokens  # the LLM's sequence, from the cluster's cache
        assert all(s.route == "peer" and s.peer_token == s.token for s in second.steps)
        assert dep.llm[0].stats.session_tokens == verified  # the LLM verified nothing of the repeat
        stats = dep.edges["e0"].resolver.stats
        assert (stats.hits, stats.forwarded, stats.learned) == (len(second.tokens), len(first.tokens), len(first.tokens))
        # the peer step cost the repeat one request per token to its own edge: nobody was broadcast to
        assert dep.clients["c000"].endpoint.stats().received_messages["p2p"] == 0
        assert dep.clients["c001"].counters.peer_hits == len(second.tokens)
        # the prompt's sketch (16 B at 128 bits) went with the sequence's first request, not with every token
        assert all(s.uplink_bytes < first.steps[0].uplink_bytes for s in first.steps[1:])
        assert max(s.uplink_bytes for s in first.steps[1:]) <= 122
        # in another cluster the same sequence is the LLM's again: the cache is the cluster's
        third = write(dep, "c002", slm, prompt(tokenizer), context)
        assert third.tokens == first.tokens and all(s.route == "llm" for s in third.steps)
    finally:
        dep.stop()


@pytest.mark.parametrize(("cos", "reused"), [(0.98, True), (0.5, False)])
def test_a_similar_prompt_is_answered_above_delta_and_not_below(broker, llm, slm, tokenizer, cos: float,
                                                                 reused: bool) -> None:
    dep = deployment(broker, llm, delta=0.9)
    try:
        context = unit(1)
        first = write(dep, "c000", slm, prompt(tokenizer), context)
        wait_learned(dep, "e0", len(first.tokens))
        other = write(dep, "c001", slm, prompt(tokenizer, "shares rose on tuesday as traders"),
                      at_cosine(context, cos, 2))
        assert (other.steps[0].route == "peer") is reused
        if reused:  # the first token is the cached one, and from there on the prefixes are the same
            assert other.tokens == first.tokens
    finally:
        dep.stop()


def test_a_cached_token_answers_only_the_same_generated_prefix(broker, llm, tokenizer) -> None:
    """Straight on the wire: an entry learnt at one prefix answers that prefix, not another one of the same prompt."""
    dep = deployment(broker, llm)
    try:
        c = dep.clients["c000"]
        ids = prompt(tokenizer)
        sketch = c.peers.sketch(unit(3))

        def ask(prefix: list[int], start: int = 0) -> object:
            message = SessionToken(client_id=c.id, session_id=f"s{len(prefix)}-{start}", seq=c._next_seq(), start=start,
                                   new_ids=np.asarray((ids + prefix)[start:], np.int32), draft_token=5,
                                   topk_ids=np.array([5, 6], np.int32), topk_probs=np.array([0.5, 0.25], np.float16),
                                   tail_mass=0.25)
            topic, resolve = c.peers.through(message, "", sketch, prefix)
            assert resolve.context_key == prefix_key(prefix)
            return c.endpoint.request(topic, resolve, topics.client_llm_reply(c.id), timeout_s=5.0, qos=1,
                                      also_on=(c.peers.reply_topic, topics.client_llm_miss(c.id)))

        learnt = ask([2000, 2001])
        assert isinstance(learnt, LLMVerdict)  # a miss, forwarded to the LLM's shared session topic
        wait_learned(dep, "e0", 1)
        hit = ask([2000, 2001])
        assert isinstance(hit, PeerReply) and hit.token == learnt.final_token and hit.responder_id == "e0"
        assert isinstance(ask([2000, 2002]), LLMVerdict)  # same prompt, another prefix: the LLM's again
        assert isinstance(ask([]), LLMVerdict)
        # a later token whose worker the client lost goes to the shared topic, as it would straight: the worker
        # that does not hold the session answers a miss at once (no timeout on a topic nobody reads)
        assert isinstance(ask([2000, 2003], start=len(ids) + 1), SessionMiss)
        # the sketch goes with a sequence's first request only; a sequence whose sketch the edge does not hold
        # (a restarted edge) is forwarded without a lookup, not refused
        stats = dep.edges["e0"].resolver.stats
        message = SessionToken(client_id=c.id, session_id="unknown", seq=c._next_seq(), start=0,
                               new_ids=np.asarray(ids, np.int32), draft_token=5, topk_ids=np.array([5], np.int32),
                               topk_probs=np.array([0.75], np.float16), tail_mass=0.25)
        topic, resolve = c.peers.through(message, "", b"", [])
        before = stats.hits
        reply = c.endpoint.request(topic, resolve, topics.client_llm_reply(c.id), timeout_s=5.0, qos=1,
                                   also_on=(c.peers.reply_topic, topics.client_llm_miss(c.id)))
        assert isinstance(reply, LLMVerdict) and stats.unkeyed == 1 and stats.hits == before
    finally:
        dep.stop()


def test_audited_hits_are_verified_by_the_llm_and_compared(broker, llm, slm, tokenizer) -> None:
    dep = deployment(broker, llm, audit=1.0)
    try:
        context = unit(4)
        first = write(dep, "c000", slm, prompt(tokenizer), context)
        wait_learned(dep, "e0", len(first.tokens))
        # the same prompt (an identical sketch): the LLM gave these tokens to this text and would again, no audit
        exact = write(dep, "c001", slm, prompt(tokenizer), context)
        assert all(s.route == "peer" and s.reason == "uncertain" for s in exact.steps)
        audited = write(dep, "c001", slm, prompt(tokenizer), at_cosine(context, 0.98, 3))  # a near repeat
        # every hit was also sent to the LLM: the token is the LLM's, the edge's answer kept beside it
        assert all(s.route == "llm" and s.reason == "audit" for s in audited.steps)
        assert all(s.peer_token == s.token for s in audited.steps)  # the same text in fact: no wrong reuse
        assert audited.tokens == first.tokens
    finally:
        dep.stop()


def test_explored_positions_are_the_same_at_a_repeat_and_answered_by_the_edge_with_their_labels(broker, llm, slm,
                                                                                                 tokenizer) -> None:
    # the head keeps every token (tau far above any entropy); half the contexts are explored, by their own draw
    dep = deployment(broker, llm, policy="learned", tau=50.0, exploration=0.5)
    try:
        context = unit(5)
        first = write(dep, "c000", slm, prompt(tokenizer), context)
        explored = [s.position for s in first.steps if s.reason == "exploration"]
        assert explored and len(explored) < len(first.steps)
        assert all(s.route == "llm" for s in first.steps if s.reason == "exploration")
        wait_learned(dep, "e0", len(explored))
        second = write(dep, "c001", slm, prompt(tokenizer), context)
        assert second.tokens == first.tokens
        assert [s.position for s in second.steps if s.reason == "exploration"] == explored  # same draws
        assert all(s.route == "peer" for s in second.steps if s.reason == "exploration")  # the edge's answers
        _, beta, weights = dep.clients["c001"].pairs()  # each cached answer is a label, weighed 1 / exploration
        assert beta.size == len(explored) and weights == pytest.approx([2.0] * len(explored))
        assert beta.tolist() == [float(s.draft != s.token) for s in second.steps if s.reason == "exploration"]
        counted = generation_summary(second.steps, {0: second.tokens}, {0: "a b"}, decode=lambda ids: "a b")["tokens"]
        assert (counted["exploration"], counted["exploration_cached"]) == (0, len(explored))  # none reached the LLM
    finally:
        dep.stop()
