"""`fedhlm simulate` end to end: tiny models, the generated corpus, a real private Mosquitto."""

from __future__ import annotations

import json

import numpy as np

import pytest
import yaml

from fedhlm.simulation import run as sim
from fedhlm.cli.simulate import main as simulate_main
from fedhlm.simulation.config import load_config

TINY_BACKBONE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position": 64,
                 "embeddings_from": None}
DATA = {"source": "synthetic", "synthetic_size": 320, "max_length": 32, "batch_size": 32, "seed": 0}
TRAINER = {"max_epochs": 1, "max_steps": 4, "limit_val_batches": 1, "limit_test_batches": 2}


def tiny_configs(tmp_path, data: dict | None = None) -> tuple[str, str]:
    data = data or DATA
    slm = tmp_path / "slm.yaml"
    llm = tmp_path / "llm.yaml"
    slm.write_text(yaml.safe_dump({"model": {"class_path": "fedhlm.models.slm.SLMModule",
                                             "init_args": {"pretrained": None, **TINY_BACKBONE, "topk": 4}},
                                   "data": data, "trainer": TRAINER}))
    llm.write_text(yaml.safe_dump({"model": {"class_path": "fedhlm.models.llm.LLMRefiner",
                                             "init_args": {"pretrained": None, **TINY_BACKBONE}},
                                   "data": data, "trainer": TRAINER}))
    return str(slm), str(llm)


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    return load_config(overrides=[
        f"models.slm={slm}", f"models.llm={llm}", "data.source=synthetic", "data.inputs=48",
        "federation.clients=4", "federation.edges=2", "federation.rounds=2", "federation.round_deadline_s=5",
        "routing.exploration=0.2", "p2p.delta=0.5", "p2p.audit=0.3", "routing.top_k=4",
    ])


