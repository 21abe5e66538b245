"""Simulation configuration: typed dataclasses read from YAML by jsonargparse, with `--set a.b=c` overrides.

jsonargparse checks keys and types against the annotations, the dataclasses' `__post_init__`
check ranges and cross-field rules, and every error names the field
(`federation.quorum: must be in (0, 1], got 1.5`) so a bad config never costs a run.
The `routing:`, `federation:` and `p2p:` sections are `fedhlm.core.settings`'s, shared with
`fedhlm client` and the device.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace

from fedhlm.core.settings import (
    FederationSettings,
    LLMBackendName,
    RemoteLLMSettings,
    P2PSettings,
    RoutingSettings,
    SettingError,
    check_choice,
    check_range,
)
from fedhlm.simulation.methods import METHOD_NAMES, METHODS

TopologyName = Literal["flat", "bridged"]  # the keys of transport.topology.TOPOLOGIES

DataSource = Literal["auto", "files", "synthetic"]
_ROOT = "sim"  # the parser's key for SimConfig; stripped from the names errors give


class ConfigError(SettingError):
    """A config field is unknown, mistyped or out of range, or the file unreadable; the message names it."""


@dataclass
class DataConfig:
    task: str | None = None  # a shipped task (configs/tasks/<name>.yaml) or a task YAML; None: the model configs'
    source: DataSource = "auto"  # auto: the task's files when found, else the generated corpus; files: or fail
    train_path: str | None = None  # training file; default: the task's, in FEDHLM_DATA or ../shared/data/<folder>
    eval_path: str | None = None  # evaluation file; default: the task's (the test inputs come from it)
    inputs: int = 400  # test inputs spread over the clients (0 = the whole test split)
    alpha: float | None = None  # Dirichlet concentration over labels; None = IID

    def __post_init__(self) -> None:
        check_choice("data", "source", self.source, DataSource)
        check_range("data", "inputs", self.inputs, 0)
        check_range("data", "alpha", self.alpha, 0, lo_open=True)
        for name in ("train_path", "eval_path"):
            given = getattr(self, name)
            if given is not None and not Path(given).expanduser().is_file():
                raise ConfigError(f"data.{name}: no such file: {given}")
        if self.task is not None:
            from fedhlm.data.task import TaskError, load_task

            try:
                load_task(self.task)
            except TaskError as err:
                raise ConfigError(f"data.task: {err}") from None

    def model_overrides(self) -> dict[str, Any]:
        """What this section changes in both models' ``data`` sections (so they train on and test this data)."""
        given = {"task": self.task, "train_path": self.train_path, "eval_path": self.eval_path}
        return {"source": self.source, **{k: v for k, v in given.items() if v is not None}}


@dataclass
class WorkloadConfig:
    """How often the test articles reach the clients (`simulation.workload`); 1 = every article once."""

    deliveries: float = 1.0  # mean deliveries per article
    zipf_s: float = 1.0  # popularity exponent of the repeats over a random ranking of the articles
    locality: float = 0.8  # share of repeats that go to the first recipient's own edge cluster
    near_repeats: float = 0.0  # share of repeats that are another outlet's version of the story, not the same text

    def __post_init__(self) -> None:
        check_range("workload", "deliveries", self.deliveries, 1, 100)
        check_range("workload", "zipf_s", self.zipf_s, 0, 10)
        check_range("workload", "locality", self.locality, 0, 1)
        check_range("workload", "near_repeats", self.near_repeats, 0, 1)


@dataclass
class GenerationConfig:
    """Multi-token generation (issue 18): each client writes its test articles' titles from their descriptions,
    token by token through its router; `models.slm` / `models.llm` are then title models (configs/gen-*.yaml)."""

    enabled: bool = False
    max_new_tokens: int = 24  # per title; [SEP] ends one earlier
    calib_prompts: int = 40  # calibration descriptions whose SLM drafts and LLM verdicts fit U-HLM's threshold
    session_ttl_s: float = 60.0  # an LLM session unused this long is dropped (its client died)
    reencode_sequences: int = 48  # LLM-only sequences timed with and without session reuse (at the run's concurrency and alone)

    def __post_init__(self) -> None:
        check_range("generation", "max_new_tokens", self.max_new_tokens, 1, 256)
        check_range("generation", "calib_prompts", self.calib_prompts, 1)
        check_range("generation", "session_ttl_s", self.session_ttl_s, 0, lo_open=True)
        check_range("generation", "reencode_sequences", self.reencode_sequences, 0)


