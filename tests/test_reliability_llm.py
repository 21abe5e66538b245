"""The LLM refiner down, slow or losing a worker: clients time out, keep their token, retry once, never hang."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fedhlm.transport.broker import LocalBroker
from fedhlm.roles.deployment import Deployment
from fedhlm.roles.llm_service import LLMService
from fedhlm.transport.topology import TOPOLOGIES
from test_federated_roles import q_fn
from test_reliability_support import assignment, federated_spec, round_inputs, users, wait_until

pytestmark = pytest.mark.reliability

TIMEOUT_S = 0.3


def offloading_deployment(broker: LocalBroker, clients: int, **routing) -> Deployment:
    """Clients that send every token to the LLM, and no LLM worker: the tests start (and kill) their own."""
    spec = federated_spec(assignment(clients, 1), policy="always", deployment=dict(llm_workers=0), routing=routing)
    return Deployment(spec, broker.address).start()


def route_all(dep: Deployment, round_: int, n: int) -> dict[str, list]:
    """Every client routes n tokens at the same time; returns the records per client."""
    inputs = round_inputs(dep.clients, round_, n)
    with ThreadPoolExecutor(len(dep.clients)) as pool:
        futures = {cid: pool.submit(c.run_round, round_, inputs[cid]) for cid, c in dep.clients.items()}
    return {cid: f.result() for cid, f in futures.items()}


def test_refiner_down_then_slow_clients_fall_back_in_time_and_resume_when_it_returns() -> None:
    assign = assignment(2, 1)
    broker = LocalBroker(users(assign)).start()
    dep = offloading_deployment(broker, 2, llm_timeout_s=TIMEOUT_S, llm_retries=1)
    slow = threading.Event()

    def slow_q(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        if slow.is_set():
            time.sleep(2 * TIMEOUT_S)
        return q_fn(ids, mask, last)

    worker: LLMService | None = None
    try:
        # down: nobody serves llm/request; the first token is tried twice, the next ones once (the LLM looks down)
        t0 = time.monotonic()
        down = route_all(dep, 0, 4)
        down_s = time.monotonic() - t0
        records = [r for rs in down.values() for r in rs]
        assert [(r.route, r.reason) for r in records] == [("llm", "fallback")] * 8
        assert all(r.final == r.draft for r in records)  # the client kept its own token
        assert [c.counters.fallbacks for c in dep.clients.values()] == [4, 4]
        assert [c.counters.llm_retries for c in dep.clients.values()] == [1, 1]
        assert max(r.latency_ms for r in records) < (2 * TIMEOUT_S + 0.25) * 1000
        assert down_s < 2 * TIMEOUT_S + 3 * TIMEOUT_S + 1.0  # never hangs: bounded by the timeouts

        # slow: a worker answers, but after the deadline; its late verdicts are dropped, not taken
        slow.set()
        worker = LLMService(broker.address("llm"), slow_q, mode="greedy").start()
        slow_run = route_all(dep, 1, 2)
        assert all(r.reason == "fallback" for rs in slow_run.values() for r in rs)
        assert wait_until(lambda: sum(c.endpoint.stats().dropped["late_reply"] for c in dep.clients.values())
                          == worker.stats.requests == 4, 10)

        # back to speed: offloading resumes at once
        slow.clear()
        back = route_all(dep, 2, 4)
        assert [(r.route, r.reason) for rs in back.values() for r in rs] == [("llm", "uncertain")] * 8
        fallbacks = [c.counters.fallbacks for c in dep.clients.values()]
        assert fallbacks == [6, 6] and worker.stats.requests == 12
        print(f"\nLLM down: {sum(len(rs) for rs in down.values())} tokens, "
              f"{sum(c.counters.llm_retries for c in dep.clients.values())} retries, all kept locally in "
              f"{down_s:.2f} s (timeout {TIMEOUT_S} s); slow: 4/4 fallbacks with late verdicts dropped; "
              f"back: 8/8 offloaded; fallbacks counted {sum(fallbacks)}")
    finally:
        dep.stop()
        if worker is not None:
            worker.stop()
        broker.cleanup()


@pytest.mark.parametrize("topology", ["flat", "bridged"])
@pytest.mark.parametrize("retries", [0, 1])
def test_killed_shared_subscription_worker_loses_its_requests_unless_the_client_retries(retries: int,
                                                                                      topology: str) -> None:
    """Mosquitto gives a dead shared subscriber's requests to no other worker (paho had acknowledged
    them on receipt; the clean session goes with the connection): a resend is what saves them. The same
    holds with the workers' $share group on a cloud broker and the clients on a bridged site broker."""
    assign = assignment(4, 1)
    broker = TOPOLOGIES[topology](users(assign, llm_workers=2), assign).__enter__()
    gate = threading.Event()

    def stuck_q(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        gate.wait(10)  # the doomed worker never gets to answer
        return q_fn(ids, mask, last)

    alive = LLMService(broker.address("llm"), q_fn, mode="greedy").start()
    doomed = LLMService(broker.address("llm1"), stuck_q, mode="greedy").start()
    dep = offloading_deployment(broker, 4, llm_timeout_s=1.0, llm_retries=retries)
    try:
        with ThreadPoolExecutor(1) as pool:
            routing = pool.submit(route_all, dep, 0, 6)
            assert wait_until(lambda: doomed.endpoint.stats().received_messages["llm"] >= 2, 5)
            doomed.endpoint.abort()  # the worker process dies with the requests it holds
            gate.set()
            records = [r for rs in routing.result(timeout=30).values() for r in rs]
        swallowed = doomed.endpoint.stats().received_messages["llm"]
        assert doomed.endpoint.stats().sent_messages["llm"] == 0 and swallowed >= 2
        fallbacks = sum(c.counters.fallbacks for c in dep.clients.values())
        resent = sum(c.counters.llm_retries for c in dep.clients.values())
        print(f"\nshared subscription, llm_retries={retries}: the killed worker took {swallowed} requests, "
              f"{resent} resent, {fallbacks} fallbacks of {len(records)} tokens; the live worker answered "
              f"{alive.stats.requests}")
        assert len(records) == 24
        if retries:
            assert fallbacks == 0 and resent >= swallowed
            assert all(r.route == "llm" and r.reason == "uncertain" for r in records)
            assert alive.stats.requests == 24
        else:
            assert fallbacks >= swallowed  # lost: no other worker ever saw them
            assert alive.stats.requests == 24 - fallbacks
    finally:
        gate.set()
        dep.stop()
        alive.stop()
        doomed.stop()
        broker.__exit__(None, None, None)
