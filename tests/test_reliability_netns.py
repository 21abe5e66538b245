"""A federated round over a real network: broker, edge and two clients each in a network namespace of its own.

The namespaces hang off a bridge in the broker's namespace (10.231.0.0/24, created and
removed by the test, nothing touches the host's own network). Every role is its own
process (`ip netns exec <ns> python -c ...`); one client's link gets 100 ms of delay and
2 % loss with `tc netem`. Where the kernel has no netem (CONFIG_NET_SCH_NETEM off), the
delay comes from a user-space relay in that client's namespace and the loss from an
nftables rule on its link (`numgen random mod 100 < 2 drop`, if `nft` is installed); the
test prints which one it used. Root and a working `ip netns` are required.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fedhlm.transport.broker import LocalBroker, find_mosquitto

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.231.0"
BROKER_IP = f"{SUBNET}.1"
MQTT_PORT = 18830
DELAY_MS = 100
LOSS_PCT = 2
ROUNDS, TOKENS = 2, 15
HEAD_TAU = {"c0": -0.2, "c1": -0.4}  # below every token's entropy: each token goes to the LLM and is timed


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    try:
        find_mosquitto()
    except FileNotFoundError as err:
        return str(err)
    probe = f"fhprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


NETNS_UNAVAILABLE = _netns_unavailable()


class Lab:
    """Namespaces and processes of one test; `close` removes all of them, also after a failure."""

    def __init__(self) -> None:
        self.tag = f"fh{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ip(self, *args: str, ns: str | None = None) -> subprocess.CompletedProcess:
        cmd = ["ip", *(["-n", ns] if ns else []), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True)

    def namespace(self, name: str) -> str:
        ns = f"{self.tag}{name}"
        self.ip("netns", "add", ns)
        self.namespaces.append(ns)
        self.ip("link", "set", "lo", "up", ns=ns)
        return ns

    def hub(self, ns: str) -> None:
        self.ip("link", "add", "br0", "type", "bridge", ns=ns)
        self.ip("addr", "add", f"{BROKER_IP}/24", "dev", "br0", ns=ns)
        self.ip("link", "set", "br0", "up", ns=ns)

    def wire(self, hub: str, ns: str, host: int) -> str:
        """A veth from `ns` (eth0, SUBNET.host) to the bridge in `hub`."""
        port = f"p{host}"
        self.ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", hub)
        self.ip("link", "set", port, "master", "br0", "up", ns=hub)
        self.ip("addr", "add", f"{SUBNET}.{host}/24", "dev", "eth0", ns=ns)
        self.ip("link", "set", "eth0", "up", ns=ns)
        return f"{SUBNET}.{host}"

    def spawn(self, ns: str, argv: list[str], stdin: str | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"})
        self.procs.append(proc)
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.flush()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def lab():
    made = Lab()
    try:
        yield made
    finally:
        made.close()


LLM = textwrap.dedent("""
    import json, sys
    from fedhlm.roles.llm_service import LLMService
    from fedhlm.transport.address import BrokerAddress
    from test_federated_roles import q_fn
    cfg = json.loads(sys.stdin.readline())
    worker = LLMService(BrokerAddress(**cfg["address"]), q_fn, mode="greedy").start(30)
    print("ready", flush=True)
    sys.stdin.readline()  # until the test closes stdin
    worker.stop()
""")

EDGE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from fedhlm.roles.edge import EdgeServer
    from fedhlm.transport.address import BrokerAddress
    cfg = json.loads(sys.stdin.readline())
    init = {"tau": np.array(0.5, np.float32), "temperature": np.array(0.1, np.float32)}
    edge = EdgeServer("e0", BrokerAddress(**cfg["address"]), cfg["members"], init, quorum=1.0, deadline_s=60.0,
                      cloud_every=1000).start(30)
    print("ready", flush=True)
    while edge.round < cfg["rounds"]:
        time.sleep(0.02)
    edge.stop()
    print(json.dumps({"history": edge.history, "tau": float(edge.params["tau"])}), flush=True)
""")

CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from fedhlm.core.settings import ClientSettings, FederationSettings, P2PSettings, RoutingSettings
    from fedhlm.maths.threshold import ThresholdHead
    from fedhlm.models.head_fit import TorchHead
    from fedhlm.roles.client import Client
    from fedhlm.transport.address import BrokerAddress
    from test_federated_roles import make_inputs
    cfg = json.loads(sys.stdin.readline())
    settings = ClientSettings(cfg["id"], "e0", policy="learned", p2p=P2PSettings(enabled=False),
                              routing=RoutingSettings(exploration=0.0, local_steps=0, llm_timeout_s=10.0),
                              federation=FederationSettings(round_deadline_s=30.0))
    client = Client(settings, BrokerAddress(**cfg["address"]), TorchHead(ThresholdHead(tau=cfg["tau"], temperature=0.1)),
                    lambda t: t if t < 2 else -1).start(30)
    rng = np.random.default_rng(cfg["seed"])
    out = {"latency_ms": [], "uploads": []}
    for r in range(cfg["rounds"]):
        records = client.run_round(r, make_inputs(rng, cfg["tokens"], r * 1000))
        out["latency_ms"] += [rec.latency_ms for rec in records if rec.route == "llm" and rec.reason != "fallback"]
        out["uploads"].append((float(client.head.tau), int(client.pairs()[1].size)))
        client.finish_round(r)
    out.update(fallbacks=client.counters.fallbacks, tau=client.head.effective_tau(),
               no_model=client.counters.rounds_without_model)
    client.stop()
    print(json.dumps(out), flush=True)
""")

RELAY = textwrap.dedent("""
    import asyncio, sys
    listen_port, host, port, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    async def pipe(reader, writer, delay):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        async def read():
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + delay, data))
            queue.put_nowait((loop.time() + delay, b""))
        task = asyncio.create_task(read())
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                writer.close()
                return task
            writer.write(data)
            await writer.drain()

    async def handle(client_reader, client_writer):
        broker_reader, broker_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(client_reader, broker_writer, delay), pipe(broker_reader, client_writer, 0.0))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
""")


def ready(proc: subprocess.Popen, what: str) -> None:
    """Wait for the process's "ready" line (each script gives up by itself if it cannot connect)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        raise AssertionError(f"{what} did not start: {line!r} {err[-2000:]}")


def result(proc: subprocess.Popen, what: str, timeout_s: float = 90.0) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"{what} failed ({proc.returncode}): {err[-3000:]}"
    return json.loads(lines[-1])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=str(NETNS_UNAVAILABLE))