@dataclass
class ModelConfig:
    # `fedhlm fit` configs of the two models; a model missing from the cache is trained once from them
    slm: str = "configs/slm.yaml"
    llm: str = "configs/llm.yaml"
    # local: the models.llm checkpoint serves (in process, or in `fedhlm llm` workers); openai: a remote
    # OpenAI-compatible completions server at models.remote.url (models.llm then goes unused)
    llm_backend: LLMBackendName = "local"
    remote: RemoteLLMSettings = field(default_factory=RemoteLLMSettings)

    def __post_init__(self) -> None:
        check_choice("models", "llm_backend", self.llm_backend, LLMBackendName)
        if self.llm_backend == "openai" and not self.remote.url:
            raise ConfigError("models.remote.url: llm_backend openai needs the server's URL, e.g. "
                              "http://127.0.0.1:8080/v1")


@dataclass
class SimConfig:
    seed: int = 0
    out: str | None = None  # default runs/<timestamp>
    broker: str | None = None  # mqtt://user:pass@host:port; default a private broker
    # private brokers: flat (one for every role) or bridged (one per edge site, bridged to a cloud broker)
    topology: TopologyName = "flat"
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))  # names in METHOD_NAMES
    lambda_sweep: list[float] = field(default_factory=list)
    delta_sweep: list[float] = field(default_factory=list)
    # shares sent at which the report states the reference routers (uncertainty curve, oracle); [] skips
    # them, which saves one in-process LLM pass over the test articles
    reference_shares: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2])
    data: DataConfig = field(default_factory=DataConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    p2p: P2PSettings = field(default_factory=P2PSettings)

    def __post_init__(self) -> None:
        """The checks that span fields or sections (each section checked its own ranges already)."""
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0 (numpy seeds are unsigned), got {self.seed}")
        if self.data.inputs and self.data.inputs < self.federation.clients:
            raise ConfigError(f"data.inputs: {self.data.inputs} inputs for {self.federation.clients} clients; every "
                              "client needs one at least (0 = every test article)")
        for i, m in enumerate(self.methods):
            if m not in METHOD_NAMES:
                raise ConfigError(f"methods[{i}]: must be one of {', '.join(METHOD_NAMES)}, got {m!r}")
        if self.lambda_sweep and (self.routing.target_share is not None or self.routing.target_agreement is not None):
            raise ConfigError("lambda_sweep: routing.target_share / target_agreement set the threshold, so lambda "
                              "would change nothing; give one of them")
        for i, lam in enumerate(self.lambda_sweep):
            if not lam >= 0:
                raise ConfigError(f"lambda_sweep[{i}]: must be >= 0, got {lam}")
        for i, share in enumerate(self.reference_shares):
            if not 0 <= share <= 1:
                raise ConfigError(f"reference_shares[{i}]: must be in [0, 1], got {share}")
        for i, d in enumerate(self.delta_sweep):
            if not -1 <= d <= 1:
                raise ConfigError(f"delta_sweep[{i}]: must be in [-1, 1], got {d}")
            if self.p2p.delta_floor is not None and d <= self.p2p.delta_floor:
                raise ConfigError(f"delta_sweep[{i}]: {d} is not above p2p.delta_floor ({self.p2p.delta_floor}), "
                                  f"where a learned delta starts")
        fed = self.federation
        if fed.edges > fed.clients:
            raise ConfigError(f"federation.edges: {fed.edges} edges for {fed.clients} clients; need edges <= clients")
        if fed.clustering == "given":
            missing = sorted({f"c{i:03d}" for i in range(fed.clients)} - set(fed.assignment))
            if missing:
                raise ConfigError(f"federation.assignment: no edge given for client {missing[0]}")
        if self.topology not in get_args(TopologyName):
            raise ConfigError(f"topology: must be one of {', '.join(get_args(TopologyName))}, got {self.topology!r}")
        if self.broker is not None and self.topology != "flat":
            raise ConfigError(f"topology: {self.topology!r} starts its own brokers; with broker: (your own) it must be "
                              "flat")
        if self.generation.enabled:
            wants_peers = any(METHODS[m].p2p for m in self.methods)
            if wants_peers and self.p2p.resolver != "edge":  # a broadcast query per generated token: never worth it
                raise ConfigError(f"p2p.resolver: generation asks the edge's cache only, got {self.p2p.resolver!r}")
            if wants_peers and self.p2p.representation != "embedder":
                raise ConfigError(f"p2p.representation: a generated token's context is its prompt's embedding "
                                  f"(embedder), got {self.p2p.representation!r}")
            if self.lambda_sweep or self.delta_sweep:
                raise ConfigError("lambda_sweep: the sweeps run for classification only; leave them empty with "
                                  "generation.enabled")
            if self.routing.features != "basic":  # the label and hidden columns describe class tokens
                raise ConfigError(f"routing.features: generation routes on the basic features, got "
                                  f"{self.routing.features!r}")
            if self.broker is not None:
                raise ConfigError("broker: a generation run starts its own private brokers; leave broker unset")
        if self.broker is not None and not self.broker.startswith(("mqtt://", "mqtts://")):
            raise ConfigError(f"broker: must be an mqtt:// or mqtts:// URL, got {self.broker!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _parser() -> ArgumentParser:
    """SimConfig's schema as a jsonargparse parser: its annotations give the keys, types and choices."""
    parser = ArgumentParser(prog="fedhlm simulate", exit_on_error=False, allow_abbrev=False, default_env=False)
    parser.add_class_arguments(SimConfig, _ROOT)
    return parser


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """The file's mapping; read here (not by jsonargparse) so a missing or malformed file gets a plain message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    for name, hint in get_type_hints(SimConfig).items():
        # jsonargparse would hand a non-mapping section to the dataclass as **kwargs and fail unnamed
        if is_dataclass(hint) and name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{name}: must be a mapping, got {data[name]!r}")
    return data


def _override_args(overrides: list[str]) -> list[str]:
    """`a.b=c` as the parser's `--sim.a.b=c`; the value is parsed by the field's type (YAML: numbers, lists, null)."""
    args = []
    for assignment in overrides:
        key, eq, value = assignment.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {assignment!r}: expected key=value")
        args.append(f"--{_ROOT}.{key.strip()}={value}")
    return args


def _unknown(key: str) -> ConfigError:
    parent = key.rpartition(".")[0]
    node = _parser().get_defaults().get(f"{_ROOT}.{parent}" if parent else _ROOT)
    known = f" (known: {', '.join(sorted(vars(node)))})" if isinstance(node, Namespace) else ""
    return ConfigError(f"{key}: unknown field{known}")


def _named(exc: ArgumentError) -> ConfigError:
    """jsonargparse's error as `dotted.key: what is wrong`, on one line."""
    text = str(exc)
    if m := re.search(rf"Group '{_ROOT}\.?([\w.]*)' does not accept option '([\w.]+)'", text):
        return _unknown(".".join(filter(None, m.groups())))
    if m := re.search(rf"unrecognized arguments: --{_ROOT}\.([^\s=]+)", text):
        return _unknown(m.group(1))
    keys = list(re.finditer(rf'Parser key "{_ROOT}\.([^"]+)":?', text))
    if keys:  # the innermost key is the field; what follows it is jsonargparse's reason
        last = keys[-1]
        return ConfigError(f"{last.group(1)}: {' '.join(text[last.end():].split())}")
    return ConfigError(" ".join(text.split()))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimConfig:
    """Read a YAML config (or the defaults), apply overrides in order, check every field."""
    data = _read_yaml(path) if path is not None else {}
    parser = _parser()
    try:
        namespace = parser.parse_object({_ROOT: data})
        if overrides:
            namespace = parser.parse_args(_override_args(overrides), namespace=namespace)
        return parser.instantiate(namespace)[_ROOT]
    except ArgumentError as exc:
        raise _named(exc) from None
    except SettingError as exc:  # a dataclass's own check: its message already names the field
        raise ConfigError(str(exc)) from None
