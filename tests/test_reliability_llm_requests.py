"""One malformed request must not take down the LLM batch it lands in (issue 19, item 3).

A hostile client floods schema-valid requests that the model cannot compute (token ids above its
vocabulary, contexts longer than its positions, a draft outside its own top-k) while a victim routes
ordinary tokens through the same worker. The worker checks each request against the model's limits
(`ModelLimits`), drops the bad ones with a counted reason and a rate-limited log line, and the victim
gets every verdict. The q function raises on what the real model's embedding lookup would refuse.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from fedhlm.core.records import ModelLimits
from fedhlm.roles.deployment import Deployment
from fedhlm.roles.llm_service import LLMService
from fedhlm.transport import topics
from fedhlm.transport.broker import LocalBroker
from fedhlm.transport.endpoint import Endpoint
from fedhlm.transport.messages import TokenRequest
from test_federated_roles import q_fn
from test_reliability_support import assignment, federated_spec, round_inputs, users, wait_until

pytestmark = pytest.mark.reliability

LIMITS = ModelLimits(vocab_size=2000, max_positions=16)  # the synthetic contexts carry ids up to 1000


def strict_q(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The synthetic LLM, failing as a real one does on an id past its embedding table or a context past its positions."""
    if int(ids.max()) >= LIMITS.vocab_size:
        raise IndexError("index out of range in self")
    if ids.shape[1] > LIMITS.max_positions:
        raise RuntimeError(f"sequence length {ids.shape[1]} > {LIMITS.max_positions} positions")
    return q_fn(ids, mask, last)


def bad_request(i: int) -> TokenRequest:
    kinds = [np.array([1, 99_999], np.int32), np.arange(1, 40, dtype=np.int32)]
    return TokenRequest(client_id="c01", session_id="flood", seq=i, round=0, context_ids=kinds[i % 2], draft_token=0,
                        topk_ids=np.array([0, 1], np.int32), topk_probs=np.array([0.7, 0.3], np.float32), tail_mass=0.0,
                        features=np.zeros(4, np.float32), reason="uncertain")


def flood(broker: LocalBroker, stop: threading.Event, sent: list[int]) -> None:
    with Endpoint(broker.address("c01")) as ep:
        ep.wait_connected()
        i = 0
        while not stop.is_set() and i < 5000:  # ~500 a second for as long as the victim routes
            ep._publish(topics.llm_request(), bad_request(i), 0, False, response_topic=topics.client_llm_reply("c01"),
                        correlation=b"%d" % i)
            i += 1
            stop.wait(0.002)
        sent.append(i)


