"""Where the roles of a run connect: one private broker (`flat`), or a broker per edge site bridged to a
cloud broker (`bridged`), the way an IoT fleet with edge servers is run.

Bridged: each site's clients and its edge server connect to the site's Mosquitto; the cloud server and
the LLM workers to the cloud's. Each site broker bridges itself to the cloud broker over MQTT v5 at
QoS 1 with a persistent session (`broker/bridge.conf` holds the topic mapping, written once), under an
account of its own on the cloud broker whose ACL (`[bridge]` in `broker/acl-roles.template`) lets it
carry only its own site's traffic. The LLM's `$share` group lives on the cloud broker (Mosquitto's
shared subscriptions do not span bridges); verdicts come back down the bridge of the client's site.

Both topologies answer `address(user)` (where that role connects, with its credentials), so roles and
the simulation do not know which one they run on. `TOPOLOGIES` is the registry the config names.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt

from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.broker import BridgeLink, BridgeSite, LocalBroker

log = logging.getLogger(__name__)

CLOUD_ROLES = ("cloud", "llm", "admin")


class Topology(Protocol):
    """The brokers of one run, started and stopped together."""

    def address(self, user_id: str) -> BrokerAddress: ...

    def brokers(self) -> dict[str, LocalBroker]: ...

    def __enter__(self) -> "Topology": ...

    def __exit__(self, *exc: object) -> None: ...


class FlatBrokers:
    """Every role on one private broker (the default: the quick run, the tests)."""

    def __init__(self, users: Mapping[str, str], assignment: Mapping[str, str]) -> None:
        self.broker = LocalBroker(users, clusters=dict(assignment))

    def address(self, user_id: str) -> BrokerAddress:
        return self.broker.address(user_id)

    def brokers(self) -> dict[str, LocalBroker]:
        return {"broker": self.broker}

    def __enter__(self) -> "FlatBrokers":
        self.broker.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.__exit__(*exc)


def read_sys(address: BrokerAddress, names: tuple[str, ...], timeout_s: float = 2.0,
             fresh: bool = False) -> dict[str, bytes]:
    """A broker's retained `$SYS/broker/<name>` values (bridge states, message counters), read by a short-lived
    connection as `address` (an admin account); the names not seen within `timeout_s` are missing.

    A retained counter is the value of the broker's last `$SYS` cycle, which may lie well before the read
    (seen: totals of 0 read 20 s into a busy run). `fresh` waits for a live cycle instead: the broker publishes
    `uptime` first in each cycle and the counters that changed right after it, so the values held a moment
    after a live `uptime` are current (a counter that did not change keeps its retained value)."""
    seen: dict[str, bytes] = {}
    live = threading.Event()
    done = threading.Event()

    def on_message(_c, _u, msg: mqtt.MQTTMessage) -> None:  # noqa: ANN001
        name = msg.topic.removeprefix("$SYS/broker/")
        if name == "uptime" and fresh:
            if not msg.retain:
                live.set()
            return
        seen[name] = bytes(msg.payload)
        if all(n in seen for n in names) and not fresh:
            done.set()

    topics = names + ("uptime",) if fresh else names
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(address.username, address.password)
    client.on_message = on_message
    client.on_connect = lambda c, *_: [c.subscribe(f"$SYS/broker/{n}", 0) for n in topics]
    try:
        client.connect(address.host, address.port)
        client.loop_start()
        if fresh:
            if live.wait(timeout_s):
                time.sleep(0.3)  # the rest of that cycle's messages
        else:
            done.wait(timeout_s)
    except OSError:
        return {}
    finally:
        client.disconnect()
        client.loop_stop()
    return dict(seen)


def bridge_user(edge: str) -> str:
    """The account (and client id) of a site's bridge on the cloud broker."""
    return f"bridge-{edge}"