def test_round_across_network_namespaces_completes_over_a_delayed_lossy_link(lab: Lab, tmp_path) -> None:
    broker_ns, edge_ns = lab.namespace("b"), lab.namespace("e")
    client_ns = {"c0": lab.namespace("c0"), "c1": lab.namespace("c1")}
    lab.hub(broker_ns)
    lab.wire(broker_ns, edge_ns, 2)
    for i, ns in enumerate(client_ns.values()):
        lab.wire(broker_ns, ns, 10 + i)

    impaired = client_ns["c1"]
    netem = subprocess.run(["ip", "netns", "exec", impaired, "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
                            "delay", f"{DELAY_MS}ms", "loss", f"{LOSS_PCT}%"], capture_output=True, text=True)
    emulation = f"tc netem delay {DELAY_MS} ms loss {LOSS_PCT} %"
    nft_loss = netem.returncode != 0 and shutil.which("nft") is not None
    if netem.returncode != 0:
        emulation = (f"no netem here ({netem.stderr.strip()}): {DELAY_MS} ms client->broker by a user-space relay, "
                     + (f"{LOSS_PCT} % loss by nftables" if nft_loss else "no loss (nft not installed)"))
    if nft_loss:
        rules = ("table inet fedhlm_loss {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
                 f'  oifname "eth0" numgen random mod 100 < {LOSS_PCT} counter drop\n }}\n}}\n')
        subprocess.run(["ip", "netns", "exec", impaired, "nft", "-f", "-"], input=rules, text=True, check=True)

    users = {"c0": "client", "c1": "client", "e0": "edge", "llm": "llm"}
    broker = LocalBroker(users, run_dir=tmp_path / "broker", host=BROKER_IP, port=MQTT_PORT)  # config only
    mosquitto = lab.spawn(broker_ns, [find_mosquitto(), "-c", str(broker.config_file)])

    def address(user: str, host: str = BROKER_IP, port: int = MQTT_PORT) -> dict:
        return {"host": host, "port": port, "username": user, "password": broker.address(user).password}

    client_address = {"c0": address("c0"), "c1": address("c1")}
    if netem.returncode != 0:
        relay = lab.spawn(impaired, [sys.executable, "-c", RELAY, "18831", BROKER_IP, str(MQTT_PORT),
                                     str(DELAY_MS / 1000)])
        ready(relay, "the delay relay")
        client_address["c1"] = address("c1", "127.0.0.1", 18831)

    t0 = time.monotonic()
    llm = lab.spawn(broker_ns, [sys.executable, "-c", LLM], json.dumps({"address": address("llm")}) + "\n")
    edge = lab.spawn(edge_ns, [sys.executable, "-c", EDGE],
                     json.dumps({"address": address("e0"), "members": ["c0", "c1"], "rounds": ROUNDS}) + "\n")
    ready(edge, "the edge")
    ready(llm, "the LLM worker")
    clients = {cid: lab.spawn(ns, [sys.executable, "-c", CLIENT], json.dumps(
        {"id": cid, "address": client_address[cid], "tau": HEAD_TAU[cid], "seed": i, "rounds": ROUNDS,
         "tokens": TOKENS}) + "\n") for i, (cid, ns) in enumerate(client_ns.items())}
    outcome = {cid: result(proc, cid) for cid, proc in clients.items()}
    edge_out = result(edge, "the edge")
    elapsed = time.monotonic() - t0
    assert llm.stdin is not None
    llm.stdin.close()
    llm.wait(15)
    mosquitto.terminate()
    mosquitto.wait(10)

    # the round completed over the namespaces with the right aggregate
    assert [h["participants"] for h in edge_out["history"]] == [["c0", "c1"]] * ROUNDS
    tau0, n0 = outcome["c0"]["uploads"][0]
    tau1, n1 = outcome["c1"]["uploads"][0]
    assert n0 == n1 == TOKENS  # every token went to the LLM and came back, also over the impaired link
    assert edge_out["history"][0]["tau"] == pytest.approx((tau0 * n0 + tau1 * n1) / (n0 + n1), abs=1e-6)
    assert all(o["fallbacks"] == 0 and o["no_model"] == 0 for o in outcome.values())
    assert outcome["c0"]["tau"] == pytest.approx(edge_out["tau"]) == pytest.approx(outcome["c1"]["tau"])

    if nft_loss:
        ruleset = subprocess.run(["ip", "netns", "exec", impaired, "nft", "list", "ruleset"], capture_output=True,
                                 text=True).stdout
        emulation += f" ({ruleset.split('counter packets ')[1].split()[0]} packets dropped)"
    lat = {cid: o["latency_ms"] for cid, o in outcome.items()}
    p50 = {cid: percentile(v, 50) for cid, v in lat.items()}
    print(f"\nnetns ({emulation}; {ROUNDS} rounds in {elapsed:.1f} s): per-token LLM latency "
          + "; ".join(f"{cid} p50 {p50[cid]:.1f} ms p99 {percentile(v, 99):.1f} ms" for cid, v in lat.items())
          + f"; delay adds {p50['c1'] - p50['c0']:.1f} ms at p50")
    assert p50["c1"] - p50["c0"] >= 0.9 * DELAY_MS  # the request crossed the delayed link once
    assert p50["c0"] < DELAY_MS / 2
