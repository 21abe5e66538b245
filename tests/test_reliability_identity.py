"""Identity (issue 19, item 1): a client id is the authenticated username, and a role whose id is taken stops.

Without `use_username_as_clientid`, any client's credentials could connect under the LLM worker's
or an edge's client id and take its session (the two then kick each other for ever, and a clean
start wipes the edge's queued QoS 1 updates).
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest

from fedhlm.transport.broker import LocalBroker
from fedhlm.transport.endpoint import Endpoint
from test_reliability_support import wait_until

pytestmark = pytest.mark.reliability


def raw_client(broker: LocalBroker, user: str, client_id: str) -> mqtt.Client:
    """A plain paho client with `user`'s credentials asking for `client_id`, clean start."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, broker.address(user).password)
    client.connect(broker.host, broker.port, clean_start=True)
    client.loop_start()
    return client


def test_a_client_cannot_take_another_roles_client_id() -> None:
    with LocalBroker({"c000": "client", "llm": "llm", "e0": "edge"}) as broker:
        llm = Endpoint(broker.address("llm")).start().wait_connected()
        edge = Endpoint(broker.address("e0"), persistent=True).start().wait_connected()
        hostile = [raw_client(broker, "c000", "llm"), raw_client(broker, "c000", "e0")]
        try:
            time.sleep(1.0)
            assert llm.connected and edge.connected, "a client's credentials took a server role's session"
            assert llm.refusal is None and edge.refusal is None
            log = broker.log_file.read_text()
            assert "Client llm already connected" not in log and "Client e0 already connected" not in log
        finally:
            for c in hostile:
                c.loop_stop()
                c.disconnect()
            llm.close()
            edge.close()


def test_a_second_role_with_the_same_id_makes_the_first_stop_with_a_clear_error() -> None:
    with LocalBroker({"e0": "edge"}) as broker:
        first = Endpoint(broker.address("e0"), reconnect_delay_s=(0.05, 0.2)).start().wait_connected()
        second = Endpoint(broker.address("e0"), reconnect_delay_s=(0.05, 0.2)).start().wait_connected()
        try:
            assert wait_until(lambda: bool(first.refusal or second.refusal), timeout_s=10), "they kick each other for ever"
            stopped, kept = (first, second) if first.refusal else (second, first)
            assert "taken over" in stopped.refusal and "second role" in stopped.refusal
            takeovers = broker.log_file.read_text().count("already connected")
            time.sleep(1.5)  # no more ping-pong: the stopped one does not come back
            assert broker.log_file.read_text().count("already connected") == takeovers
            assert wait_until(lambda: kept.connected, timeout_s=3) and not stopped.connected
        finally:
            first.close()
            second.close()