class BridgedBrokers:
    """A cloud broker and one site broker per edge, each site bridged to the cloud (see the module docstring).

    `users` maps every role id of the run to its role, `assignment` each client to its edge. Every role
    gets an account on the broker it connects to; `admin` exists on each broker (`site_admin(edge)`).
    """

    def __init__(self, users: Mapping[str, str], assignment: Mapping[str, str], *, keepalive_s: int = 10,
                 run_dir: str | Path | None = None, bridge_timeout_s: float = 10.0) -> None:
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="fedhlm-bridged-"))
        self.bridge_timeout_s = bridge_timeout_s
        members: dict[str, list[str]] = {}
        for client, edge in sorted(assignment.items()):
            members.setdefault(edge, []).append(client)
        edges = sorted({*members, *(u for u, r in users.items() if r == "edge")})
        sites = {bridge_user(e): BridgeSite(e, tuple(members.get(e, ()))) for e in edges}
        cloud_users = {u: r for u, r in users.items() if r in CLOUD_ROLES} | dict.fromkeys(sites, "bridge")
        self.cloud = LocalBroker(cloud_users, run_dir=self.run_dir / "cloud", bridges=sites)
        self.sites: dict[str, LocalBroker] = {}
        self._home: dict[str, LocalBroker] = {u: self.cloud for u in cloud_users}
        for user, site in sites.items():
            site_users = {**dict.fromkeys(site.clients, "client"), site.edge: "edge", "admin": "admin"}
            link = BridgeLink(user, self.cloud.address(user).password or "", self.cloud.host, self.cloud.port, site,
                              keepalive_s)
            broker = LocalBroker(site_users, run_dir=self.run_dir / site.edge, clusters=dict.fromkeys(site.clients,
                                 site.edge), bridge_to=link)
            self.sites[site.edge] = broker
            self._home |= {u: broker for u in site_users if u != "admin"}
        unplaced = sorted(u for u in users if u not in self._home)
        if unplaced:
            raise ValueError(f"bridged topology: {unplaced[0]!r} ({users[unplaced[0]]}) is in no site: give it an edge "
                             "in the assignment")

    def address(self, user_id: str) -> BrokerAddress:
        """Where `user_id` connects: its site's broker for a client or an edge, the cloud's for the rest."""
        if user_id not in self._home:
            raise KeyError(f"no broker user {user_id!r} in this topology")
        return self._home[user_id].address(user_id)

    def site_admin(self, edge: str) -> BrokerAddress:
        return self.sites[edge].address("admin")

    def brokers(self) -> dict[str, LocalBroker]:
        return {"cloud": self.cloud, **self.sites}

    # -- life cycle ------------------------------------------------------------
    def start(self) -> "BridgedBrokers":
        self.cloud.start()
        for broker in self.sites.values():
            broker.start()
        for edge in self.sites:
            self.wait_bridged(edge, self.bridge_timeout_s)
        log.info("bridged topology up: cloud %s, sites %s", self.cloud.url,
                 ", ".join(f"{e} {b.url}" for e, b in self.sites.items()))
        return self

    def stop(self) -> None:
        for broker in (*self.sites.values(), self.cloud):
            broker.stop()

    def bridge_state(self, edge: str, timeout_s: float = 2.0) -> bool | None:
        """The site bridge's retained notification: True connected, False down, None not seen in time."""
        name = f"connection/{bridge_user(edge)}/state"
        state = read_sys(self.site_admin(edge), (name,), timeout_s).get(name)
        return None if state is None else state == b"1"

    def wait_bridged(self, edge: str, timeout_s: float) -> None:
        """Block until the site's bridge reports itself connected; TimeoutError naming the site otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.bridge_state(edge, timeout_s=min(1.0, max(0.1, deadline - time.monotonic()))):
                return
            time.sleep(0.05)
        raise TimeoutError(f"the bridge of site {edge} did not connect to the cloud broker {self.cloud.url} within "
                           f"{timeout_s} s; see {self.sites[edge].log_file}")

    def __enter__(self) -> "BridgedBrokers":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


TOPOLOGIES: dict[str, type[FlatBrokers] | type[BridgedBrokers]] = {"flat": FlatBrokers, "bridged": BridgedBrokers}
