"""Simulation configuration: typed dataclasses read from YAML, with `--set a.b=c` overrides.

Every field is checked before any process starts; an error names the field
(`federation.quorum: must be in (0, 1], got 1.5`) so a bad config never costs a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range; the message names it."""


@dataclass
class DataConfig:
    source: str = "auto"  # auto | ag_news | csv | synthetic
    path: str | None = None  # file or folder; default: FEDHLM_DATA, then ../shared/data/ag_news
    inputs: int = 400  # test inputs spread over the clients (0 = the whole test split)
    alpha: float | None = None  # Dirichlet concentration over labels; None = IID


@dataclass
class ModelConfig:
    # `fedhlm fit` configs of the two models; a model missing from the cache is trained once from them
    slm: str = "configs/slm.yaml"
    llm: str = "configs/llm.yaml"


@dataclass
class RoutingConfig:
    top_k: int = 8  # entries of the SLM distribution sent to the LLM (the rest as one tail mass)
    lam: float = 0.1  # price of one transmission, in units of rejection risk
    exploration: float = 0.05  # share of confident tokens also sent, to keep beta labels unbiased
    importance_weights: bool = True  # exploration pairs weigh 1/exploration in the local loss (unbiased estimate)
    init_tau: float | None = None  # starting entropy threshold (nats); None = the calibrated static threshold
    temperature: float = 0.1  # sigmoid temperature T of s = sigmoid((u - tau) / T)
    local_steps: int = 20  # head optimiser steps per round
    lr: float = 1.0
    optimizer: str = "sgd"  # sgd | adam
    fit_engine: str = "loop"  # loop: the head module's steps in a plain loop; trainer: through a Lightning Trainer
    lr_decay: float = 1.0  # local lr / (1 + lr_decay * round)
    verify: str = "greedy"  # greedy: the LLM's argmax replaces a rejected draft; sample: speculative sampling
    llm_timeout_s: float = 10.0
    llm_retries: int = 1  # resends of a request that got no verdict (a dead shared-subscription worker keeps it)
    noise_std: float = 0.0  # Gaussian noise on uploaded threshold updates (privacy)


@dataclass
class FederationConfig:
    clients: int = 12
    edges: int = 3
    rounds: int = 6
    cloud_every: int = 2  # edge rounds per cloud round (HierFAVG)
    quorum: float = 0.75
    round_deadline_s: float = 20.0
    personalise: float = 0.0  # a in tau_i <- a tau_i + (1 - a) tau_edge
    aggregation: str = "fedavg"  # fedavg | median | trimmed_mean
    clustering: str = "round_robin"  # round_robin | given | kmeans_labels | kmeans_embeddings
    assignment: dict[str, str] = field(default_factory=dict)  # client -> edge when clustering == given


@dataclass
class P2PConfig:
    enabled: bool = True
    delta: float = 0.9
    deadline_ms: float = 40.0
    scope: str = "cluster"  # cluster | neighbours
    audit: float = 0.05  # share of peer hits also sent to the LLM to measure wrong reuse
    cache_entries: int = 2000
    ttl_s: float = 3600.0


