"""Shared fixtures. Keep each one generic: other test files build on them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedhlm.transport.broker import LocalBroker

# Role ids of the test broker; the username is the role id (and the MQTT client id).
BROKER_USERS = {
    **{f"c{i}": "client" for i in range(4)},
    "e0": "edge",
    "e1": "edge",
    "cloud": "cloud",
    "llm": "llm",
    "llm-2": "llm",  # a second worker: with use_username_as_clientid every connection has an account of its own
    "admin": "admin",
}


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """A private Mosquitto for one test (fresh sessions and retained messages), users BROKER_USERS."""
    with LocalBroker(BROKER_USERS) as running:
        yield running
