"""`fedhlm deploy` (issue 17, item 2): brokers, bridges and each role as its own process, from one YAML."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import yaml

from fedhlm.simulation.config import ConfigError
from fedhlm.simulation.launcher import DeployConfig, Launcher, client_groups
from test_simulate import tiny_configs

pytestmark = pytest.mark.slow


def sim_config(tmp_path, clients: int = 4, edges: int = 2) -> str:
    slm, llm = tiny_configs(tmp_path)
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"slm": slm, "llm": llm}, "data": {"source": "synthetic", "inputs": 24},
        "routing": {"top_k": 4, "exploration": 0.2, "init_tau": 0.0},  # tau 0: every token goes to the LLM at first
        "federation": {"clients": clients, "edges": edges, "rounds": 2, "round_deadline_s": 30, "cloud_every": 1,
                       "clustering": "round_robin"},
        "p2p": {"enabled": False},
    }))
    return str(path)


def test_a_bridged_deployment_of_processes_runs_its_rounds_and_stops_cleanly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    out = io.StringIO()
    config = DeployConfig(simulation=sim_config(tmp_path), topology="bridged", llm_workers=2, run_dir=str(tmp_path / "d"),
                          client_timeout_s=300)
    report = Launcher(config, out=out).run()
    printed = out.getvalue()
    assert report["status"] == "complete", printed
    procs = {p["name"]: p for p in report["processes"]}
    assert set(procs) == {"llm", "llm1", "cloud", "e0", "e1", "clients-e0-c000", "clients-e1-c001"}
    assert all(p["rc"] == 0 for p in procs.values()), procs  # servers stopped by SIGTERM, cleanly
    assert report["tokens"] == 24 and report["llm_served"] >= 12  # round 0 at tau 0: every token verified
    assert {e: [r["round"] for r in rounds] for e, rounds in report["edges"].items()} == {"e0": [0, 1], "e1": [0, 1]}
    assert all(r["participants"] == r["members"] == 2 for rounds in report["edges"].values() for r in rounds)
    assert set(report["brokers"]) == {"cloud", "e0", "e1"}
    for name in ("broker cloud", "broker e0", "llm    llm1", "client clients-e0-c000"):
        assert name in printed, printed  # where everything runs
    creds = tmp_path / "d" / "credentials.json"
    assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
    assert json.loads((tmp_path / "d" / "deploy.json").read_text())["status"] == "complete"
    for p in report["processes"]:  # the client processes' credentials came from the file, not the command line
        assert "Traceback" not in open(p["log"]).read(), p["name"]
    res = report["resources"]  # what the scale measurements read: memory per role, messages per broker
    assert all(p["peak_rss_mb"] and p["peak_rss_mb"] > 20 for p in report["processes"]), report["processes"]
    assert res["by_role"]["client"]["processes"] == 2 and res["client_rss_mb_per_1000"] > 0
    # edges and the cloud read the round-0 head from initial_head.npz instead of importing torch (~430 MB with it)
    assert res["by_role"]["edge"]["peak_rss_mb_max"] < 250 and res["by_role"]["cloud"]["peak_rss_mb_max"] < 250, res
    assert set(res["brokers"]) == {"cloud", "e0", "e1"}
    for name, b in res["brokers"].items():  # every site carried its clients' tokens; the cloud the LLM's share
        assert b["peak_rss_mb"] > 0 and b["publish_received"] > 0, (name, b)


def test_a_generation_deployment_writes_titles_through_the_llm_workers_sessions(tmp_path, monkeypatch) -> None:
    """generation.enabled: the title models go into the cache first (the distilled SLM's teacher with it), then
    every client process writes its titles token by token, offloaded tokens verified in LLM sessions."""
    from test_generation_processes import tiny_title_configs

    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_title_configs(tmp_path)
    sim = tmp_path / "gen.yaml"
    sim.write_text(yaml.safe_dump({
        "models": {"slm": slm, "llm": llm}, "data": {"source": "synthetic", "inputs": 12},
        "generation": {"enabled": True, "max_new_tokens": 5},
        "methods": ["slm_only", "llm_only", "static_hlm", "fedhlm_no_p2p"],
        "routing": {"top_k": 4, "exploration": 0.0, "init_tau": 0.0},
        "federation": {"clients": 4, "edges": 2, "rounds": 2, "round_deadline_s": 30, "cloud_every": 1,
                       "clustering": "round_robin"},
        "p2p": {"enabled": False},
    }))
    out = io.StringIO()
    config = DeployConfig(simulation=str(sim), topology="bridged", llm_workers=2, run_dir=str(tmp_path / "d"),
                          client_timeout_s=300)
    report = Launcher(config, out=out).run()
    assert report["status"] == "complete", out.getvalue()
    assert all(p["rc"] == 0 for p in report["processes"]), report["processes"]
    gen = report["generation"]
    assert gen["sequences"] == 12 and report["accuracy"] is None
    assert 0 < gen["llm_tokens"] <= report["tokens"] <= 12 * 5 and 0.0 <= gen["rouge_l"] <= 1.0
    assert {e: [r["round"] for r in rounds] for e, rounds in report["edges"].items()} == {"e0": [0, 1], "e1": [0, 1]}
    for p in report["processes"]:
        assert "Traceback" not in open(p["log"]).read(), p["name"]


def test_a_bad_deploy_setting_fails_before_any_process_starts(tmp_path) -> None:
    with pytest.raises(ConfigError, match="llm_workers"):
        DeployConfig(llm_workers=0)
    with pytest.raises(ConfigError, match="nodes: not a deploy setting"):
        DeployConfig.from_yaml(None, {"nodes": 3})
    with pytest.raises(ConfigError, match="federation.clustering"):
        Launcher(DeployConfig(simulation=sim_config(tmp_path), overrides=["federation.clustering=kmeans_labels"]))


def test_clients_are_grouped_by_site_or_k_at_a_time() -> None:
    assign = {"c000": "e0", "c001": "e1", "c002": "e0", "c003": "e1", "c004": "e0"}
    assert client_groups(assign, 0) == [("e0", ["c000", "c002", "c004"]), ("e1", ["c001", "c003"])]
    assert client_groups(assign, 2) == [("e0", ["c000", "c002"]), ("e0", ["c004"]), ("e1", ["c001", "c003"])]
