"""Generation as separate processes (`fedhlm llm|cloud|edge|client` with `generation.enabled`), as in a field
trial: tiny title models - the client's distilled from the LLM's through a `config:` teacher - over a private
Mosquitto; every offloaded token is verified in the LLM worker's session of its title."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import yaml

from fedhlm.transport.broker import LocalBroker
from test_role_processes import USERS, start_federation
from test_simulate import DATA, TINY_BACKBONE, TRAINER

pytestmark = pytest.mark.slow

ROUNDS = 2
INPUTS = 12
NEW_TOKENS = 6


def tiny_title_configs(tmp_path) -> tuple[str, str]:
    data = {**DATA, "objective": "title"}
    llm = tmp_path / "gen-llm.yaml"
    llm.write_text(yaml.safe_dump({"model": {"class_path": "fedhlm.models.title_lm.TitleLM",
                                             "init_args": {"pretrained": None, **TINY_BACKBONE, "seed": 1}},
                                   "data": data, "trainer": TRAINER}))
    slm = tmp_path / "gen-slm.yaml"
    slm.write_text(yaml.safe_dump({"model": {"class_path": "fedhlm.models.title_lm.TitleLM",
                                             "init_args": {"pretrained": None, **TINY_BACKBONE, "teacher": f"config:{llm}",
                                                           "distill_weight": 1.0}},
                                   "data": data, "trainer": TRAINER}))
    return str(slm), str(llm)


def test_processes_generate_titles_through_llm_sessions_with_a_distilled_slm(tmp_path) -> None:
    from fedhlm.models.cache import fit_config_with, get_or_train

    home = tmp_path / "home"
    slm, llm = tiny_title_configs(tmp_path)
    env = {**os.environ, "FEDHLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    os.environ["FEDHLM_HOME"] = str(home)
    try:  # trained once here (the teacher first, through the student's config: teacher), not by racing processes
        cfg = fit_config_with(slm, None)
        assert cfg["kind"] == "gen"
        student = get_or_train("gen", cfg, progress=False)
    finally:
        os.environ.pop("FEDHLM_HOME")
    metrics = json.loads((student / "metrics.json").read_text())
    teacher = metrics["config"]["model"]["teacher"]
    assert teacher.startswith("cache:gen-") and (home / "models" / teacher[len("cache:"):]).is_dir()
    assert 0.0 <= metrics["test_teacher_agree"] <= 1.0  # measured against the teacher, not only the titles
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({
        "models": {"slm": slm, "llm": llm}, "data": {"source": "synthetic", "inputs": INPUTS},
        "generation": {"enabled": True, "max_new_tokens": NEW_TOKENS},
        "methods": ["slm_only", "llm_only", "static_hlm", "fedhlm_no_p2p"],
        "routing": {"top_k": 4, "exploration": 0.0, "init_tau": 0.0},  # tau 0: every token goes to the LLM
        "federation": {"rounds": ROUNDS, "round_deadline_s": 30, "cloud_every": 1}, "p2p": {"enabled": False},
    }))
    env["SIM_CONFIG"] = str(sim)
    with LocalBroker(USERS) as broker:
        servers, clients = start_federation(broker, env)
        try:
            outputs = [c.communicate(timeout=240)[0] for c in clients]
        finally:
            for proc in servers:
                proc.send_signal(signal.SIGTERM)
            server_out = [proc.communicate(timeout=30)[0] for proc in servers]
            for proc in clients + servers:
                if proc.poll() is None:
                    proc.kill()
    assert [c.returncode for c in clients] == [0, 0], outputs
    assert [p.returncode for p in servers] == [0, 0, 0], server_out
    assert not [out for out in outputs + server_out if "Traceback" in out], outputs + server_out
    titles = sent = 0
    for out in outputs:
        rounds = re.findall(r"round (\d+): (\d+) sequences, \d+ words, (\d+) tokens to the LLM, tau=", out)
        assert [int(r[0]) for r in rounds] == list(range(ROUNDS)), out
        assert "no edge model" not in out, out
        done = re.search(r"(\d+) sequences, (\d+) tokens, (\d+) to the LLM, ROUGE-L ([\d.]+)", out)
        assert done, out
        titles += int(done.group(1))
        tokens, llm_tokens = int(done.group(2)), int(done.group(3))
        assert NEW_TOKENS * int(done.group(1)) >= tokens >= llm_tokens >= int(rounds[0][2]) > 0
        sent += llm_tokens
    assert titles == INPUTS  # the two shards cover the inputs exactly
    assert re.search(r"round 0: 2 of 2 clients, [1-9]\d* samples", server_out[2]), server_out[2]  # labels from verdicts


def test_a_generation_simulation_reports_every_method_and_the_session_reuse(tmp_path, monkeypatch) -> None:
    """`fedhlm simulate` with generation.enabled, tiny distilled title models: every method's titles and the
    session-reuse benchmark (alone and at the run's concurrency) in report.json."""
    from fedhlm.simulation.config import load_config
    from fedhlm.simulation.generation import simulate_generation

    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_title_configs(tmp_path)
    cfg = load_config("configs/generation.yaml", [
        f"models.slm={slm}", f"models.llm={llm}", "data.source=synthetic", "data.inputs=24",
        "federation.clients=4", "federation.edges=2", "federation.rounds=2", "generation.max_new_tokens=5",
        "generation.calib_prompts=4", "generation.reencode_sequences=8", "routing.top_k=4"])
    report = simulate_generation(cfg, tmp_path / "run", show_progress=False)
    methods = report["methods"]
    assert set(methods) == {"slm_only", "llm_only", "static_hlm", "fedhlm_no_p2p"}
    assert methods["llm_only"]["llm_share"] == 1.0 and methods["slm_only"]["llm_share"] == 0.0
    assert methods["llm_only"]["token_agreement_with_llm"] == 1.0
    reuse = report["reencode"]
    assert reuse["batch"] == 4 and reuse["alone"]["batch"] == 1 and reuse["sequences"] == 8
    assert reuse["verified_tokens"] == reuse["alone"]["verified_tokens"] > 8  # the same work, scheduled two ways
    assert reuse["tokens_encoded"]["ratio"] > 1 and reuse["session_ms_per_token"] > 0
    assert any("session reuse" in t["goal"] for t in report["targets"])
    assert (tmp_path / "run" / "report.json").is_file()
