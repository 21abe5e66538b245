"""Simulation config: bad fields fail before any work, naming the field; fit YAMLs read by the same parser."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from fedhlm.core.settings import FederationSettings, P2PSettings, RoutingSettings
from fedhlm.simulation.config import METHOD_NAMES, ConfigError, SimConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate_and_overrides_apply() -> None:
    cfg = load_config(overrides=["federation.clients=8", "p2p.delta=0.95", "data.alpha=0.5", "lambda_sweep=[0.05,0.1]"])
    assert cfg.federation.clients == 8 and cfg.p2p.delta == 0.95 and cfg.data.alpha == 0.5
    assert cfg.lambda_sweep == [0.05, 0.1]
    assert cfg.methods == list(METHOD_NAMES)


def test_sections_are_the_shared_settings() -> None:
    cfg = load_config()
    assert isinstance(cfg.routing, RoutingSettings) and isinstance(cfg.federation, FederationSettings)
    assert isinstance(cfg.p2p, P2PSettings)
    assert cfg.federation.trim_fraction == 0.2
    saved = cfg.to_dict()  # what report.json stores
    assert saved["federation"]["trim_fraction"] == 0.2 and saved["routing"]["lam"] == 0.1
    assert saved["data"]["source"] == "auto" and saved["models"]["slm"] == "configs/slm.yaml"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("federation.quorum=1.5", "federation.quorum"),
        ("federation.clients=zero", "federation.clients"),
        ("federation.clients=2.5", "federation.clients"),
        ("routing.verify=maybe", "routing.verify"),
        ("routing.optimizer=rmsprop", "routing.optimizer"),
        ("p2p.scope=world", "p2p.scope"),
        ("federation.colour=red", "federation.colour"),
        ("colour=red", "colour"),
        ("federation.clie=3", "federation.clie"),  # no abbreviations
        ("methods=[fedhlm, magic]", "methods[1]"),
        ("methods=fedhlm", "methods"),
        ("federation.edges=50", "federation.edges"),
        ("routing.exploration=-0.1", "routing.exploration"),
        ("routing.lam=-1", "routing.lam"),
        ("p2p.enabled=perhaps", "p2p.enabled"),
        ("p2p.delta=.nan", "p2p.delta"),
        ("data.source=web", "data.source"),
        ("data.alpha=0", "data.alpha"),
        ("data.inputs=-1", "data.inputs"),
        ("federation.trim_fraction=0.5", "federation.trim_fraction"),
        ("federation.aggregation=mode", "federation.aggregation"),
        ("lambda_sweep=[0.1, -1]", "lambda_sweep[1]"),
        ("reference_shares=[0.05, 1.5]", "reference_shares[1]"),
        ("delta_sweep=[0.9, 1.5]", "delta_sweep[1]"),
        ("broker=http://localhost:1883", "broker"),
        ("federation.clustering=given", "federation.assignment"),
        ("seed=null", "seed"),
        ("seed=-1", "seed"),
        ("routing.top_k=100000", "routing.top_k"),
        ("routing.lam=nan", "routing.lam"),
        ("routing.temperature=.nan", "routing.temperature"),
        ("data.inputs=8", "data.inputs"),  # 12 clients by default
        ("routing.head=deep", "routing.head"),
        ("routing.features=all", "routing.features"),
    ],
)
def test_bad_field_is_named(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(f"{field}:")
    assert "\n" not in str(info.value)


def test_error_messages_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"^federation\.bogus: unknown field \(known: .*clients.*trim_fraction"):
        load_config(overrides=["federation.bogus=1"])
    with pytest.raises(ConfigError, match=r"^routing\.lam: must be in \[0, inf\], got -1"):
        load_config(overrides=["routing.lam=-1"])
    with pytest.raises(ConfigError, match=r"^federation\.edges: 5 edges for 4 clients"):
        load_config(overrides=["federation.clients=4", "federation.edges=5"])
    with pytest.raises(ConfigError, match=r"^methods\[0\]: must be one of slm_only, .*got 'magic'"):
        load_config(overrides=["methods=[magic]"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["federation.clients"])
    with pytest.raises(ConfigError, match=r"^p2p\.delta_floor: must be in \[-1, 0\.9\)"):
        load_config(overrides=["p2p.delta_floor=0.95"])
    with pytest.raises(ConfigError, match=r"^p2p\.delta_floor: only an edge learns its delta"):
        load_config(overrides=["p2p.delta_floor=0.8", "p2p.resolver=peers"])
    assert load_config(overrides=["p2p.delta_floor=0.8"]).p2p.delta_floor == 0.8


def test_overrides_apply_in_order_over_the_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  clients: 6\n  edges: 2\nmethods: [fedhlm]\n")
    cfg = load_config(path, ["federation.clients=9", "federation.clients=10", "methods+=slm_only"])
    assert cfg.federation.clients == 10 and cfg.federation.edges == 2
    assert cfg.methods == ["fedhlm", "slm_only"]


def test_given_clustering_needs_every_client() -> None:
    base = ["federation.clustering=given", "federation.clients=2", "federation.edges=1"]
    with pytest.raises(ConfigError, match="^federation.assignment: no edge given for client c001"):
        load_config(overrides=[*base, "federation.assignment={c000: e0}"])
    cfg = load_config(overrides=[*base, "federation.assignment={c000: e0}", "federation.assignment.c001=e0"])
    assert cfg.federation.assignment == {"c000": "e0", "c001": "e0"}


def test_cross_field_checks_hold_outside_the_loader() -> None:
    cfg = load_config()
    with pytest.raises(ConfigError, match="^federation.edges"):
        replace(cfg, federation=replace(cfg.federation, edges=cfg.federation.clients + 1))
    with pytest.raises(ConfigError, match=r"^methods\[0\]"):
        SimConfig(methods=["magic"])


def test_yaml_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- seed: 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listed)
    good = tmp_path / "good.yaml"
    good.write_text("seed: 3\nfederation:\n  rounds: 2\n")
    cfg = load_config(good)
    assert cfg.seed == 3 and cfg.federation.rounds == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    assert load_config(empty) == SimConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("federation:\n  bogus: 5\n", r"^federation\.bogus: unknown field"),
        ("bogus: 1\n", r"^bogus: unknown field"),
        ("federation: 3\n", r"^federation: must be a mapping"),
        ("p2p:\n", r"^p2p: must be a mapping"),
        ("federation:\n  clients: zero\n", r"^federation\.clients: "),
        ("federation:\n  quorum: 0\n", r"^federation\.quorum: must be in \(0, 1\]"),
        ("data:\n  path: 5\n", r"^data\.path: "),
        ("federation:\n  assignment: {c000: [e0]}\n", r"^federation\.assignment: "),
        ("routing:\n  lam: {a: 1}\n", r"^routing\.lam: "),
    ],
)
def test_bad_field_in_a_file_is_named(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("name", ["quick.yaml", "paper.yaml", "sweep-delta.yaml", "sweep-lambda.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert set(cfg.methods) <= set(METHOD_NAMES)


def test_shipped_config_values() -> None:
    cfg = load_config(CONFIGS / "paper.yaml", ["federation.clients=20"])
    assert cfg.federation.clients == 20 and cfg.federation.edges == 4 and cfg.federation.clustering == "kmeans_labels"
    assert cfg.data.alpha == 0.5 and cfg.data.inputs == 0
    assert cfg.lambda_sweep == [0.02, 0.05, 0.1, 0.2, 0.4] and cfg.delta_sweep == [0.8, 0.9, 0.95]
    quick = load_config(CONFIGS / "quick.yaml")
    assert quick.federation.round_deadline_s == 20.0 and quick.p2p.deadline_ms == 40.0 and quick.routing.verify == "greedy"
    assert load_config(CONFIGS / "sweep-lambda.yaml").methods == ["slm_only", "llm_only", "static_hlm", "fedhlm_no_p2p"]


# ---- `fedhlm fit` YAMLs, read by the Lightning CLI's parser ----------------------------------------


def test_read_fit_config_sections() -> None:
    from fedhlm.models import cache
    cfg = cache.read_fit_config(CONFIGS / "slm.yaml")
    assert set(cfg) == {"kind", "model", "data", "trainer"}
    assert cfg["kind"] == "slm" and cache.read_fit_config(CONFIGS / "gen-llm.yaml")["kind"] == "gen"  # from class_path
    assert cfg["model"]["hidden_size"] == 128 and cfg["model"]["pretrained"] is None
    assert cfg["model"]["weight_decay"] == 0.01  # a default the YAML leaves out, written out
    assert cfg["data"]["max_length"] == 64 and cfg["data"]["source"] == "auto"
    assert cfg["trainer"] == {"max_epochs": 3, "accelerator": "auto", "devices": 1}  # only what the YAML gives
    assert cache.read_fit_config(CONFIGS / "llm.yaml")["model"]["pretrained"] == "minilm"


def test_read_fit_config_same_model_fingerprint_as_the_raw_sections() -> None:
    """Written-out defaults change no cache key: a model `fedhlm fit` cached is still found."""
    import importlib

    import yaml

    from fedhlm.models import cache
    from fedhlm.models.cache import full_config, kind_of

    for name in ("slm.yaml", "llm.yaml", "head.yaml"):
        raw = yaml.safe_load((CONFIGS / name).read_text())
        module, _, cls = raw["model"]["class_path"].rpartition(".")
        kind = kind_of(getattr(importlib.import_module(module), cls))
        parsed = cache.read_fit_config(CONFIGS / name)
        assert full_config(kind, raw["model"]["init_args"], raw["data"], raw["trainer"]) == full_config(
            kind, parsed["model"], parsed["data"], parsed["trainer"])


def test_read_fit_config_errors(tmp_path) -> None:
    from fedhlm.models import cache
    with pytest.raises(FileNotFoundError):
        cache.read_fit_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  class_path: fedhlm.models.slm.SLMModule\n  init_args:\n    hiden_size: 3\n")
    with pytest.raises(ValueError, match="hiden_size"):
        cache.read_fit_config(typo)
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  max_lenght: 3\n")
    with pytest.raises(ValueError, match="max_lenght"):
        cache.read_fit_config(data)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert cache.read_fit_config(empty)["trainer"] == {}


def test_a_generation_run_refuses_what_it_cannot_do_naming_the_field() -> None:
    """Generation routes on the basic features, asks peers only through the edge's cache with prompt embeddings,
    sweeps nothing and starts its own brokers."""
    base = ["generation.enabled=true", "methods=[slm_only,llm_only,static_hlm,fedhlm_no_p2p]"]
    for extra, field in ((["routing.features=label"], "routing.features"),
                         (["methods=[fedhlm]", "p2p.resolver=peers"], "p2p.resolver"),
                         (["methods=[fedhlm]", "p2p.representation=slm_hidden"], "p2p.representation"),
                         (["lambda_sweep=[0.1]"], "lambda_sweep"), (["broker=mqtt://u:p@127.0.0.1:1883"], "broker")):
        with pytest.raises(ConfigError, match=re.escape(field)):
            load_config(overrides=base + extra)
    assert load_config(overrides=base).generation.enabled
    assert load_config(overrides=base + ["methods=[fedhlm]", "p2p.resolver=edge"]).methods == ["fedhlm"]
