"""`fedhlm deploy`: a whole deployment from one YAML, each role its own process.

Brokers (one, or a site broker per edge bridged to a cloud broker: `transport.topology`), then
the LLM worker processes (`fedhlm llm` on the shared subscription), the cloud, one edge process
per site and the client processes (`fedhlm client`, one per site holding all the site's clients on
one connection loop and one SLM, or `clients_per_process` each). Every process gets its
credentials from the launcher (an environment variable, or a 0600 credentials file for a process of
many clients), logs to its own file, and is listed with its pid when it starts. The clients run the
simulation config's rounds over its test articles; when they are done the servers get SIGTERM and
the brokers stop. Ctrl-C or SIGTERM to the launcher stops everything the same way. The report
(`deploy.json`) lists the processes, their exit codes, each client's accuracy and each edge's rounds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from fedhlm.simulation.config import ConfigError, SimConfig, TopologyName, load_config
from fedhlm.transport.topology import TOPOLOGIES


@dataclass
class DeployConfig:
    """One deployment: what the roles run (a simulation config) and how they are laid out."""

    simulation: str = "configs/quick.yaml"  # models, data, routing, federation (clients, edges, rounds), p2p
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for the simulation config, passed to every role
    topology: TopologyName = "bridged"
    llm_workers: int = 1  # `fedhlm llm` processes sharing the request topic
    clients_per_process: int = 0  # 0: one process per site with all its clients; k: k clients per process
    run_dir: str | None = None  # default runs/deploy-<timestamp>
    client_timeout_s: float = 1800.0  # a client process still running after this is stopped (and the run failed)

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"topology: must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")
        if self.llm_workers < 1:
            raise ConfigError(f"llm_workers: must be >= 1, got {self.llm_workers}")
        if self.clients_per_process < 0:
            raise ConfigError(f"clients_per_process: must be >= 0 (0: one process per site), got "
                              f"{self.clients_per_process}")
        if not self.client_timeout_s > 0:
            raise ConfigError(f"client_timeout_s: must be > 0, got {self.client_timeout_s}")

    @classmethod
    def from_yaml(cls, path: str | Path | None, extra: dict[str, Any] | None = None) -> DeployConfig:
        data = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        data |= extra or {}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{unknown[0]}: not a deploy setting (known: {', '.join(cls.__dataclass_fields__)})")
        return cls(**data)


@dataclass
class Process:
    """One launched role."""

    name: str
    role: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None
    started: float = 0.0
    ended: float | None = None
    peak_rss_mb: float | None = None  # VmHWM, sampled while it runs
    _out: TextIO | None = None

    def start(self) -> None:
        self._out = self.log.open("w")
        self.popen = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"})
        self.started = time.monotonic()

    def poll(self) -> int | None:
        rc = self.popen.poll() if self.popen is not None else None
        if rc is not None and self.ended is None:
            self.ended = time.monotonic()
            if self._out is not None:
                self._out.close()
        return rc

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (every role stops cleanly on it), then SIGKILL after `timeout_s`."""
        if self.popen is None or self.poll() is not None:
            return self.poll()
        self.popen.terminate()
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        return self.poll()

    def sample_rss(self) -> None:
        from fedhlm.simulation.run import process_peak_rss_mb

        if self.popen is not None and self.poll() is None:
            peak = process_peak_rss_mb(self.popen.pid)
            if peak is not None:
                self.peak_rss_mb = max(peak, self.peak_rss_mb or 0.0)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "pid": self.popen.pid if self.popen else None,
                "rc": self.poll(), "log": str(self.log), "peak_rss_mb": self.peak_rss_mb,
                "wall_s": round((self.ended or time.monotonic()) - self.started, 2) if self.started else None}


def assignment_for(cfg: SimConfig) -> dict[str, str]:
    """Client ids c000.. and their edges as process roles know them (round robin, or the config's own)."""
    fed = cfg.federation
    if fed.clustering == "given":
        return {c: fed.assignment[c] for c in sorted(fed.assignment)}
    if fed.clustering != "round_robin":
        raise ConfigError(f"federation.clustering: a process deployment needs round_robin or given (the clients "
                          f"of a site are known before any data is seen), got {fed.clustering!r}")
    return {f"c{i:03d}": f"e{i % fed.edges}" for i in range(fed.clients)}