@pytest.mark.parametrize("limits", [LIMITS])
def test_a_flood_of_bad_requests_costs_a_victim_no_verdict(limits, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fedhlm.roles.llm_service")
    accounts = assignment(2, 1)  # c00 (victim) in the deployment; c01 (attacker) floods with its own session
    with LocalBroker(users(accounts)) as broker:
        spec = federated_spec({"c00": accounts["c00"]}, policy="always", deployment=dict(llm_workers=0),
                              routing=dict(llm_timeout_s=3.0))
        dep = Deployment(spec, broker.address).start()
        worker = LLMService(broker.address("llm"), strict_q, mode="greedy", limits=limits).start()
        stop, sent = threading.Event(), []
        attacker = threading.Thread(target=flood, args=(broker, stop, sent))
        try:
            attacker.start()
            stop.wait(0.3)  # the flood is on before the victim's first token
            victim = dep.clients["c00"]
            records = victim.run_round(0, round_inputs({"c00": victim}, 0, 40)["c00"])
        finally:
            stop.set()
            attacker.join(30)
            worker.stop()
            dep.stop()
    assert len(records) == 40
    assert [r.reason for r in records].count("fallback") == 0, "the victim lost verdicts to the flood"
    assert worker.stats.requests >= 40
    rejected = worker.stats.rejected
    assert set(rejected) <= {"context_id", "context_length"} and sum(rejected.values()) > 0
    drops = [r for r in caplog.records if "dropped a request" in r.getMessage()]
    assert len(drops) <= len(rejected) * (1 + sum(rejected.values()) // 1000), "one log line per bad request"


def test_model_limits_name_what_a_request_breaks() -> None:
    ids = np.array([0, 1], np.int32)
    assert LIMITS.problem(np.array([5, 7]), ids, 0) is None
    assert LIMITS.problem(np.arange(20), ids, 0)[0] == "context_length"
    assert LIMITS.problem(np.array([5, 2000]), ids, 0)[0] == "context_id"
    assert LIMITS.problem(np.array([5]), np.array([0, 5000]), 0)[0] == "topk_id"
    assert LIMITS.problem(np.array([5]), ids, 3)[0] == "draft_not_in_topk"


def test_a_request_whose_response_topic_is_not_its_clients_own_gets_no_verdict() -> None:
    """c01 asks with c00's reply topic: the LLM would publish into c00's stream (and c00's edge cache would learn
    from it). It is dropped with a counted reason; the same request with c01's own topic is answered."""
    with LocalBroker(users(assignment(2, 1))) as broker:
        worker = LLMService(broker.address("llm"), q_fn, mode="greedy").start()
        try:
            with Endpoint(broker.address("c01")) as ep:
                ep.wait_connected()
                good = bad_request(0)
                good = TokenRequest(**{**{f.name: getattr(good, f.name) for f in TokenRequest.field_specs()},
                                       "context_ids": np.array([1, 2, 3], np.int32)})
                with pytest.raises(TimeoutError):
                    ep.request(topics.llm_request(), good, topics.client_llm_reply("c00"), timeout_s=1.0)
                assert worker.stats.rejected.get("response_topic") == 1
                assert ep.request(topics.llm_request(), good, topics.client_llm_reply("c01"), timeout_s=5.0).seq == 0
        finally:
            worker.stop()


def test_a_request_whose_message_expiry_ran_out_in_the_queue_is_not_computed() -> None:
    """Issue 19, item 4: the client states its timeout as the MQTT v5 Message Expiry Interval. A worker that does
    not know the clients' timeouts (max_age_s None) is busy with one slow batch for 2.5 s; the request with a
    1 s expiry queued behind it is dropped unserved, the one with 10 s is answered."""
    computed: list[int] = []

    def slow_q(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        computed.append(ids.shape[0])
        threading.Event().wait(2.5)
        return q_fn(ids, mask, last)

    def request(seq: int) -> TokenRequest:
        r = bad_request(0)
        return TokenRequest(**{**{f.name: getattr(r, f.name) for f in TokenRequest.field_specs()}, "seq": seq,
                               "context_ids": np.array([1, 2, 3], np.int32)})

    with LocalBroker(users(assignment(2, 1))) as broker:
        worker = LLMService(broker.address("llm"), slow_q, mode="greedy", max_batch=1, max_age_s=None).start()
        replies: dict[int, object] = {}
        try:
            with Endpoint(broker.address("c01")) as ep:
                ep.wait_connected()

                def ask(seq: int, expiry_s: float) -> None:
                    try:
                        replies[seq] = ep.request(topics.llm_request(), request(seq), topics.client_llm_reply("c01"),
                                                  timeout_s=8.0, qos=1, expiry_s=expiry_s)
                    except TimeoutError as exc:
                        replies[seq] = exc

                threads = [threading.Thread(target=ask, args=(0, 10.0))]
                threads[0].start()
                assert wait_until(lambda: computed, 5.0)  # the worker is busy with seq 0
                threads += [threading.Thread(target=ask, args=(1, 1.0)), threading.Thread(target=ask, args=(2, 10.0))]
                for t in threads[1:]:
                    t.start()
                for t in threads:
                    t.join(15)
        finally:
            worker.stop()
    assert replies[0].seq == 0 and replies[2].seq == 2 and isinstance(replies[1], TimeoutError)
    assert computed == [1, 1] and worker.dropped["expired"] == 1