@dataclass
class SimConfig:
    seed: int = 0
    out: str | None = None  # default runs/<timestamp>
    broker: str | None = None  # mqtt://user:pass@host:port; default a private broker
    methods: list[str] = field(default_factory=lambda: ["slm_only", "llm_only", "static_hlm", "fedhlm_no_p2p", "fedhlm"])
    lambda_sweep: list[float] = field(default_factory=list)
    delta_sweep: list[float] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    p2p: P2PConfig = field(default_factory=P2PConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


METHODS = ("slm_only", "llm_only", "static_hlm", "fedhlm_no_p2p", "fedhlm")
_CHOICES = {
    "data.source": ("auto", "ag_news", "csv", "synthetic"),
    "routing.verify": ("greedy", "sample"),
    "routing.optimizer": ("sgd", "adam"),
    "routing.fit_engine": ("loop", "trainer"),
    "federation.aggregation": ("fedavg", "median", "trimmed_mean"),
    "federation.clustering": ("round_robin", "given", "kmeans_labels", "kmeans_embeddings"),
    "p2p.scope": ("cluster", "neighbours"),
}
# field -> (low, high, low inclusive, high inclusive)
_RANGES = {
    "data.inputs": (0, None, True, True),
    "data.alpha": (0, None, False, True),
    "routing.top_k": (1, None, True, True),
    "routing.lam": (0, None, True, True),
    "routing.exploration": (0, 1, True, True),
    "routing.temperature": (0, None, False, True),
    "routing.local_steps": (0, None, True, True),
    "routing.lr": (0, None, False, True),
    "routing.lr_decay": (0, None, True, True),
    "routing.llm_timeout_s": (0, None, False, True),
    "routing.llm_retries": (0, None, True, True),
    "routing.noise_std": (0, None, True, True),
    "federation.clients": (1, None, True, True),
    "federation.edges": (1, None, True, True),
    "federation.rounds": (1, None, True, True),
    "federation.cloud_every": (1, None, True, True),
    "federation.quorum": (0, 1, False, True),
    "federation.round_deadline_s": (0, None, False, True),
    "federation.personalise": (0, 1, True, True),
    "p2p.delta": (-1, 1, True, True),
    "p2p.deadline_ms": (0, None, False, True),
    "p2p.audit": (0, 1, True, True),
    "p2p.cache_entries": (1, None, True, True),
    "p2p.ttl_s": (0, None, False, True),
}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check (and gently convert) one value against its annotation."""
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
        return _build(hint, value, name + ".")
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: must be a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{name}: must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}: must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def validate(cfg: SimConfig) -> SimConfig:
    """Range and choice checks across the whole config; raises ConfigError naming the field."""
    flat = _flatten(cfg.to_dict())
    for name, choices in _CHOICES.items():
        if flat[name] not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {flat[name]!r}")
    for name, (lo, hi, lo_inc, hi_inc) in _RANGES.items():
        value = flat[name]
        if value is None:
            continue
        bad = (lo is not None and (value < lo if lo_inc else value <= lo)) or (
            hi is not None and (value > hi if hi_inc else value >= hi)
        )
        if bad:
            left, right = ("[" if lo_inc else "("), ("]" if hi_inc else ")")
            raise ConfigError(f"{name}: must be in {left}{lo}, {'inf' if hi is None else hi}{right}, got {value!r}")
    for i, m in enumerate(cfg.methods):
        if m not in METHODS:
            raise ConfigError(f"methods[{i}]: must be one of {', '.join(METHODS)}, got {m!r}")
    for i, lam in enumerate(cfg.lambda_sweep):
        if lam < 0:
            raise ConfigError(f"lambda_sweep[{i}]: must be >= 0, got {lam}")
    for i, d in enumerate(cfg.delta_sweep):
        if not -1 <= d <= 1:
            raise ConfigError(f"delta_sweep[{i}]: must be in [-1, 1], got {d}")
    fed = cfg.federation
    if fed.edges > fed.clients:
        raise ConfigError(f"federation.edges: {fed.edges} edges for {fed.clients} clients; need edges <= clients")
    if fed.clustering == "given":
        ids = {f"c{i:03d}" for i in range(fed.clients)}
        missing = sorted(ids - set(fed.assignment))
        if missing:
            raise ConfigError(f"federation.assignment: no edge given for client {missing[0]}")
    if cfg.broker is not None and not cfg.broker.startswith(("mqtt://", "mqtts://")):
        raise ConfigError("broker: must be an mqtt:// or mqtts:// URL")
    return cfg


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in {"assignment"}:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """`a.b=c` into a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimConfig:
    """Read a YAML config (or the defaults), apply overrides, check every field."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validate(_build(SimConfig, data))
