"""NetworkLoop and SerialExecutor: hundreds of endpoints on one network thread over a real Mosquitto."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedhlm.transport.broker import LocalBroker
from fedhlm.transport import topics
from fedhlm.transport.endpoint import Endpoint, Inbound
from fedhlm.transport.messages import ThresholdModel, ThresholdUpdate
from fedhlm.transport.netloop import NetworkLoop
from fedhlm.transport.serial import SerialExecutor

CLIENTS = 300


@pytest.mark.slow
def test_three_hundred_endpoints_share_one_network_thread_and_lose_nothing() -> None:
    users = {f"c{i:03d}": "client" for i in range(CLIENTS)} | {"e0": "edge"}
    received: set[str] = set()
    models: set[str] = set()
    lock = threading.Lock()

    def on_update(inbound: Inbound) -> None:
        with lock:
            received.add(inbound.message.client_id)

    with LocalBroker(users) as broker:
        threads_before = threading.active_count()
        loop = NetworkLoop().start()
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="handlers")
        edge = Endpoint(broker.address("e0"), network_loop=loop, handler_pool=pool, persistent=True)
        edge.subscribe(topics.edge_update_filter("e0"), on_update)
        clients = []
        for cid in sorted(u for u in users if u.startswith("c")):
            ep = Endpoint(broker.address(cid), network_loop=loop, handler_pool=pool, persistent=True)

            def on_model(inbound: Inbound, cid: str = cid) -> None:
                with lock:
                    models.add(cid)

            ep.subscribe(topics.edge_model("e0"), on_model)
            clients.append(ep)
        try:
            start = time.monotonic()
            for ep in [edge, *clients]:
                ep.start()  # returns at once: the loop connects them
            for ep in [edge, *clients]:
                ep.wait_connected(60)
            connect_s = time.monotonic() - start
            for ep in clients:
                ep.publish(topics.edge_update("e0", ep.client_id),
                           ThresholdUpdate(ep.client_id, "e0", 0, 1, {"tau": [0.5]}), qos=1)
            edge.publish(topics.edge_model("e0"), ThresholdModel("e0", "edge", 0, CLIENTS, {"tau": 0.5}), qos=1)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (len(received) < CLIENTS or len(models) < CLIENTS):
                time.sleep(0.05)
            assert len(received) == CLIENTS, f"{CLIENTS - len(received)} updates lost"
            assert len(models) == CLIENTS, f"{CLIENTS - len(models)} clients never got the model"
            assert all(ep.flush(10) for ep in clients)
            # one network thread and four handler threads for 301 connections (paho's own: 301 + handlers)
            assert threading.active_count() - threads_before <= 6, threading.enumerate()
            print(f"{CLIENTS} endpoints connected in {connect_s:.2f} s on one network thread")
        finally:
            for ep in [*clients, edge]:
                ep.close(flush_timeout_s=1)
            assert len(loop) == 0
            loop.stop()
            pool.shutdown()


def test_serial_executor_keeps_each_owners_order_and_never_overlaps_its_tasks() -> None:
    pool = ThreadPoolExecutor(max_workers=4)
    owners = [SerialExecutor(pool, name=f"o{i}") for i in range(3)]
    seen: dict[str, list[int]] = {o.name: [] for o in owners}
    running: dict[str, int] = {o.name: 0 for o in owners}
    overlaps = []
    lock = threading.Lock()

    def task(owner: str, i: int) -> None:
        with lock:
            running[owner] += 1
            if running[owner] > 1:
                overlaps.append((owner, i))
        time.sleep(0.0005)
        with lock:
            seen[owner].append(i)
            running[owner] -= 1

    for i in range(100):
        for o in owners:
            o.submit(task, o.name, i)
    for o in owners:
        o.shutdown(wait=True)
    assert overlaps == []
    assert all(order == list(range(100)) for order in seen.values()), seen
    pool.shutdown()


def test_serial_executor_shutdown_drops_queued_tasks_and_refuses_new_ones() -> None:
    pool = ThreadPoolExecutor(max_workers=2)
    ex = SerialExecutor(pool, name="o")
    gate = threading.Event()
    ran: list[int] = []
    inside = []

    def first() -> None:
        inside.append(ex.in_task())
        gate.wait(5)
        ran.append(0)

    ex.submit(first)
    for i in range(1, 5):
        ex.submit(ran.append, i)
    time.sleep(0.05)
    threading.Timer(0.1, gate.set).start()
    ex.shutdown(wait=True, cancel_futures=True)  # waits for the running task, drops the four queued
    assert ran == [0] and inside == [True] and not ex.in_task()
    with pytest.raises(RuntimeError):
        ex.submit(ran.append, 9)
    pool.shutdown()