@pytest.mark.slow
def test_small_simulation_writes_a_consistent_report(tiny_cfg, tmp_path) -> None:
    out = tmp_path / "run"
    report = sim.simulate(tiny_cfg, out, show_progress=False)
    assert report["status"] == "complete"
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["methods"]) == {"slm_only", "llm_only", "static_hlm", "fedhlm_no_p2p", "fedhlm"}
    assert saved["consistency_problems"] == []
    for name, m in saved["methods"].items():
        t = m["tokens"]
        assert t["local"] + t["peer"] + t["llm"] == t["total"] == 48, name
        assert 0.0 <= m["accuracy"] <= 1.0
    b = {name: m["bytes"] for name, m in saved["methods"].items()}
    assert b["slm_only"]["uplink"] == 0 and b["slm_only"]["downlink"] == 0
    assert saved["methods"]["llm_only"]["tokens"]["llm"] == 48
    assert b["llm_only"]["llm"] > 0 and b["llm_only"]["p2p"] == 0 and b["llm_only"]["fl"] == 0
    assert b["fedhlm_no_p2p"]["fl"] > 0 and b["fedhlm_no_p2p"]["p2p"] == 0
    assert b["fedhlm"]["fl"] > 0
    # through the edge (the default resolver) only the edge's answers are peer traffic; its misses go on as LLM requests
    assert (b["fedhlm"]["p2p"] > 0) == (saved["methods"]["fedhlm"]["peer"]["edge_cache"]["hits"] > 0)
    fed = saved["federated"]
    assert [r["round"] for r in fed["rounds"]] == [0, 1]
    assert set(fed["rounds"][-1]["clients"]) == {"c000", "c001", "c002", "c003"}
    assert fed["transmissions"]["updates"] == 4 * 2
    assert any(t["goal"].startswith("FedHLM sends the LLM") for t in saved["targets"])
    ref = saved["reference"]  # computed in-process; it must agree with what the clients and the LLM service did
    assert ref["articles"] == 48 and [p["share"] for p in ref["at_shares"]] == [0.02, 0.05, 0.1, 0.2]
    assert ref["slm_accuracy"] == pytest.approx(saved["methods"]["slm_only"]["accuracy"])
    assert ref["llm_accuracy"] == pytest.approx(saved["methods"]["llm_only"]["accuracy"])  # greedy verification
    dense = ref["dense"]
    assert dense[0]["oracle"] == dense[0]["uncertainty"] == pytest.approx(ref["slm_accuracy"])
    assert dense[-1]["uncertainty"] == pytest.approx(ref["llm_accuracy"])
    assert all(p["oracle"] >= p["uncertainty"] - 1e-12 for p in dense)
    assert set(ref["methods"]) == set(saved["methods"]) and "oracle_gain_captured" in ref["methods"]["fedhlm"]
    for png in ("llm_per_round.png", "accuracy_vs_transmissions.png", "threshold_convergence.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow
def test_a_five_class_csv_trains_and_simulates_in_its_own_classes(tmp_path, monkeypatch) -> None:
    import csv

    from fedhlm.data import load_task, synthetic_corpus

    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    path = tmp_path / "five.csv"
    with path.open("w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(
            (it.label + 1, it.title, it.description) for it in synthetic_corpus(300, seed=1, num_classes=5))
    data = {**DATA, "task": "bbc_news", "source": "files", "train_path": str(path), "holdout": [0.1, 0.1, 0.2]}
    slm, llm = tiny_configs(tmp_path, data)
    cfg = load_config(overrides=[
        f"models.slm={slm}", f"models.llm={llm}", "data.inputs=0", "federation.clients=3", "federation.edges=1",
        "federation.rounds=2", "federation.round_deadline_s=5", "methods=[slm_only,llm_only,fedhlm_no_p2p]",
        "routing.top_k=4",
    ])
    report = sim.simulate(cfg, tmp_path / "run", show_progress=False)
    assert report["status"] == "complete" and report["consistency_problems"] == []
    task = load_task("bbc_news")
    assert report["data"]["task"] == "bbc_news" and report["data"]["classes"] == list(task.class_names)
    assert report["data"]["train"] == str(path) and report["data"]["eval"] is None
    assert report["data"]["splits"] == {"train": 180, "val": 30, "calib": 30, "test": 60}
    hist = report["data"]["label_histograms"]
    assert len(hist) == 3 and all(len(h) == 5 for h in hist) and [sum(col) for col in zip(*hist)] == [12] * 5
    for name, m in report["methods"].items():
        assert m["tokens"]["total"] == 60, name
    for kind in ("slm", "llm"):
        saved = json.loads((tmp_path / "home" / "models" / report["models"][kind].rsplit("/", 1)[1]
                            / "metrics.json").read_text())
        assert saved["config"]["model"]["task"] == "bbc_news" and 0 <= saved["test_acc"] <= 1


def test_config_error_names_the_field_before_anything_starts(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    rc = simulate_main(["--set", "federation.quorum=2", "--out", str(out)])
    assert rc == 2
    assert "federation.quorum" in capsys.readouterr().err
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_before_anything_starts(tmp_path, capsys) -> None:
    afile = tmp_path / "report.txt"
    afile.write_text("keep me")
    assert simulate_main(["--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep me"


@pytest.mark.slow
def test_interrupted_run_still_writes_its_partial_report(tiny_cfg, tmp_path, monkeypatch) -> None:
    real = sim.run_method
    calls = {"n": 0}

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "run_method", interrupt_on_third)
    out = tmp_path / "partial"
    report = sim.simulate(tiny_cfg, out, show_progress=False)
    saved = json.loads((out / "report.json").read_text())
    assert report["status"] == saved["status"] == "interrupted"
    assert set(saved["methods"]) == {"slm_only", "llm_only"}


@pytest.mark.slow
def test_simulation_over_a_given_broker_with_one_shared_account(tiny_cfg, tmp_path) -> None:
    import dataclasses
    import threading

    from fedhlm.transport.broker import LocalBroker
    from fedhlm.transport import topics
    from fedhlm.transport.endpoint import Endpoint

    # a user's broker that lets one account hold several sessions (ours binds client id to username)
    with LocalBroker({"ops": "admin"}, username_as_client_id=False) as broker:
        url = broker.address("ops").url
        cfg = dataclasses.replace(tiny_cfg, broker=url, methods=["llm_only", "fedhlm_no_p2p"])
        report = sim.simulate(cfg, tmp_path / "ext", show_progress=False)
        assert report["status"] == "complete"
        assert report["methods"]["fedhlm_no_p2p"]["fl"]["updates_aggregated"] == 4 * 2
        assert broker.address("ops").password not in (tmp_path / "ext" / "report.json").read_text()

        def retained_global() -> bool:
            got = threading.Event()
            with Endpoint(broker.address("ops").for_role("probe")) as probe:
                probe.subscribe(topics.global_model(), lambda _m: got.set(), qos=1)
                probe.wait_connected()
                return got.wait(1.0)

        assert retained_global()  # the run left its global model retained ...
        sim.clear_models(broker.address("ops").for_role("cleaner"), ["e0", "e1"])
        assert not retained_global()  # ... and a new run starts by clearing it


@pytest.mark.slow
def test_a_target_share_reaches_the_report_of_a_simulation(tmp_path, monkeypatch) -> None:
    """`routing.target_share` instead of lambda, from the config through the clients to the report's targets. The
    tiny random SLM's entropies are packed within 1e-4 nats, tighter than the federated share curve's grid, so
    where the share lands says nothing here; tests/test_target_share_broker.py checks the precision on spread
    entropies (IID and non-IID clients)."""
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    report = sim.simulate(load_config(overrides=[
        f"models.slm={slm}", f"models.llm={llm}", "data.source=synthetic", "data.inputs=160", "federation.clients=4",
        "federation.edges=2", "federation.rounds=3", "federation.round_deadline_s=30", "federation.quorum=1.0",
        "routing.exploration=0.1", "routing.top_k=4", "methods=[fedhlm_no_p2p]", "reference_shares=[]",
        "routing.target_share=0.4"]), tmp_path / "t", show_progress=False)
    goal = next(t for t in report["targets"] if "target_share" in t["goal"])
    assert goal["measured"] == pytest.approx(report["methods"]["fedhlm_no_p2p"]["llm_share"])
    assert report["config"]["routing"]["target_share"] == 0.4 and "reference" not in report
    assert report["federated"]["rounds"][-1]["clients"]  # every round closed with the clients' curves


@pytest.mark.slow
def test_a_target_agreement_with_the_llm_sets_how_much_is_sent_over_a_real_broker(tmp_path, monkeypatch) -> None:
    """`routing.target_agreement`: clients keep tokens only while their weighted rejection risk allows. The
    tiny random SLM seldom agrees with the tiny LLM, so a strict target sends far more than a loose one;
    agreement with the LLM is measured on every token of the run. (Its entropies are packed within 1e-4
    nats, so the edge's average of the clients' taus lands mid-pack: 73 % sent for 95 %, not all.)"""
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    common = [f"models.slm={slm}", f"models.llm={llm}", "data.source=synthetic", "data.inputs=160",
              "federation.clients=4", "federation.edges=2", "federation.rounds=4", "federation.round_deadline_s=5",
              "routing.exploration=0.1", "routing.top_k=4", "methods=[llm_only,fedhlm_no_p2p]", "reference_shares=[]"]
    late = {}
    for target in (0.3, 0.95):
        report = sim.simulate(load_config(overrides=[*common, f"routing.target_agreement={target}"]),
                              tmp_path / f"a{target}", show_progress=False)
        m = report["methods"]
        assert m["llm_only"]["agreement_with_llm"] == 1.0  # greedy: the LLM's own answers
        rounds = report["rounds"]["by_method"]["fedhlm_no_p2p"][1:]  # after the first local fit
        late[target] = sum(r["llm"] for r in rounds) / sum(r["total"] for r in rounds)
        assert any("target_agreement" in t["goal"] for t in report["targets"])
        print(f"\ntarget agreement {target}: agreement {m['fedhlm_no_p2p']['agreement_with_llm']:.3f}, "
              f"sent {late[target]:.3f} after round 0")
    assert late[0.95] >= late[0.3] + 0.2 and late[0.3] <= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("head,features", [("linear", "label"), ("mlp", "hidden")])
def test_a_richer_head_trains_federated_over_a_real_broker_and_is_compared_with_its_central_fit(
        head, features, tmp_path, monkeypatch) -> None:
    """`routing.head` / `routing.features`: every client drafts the wider feature vector, fits the same seeded
    head, the edges and the cloud average all its parameters; the report sets the federated head's pooled
    loss beside the same head fitted centrally on the pooled pairs."""
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    overrides = [f"models.slm={slm}", f"models.llm={llm}", "data.source=synthetic", "data.inputs=120",
                 "federation.clients=4", "federation.edges=2", "federation.rounds=3", "federation.round_deadline_s=5",
                 "federation.cloud_every=1", "routing.exploration=0.2", "routing.top_k=4", "routing.hidden_dim=4",
                 f"routing.head={head}", f"routing.features={features}", "methods=[fedhlm_no_p2p]",
                 "reference_shares=[]"]
    report = sim.simulate(load_config(overrides=overrides), tmp_path / "r", show_progress=False)
    fed = report["federated"]
    width = {"label": 8, "hidden": 12}[features]
    assert fed["head"] == head and fed["features"] == features and fed["pairs"] > 0
    assert np.shape(fed["final_params"]["weight"]) == (width,)
    assert not np.allclose(fed["final_params"]["weight"], np.eye(width)[0])  # the non-entropy weights learned
    assert fed["central_loss"] > 0 and fed["loss_ratio"] >= 0.99  # the central fit is the optimum's reference
    warm = report["warm_start"]["calibration_fit"]  # the round-0 model: the head fitted on the calibration pairs
    assert warm["pairs"] > 0 and warm["loss_after"] <= warm["loss_before"]
    print(f"\n{head}/{features}: federated loss {fed['federated_loss']:.5f}, central {fed['central_loss']:.5f}, "
          f"ratio {fed['loss_ratio']:.3f}")
    assert report["methods"]["fedhlm_no_p2p"]["fl"]["updates_rejected"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("representation", ["embedder", "slm_hidden"])
def test_repeated_deliveries_are_answered_by_the_edges_cache_instead_of_the_llm(tmp_path, monkeypatch,
                                                                                 representation: str) -> None:
    """A workload where each article reaches ~3 clients: FedHLM through the edges' caches sends the LLM far fewer
    tokens than FedHLM without P2P on the same deliveries, and every reused token is the LLM's token for that text;
    the context represented by the sentence embedder or by the SLM's own hidden state."""
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    cfg = load_config(overrides=[
        f"models.slm={slm}", f"models.llm={llm}", "data.source=synthetic", "data.inputs=60",
        "federation.clients=4", "federation.edges=2", "federation.rounds=3", "federation.round_deadline_s=5",
        "routing.exploration=0.0", "routing.top_k=4", "routing.init_tau=-1", "federation.quorum=1.0",
        "methods=[llm_only,fedhlm_no_p2p,fedhlm]", "reference_shares=[]", "workload.deliveries=3",
        "workload.locality=1.0", "p2p.audit=0.0", f"p2p.representation={representation}"])
    report = sim.simulate(cfg, tmp_path / "run", show_progress=False)
    assert report["status"] == "complete"
    w = report["workload"]
    assert w["articles"] == 60 and w["total_deliveries"] == 180 and w["repeats_same_cluster"] == 1.0
    m = report["methods"]
    assert m["fedhlm"]["tokens"]["total"] == m["fedhlm_no_p2p"]["tokens"]["total"] == 180
    cache = m["fedhlm"]["peer"]["edge_cache"]
    assert cache["hits"] > 0 and cache["learned"] > 0 and cache["refused"] == 0
    # a repeat at the same client is answered from its own cache before the edge is asked
    assert m["fedhlm"]["tokens"]["peer"] == cache["hits"] + m["fedhlm"]["peer"]["own_cache_hits"]
    assert m["fedhlm"]["tokens"]["llm"] < m["fedhlm_no_p2p"]["tokens"]["llm"]
    # an exact repeat gets the token the LLM gave the same text: as accurate as asking the LLM again
    assert m["fedhlm"]["accuracy"] == pytest.approx(m["llm_only"]["accuracy"], abs=0.02)
    assert m["fedhlm"]["peer"]["label_error"] is not None and m["fedhlm"]["peer"]["wrong_reuse_ci95"] is None  # no audit
    by = m["fedhlm"]["peer"]["by_delivery"]  # reuse apart for first deliveries, exact and near repeats
    assert (by["first"]["tokens"], by["exact_repeat"]["tokens"], by["near_repeat"]["tokens"]) == (60, 120, 0)
    assert by["first"]["reused"] + by["exact_repeat"]["reused"] == m["fedhlm"]["tokens"]["peer"]
    assert by["exact_repeat"]["reused"] > 0


@pytest.mark.slow
def test_a_simulation_over_bridged_site_brokers_gives_the_flat_runs_results(tiny_cfg, tmp_path) -> None:
    """topology: bridged runs each edge site on its own Mosquitto bridged to a cloud broker (issue 17, item 1)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, methods=["llm_only", "fedhlm_no_p2p"], reference_shares=[])
    flat = sim.simulate(cfg, tmp_path / "flat", show_progress=False)
    bridged = sim.simulate(dataclasses.replace(cfg, topology="bridged"), tmp_path / "bridged", show_progress=False)
    assert bridged["status"] == flat["status"] == "complete"
    for name in ("llm_only", "fedhlm_no_p2p"):
        assert bridged["methods"][name]["accuracy"] == flat["methods"][name]["accuracy"], name
        assert bridged["methods"][name]["tokens"] == flat["methods"][name]["tokens"], name
    assert bridged["config"]["topology"] == "bridged"
    assert set(bridged["methods"]["fedhlm_no_p2p"]["brokers"]["by_broker"]) == {"cloud", "e0", "e1"}
    assert set(flat["methods"]["fedhlm_no_p2p"]["brokers"]["by_broker"]) == {"broker"}
