"""SIGTERM and operator mistakes at the command line: what `timeout`, `kill`, systemd and CI send.

Each test runs the real `fedhlm` command as a subprocess with its own private Mosquitto.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

FEDHLM = [sys.executable, "-m", "fedhlm"]


def mosquitto_pids(marker: str) -> list[int]:
    """Mosquitto processes whose command line names `marker` (a run folder)."""
    out = subprocess.run(["pgrep", "-f", f"mosquitto -c .*{marker}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start_broker_cli(*args: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([*FEDHLM, "broker", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return proc, lines
    proc.kill()
    raise AssertionError(f"fedhlm broker did not come up: {lines} {proc.stderr.read()}")


def test_sigterm_stops_fedhlm_broker_and_its_mosquitto_and_removes_its_files() -> None:
    proc, lines = start_broker_cli("--clients", "2", "--edges", "1")
    run_dir = next(line for line in lines if "run dir" in line).split("run dir ")[1].rstrip(")\n")
    assert mosquitto_pids(run_dir), "no mosquitto for the run dir"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not mosquitto_pids(run_dir), "SIGTERM left mosquitto running"
    assert not Path(run_dir).exists(), "SIGTERM left the run folder (password hashes, ACL) behind"


def test_fedhlm_broker_keeps_credentials_in_its_run_dir_across_restarts(tmp_path) -> None:
    run_dir = tmp_path / "broker"
    first, lines1 = start_broker_cli("--run-dir", str(run_dir), "--clients", "1", "--edges", "1")
    first.send_signal(signal.SIGTERM)
    assert first.wait(15) == 0
    creds = run_dir / "credentials.json"
    assert creds.is_file() and (creds.stat().st_mode & 0o777) == 0o600
    second, lines2 = start_broker_cli("--run-dir", str(run_dir), "--clients", "1", "--edges", "1")
    second.send_signal(signal.SIGTERM)
    second.wait(15)
    urls = lambda lines: sorted(line.split("://", 1)[1].split("@")[0] for line in lines if "://" in line and "@" in line)  # noqa: E731
    assert urls(lines1) == urls(lines2) and len(urls(lines1)) == 5  # the same user:password pairs
    assert json.loads(creds.read_text())["c000"] in "".join(lines2)


def test_fedhlm_broker_on_a_busy_port_fails_clearly() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([*FEDHLM, "broker", "--port", str(port)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"port {port}" in done.stderr and "already in use" in done.stderr
    assert "listening" not in done.stdout


def test_fedhlm_broker_exits_non_zero_when_its_mosquitto_dies() -> None:
    proc, lines = start_broker_cli("--clients", "1", "--edges", "1")
    run_dir = next(line for line in lines if "run dir" in line).split("run dir ")[1].rstrip(")\n")
    for pid in mosquitto_pids(run_dir):
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(15) == 1
    assert "mosquitto exited unexpectedly" in proc.stderr.read()


@pytest.mark.slow
def test_a_broker_that_dies_mid_simulation_makes_a_degraded_run_that_exits_non_zero(tmp_path, monkeypatch,
                                                                                      capsys) -> None:
    """kill -9 of the private broker in round 1: the clients fall back to their drafts, and the run says so in
    its status, its table and its exit code (3), unless --tolerate-degraded."""
    from fedhlm.cli.simulate import main as simulate_main
    from fedhlm.roles.deployment import Deployment
    from fedhlm.transport.broker import LocalBroker
    from test_simulate import tiny_configs

    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    started: list[LocalBroker] = []
    real_start, real_round = LocalBroker.start, Deployment.run_round

    def start(self):  # noqa: ANN001
        started.append(self)
        return real_start(self)

    def run_round(self, round_, items, skip=None):  # noqa: ANN001
        if round_ == 1:
            started[-1].kill()  # SIGKILL: no goodbye to anyone
        return real_round(self, round_, items, skip)

    monkeypatch.setattr(LocalBroker, "start", start)
    monkeypatch.setattr(Deployment, "run_round", run_round)
    args = ["--set", f"models.slm={slm}", "--set", f"models.llm={llm}", "--set", "data.source=synthetic",
            "--set", "data.inputs=24", "--set", "federation.clients=2", "--set", "federation.edges=1",
            "--set", "federation.rounds=2", "--set", "federation.round_deadline_s=1", "--set", "routing.llm_timeout_s=0.5",
            "--set", "routing.llm_retries=0", "--set", "methods=[llm_only]", "--set", "reference_shares=[]",
            "--no-progress"]
    rc = simulate_main([*args, "--out", str(tmp_path / "a")])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rc == 3
    assert report["status"] == "degraded"
    reasons = report["degraded"]["llm_only"]
    assert any("broker died" in r for r in reasons) and any("fell back" in r for r in reasons)
    assert "DEGRADED llm_only" in capsys.readouterr().out
    assert simulate_main([*args, "--tolerate-degraded", "--out", str(tmp_path / "b")]) == 0


@pytest.mark.slow
def test_sigterm_to_fedhlm_simulate_writes_its_partial_report_and_leaves_no_broker(tmp_path) -> None:
    from test_simulate import tiny_configs

    slm, llm = tiny_configs(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "FEDHLM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*FEDHLM, "simulate", "--set", f"models.slm={slm}", "--set", f"models.llm={llm}",
                             "--set", "data.source=synthetic", "--set", "data.inputs=48", "--set", "federation.clients=4",
                             "--set", "federation.edges=2", "--set", "federation.rounds=40", "--set",
                             "methods=[fedhlm_no_p2p]", "--set", "reference_shares=[]", "--no-progress",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + 240
    brokers: list[int] = []
    while time.monotonic() < deadline and not brokers:  # wait until its private broker runs (rounds have begun)
        time.sleep(0.2)
        brokers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid), "mosquitto"], capture_output=True,
                                                   text=True).stdout.split()]
    assert brokers, "the simulation never started its broker"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130, proc.stdout.read()
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    assert not any(Path(f"/proc/{pid}").exists() for pid in brokers), "SIGTERM left the simulation's mosquitto running"


@pytest.mark.parametrize("bad", ["x", "3/2", "1/0"])
def test_a_bad_shard_is_a_one_line_usage_error(bad: str) -> None:
    done = subprocess.run([*FEDHLM, "client", "--broker", "mqtt://a:b@127.0.0.1:1", "--shard", bad],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--shard" in done.stderr and "Traceback" not in done.stderr


def test_a_role_pointed_at_no_broker_fails_in_one_line_before_loading_a_model() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    done = subprocess.run([*FEDHLM, "client", "--broker", f"mqtt://c000:pw@127.0.0.1:{port}", "--edge", "e0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "cannot reach the broker" in done.stderr and "Traceback" not in done.stderr
    assert "pw" not in done.stderr  # the password stays out of the message
    assert time.monotonic() - started < 30  # no SLM was loaded first


def test_a_role_with_wrong_credentials_fails_in_one_line() -> None:
    from fedhlm.transport.broker import LocalBroker

    with LocalBroker({"e0": "edge", "c000": "client"}) as broker:
        addr = broker.address("e0")
        url = f"mqtt://e0:wrong@{addr.host}:{addr.port}"
        done = subprocess.run([*FEDHLM, "edge", "--broker", url, "--clients", "c000"], capture_output=True, text=True,
                              timeout=90)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "wrong" not in done.stderr.splitlines()[-1]


def test_a_simulation_pointed_at_no_broker_fails_before_preparing_anything(tmp_path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run([*FEDHLM, "simulate", "--broker", f"mqtt://a:pw@127.0.0.1:{port}", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "cannot reach the broker" in done.stderr and "Traceback" not in done.stderr
    assert "preparing" not in done.stdout and not (tmp_path / "r").exists()


def test_a_missing_data_file_is_a_config_error_and_a_malformed_one_a_single_line(tmp_path) -> None:
    from test_simulate import tiny_configs

    done = subprocess.run([*FEDHLM, "simulate", "--set", f"data.eval_path={tmp_path / 'missing.csv'}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "data.eval_path: no such file" in done.stderr and "Traceback" not in done.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("1,a title,a text\nx,another title,another text\n")
    slm, llm = tiny_configs(tmp_path)
    env = {**os.environ, "FEDHLM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*FEDHLM, "simulate", "--set", f"models.slm={slm}", "--set", f"models.llm={llm}",
                           "--set", f"data.eval_path={bad}", "--set", "data.source=files", "--no-progress",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"{bad}: line 2: label 'x' is not an integer" in done.stderr