def client_groups(assign: dict[str, str], per_process: int) -> list[tuple[str, list[str]]]:
    """(edge, client ids) of each client process: a site's clients together, or `per_process` at a time."""
    by_edge: dict[str, list[str]] = {}
    for cid, edge in assign.items():
        by_edge.setdefault(edge, []).append(cid)
    groups = []
    for edge, ids in sorted(by_edge.items()):
        size = per_process or len(ids)
        groups += [(edge, ids[i:i + size]) for i in range(0, len(ids), size)]
    return groups


CLIENT_LINE = re.compile(r"client (.+?): accuracy ([\d.]+) over (\d+) tokens")  # "c000..c099 (100)" for many
GEN_CLIENT_LINE = re.compile(r"client (.+?): (\d+) sequences, (\d+) tokens, (\d+) to the LLM, ROUGE-L ([\d.]+)")  # generation
CLIENT_PHASES = re.compile(r"ready in ([\d.]+) s, rounds in ([\d.]+) s")
EDGE_ROUND = re.compile(r"^round (\d+): (\d+) of (\d+) clients", re.M)


class Launcher:
    """Starts, watches and stops the processes of one deployment (see the module docstring)."""

    def __init__(self, config: DeployConfig, out: TextIO = sys.stdout) -> None:
        self.config = config
        self.cfg = load_config(config.simulation, config.overrides)  # a bad setting fails here, before any process
        self.assign = assignment_for(self.cfg)
        self.run_dir = Path(config.run_dir or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out = out
        self.processes: list[Process] = []
        self.edges = sorted(set(self.assign.values()))
        self.workers = ["llm" if i == 0 else f"llm{i}" for i in range(config.llm_workers)]
        users = {**dict.fromkeys(self.assign, "client"), **dict.fromkeys(self.edges, "edge"), "cloud": "cloud",
                 **dict.fromkeys(self.workers, "llm"), "admin": "admin"}
        self.topology = TOPOLOGIES[config.topology](users, self.assign)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _role(self, name: str, role: str, *args: str, broker_user: str | None = None) -> Process:
        argv = [sys.executable, "-m", "fedhlm.cli.main", role, "--config", self.config.simulation,
                *[f"--set={o}" for o in self.config.overrides], *args]
        env = {"FEDHLM_BROKER": self.topology.address(broker_user).url} if broker_user else {}
        proc = Process(name, role, argv, env, self.run_dir / "logs" / f"{name}.log")
        self.processes.append(proc)
        return proc

    def plan(self, credentials: Path, initial: Path | None = None) -> None:
        """The processes of the deployment; `initial` (the round-0 head) spares edge and cloud loading torch."""
        head = ["--initial-params", str(initial)] if initial is not None else []
        for worker in self.workers:
            self._role(worker, "llm", broker_user=worker)
        self._role("cloud", "cloud", "--edges", ",".join(self.edges), *head, broker_user="cloud")
        neighbours = self.cfg.p2p.asks_neighbours
        for edge in self.edges:
            members = [c for c, e in self.assign.items() if e == edge]
            extra = ["--neighbours", ",".join(e for e in self.edges if e != edge)] if neighbours else []
            self._role(edge, "edge", "--clients", ",".join(members), *extra, *head, broker_user=edge)
        index = {cid: i for i, cid in enumerate(self.assign)}
        for edge, ids in client_groups(self.assign, self.config.clients_per_process):
            shard = f"{','.join(str(index[c]) for c in ids)}/{len(self.assign)}"
            name = ids[0] if len(ids) == 1 else f"clients-{edge}-{ids[0]}"
            self._role(name, "client", "--edge", edge, "--ids", ",".join(ids), "--shard", shard, "--credentials",
                       str(credentials))

    def run(self) -> dict[str, Any]:
        """Train or load the models once, start everything, wait for the clients, stop; the report."""
        import numpy as np

        from fedhlm.models.cache import fit_config_with, get_or_train
        from fedhlm.models.head_fit import initial_head_params
        from fedhlm.models.hybrid import load_slm
        from fedhlm.models.llm_backend import load_llm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        started = time.monotonic()
        overrides = self.cfg.data.model_overrides()
        if self.cfg.models.llm_backend == "local":  # into the cache now: processes must not race to train
            load_llm(self.cfg.models.llm, data_overrides=overrides)
        if self.cfg.generation.enabled:  # the generation SLM (and its teacher): a model of the cache, no classifier
            slm_cfg = fit_config_with(self.cfg.models.slm, overrides)
            get_or_train(slm_cfg.get("kind") or "gen", slm_cfg)
        else:
            load_slm(self.cfg.models.slm, data_overrides=overrides)
        status = "failed"
        with self.topology:
            credentials = self.run_dir / "credentials.json"
            credentials.write_text(json.dumps({c: self.topology.address(c).url for c in self.assign}))
            credentials.chmod(0o600)
            initial = self.run_dir / "initial_head.npz"  # edges and the cloud read it instead of importing torch
            np.savez(initial, **initial_head_params(self.cfg.routing, self.cfg.seed))
            self.plan(credentials, initial)
            for name, broker in self.topology.brokers().items():
                self.say(f"broker {name:<8} {broker.url}  (run dir {broker.run_dir})")
            try:
                for proc in self.processes:
                    proc.start()
                    self.say(f"{proc.role:<6} {proc.name:<20} pid {proc.popen.pid}  log {proc.log}")
                status = self._wait_for_clients()
            except KeyboardInterrupt:
                status = "interrupted"
                self.say("deploy: interrupted; stopping every process")
            finally:
                for proc in self.processes:
                    proc.sample_rss()
                brokers = self._broker_telemetry()
                for proc in self.processes:  # clients first (still running only on interrupt), then the servers
                    proc.stop()
        report = self._report(status, time.monotonic() - started)
        report["resources"] = self._resources(brokers)
        (self.run_dir / "deploy.json").write_text(json.dumps(report, indent=2))
        self.say(f"deploy: {status} in {report['wall_s']:.0f} s; report {self.run_dir / 'deploy.json'}")
        return report

    def _wait_for_clients(self) -> str:
        clients = [p for p in self.processes if p.role == "client"]
        servers = [p for p in self.processes if p.role != "client"]
        deadline = time.monotonic() + self.config.client_timeout_s
        self._clients_started, sampled = time.monotonic(), 0.0
        while any(p.poll() is None for p in clients):
            if time.monotonic() - sampled >= 1.0:  # peak RSS of each process, while it still has a /proc entry
                for proc in self.processes:
                    proc.sample_rss()
                sampled = time.monotonic()
            dead = [p for p in servers if p.poll() is not None]
            if dead:
                self.say(f"deploy: {dead[0].name} exited with {dead[0].poll()} (see {dead[0].log}); stopping")
                return "failed"
            if time.monotonic() > deadline:
                self.say(f"deploy: clients still running after {self.config.client_timeout_s} s; stopping")
                return "failed"
            time.sleep(0.2)
        self._clients_wall_s = time.monotonic() - self._clients_started
        return "complete" if all(p.poll() == 0 for p in clients) else "failed"

    def _broker_telemetry(self) -> dict[str, dict[str, Any]]:
        """Each broker's peak RSS and its $SYS publish totals (messages in from clients, out to subscribers)."""
        from fedhlm.simulation.run import process_peak_rss_mb
        from fedhlm.transport.topology import read_sys

        from concurrent.futures import ThreadPoolExecutor

        brokers = self.topology.brokers()
        names = ("publish/messages/received", "publish/messages/sent")
        with ThreadPoolExecutor(max_workers=min(16, len(brokers))) as pool:  # a live $SYS cycle is up to 3 s away
            read = pool.map(lambda b: read_sys(b.address("admin"), names, 5.0, fresh=True), brokers.values())
            counted = dict(zip(brokers, read))
        out = {}
        for name, broker in brokers.items():
            number = {k: int(v) for k, v in counted[name].items() if v.isdigit()}
            out[name] = {"peak_rss_mb": process_peak_rss_mb(broker.pid),
                         "publish_received": number.get("publish/messages/received"),
                         "publish_sent": number.get("publish/messages/sent")}
        return out

    def _resources(self, brokers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Memory per role and per 1,000 clients, messages/s per broker over the clients' rounds (the slowest client
        process's, start-up left out: the brokers carry next to nothing while processes load)."""
        wall = getattr(self, "_clients_wall_s", None)
        phases = [c for c in self._clients.values() if "rounds_s" in c]
        rounds_s = max((c["rounds_s"] for c in phases), default=None)
        by_role: dict[str, dict[str, Any]] = {}
        for proc in self.processes:
            entry = by_role.setdefault(proc.role, {"processes": 0, "peak_rss_mb_sum": 0.0, "peak_rss_mb_max": 0.0})
            entry["processes"] += 1
            entry["peak_rss_mb_sum"] = round(entry["peak_rss_mb_sum"] + (proc.peak_rss_mb or 0.0), 1)
            entry["peak_rss_mb_max"] = round(max(entry["peak_rss_mb_max"], proc.peak_rss_mb or 0.0), 1)
        for entry in brokers.values():
            received = entry.get("publish_received")
            entry["received_per_s"] = round(received / rounds_s, 1) if received is not None and rounds_s else None
        clients_mb = by_role.get("client", {}).get("peak_rss_mb_sum", 0.0)
        return {"clients": len(self.assign), "clients_wall_s": round(wall, 2) if wall else None,
                "client_ready_s_max": max((c["ready_s"] for c in phases), default=None),
                "client_rounds_s_max": rounds_s, "by_role": by_role,
                "client_rss_mb_per_1000": round(1000.0 * clients_mb / len(self.assign), 1) if self.assign else None,
                "brokers": brokers,
                "brokers_peak_rss_mb": round(sum(b["peak_rss_mb"] or 0.0 for b in brokers.values()), 1)}

    def _report(self, status: str, wall_s: float) -> dict[str, Any]:
        clients: dict[str, dict[str, float]] = {}
        edges: dict[str, list[dict[str, int]]] = {}
        served = 0
        for proc in self.processes:
            text = proc.log.read_text() if proc.log.exists() else ""
            if proc.role == "client":
                for ids, acc, tokens in CLIENT_LINE.findall(text):
                    clients[proc.name] = {"accuracy": float(acc), "tokens": int(tokens)}
                for ids, sequences, tokens, llm, rouge in GEN_CLIENT_LINE.findall(text):
                    clients[proc.name] = {"sequences": int(sequences), "tokens": int(tokens), "llm_tokens": int(llm),
                                          "rouge_l": float(rouge)}
                for ready, rounds in CLIENT_PHASES.findall(text):
                    clients[proc.name] |= {"ready_s": float(ready), "rounds_s": float(rounds)}
            elif proc.role == "edge":
                edges[proc.name] = [{"round": int(r), "participants": int(k), "members": int(n)}
                                    for r, k, n in EDGE_ROUND.findall(text)]
            elif proc.role == "llm":
                found = re.search(r"served (\d+) requests", text)
                served += int(found.group(1)) if found else 0
        self._clients = clients
        tokens = sum(c["tokens"] for c in clients.values())
        accuracy = (sum(c["accuracy"] * c["tokens"] for c in clients.values()) / tokens
                    if tokens and all("accuracy" in c for c in clients.values()) else None)
        generation = None
        if clients and all("sequences" in c for c in clients.values()):
            sequences = sum(c["sequences"] for c in clients.values())
            generation = {"sequences": sequences, "llm_tokens": sum(c["llm_tokens"] for c in clients.values()),
                          "rouge_l": (sum(c["rouge_l"] * c["sequences"] for c in clients.values()) / sequences
                                      if sequences else None)}
        return {"status": status, "wall_s": wall_s, "config": asdict(self.config),
                "brokers": {name: b.url for name, b in self.topology.brokers().items()},
                "processes": [p.summary() for p in self.processes],
                "clients": clients, "tokens": tokens, "accuracy": accuracy, "generation": generation, "edges": edges,
                "llm_served": served}
