"""Simulation config: bad fields fail before any work, naming the field."""

from __future__ import annotations

import pytest

from fedhlm.simulation.config import ConfigError, load_config


def test_defaults_validate_and_overrides_apply() -> None:
    cfg = load_config(overrides=["federation.clients=8", "p2p.delta=0.95", "data.alpha=0.5", "lambda_sweep=[0.05,0.1]"])
    assert cfg.federation.clients == 8 and cfg.p2p.delta == 0.95 and cfg.data.alpha == 0.5
    assert cfg.lambda_sweep == [0.05, 0.1]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("federation.quorum=1.5", "federation.quorum"),
        ("federation.clients=zero", "federation.clients"),
        ("routing.verify=maybe", "routing.verify"),
        ("p2p.scope=world", "p2p.scope"),
        ("federation.colour=red", "federation.colour"),
        ("methods=[fedhlm, magic]", "methods[1]"),
        ("federation.edges=50", "federation.edges"),
        ("routing.exploration=-0.1", "routing.exploration"),
        ("p2p.enabled=perhaps", "p2p.enabled"),
    ],
)
def test_bad_field_is_named(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(field)


def test_yaml_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("seed: 3\nfederation:\n  rounds: 2\n")
    cfg = load_config(good)
    assert cfg.seed == 3 and cfg.federation.rounds == 2
