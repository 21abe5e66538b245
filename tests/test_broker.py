"""LocalBroker: a private Mosquitto per run, with generated credentials and the shipped ACL."""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from fedhlm.transport.broker import LocalBroker, hash_password, render_acl, config_dir


def _connect_rc(host: str, port: int, username: str | None, password: str | None) -> int:
    """Connect with plain paho (MQTT v5) and return the CONNACK reason code value."""
    done = threading.Event()
    result: dict[str, int] = {}

    def on_connect(client, userdata, flags, reason_code, properties):  # noqa: ANN001
        result["rc"] = reason_code.value
        done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    client.on_connect = on_connect
    client.connect(host, port)
    client.loop_start()
    try:
        assert done.wait(5), "no CONNACK"
    finally:
        client.loop_stop()
        client.disconnect()
    return result["rc"]


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_broker_accepts_generated_credentials_and_refuses_anonymous() -> None:
    with LocalBroker({"c0": "client", "admin": "admin"}) as broker:
        addr = broker.address("c0")
        assert _connect_rc(broker.host, broker.port, addr.username, addr.password) == 0
        assert _connect_rc(broker.host, broker.port, None, None) != 0
        assert _connect_rc(broker.host, broker.port, "c0", "wrong-password") != 0


def test_broker_stops_and_removes_its_run_dir_on_exit_also_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with LocalBroker() as broker:
            run_dir, port = broker.run_dir, broker.port
            assert _listening(broker.host, port)
            raise RuntimeError("boom")
    assert not run_dir.exists()
    assert not _listening("127.0.0.1", port)


def test_broker_restart_keeps_port_and_persistence_dir(tmp_path) -> None:
    with LocalBroker({"admin": "admin"}, run_dir=tmp_path) as broker:
        port = broker.port
        broker.stop()
        assert not _listening(broker.host, port)
        broker.start()
        assert broker.port == port and _listening(broker.host, port)
        assert (tmp_path / "persistence").is_dir()
    assert tmp_path.exists(), "a run dir given by the caller is kept"


def test_broker_rejects_bad_user_ids_and_roles() -> None:
    with pytest.raises(ValueError, match="role id"):
        LocalBroker({"c/0": "client"})
    with pytest.raises(ValueError, match="role must be one of"):
        LocalBroker({"c0": "superuser"})


def test_address_never_prints_the_password() -> None:
    with LocalBroker({"c0": "client"}) as broker:
        addr = broker.address("c0")
        assert addr.password and addr.password not in repr(addr)
        assert addr.password not in addr.public_url
        with pytest.raises(KeyError):
            broker.address("nobody")


def test_acl_has_client_patterns_and_one_section_per_server_role() -> None:
    acl = render_acl({"c0": "client", "e7": "edge", "cloud": "cloud", "llm": "llm"}, config_dir())
    assert "pattern write fedhlm/v1/client/%u/status" in acl and "pattern write fedhlm/v1/client/%u/#" not in acl
    assert "user e7" in acl and "topic write fedhlm/v1/edge/e7/#" in acl
    assert "topic write fedhlm/v1/global/update/e7" in acl
    assert "user c0" not in acl  # clients are covered by the pattern lines only


def test_password_hash_is_salted_pbkdf2() -> None:
    a, b = hash_password("secret"), hash_password("secret")
    assert a.startswith("$7$101$") and a != b
    assert hash_password("secret", salt=b"x" * 12) == hash_password("secret", salt=b"x" * 12)


def test_a_fresh_sys_read_counts_publishes_made_just_before_it(broker) -> None:
    """The retained $SYS counter is the broker's last cycle (up to 3 s old); a fresh read waits for a live one,
    so publishes made a moment before the read are in it (the deploy report's per-broker message totals)."""
    from fedhlm.transport.topology import read_sys

    name = "publish/messages/received"
    before = int(read_sys(broker.address("admin"), (name,), 5.0, fresh=True)[name])
    admin = broker.address("admin")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(admin.username, admin.password)
    client.connect(admin.host, admin.port)
    client.loop_start()
    for _ in range(25):
        client.publish("fedhlm/v1/probe", b"x", qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    after = int(read_sys(admin, (name,), 5.0, fresh=True)[name])
    assert after - before >= 25, (before, after)
