"""The roles as separate processes (`fedhlm llm|cloud|edge|client`), as on real hosts: a whole federation over a
private Mosquitto with tiny models. Each process gets its broker URL (with password) through FEDHLM_BROKER."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from fedhlm.transport.broker import LocalBroker
from test_simulate import tiny_configs

pytestmark = pytest.mark.slow

ROUNDS = 2
INPUTS = 24


def spawn(broker: LocalBroker, role: str, user: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedhlm.cli.main", role, "--config", env["SIM_CONFIG"], *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**env, "FEDHLM_BROKER": broker.address(user).url, "PYTHONUNBUFFERED": "1"},
    )


USERS = {"c00": "client", "c01": "client", "e0": "edge", "cloud": "cloud", "llm": "llm"}


def start_federation(broker: LocalBroker, env: dict[str, str]) -> tuple[list[subprocess.Popen], list[subprocess.Popen]]:
    """(servers: llm, cloud, edge e0; clients c00 and c01, each half of the inputs) as separate processes."""
    servers = [spawn(broker, "llm", "llm", env=env),
               spawn(broker, "cloud", "cloud", "--edges", "e0", env=env),
               spawn(broker, "edge", "e0", "--clients", "c00,c01", env=env)]
    clients = [spawn(broker, "client", cid, "--edge", "e0", "--shard", f"{i}/2", env=env)
               for i, cid in enumerate(("c00", "c01"))]
    return servers, clients


def test_a_federation_of_separate_processes_routes_learns_and_stops_cleanly(tmp_path) -> None:
    from fedhlm.models.hybrid import HybridModels

    home = tmp_path / "home"
    slm, llm = tiny_configs(tmp_path)
    env = {**os.environ, "FEDHLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    os.environ["FEDHLM_HOME"] = str(home)
    try:
        HybridModels(slm, llm)  # trained once here, so that five processes do not race to train them
    finally:
        os.environ.pop("FEDHLM_HOME")
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({
        "models": {"slm": slm, "llm": llm}, "data": {"source": "synthetic", "inputs": INPUTS},
        "routing": {"top_k": 4, "exploration": 0.2, "init_tau": 0.0},  # tau 0: every token goes to the LLM
        "federation": {"rounds": ROUNDS, "round_deadline_s": 30, "cloud_every": 1}, "p2p": {"enabled": False},
    }))
    env["SIM_CONFIG"] = str(sim)
    with LocalBroker(USERS) as broker:
        servers, clients = start_federation(broker, env)
        try:
            outputs = [c.communicate(timeout=240)[0] for c in clients]
            codes = [c.returncode for c in clients]
            # c00 restarted after the federation's last round: it must not replay rounds 0.. (the edge refuses them)
            again = spawn(broker, "client", "c00", "--edge", "e0", "--shard", "0/2", env=env)
            clients.append(again)
            try:
                restarted = again.communicate(timeout=60)[0]
            except subprocess.TimeoutExpired:
                again.kill()
                raise AssertionError(again.communicate()[0]) from None
        finally:
            for proc, sig in zip(servers, (signal.SIGTERM, signal.SIGINT, signal.SIGTERM)):
                proc.send_signal(sig)  # Ctrl-C or what systemd/kill send: each server stops cleanly
            server_out = [proc.communicate(timeout=30)[0] for proc in servers]
            for proc in clients + servers:
                if proc.poll() is None:
                    proc.kill()
    assert codes == [0, 0], outputs
    assert again.returncode == 0 and f"edge e0 is at round {ROUNDS}" in restarted, restarted
    assert not re.search(r"^round \d+:", restarted, re.M), restarted
    assert [p.returncode for p in servers] == [0, 0, 0], server_out
    assert not [out for out in server_out if "terminate called" in out or "Traceback" in out], server_out
    assert re.search(r"round 0: 2 of 2 clients, \d+ samples, tau=", server_out[2]), server_out[2]  # the edge's progress
    assert re.search(r"round 0: 1 of 1 edges", server_out[1]), server_out[1]
    tokens = 0
    final_taus = []
    for out in outputs:
        rounds = re.findall(r"round (\d+): (\d+) tokens, (\d+) to the LLM, tau=(-?[\d.]+)", out)
        assert [int(r[0]) for r in rounds] == list(range(ROUNDS)), out
        assert int(rounds[0][2]) == int(rounds[0][1]) > 0  # round 0 at tau 0: every token verified by the LLM
        assert "no edge model" not in out, out  # every round ended with the edge's model adopted
        tokens += int(re.search(r"accuracy [\d.]+ over (\d+) tokens", out).group(1))
        final_taus.append(float(rounds[-1][3]))
    assert tokens == INPUTS  # the two shards cover the inputs exactly
    assert final_taus[0] == pytest.approx(final_taus[1], abs=1e-4)  # both adopted the same global model
    assert "served" in server_out[0] and int(re.search(r"served (\d+) requests", server_out[0]).group(1)) >= INPUTS // 2
