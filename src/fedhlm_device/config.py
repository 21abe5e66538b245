"""Device configuration: command line over environment over a YAML file over defaults.

    fedhlm-device --broker mqtts://host:8883 --id c001 --edge e0 --model DIR [--config device.yaml]

Environment: FEDHLM_BROKER, FEDHLM_ID, FEDHLM_EDGE, FEDHLM_MODEL (and FEDHLM_PASSWORD when the
URL carries no password). The YAML file has the same top-level keys as DeviceConfig and a
`routing:`, `federation:` and `p2p:` sections of a simulation config (the same names and defaults, so a
device and a `fedhlm client` given one file train the same head) and a `settings:` map of the
other client settings (`policy`, `seed`, ...).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhlm.transport.address import BrokerAddress
from fedhlm_device.client import DeviceSettings

ENV = {"broker": "FEDHLM_BROKER", "id": "FEDHLM_ID", "edge": "FEDHLM_EDGE", "model": "FEDHLM_MODEL"}
PASSWORD_ENV = "FEDHLM_PASSWORD"


@dataclass
class DeviceConfig:
    broker: str = ""
    id: str = ""
    edge: str = ""
    model: str = ""
    precision: str = "fp32"  # fp32 | int8
    threads: int = 1  # ONNX Runtime intra-op threads
    ca_certs: str | None = None  # CA bundle for mqtts:// brokers with a private CA
    inputs: str | None = None  # CSV (label,title,description) or text file, one input a line; '-' = stdin
    rounds: int = 1
    per_round: int = 50
    state_dir: str = "~/.fedhlm-device"
    settings: dict[str, Any] = field(default_factory=dict)  # policy, static_tau, seed, embedder_name
    routing: dict[str, Any] = field(default_factory=dict)  # core.settings.RoutingSettings fields
    federation: dict[str, Any] = field(default_factory=dict)  # core.settings.FederationSettings fields
    p2p: dict[str, Any] = field(default_factory=lambda: {"enabled": False})  # a device has no embedder: off

    def check(self) -> None:
        for name in ("broker", "id", "edge", "model"):
            if not getattr(self, name):
                raise ValueError(f"{name}: not set (--{name}, {ENV[name]} or the config file)")
        if self.precision not in ("fp32", "int8"):
            raise ValueError(f"precision: must be fp32 or int8, got {self.precision!r}")
        if self.rounds < 1 or self.per_round < 1 or self.threads < 1:
            raise ValueError("rounds, per_round and threads must be >= 1")

    def address(self) -> BrokerAddress:
        address = BrokerAddress.from_url(self.broker)
        if not address.username:
            address = dataclasses.replace(address, username=self.id)
        if address.password is None and os.environ.get(PASSWORD_ENV):
            address = dataclasses.replace(address, password=os.environ[PASSWORD_ENV])
        if self.ca_certs:
            address = dataclasses.replace(address, ca_certs=str(Path(self.ca_certs).expanduser()))
        return address

    def device_settings(self) -> DeviceSettings:
        sections = {**self.settings, "routing": self.routing, "federation": self.federation, "p2p": self.p2p}
        return DeviceSettings.from_sections(sections, client_id=self.id, edge_id=self.edge,
                                            state_dir=str(Path(self.state_dir).expanduser() / self.id))


def load_config(path: str | None, overrides: dict[str, Any], environ: dict[str, str] | None = None) -> DeviceConfig:
    """File, then environment, then the non-None `overrides` (the command line)."""
    import yaml

    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if path:
        file = Path(path).expanduser()
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"config {file}: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"config {file}: expected a mapping at the top level")
        known = {f.name for f in dataclasses.fields(DeviceConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"config {file}: unknown keys {unknown} (known: {sorted(known)})")
        values |= loaded
    values |= {key: environ[var] for key, var in ENV.items() if environ.get(var)}
    values |= {k: v for k, v in overrides.items() if v is not None}
    config = DeviceConfig(**values)
    config.check()
    return config
