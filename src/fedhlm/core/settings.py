"""The knobs a client, an edge and a simulation share: one dataclass a section, one default a knob.

`RoutingSettings`, `FederationSettings` and `P2PSettings` are the `routing:`, `federation:` and
`p2p:` sections of every YAML the project reads (a simulation, `fedhlm client`, a device), and
`ClientSettings` is made of them, so a simulated client, a `fedhlm client` process and a
device given the same file train the same head. Each dataclass checks its own ranges on
construction and names the field it refuses (`routing.lam: must be >= 0, got -1`).
Torch-free: the device package imports this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Optimizer = Literal["sgd", "adam"]
FitEngine = Literal["loop", "trainer"]
VerifyModeName = Literal["greedy", "sample"]
Aggregation = Literal["fedavg", "median", "trimmed_mean"]
Clustering = Literal["round_robin", "given", "kmeans_labels", "kmeans_embeddings"]
PeerScope = Literal["cluster", "neighbours"]
# edge: the uncertain token goes through the client's edge, which answers from its cluster cache or forwards
# it to the LLM (one message, no broadcast, no deadline); peers: a query broadcast to the cluster first
PeerResolver = Literal["edge", "peers"]
# what represents a context: a sentence embedder (all-MiniLM-L6-v2) on its text, or the SLM's own hidden state
Representation = Literal["embedder", "slm_hidden"]
PolicyName = Literal["learned", "static", "always", "never"]
HeadModeName = Literal["scalar", "linear", "mlp"]  # maths.threshold.HEAD_MODES
FeatureSetName = Literal["basic", "label", "hidden"]  # maths.route_features.FEATURE_SETS
# local: the models.llm checkpoint in the refiner's process; openai: a remote OpenAI-compatible completions
# server (llama.cpp, vLLM, SGLang, Ollama) that returns log-probabilities (models.llm_backend.LLM_BACKENDS)
LLMBackendName = Literal["local", "openai"]
OutsideTop = Literal["auto", "echo", "widen", "bound"]  # how a remote LLM scores a class outside its top-N

# most entries of the SLM's distribution an offloaded token may carry: past this the upload is no longer a
# compression of the distribution (CU-HLM's point), and a mistyped value would send megabytes a token
MAX_TOP_K = 1024

# the entropy threshold (nats) a head starts from when nothing calibrated one
UNCALIBRATED_TAU = 0.5


class SettingError(ValueError):
    """A setting is out of range or of the wrong kind; the message starts with its dotted name."""


def check_range(section: str, name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise SettingError naming `section.name` unless lo <= value <= hi (open ends where asked); None passes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        raise SettingError(f"{section}.{name}: must be a number, got {value!r}")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        low = "-inf" if lo is None else lo
        high = "inf" if hi is None else hi
        raise SettingError(f"{section}.{name}: must be in {left}{low}, {high}{right}, got {value!r}")


def check_choice(section: str, name: str, value: Any, choices: Any) -> None:
    """Raise SettingError naming `section.name` unless value is one of the Literal's choices."""
    allowed = choices.__args__ if hasattr(choices, "__args__") else tuple(choices)
    if value not in allowed:
        raise SettingError(f"{section}.{name}: must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass
class RoutingSettings:
    """How a client routes and learns its threshold head."""

    top_k: int = 8  # entries of the SLM distribution sent to the LLM (the rest as one tail mass)
    lam: float = 0.1  # price of one transmission, in units of rejection risk
    # "send this share of tokens" (exploration counted) instead of a price: after each local fit the
    # client moves tau to the importance-weighted quantile of its labelled entropies; None: lam decides
    target_share: float | None = None
    # "agree with the LLM on this share of tokens" (e.g. 0.98): tau is the highest whose kept tokens' weighted
    # rejection risk stays within 1 - target_agreement; None: lam (or target_share) decides
    target_agreement: float | None = None
    exploration: float = 0.05  # share of confident tokens also sent, to keep beta labels unbiased
    # round r explores exploration / (1 + exploration_decay * r): labels are dear early, the head settles later
    exploration_decay: float = 0.0
    importance_weights: bool = True  # exploration pairs weigh 1/exploration in the local loss (unbiased estimate)
    init_tau: float | None = None  # starting entropy threshold (nats); None = the calibrated static threshold
    temperature: float = 0.1  # sigmoid temperature T of s = sigmoid((u - tau) / T)
    # scalar: the entropy threshold; linear: w . f - tau; mlp: plus a small residual MLP (both start as scalar)
    head: HeadModeName = "scalar"
    head_hidden: int = 8  # hidden units of the mlp head
    # what the head sees: basic (entropy, max prob, top-2 margin, sampling), label (+ the same over the class
    # tokens and their mass), hidden (+ hidden_dim whitened PCA components of the SLM's state, fitted on calibration)
    features: FeatureSetName = "basic"
    hidden_dim: int = 16
    # a linear or mlp head's round-0 model: the head fitted on the calibration split's (features, beta) pairs with
    # this many full-batch Adam steps of the routing loss (the richer analogue of U-HLM's calibrated threshold);
    # 0: the entropy unit vector at the static threshold. The scalar head always starts at the static threshold.
    warm_fit_steps: int = 600
    local_steps: int = 20  # head optimiser steps per round
    lr: float = 1.0  # local step size: plain SGD steps, so FedAvg follows the pooled loss's gradient
    optimizer: Optimizer = "sgd"
    fit_engine: FitEngine = "loop"  # loop: the head module's steps in a plain loop; trainer: a Lightning Trainer
    lr_decay: float = 1.0  # local lr / (1 + lr_decay * round): shrinking steps let FedAvg settle on the optimum
    verify: VerifyModeName = "greedy"  # greedy: the LLM's argmax replaces a rejected draft; sample: speculative
    llm_timeout_s: float = 10.0  # per attempt: no verdict by then and the client keeps its own token
    llm_retries: int = 1  # resends of a request that got no verdict (a dead shared-subscription worker keeps it)
    noise_std: float = 0.0  # Gaussian noise on uploaded threshold updates (privacy), never on the local head

    def __post_init__(self) -> None:
        s = "routing"
        check_range(s, "top_k", self.top_k, 1, MAX_TOP_K)
        check_range(s, "lam", self.lam, 0)
        check_range(s, "exploration", self.exploration, 0, 1)
        check_range(s, "exploration_decay", self.exploration_decay, 0)
        if self.target_share is not None:
            check_range(s, "target_share", self.target_share, 0, 1, lo_open=True)
            if self.target_share <= self.exploration:
                raise SettingError(f"{s}.target_share: {self.target_share} must exceed routing.exploration "
                                   f"({self.exploration}), which alone sends that share")
        check_range(s, "target_agreement", self.target_agreement, 0, 1, lo_open=True)
        if self.target_share is not None and self.target_agreement is not None:
            raise SettingError(f"{s}.target_agreement: give target_share or target_agreement, not both")
        check_range(s, "temperature", self.temperature, 0, lo_open=True)
        check_choice(s, "head", self.head, HeadModeName)
        check_choice(s, "features", self.features, FeatureSetName)
        check_range(s, "head_hidden", self.head_hidden, 1)
        check_range(s, "hidden_dim", self.hidden_dim, 1)
        if self.head != "scalar" and (self.target_share is not None or self.target_agreement is not None):
            raise SettingError(f"{s}.head: target_share / target_agreement place an entropy threshold, which only "
                               f"the scalar head is; got head {self.head!r}")
        check_range(s, "warm_fit_steps", self.warm_fit_steps, 0)
        check_range(s, "local_steps", self.local_steps, 0)
        check_range(s, "lr", self.lr, 0, lo_open=True)
        check_range(s, "lr_decay", self.lr_decay, 0)
        check_range(s, "llm_timeout_s", self.llm_timeout_s, 0, lo_open=True)
        check_range(s, "llm_retries", self.llm_retries, 0)
        check_range(s, "noise_std", self.noise_std, 0)
        check_choice(s, "optimizer", self.optimizer, Optimizer)
        check_choice(s, "fit_engine", self.fit_engine, FitEngine)
        check_choice(s, "verify", self.verify, VerifyModeName)

    @property
    def process_tau(self) -> float:
        """The entropy threshold a process deployment starts from: `init_tau`, else the uncalibrated default
        (its roles have no calibration split to fit U-HLM's threshold on; a simulation does)."""
        return UNCALIBRATED_TAU if self.init_tau is None else self.init_tau

    def exploration_rate(self, round_: int) -> float:
        """The share of confident tokens explored in this round (the schedule's one definition)."""
        return self.exploration / (1.0 + self.exploration_decay * max(round_, 0))


@dataclass
class FederationSettings:
    """Who takes part and how rounds close (HierFAVG: edge rounds, a cloud round every `cloud_every`)."""

    clients: int = 12
    edges: int = 3
    rounds: int = 6
    cloud_every: int = 2  # edge rounds per cloud round
    quorum: float = 0.75  # share of a cluster an edge needs at the deadline
    round_deadline_s: float = 20.0  # from a round's first update, then closed with a quorum; a client waits 2x
    personalise: float = 0.0  # a in tau_i <- a tau_i + (1 - a) tau_edge
    aggregation: Aggregation = "fedavg"
    trim_fraction: float = 0.2  # of each side, for trimmed_mean
    # an update claiming more tokens than this is refused (a client cannot have seen more in a round's
    # history; an unbounded count would let one client set its cluster's model and overflow the sums)
    max_update_samples: int = 10_000_000
    # each update weighs at most this many times the round's median weight (0: plain FedAvg weights)
    max_weight_ratio: float = 10.0
    clustering: Clustering = "round_robin"
    assignment: dict[str, str] = field(default_factory=dict)  # client -> edge when clustering == given

    def __post_init__(self) -> None:
        s = "federation"
        for name in ("clients", "edges", "rounds", "cloud_every"):
            check_range(s, name, getattr(self, name), 1)
        check_range(s, "quorum", self.quorum, 0, 1, lo_open=True)
        check_range(s, "round_deadline_s", self.round_deadline_s, 0, lo_open=True)
        check_range(s, "personalise", self.personalise, 0, 1)
        check_range(s, "trim_fraction", self.trim_fraction, 0, 0.5, hi_open=True)
        check_range(s, "max_update_samples", self.max_update_samples, 1, 2**53)
        check_range(s, "max_weight_ratio", self.max_weight_ratio, 0)
        if 0 < self.max_weight_ratio < 1:
            raise SettingError(f"{s}.max_weight_ratio: must be 0 (off) or >= 1, got {self.max_weight_ratio}")
        check_choice(s, "aggregation", self.aggregation, Aggregation)
        check_choice(s, "clustering", self.clustering, Clustering)

    @property
    def client_wait_s(self) -> float:
        """How long a client waits for its edge's model after sending an update."""
        return 2 * self.round_deadline_s


@dataclass
class P2PSettings:
    """The peer step: ask the cluster before the LLM."""

    enabled: bool = True
    resolver: PeerResolver = "edge"  # who answers: the edge's cluster cache, or every peer (broadcast)
    representation: Representation = "embedder"  # slm_hidden: no second model on the device
    delta: float = 0.9  # cosine similarity a peer's cached context needs
    # null: the edges answer at delta; a number: each edge lowers its cluster's delta, not below this, where its
    # misses show the nearest cached answers disagree with the LLM no more often than the drafts (core.reuse_delta)
    delta_floor: float | None = None
    deadline_ms: float = 40.0  # how long a client waits for a peer answer (resolver peers)
    # neighbours: also the other clusters' (resolver edge: edges share their new entries; peers: the edge
    # forwards a query its cluster missed)
    scope: PeerScope = "cluster"
    audit: float = 0.05  # share of peer hits also sent to the LLM to measure wrong reuse
    # audited disagreements with the LLM (also a majority of its audits) that exclude a peer; 0: never
    exclude_after: int = 3
    cache_entries: int = 2000  # a client's own cache (resolver peers: what it answers its peers; edge: looked up first)
    ttl_s: float = 3600.0
    sketch_bits: int = 128  # SimHash bits a client sends its edge per uncertain token (resolver edge)
    edge_cache_entries: int = 20_000  # the edge's cluster cache (resolver edge)

    def __post_init__(self) -> None:
        s = "p2p"
        check_range(s, "delta", self.delta, -1, 1)
        if self.delta_floor is not None:
            check_range(s, "delta_floor", self.delta_floor, -1, self.delta, hi_open=True)
            if self.resolver != "edge":
                raise SettingError(f"{s}.delta_floor: only an edge learns its delta (resolver edge), not {self.resolver}")
        check_range(s, "deadline_ms", self.deadline_ms, 0, lo_open=True)
        check_range(s, "audit", self.audit, 0, 1)
        check_range(s, "exclude_after", self.exclude_after, 0)
        check_range(s, "cache_entries", self.cache_entries, 1)
        check_range(s, "ttl_s", self.ttl_s, 0, lo_open=True)
        check_choice(s, "scope", self.scope, PeerScope)
        check_choice(s, "resolver", self.resolver, PeerResolver)
        check_choice(s, "representation", self.representation, Representation)
        check_range(s, "edge_cache_entries", self.edge_cache_entries, 1)
        if self.sketch_bits <= 0 or self.sketch_bits % 8:
            raise SettingError(f"{s}.sketch_bits: must be a positive multiple of 8, got {self.sketch_bits}")

    @property
    def asks_neighbours(self) -> bool:
        """A query the cluster misses goes on to the other clusters (through the edge)."""
        return self.enabled and self.scope == "neighbours"

    @property
    def edge_answers_from(self) -> float:
        """The least similarity at which a client takes its edge's answer: where the edge's delta may go."""
        return self.delta if self.delta_floor is None else self.delta_floor

    @property
    def through_edge(self) -> bool:
        """Uncertain tokens go through the edge's cluster cache (no broadcast query)."""
        return self.enabled and self.resolver == "edge"


@dataclass
class RemoteLLMSettings:
    """The remote LLM (`models.llm_backend: openai`): an OpenAI-compatible `/v1/completions` server.

    A routed token's prompt is rebuilt as text (the request's ids decoded), put into `prompt`, and
    each class is scored by the log-probability the server gives its continuation as the next token
    (`top_logprobs` of them come with one completion call). A class outside that top-N is scored as
    `outside_top` says: `echo` (prompt + continuation echoed with its log-probabilities: exact where
    the server echoes correctly), `widen` (the same call again with `widen_to` alternatives; still
    missing: bounded), `bound` (at most the N-th log-probability), or `auto`: echo when a probe at
    start-up finds the server's echoed scores consistent with its top-N, else widen.
    """

    url: str | None = None  # the API's base, e.g. http://127.0.0.1:8080/v1
    model: str = ""  # the server's model name; "" for a server that serves one model
    # {text}: the article (the request's ids decoded), {choices}: the continuations, comma-separated
    prompt: str = "Classify the news article as one of: {choices}.\nArticle: {text}\nAnswer:"
    continuations: list[str] = field(default_factory=list)  # per class; [] = " " + its verbaliser, capitalised
    top_logprobs: int = 20  # next-token log-probabilities asked for per completion call
    outside_top: OutsideTop = "auto"
    # contextual calibration (Zhao et al. 2021, "Calibrate before use"): each class's score minus its score for
    # this content-free article, which removes the prompt's own preference for some answers; null: raw scores
    content_free: str | None = "N/A"
    widen_to: int = 1000  # alternatives asked for by outside_top widen
    timeout_s: float = 30.0  # per HTTP call
    concurrency: int = 4  # HTTP calls in flight per batch (a batching server such as vLLM gains from more)
    api_key_env: str | None = None  # name of the environment variable holding a bearer token, if the server wants one

    def __post_init__(self) -> None:
        s = "models.remote"
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise SettingError(f"{s}.url: must be an http:// or https:// URL, got {self.url!r}")
        if "{text}" not in self.prompt:
            raise SettingError(f"{s}.prompt: must contain {{text}} (where the article goes), got {self.prompt!r}")
        for i, c in enumerate(self.continuations):
            if not c.strip():
                raise SettingError(f"{s}.continuations[{i}]: must not be empty")
        check_range(s, "top_logprobs", self.top_logprobs, 1, 100)
        check_choice(s, "outside_top", self.outside_top, OutsideTop)
        check_range(s, "widen_to", self.widen_to, self.top_logprobs, 100_000)
        check_range(s, "timeout_s", self.timeout_s, 0, lo_open=True)
        check_range(s, "concurrency", self.concurrency, 1, 256)


@dataclass
class ClientSettings:
    """One client: its ids, its routing policy and the shared sections (see the module docstring)."""

    client_id: str
    edge_id: str
    policy: PolicyName = "learned"  # a name in `core.policies.POLICIES`
    static_tau: float = UNCALIBRATED_TAU  # entropy threshold of the static policy
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    p2p: P2PSettings = field(default_factory=P2PSettings)
    embedder_name: str = "all-MiniLM-L6-v2"  # peers only answer queries embedded by the same model
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("client", "policy", self.policy, PolicyName)

    @classmethod
    def from_config(cls, config: Any, *, client_id: str, edge_id: str, **changes: Any) -> "ClientSettings":
        """The one way an entry point (a simulation, `fedhlm client`, a device) turns its config into a client's
        settings: any object with `routing`, `federation`, `p2p` sections and a `seed`; `changes` set the rest."""
        values = {"routing": config.routing, "federation": config.federation, "p2p": config.p2p, "seed": config.seed}
        return cls(client_id=client_id, edge_id=edge_id, **{**values, **changes})

    def with_changes(self, **changes: Any) -> "ClientSettings":
        """A copy with `changes`; a section given as a mapping (`routing={"noise_std": 0.1}`) changes only those
        fields of it, so one client of a deployment can differ in one knob."""
        sections = {f.name for f in fields(self) if f.name in ("routing", "federation", "p2p")}
        merged = {k: replace(getattr(self, k), **v) if k in sections and isinstance(v, dict) else v
                  for k, v in changes.items()}
        return replace(self, **merged)


def from_mapping(cls: type, data: dict[str, Any] | None, section: str) -> Any:
    """A settings dataclass from a plain mapping (a YAML section); an unknown key is an error naming it."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingError(f"{section}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as exc:
        raise SettingError(f"{section}: {exc}") from None
