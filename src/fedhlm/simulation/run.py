"""`fedhlm simulate`: the end-to-end run over Mosquitto, with the baselines, a JSON report and plots.

Every method of the report runs on the same test inputs, split the same way among the
same clients: the SLM alone, the LLM for every token, U-HLM's static threshold, FedHLM
without peers and FedHLM. Each method that talks gets a fresh private broker, so no
retained model or queued message of one method leaks into the next.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm.core.records import TokenInput
from fedhlm.core.settings import UNCALIBRATED_TAU, ClientSettings
from fedhlm.core.termination import raise_if_terminated
from fedhlm.simulation.config import SimConfig
from fedhlm.simulation.methods import METHODS, Method

log = logging.getLogger("fedhlm.simulation.run")

FULL_VOCAB_FP32_BYTES = 30522 * 4  # a full fp32 distribution over MiniLM's vocabulary


# ---- plan: who holds which inputs, in which round ------------------------------------------------
def client_ids(n: int) -> list[str]:
    return [f"c{i:03d}" for i in range(n)]


def plan_rounds(parts: Sequence[Sequence[int]], ids: Sequence[str], rounds: int) -> list[dict[str, list[int]]]:
    """Per round, client id -> indices into the test inputs (each client's share cut into `rounds` slices)."""
    plan: list[dict[str, list[int]]] = [{} for _ in range(rounds)]
    for cid, part in zip(ids, parts):
        for r, chunk in enumerate(np.array_split(np.asarray(part, dtype=int), rounds)):
            plan[r][cid] = chunk.tolist()
    return plan


@dataclass
class ClientPlan:
    """Which test items each client gets in each round, and which edge each client belongs to."""

    rounds: list[dict[str, list[int]]]  # per round: client id -> indices into Prepared.items
    assignment: dict[str, str]  # client id -> edge id
    label_histograms: list[list[int]]
    repeat_of: dict[int, int] = field(default_factory=dict)  # uid of a repeat delivery -> its article's uid
    near_repeats: frozenset[int] = frozenset()  # uids of the repeats that are another outlet's version


@dataclass
class Prepared:
    """Everything the methods of one run share: the models, the test items, the calibration drafts, the plan."""

    source: str
    task: Any  # data.Task: the classes the test items are labelled in
    models: Any  # models.hybrid.HybridModels
    items: list[Any]  # the test NewsItems, in plan order
    calib: list[TokenInput]  # the calibration split drafted centrally (U-HLM's fit)
    split_sizes: dict[str, int]
    embedder: Any | None  # the P2P methods' context representation (models.embedder.REPRESENTATIONS)
    plan: ClientPlan | None = None
    workload: dict[str, Any] = field(default_factory=dict)  # the report's workload section
    init_tau: float = UNCALIBRATED_TAU
    init_params: dict[str, np.ndarray] | None = None  # the round-0 head (`models.head_fit.warm_head_params`)
    files: dict[str, Any] = field(default_factory=dict)  # training / evaluation file and overlap dropped

    @property
    def embedder_name(self) -> str:
        return self.embedder.name if self.embedder is not None else "none"

    @property
    def embedding_dim(self) -> int:
        return self.embedder.dim if self.embedder is not None else 384

    def label_of(self) -> dict[int, int]:
        return {item.uid: item.label for item in self.items}


def client_settings(cfg: SimConfig, method: Method, prep: Prepared, *, lam: float | None = None,
                    delta: float | None = None, static_tau: float = UNCALIBRATED_TAU) -> ClientSettings:
    """The clients' settings of one method: the config's sections, with the method's policy and peers."""
    routing = cfg.routing if lam is None else dataclasses.replace(cfg.routing, lam=lam)
    p2p = dataclasses.replace(cfg.p2p, enabled=method.p2p, delta=cfg.p2p.delta if delta is None else delta)
    return ClientSettings.from_config(cfg, client_id="-", edge_id="-", policy=method.policy, static_tau=static_tau,
                                      routing=routing, p2p=p2p, embedder_name=prep.embedder_name)


def round0_head(cfg: SimConfig, prep: Prepared):  # noqa: ANN201
    """A client's head as the round-0 global model has it: the warm start's parameters when there are any."""
    from fedhlm.models.head_fit import TorchHead, routing_head

    head = TorchHead(routing_head(cfg.routing, prep.init_tau, cfg.seed), engine=cfg.routing.fit_engine)
    if prep.init_params is not None:
        head.load(prep.init_params)
    return head


# ---- one method -------------------------------------------------------------------------------------
def run_method(method: Method, cfg: SimConfig, prep: Prepared, *, lam: float | None = None,
               delta: float | None = None, static_tau: float = UNCALIBRATED_TAU, progress=None) -> dict[str, Any]:
    """Run one routing method over a private broker (or the given one); returns its records and telemetry."""
    from fedhlm.models.drafter import SLMDrafter
    from fedhlm.reporting.summary import TokenRecord
    from fedhlm.roles.deployment import Deployment, DeploymentSpec
    from fedhlm.transport.address import BrokerAddress
    from fedhlm.transport.topology import TOPOLOGIES

    assert prep.plan is not None, "plan the clients first"
    models, plan, label_of = prep.models, prep.plan, prep.label_of()
    drafter = SLMDrafter(models.drafting, prep.embedder if method.p2p else None)
    settings = client_settings(cfg, method, prep, lam=lam, delta=delta, static_tau=static_tau)
    if not method.needs_network:  # the SLM alone: each client drafts and keeps its tokens, nothing is sent
        records = []
        for r, by_client in enumerate(plan.rounds):
            for cid, idx in by_client.items():
                drafted = drafter.draft([prep.items[i] for i in idx])
                for d in drafted.inputs:
                    c = models.class_of(d.draft_token)
                    records.append(TokenRecord(cid, r, d.uid, c, c, "local", latency_ms=drafted.ms_per_token,
                                               label=label_of[d.uid]))
            raise_if_terminated()
            if progress is not None:
                progress.update(1)
        return {"records": records, "bytes": None, "federated": None, "dep": None}

    spec = DeploymentSpec(
        assignment=plan.assignment, client=settings,
        head_factory=lambda: round0_head(cfg, prep),
        q_fn=models.q_fn, class_of=models.class_of, drafter=drafter, llm_limits=models.llm_limits(),
        llm_sessions=getattr(models.serving, "sessions", None),
        pad_id=models.tokenizer.pad_token_id or 0, embedding_dim=prep.embedding_dim,
    )
    users = {**{c: "client" for c in plan.assignment}, **{e: "edge" for e in spec.edges}, "cloud": "cloud",
             "llm": "llm", "admin": "admin"}
    if cfg.broker:  # one account for every role, each under its own client id; no stale models from a last run
        base = BrokerAddress.from_url(cfg.broker)
        clear_models(base.for_role("fedhlm-sim-admin"), spec.edges)
        broker_cm = nullcontext(None)
    else:
        broker_cm = TOPOLOGIES[cfg.topology](users, plan.assignment)
    records = []
    fed_rounds: list[dict[str, Any]] = []
    phases: dict[str, float] = {}
    started = time.perf_counter()
    with broker_cm as topology:
        address = topology.address if topology is not None else base.for_role
        brokers = topology.brokers() if topology is not None else {}
        dep = Deployment(spec, address).start()
        phases["start_s"] = time.perf_counter() - started
        try:
            for r, by_client in enumerate(plan.rounds):
                round_items = {cid: [prep.items[i] for i in idx] for cid, idx in by_client.items()}
                records.extend(TokenRecord.labelled(t, label_of[t.uid]) for t in dep.run_round(r, round_items))
                if spec.federated:
                    fed_rounds.append(federated_round(dep, r))
                raise_if_terminated()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix_str(f"{method.name} r{r} llm={sum(1 for t in records if t.route == 'llm')}")
        finally:
            phases["rounds_s"] = time.perf_counter() - started - phases["start_s"]
            counts = dep.byte_counts()
            telemetry = deployment_telemetry(dep)
            peaks = {name: process_peak_rss_mb(b.pid) for name, b in brokers.items()}
            telemetry["broker_peak_rss_mb"] = sum(p for p in peaks.values() if p is not None) if brokers else None
            telemetry["brokers_peak_rss_mb"] = peaks
            telemetry["broker_died"] = any(not b.running for b in brokers.values())
            stopping = time.perf_counter()
            dep.stop()
            phases["stop_s"] = time.perf_counter() - stopping
            telemetry["phases_s"] = phases
    return {"records": records, "bytes": counts, "federated": fed_rounds if spec.federated else None,
            "dep": telemetry}


def clear_models(address, edges: Sequence[str]) -> None:
    """Drop the retained edge and global models a previous run left on a shared broker."""
    from fedhlm.transport import topics
    from fedhlm.transport.endpoint import Endpoint

    with Endpoint(address) as ep:
        ep.wait_connected()
        for topic in [topics.edge_model(e) for e in edges] + [topics.global_model()]:
            ep.clear_retained(topic)


def federated_round(dep, r: int) -> dict[str, Any]:
    """Effective entropy thresholds after round r: every client, every edge, the global model."""
    glob = dep.cloud.history[-1]["tau"] if dep.cloud is not None and dep.cloud.history else None
    return {
        "round": r,
        "clients": {cid: c.tau_history[-1][1] for cid, c in dep.clients.items() if c.tau_history},
        "edges": {eid: e.history[-1]["tau"] for eid, e in dep.edges.items() if e.history},
        "global": glob,
    }


def process_peak_rss_mb(pid: int | None) -> float | None:
    """Peak resident memory of a process (the broker), from /proc; None where unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def deployment_telemetry(dep) -> dict[str, Any]:
    clients = dep.clients.values()
    endpoints = [c.endpoint for c in clients] + [e.endpoint for e in dep.edges.values()] + [w.endpoint for w in dep.llm]
    if dep.cloud is not None:
        endpoints.append(dep.cloud.endpoint)
    peer_ms = [x for c in clients for x in c.counters.peer_ms]
    return {
        "fallbacks": sum(c.counters.fallbacks for c in clients),
        "peer_queries": sum(c.counters.peer_queries for c in clients),
        "peer_hits": sum(c.counters.peer_hits for c in clients),
        "own_cache_hits": sum(c.counters.own_cache_hits for c in clients),
        "peer_answers": sum(c.counters.peer_answers for c in clients),
        "peers_excluded": sum(c.counters.peers_excluded for c in clients),
        "peer_ms_p50": float(np.percentile(peer_ms, 50)) if peer_ms else 0.0,
        "peer_ms_mean": float(np.mean(peer_ms)) if peer_ms else 0.0,
        "updates_sent": sum(c.counters.updates_sent for c in clients),
        "models_received": sum(c.counters.models_received for c in clients),
        "rounds_without_model": sum(c.counters.rounds_without_model for c in clients),
        "updates_aggregated": sum(e.updates_accepted for e in dep.edges.values()),
        "updates_rejected": sum(sum(e.rejected.values()) for e in dep.edges.values()),
        "duplicates": sum(e.duplicates for e in dep.edges.values()),
        "messages_sent_total": sum(sum(ep.stats().sent_messages.values()) for ep in endpoints),
        "llm_requests": sum(w.stats.requests for w in dep.llm),
        "llm_batches": sum(w.stats.batches for w in dep.llm),
        "llm_compute_s": sum(w.stats.compute_s for w in dep.llm),
        "edge_cache": {eid: e.resolver.report() for eid, e in dep.edges.items() if e.resolver is not None},
        # what the edges moved (forwarded LLM requests, verdict copies, models): not the devices' links
        "edge_bytes": _edge_bytes(dep),
        "pairs": {cid: (f, b, w) for cid, (f, b, w) in ((cid, c.pairs()) for cid, c in dep.clients.items()) if b.size},
        # what the run ended with: the cloud's global model, else the mean of the edges' models
        "global_params": _final_params(dep),
    }


def _edge_bytes(dep) -> dict[str, dict[str, int]]:
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    for edge in dep.edges.values():
        stats = edge.endpoint.stats()
        for kind, n in stats.sent_bytes.items():
            sent[kind] = sent.get(kind, 0) + int(n)
        for kind, n in stats.received_bytes.items():
            received[kind] = received.get(kind, 0) + int(n)
    return {"sent": sent, "received": received}


def _final_params(dep) -> dict[str, list] | None:
    if dep.cloud is not None and dep.cloud.history:
        return {k: np.asarray(v).tolist() for k, v in dep.cloud.params.items()}
    edges = [e.params for e in dep.edges.values() if e.history]
    if not edges:
        return None
    return {k: np.mean([np.asarray(p[k]) for p in edges], axis=0).tolist() for k in edges[0]}


def method_entry(result: dict[str, Any]) -> dict[str, Any]:
    from fedhlm.reporting.summary import ByteCounts, summarise

    entry = summarise(result["records"], result["bytes"] or ByteCounts())
    dep = result.get("dep") or {}
    if dep:
        queries = dep["peer_queries"]
        entry["peer"].update({
            "queries": queries, "hit_rate": dep["peer_hits"] / queries if queries else None,
            "own_cache_hits": dep.get("own_cache_hits", 0),
            "added_latency_ms_p50": dep["peer_ms_p50"], "added_latency_ms_mean": dep["peer_ms_mean"],
        })
        if dep.get("edge_cache"):
            caches = dep["edge_cache"].values()
            total = {k: sum(c[k] for c in caches) for k in ("requests", "hits", "forwarded", "learned", "refused",
                                                             "entries", "cache_bytes")}
            entry["peer"]["edge_cache"] = {**total, "hit_rate": total["hits"] / total["requests"] if total["requests"]
                                           else 0.0, "by_edge": dep["edge_cache"]}
        entry["edge_bytes"] = dep.get("edge_bytes", {})
        entry["fl"] = {k: dep[k] for k in ("updates_sent", "updates_aggregated", "updates_rejected", "duplicates",
                                            "models_received", "rounds_without_model")}
        entry["llm_service"] = {k: dep[k] for k in ("llm_requests", "llm_batches", "llm_compute_s")}
        entry["brokers"] = {"peak_rss_mb": dep.get("broker_peak_rss_mb"), "by_broker": dep.get("brokers_peak_rss_mb")}
        entry["degraded"] = degradation(dep)
    return entry


def degradation(dep: dict[str, Any]) -> list[str]:
    """Why a method's numbers are not those of a healthy deployment (empty when they are)."""
    reasons = []
    if dep.get("broker_died"):
        reasons.append("the broker died during the run")
    if dep["fallbacks"]:
        reasons.append(f"{dep['fallbacks']} tokens fell back to the SLM's draft (no LLM verdict in time)")
    if dep["rounds_without_model"]:
        reasons.append(f"{dep['rounds_without_model']} client rounds ended without the edge's model")
    return reasons


# ---- the whole run ----------------------------------------------------------------------------------
def prepare(cfg: SimConfig, progress: bool = True) -> Prepared:
    """Data, models, calibration, partition and clusters: everything the methods share."""
    prep = prepare_inputs(cfg, progress)
    prep.plan = plan_clients(cfg, prep.items, prep.task.num_classes)
    prep.workload = add_repeats(cfg, prep.items, prep.plan)
    return prep


def add_repeats(cfg: SimConfig, items: list[Any], plan: ClientPlan) -> dict[str, Any]:
    """Append the workload's repeat deliveries to `items` (copies under new uids) and to the plan's rounds;
    returns the report's workload section."""
    from fedhlm.simulation.workload import outlet_version, plan_repeats, workload_summary

    w = cfg.workload
    first: list[tuple[str, int]] = [("", 0)] * len(items)
    for r, by_client in enumerate(plan.rounds):
        for cid, idx in by_client.items():
            for i in idx:
                first[i] = (cid, r)
    repeats = plan_repeats(first, plan.assignment, len(plan.rounds), deliveries=w.deliveries, zipf_s=w.zipf_s,
                           locality=w.locality, seed=cfg.seed, near=w.near_repeats)
    next_uid = max((it.uid for it in items), default=-1) + 1
    rng = np.random.default_rng([cfg.seed, 8])
    touched: set[tuple[int, str]] = set()
    near_rng = np.random.default_rng([cfg.seed, 10])
    for j, rep in enumerate(repeats):
        original = items[rep.index]
        items.append(outlet_version(original, near_rng, next_uid + j) if rep.near
                     else dataclasses.replace(original, uid=next_uid + j))
        plan.rounds[rep.round].setdefault(rep.client_id, []).append(len(items) - 1)
        touched.add((rep.round, rep.client_id))
    for r, cid in sorted(touched):  # a repeat arrives at some time within its round, not after everything else
        plan.rounds[r][cid] = rng.permutation(plan.rounds[r][cid]).tolist()
    plan.repeat_of = {next_uid + j: items[rep.index].uid for j, rep in enumerate(repeats)}
    plan.near_repeats = frozenset(next_uid + j for j, rep in enumerate(repeats) if rep.near)
    return workload_summary(repeats, first, plan.assignment, deliveries=w.deliveries, zipf_s=w.zipf_s,
                            locality=w.locality, near=w.near_repeats)


def prepare_inputs(cfg: SimConfig, progress: bool = True) -> Prepared:
    """The models, the test items (each client drafts its own later) and the calibration split's drafts."""
    from fedhlm.data.module import NewsDataModule
    from fedhlm.maths.route_features import feature_set
    from fedhlm.models.embedder import context_representation
    from fedhlm.models.hybrid import HybridModels

    models = HybridModels(cfg.models.slm, cfg.models.llm, data_overrides=cfg.data.model_overrides(), top_k=cfg.routing.top_k,
                          progress=progress, features=feature_set(cfg.routing.features, cfg.routing.hidden_dim),
                          llm_backend=cfg.models.llm_backend, remote=cfg.models.remote)
    # the SLM's own data module gives the split it was trained on: the test inputs are held out
    datamodule = NewsDataModule(**models.configs["slm"]["data"])
    datamodule.setup()
    splits = datamodule.splits
    models.drafting.fit_features(list(splits.calib))  # a feature map (the hidden set's PCA) from calibration only
    test = test_items(cfg, splits)
    wants_peers = any(METHODS[m].p2p for m in cfg.methods) or bool(cfg.delta_sweep)
    corpus = datamodule.corpus
    return Prepared(source=datamodule.source_name, task=datamodule.task, models=models, items=test,
                    calib=models.draft(list(splits.calib)).inputs, split_sizes=splits.sizes(),
                    embedder=context_representation(cfg.p2p.representation, models.drafting) if wants_peers else None,
                    files={"train": corpus.train_file, "eval": corpus.eval_file,
                           "dropped_overlap": corpus.dropped_overlap})


def test_items(cfg: SimConfig, splits: Any) -> list[Any]:
    """The test articles a run spreads over its clients: `data.inputs` of them, stratified (0 = all)."""
    from fedhlm.data import stratified_subset

    test = list(splits.test)
    if cfg.data.inputs and cfg.data.inputs < len(test):
        test = stratified_subset(test, cfg.data.inputs, seed=cfg.seed)
    return test


def plan_clients(cfg: SimConfig, items: Sequence[Any], num_classes: int) -> ClientPlan:
    """Share the items among the clients (IID or Dirichlet), cluster the clients onto edges, cut rounds."""
    from fedhlm.data import label_histograms, partition
    from fedhlm.simulation.clustering import assign_clients

    ids = client_ids(cfg.federation.clients)
    labels = [d.label for d in items]
    parts = partition(labels, len(ids), alpha=cfg.data.alpha, seed=cfg.seed)
    hist = label_histograms(labels, parts, num_classes)
    profiles = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    assignment = assign_clients(ids, cfg.federation.edges, cfg.federation.clustering, profiles=profiles,
                                given=cfg.federation.assignment, seed=cfg.seed)
    return ClientPlan(plan_rounds(parts, ids, cfg.federation.rounds), assignment, hist.tolist())


@contextmanager
def reporting(report: dict[str, Any], out_dir: Path, write: Callable[[dict[str, Any], Path], None]) -> Iterator[None]:
    """A run whose report is written whatever happens: its status on Ctrl-C ("interrupted", what was measured
    kept) or an error ("failed", re-raised), its wall time; `write` puts it (and its plots) into out_dir."""
    started = time.time()
    try:
        yield
    except KeyboardInterrupt:
        report["status"] = "interrupted"
        print("\n[fedhlm] interrupted: writing what was measured so far", flush=True)
    except Exception as exc:
        report["status"] = "failed"
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report["wall_s"] = round(time.time() - started, 2)
        write(report, out_dir)


def simulate(cfg: SimConfig, out_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Run every configured method and the sweeps; write report.json and the plots into out_dir."""
    from tqdm import tqdm

    from fedhlm.reporting.summary import check_consistency, per_round, reuse_by_delivery

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"status": "running", "config": cfg.to_dict(), "seed": cfg.seed, "versions": versions(),
                              "methods": {}, "rounds": {"by_method": {}}}
    if report["config"].get("broker"):
        from fedhlm.transport.address import redact

        report["config"]["broker"] = redact(report["config"]["broker"])
    with reporting(report, out_dir, write_report):
        print("[fedhlm] preparing data and models ...", flush=True)
        prep = prepare(cfg, progress=show_progress)
        raise_if_terminated()
        report["data"] = {"task": prep.task.name, "classes": list(prep.task.class_names),
                          "verbalisers": list(prep.task.verbalisers), "source": prep.source, **prep.files,
                          "test_inputs": len(prep.items), "splits": prep.split_sizes,
                          "label_histograms": prep.plan.label_histograms, "assignment": prep.plan.assignment}
        report["workload"] = prep.workload
        if prep.source == "synthetic":
            print(f"[fedhlm] WARNING: {prep.task.name} files not found; running on the GENERATED synthetic corpus",
                  flush=True)
            report["data"]["warning"] = f"{prep.task.name} not found: results are on the generated synthetic corpus"
        report["models"] = {k: str(v) for k, v in prep.models.folders.items()}
        report["model_metrics"] = prep.models.metrics()
        static = prep.models.static_threshold(prep.calib, cfg.routing.lam, cfg.routing.verify)
        report["static_hlm"] = static
        prep.init_tau = warm_start_tau(cfg, prep, static["tau"])
        report["warm_start"] = warm_start_head(cfg, prep)
        steps = cfg.federation.rounds * (len(cfg.methods) + 2 * len(cfg.lambda_sweep) + len(cfg.delta_sweep))
        bar = tqdm(total=steps, desc="rounds", unit="round", disable=not show_progress)
        results = {}
        for name in cfg.methods:
            method = METHODS[name]
            tau = static["tau"] if method.calibrated else UNCALIBRATED_TAU
            result = run_method(method, cfg, prep, static_tau=tau, progress=bar)
            results[name] = result
            report["methods"][name] = method_entry(result)
            if prep.plan.repeat_of:
                report["methods"][name]["peer"]["by_delivery"] = reuse_by_delivery(
                    result["records"], prep.plan.repeat_of, prep.plan.near_repeats)
            report["rounds"]["by_method"][name] = per_round(result["records"])
        if "slm_only" in results:  # each client's own SLM batch, per token
            report["slm_ms_per_token"] = float(np.mean([t.latency_ms for t in results["slm_only"]["records"]]))
        if "fedhlm" in results or "fedhlm_no_p2p" in results:
            fed_name = "fedhlm" if "fedhlm" in results else "fedhlm_no_p2p"
            report["federated"] = federated_section(results[fed_name], cfg, prep.init_tau, prep.init_params)
        if cfg.reference_shares or cfg.routing.target_agreement is not None:
            report["reference"] = reference_routers(cfg, prep, report["methods"], results)
        report["lambda_sweep"] = lambda_sweep(cfg, prep, bar) if cfg.lambda_sweep else {}
        report["delta_sweep"] = delta_sweep(cfg, prep, bar) if cfg.delta_sweep else []
        bar.close()
        report["consistency_problems"] = check_consistency(report["methods"])
        report["targets"] = targets(report)
        report["degraded"] = {name: m["degraded"] for name, m in report["methods"].items() if m.get("degraded")}
        raise_if_terminated()
        report["status"] = "degraded" if report["degraded"] else "complete"
    return report


def warm_start_tau(cfg: SimConfig, prep: Prepared, static_tau: float) -> float:
    """The round-0 threshold every client starts from (see `warm_start`), from the calibration split's drafts."""
    r = cfg.routing
    if r.init_tau is None and prep.calib:
        u = np.array([float(d.features[0]) for d in prep.calib])
        return warm_start(r, static_tau, u, prep.models.calibration_beta(prep.calib, r.verify))
    return warm_start(r, static_tau, None, None)


def warm_start_head(cfg: SimConfig, prep: Prepared) -> dict[str, Any]:
    """Fit a richer head's round-0 model on the calibration split (`models.head_fit.warm_head_params`) into
    `prep.init_params`; returns the report's warm-start section."""
    from fedhlm.models.head_fit import warm_head_params

    r = cfg.routing
    feats = beta = None
    if r.head != "scalar" and prep.calib:
        feats = np.stack([np.asarray(d.features, np.float32) for d in prep.calib])
        beta = prep.models.calibration_beta(prep.calib, r.verify)
    params, fitted = warm_head_params(r, prep.init_tau, cfg.seed, feats, beta)
    prep.init_params = params if fitted is not None else None
    return {"tau": prep.init_tau, "head": r.head, "features": r.features, "calibration_fit": fitted}


def warm_start(routing: Any, static_tau: float, u: np.ndarray | None, beta: np.ndarray | None) -> float:
    """routing.init_tau when given; for a target (share or agreement), where the calibration pairs (entropy u,
    LLM verdict beta) put it; else the static (U-HLM) threshold."""
    from fedhlm.core.operating_point import operating_point

    if routing.init_tau is not None:
        return routing.init_tau
    point = operating_point(routing)
    if point.name != "price" and u is not None and u.size:
        return float(point.tau(u, beta, np.ones_like(u), routing.exploration_rate(0)))
    return static_tau


def reference_routers(cfg: SimConfig, prep: Prepared, methods: dict[str, Any], results: dict[str, Any]
                      ) -> dict[str, Any]:
    """The uncertainty curve and the oracle on the run's test articles (in-process: the SLM's drafts and
    the LLM's verdicts by the service's own verification path), with each method's point against them and
    its agreement with the LLM (the share of tokens whose final class is the LLM's; also put on the method)."""
    from fedhlm.reporting.reference import reference_section

    print("[fedhlm] reference routers (uncertainty curve, oracle) ...", flush=True)
    drafts = prep.models.draft(prep.items).inputs
    _, llm_class = prep.models.llm_verdicts(drafts, cfg.routing.verify)
    labels = np.array([prep.label_of()[d.uid] for d in drafts])
    slm_class = np.array([prep.models.class_of(d.draft_token) for d in drafts])
    entropy = np.array([float(d.features[0]) for d in drafts])
    points = {name: (m["accuracy"], m["llm_share"]) for name, m in methods.items()}
    section = reference_section(entropy, slm_class == labels, llm_class == labels, cfg.reference_shares,
                                "entropy of the SLM's next-token distribution", points)
    llm_of = {d.uid: int(c) for d, c in zip(drafts, llm_class)}
    for name, result in results.items():
        records = result["records"]
        agree = float(np.mean([t.final == llm_of[t.uid] for t in records])) if records else None
        methods[name]["agreement_with_llm"] = agree
        section["methods"][name]["agreement_with_llm"] = agree
    return section


def federated_section(result: dict[str, Any], cfg: SimConfig, init_tau: float = UNCALIBRATED_TAU,
                      init_params: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Convergence of the learned head against the central optimum on the pooled pairs.

    The scalar head's optimum is exact (`central_threshold`); a linear or mlp head is compared with the
    same head fitted centrally (same round-0 start, full batch, Adam) on the same weighted pairs.
    """
    from fedhlm.maths.threshold import central_threshold

    pairs = result["dep"]["pairs"]
    feats = np.concatenate([p[0] for p in pairs.values()]) if pairs else np.zeros((0, 1), np.float32)
    beta = np.concatenate([p[1] for p in pairs.values()]) if pairs else np.zeros(0)
    weights = np.concatenate([p[2] for p in pairs.values()]) if pairs else np.zeros(0)
    u = feats[:, 0] if feats.size else np.zeros(0)
    rounds = result["federated"] or []
    section: dict[str, Any] = {"rounds": rounds, "pairs": int(u.size), "head": cfg.routing.head,
                               "features": cfg.routing.features}
    final_params = result["dep"].get("global_params")
    if u.size and cfg.routing.head == "scalar":
        T, lam = cfg.routing.temperature, cfg.routing.lam
        central_tau = central_threshold(u, beta, lam, method="sigmoid", temperature=T, weights=weights)
        final = next((r["global"] for r in reversed(rounds) if r.get("global") is not None), None)
        if final is None and rounds and rounds[-1]["edges"]:
            final = float(np.mean(list(rounds[-1]["edges"].values())))
        loss = functools.partial(_pooled_loss, cfg, feats, beta, weights)
        section.update({"central_tau": central_tau, "central_loss": loss({"tau": central_tau}),
                        "final_tau": final, "federated_loss": loss({"tau": final}) if final is not None else None,
                        "tau_gap": (abs(final - central_tau) / abs(central_tau)) if final is not None and central_tau else None})
    elif u.size and final_params is not None:
        central = _central_head_params(cfg, feats, beta, weights, init_tau, init_params)
        loss = functools.partial(_pooled_loss, cfg, feats, beta, weights)
        section.update({"central_loss": loss(central), "federated_loss": loss(final_params),
                        "central_params": central, "final_params": final_params})
    if section.get("central_loss") and section.get("federated_loss") is not None:
        section["loss_ratio"] = section["federated_loss"] / section["central_loss"]
        hard = functools.partial(_pooled_loss, cfg, feats, beta, weights, hard=True)
        central_p = section.get("central_params") or {"tau": section.get("central_tau")}
        final_p = final_params if cfg.routing.head != "scalar" else {"tau": section.get("final_tau")}
        section.update({"central_hard_loss": hard(central_p), "federated_hard_loss": hard(final_p)})
        if section["central_hard_loss"] > 0:
            section["hard_loss_ratio"] = section["federated_hard_loss"] / section["central_hard_loss"]
    recs = result["records"]
    tel = result["dep"]
    section["transmissions"] = {"exploration": sum(1 for t in recs if t.reason == "exploration" and t.route == "llm"),
                                "updates": tel["updates_sent"], "models": tel["models_received"]}
    return section


def _pooled_loss(cfg: SimConfig, feats: np.ndarray, beta: np.ndarray, weights: np.ndarray,
                 params: dict[str, Any], hard: bool = False) -> float:
    """The weighted routing loss on the pooled pairs of the run's head with `params` (the rest at its start);
    `hard`: of its hard decisions (send iff score > tau), what a deployment pays, and blind to the scale of w and
    tau, which the sigmoid loss of a linear head keeps rewarding (a larger scale is a steeper sigmoid)."""
    import torch

    from fedhlm.maths.threshold import routing_loss
    from fedhlm.models.head_fit import TorchHead, routing_head

    head = TorchHead(routing_head(cfg.routing, UNCALIBRATED_TAU, cfg.seed))
    head.load({**head.params(), **{k: np.asarray(v, np.float32) for k, v in params.items()}})
    with torch.no_grad():
        f = torch.from_numpy(np.asarray(feats, np.float32))
        s = head.module.route(f).float() if hard else head.module(f)
        return float(routing_loss(s, torch.from_numpy(np.asarray(beta, np.float32)), cfg.routing.lam,
                                  torch.from_numpy(np.asarray(weights, np.float32))))


def _central_head_params(cfg: SimConfig, feats: np.ndarray, beta: np.ndarray, weights: np.ndarray,
                         init_tau: float, init_params: dict[str, np.ndarray] | None = None,
                         steps: int = 600) -> dict[str, list]:
    """The run's head fitted on all clients' pairs at once, from the round-0 start: the central reference."""
    from fedhlm.models.head_fit import TorchHead, fit_pooled, routing_head

    head = TorchHead(routing_head(cfg.routing, init_tau, cfg.seed))
    if init_params is not None:
        head.load(init_params)
    fit_pooled(head.module, feats, beta, lam=cfg.routing.lam, steps=steps, weights=weights)
    return {k: v.tolist() for k, v in head.params().items()}


def lambda_sweep(cfg: SimConfig, prep: Prepared, bar) -> dict[str, list[dict[str, float]]]:
    """Accuracy vs LLM share for each lambda: FedHLM (no P2P, to isolate the threshold) and the static HLM."""
    out: dict[str, list[dict[str, float]]] = {"fedhlm_no_p2p": [], "static_hlm": []}
    for lam in cfg.lambda_sweep:
        res = method_entry(run_method(METHODS["fedhlm_no_p2p"], cfg, prep, lam=lam, progress=bar))
        out["fedhlm_no_p2p"].append({"lambda": lam, "accuracy": res["accuracy"], "llm_share": res["llm_share"]})
        tau = prep.models.static_threshold(prep.calib, lam, cfg.routing.verify)["tau"]
        res = method_entry(run_method(METHODS["static_hlm"], cfg, prep, static_tau=tau, progress=bar))
        out["static_hlm"].append({"lambda": lam, "tau": tau, "accuracy": res["accuracy"], "llm_share": res["llm_share"]})
    return out


def delta_sweep(cfg: SimConfig, prep: Prepared, bar) -> list[dict[str, Any]]:
    from fedhlm.reporting.summary import reuse_by_delivery

    points = []
    for delta in cfg.delta_sweep:
        result = run_method(METHODS["fedhlm"], cfg, prep, delta=delta, progress=bar)
        res = method_entry(result)
        peer = res["peer"]
        point = {"delta": delta, "hit_rate": peer.get("hit_rate") or 0.0,
                 "wrong_reuse_rate": peer.get("wrong_reuse_rate"), "audited": peer["audited"],
                 "added_latency_ms_p50": peer.get("added_latency_ms_p50"), "llm_share": res["llm_share"],
                 "llm_tokens": res["tokens"]["llm"], "accuracy": res["accuracy"]}
        if prep.plan is not None and prep.plan.repeat_of:
            point["by_delivery"] = reuse_by_delivery(result["records"], prep.plan.repeat_of, prep.plan.near_repeats)
        points.append(point)
    return points


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals beside what this run measured."""
    m = report["methods"]
    out = []

    def add(goal: str, measured: Any, met: bool | None) -> None:
        out.append({"goal": goal, "measured": measured, "met": met})

    if "fedhlm" in m:
        add("FedHLM sends the LLM at most 5% of tokens (exploration and audits counted)", m["fedhlm"]["llm_share"],
            m["fedhlm"]["llm_share"] <= 0.05)
        if "llm_only" in m and m["llm_only"]["accuracy"] > 0:
            ratio = m["fedhlm"]["accuracy"] / m["llm_only"]["accuracy"]
            add("FedHLM accuracy >= 98% of LLM-only accuracy", ratio, ratio >= 0.98)
        per_token = m["fedhlm"]["uplink_bytes_per_llm_token"]
        add("uplink bytes per offloaded token <= 1/1000 of a full fp32 vocabulary distribution "
            f"({FULL_VOCAB_FP32_BYTES / 1000:.1f} B)", per_token, per_token <= FULL_VOCAB_FP32_BYTES / 1000)
    routing = (report.get("config") or {}).get("routing") or {}
    target, agreement = routing.get("target_share"), routing.get("target_agreement")
    for name in ("fedhlm", "fedhlm_no_p2p"):
        if target is not None and name in m:
            share = m[name]["llm_share"]
            add(f"{name} sends its routing.target_share of {100 * target:g} % of tokens (within 1 point)", share,
                abs(share - target) <= 0.01)
        if agreement is not None and name in m and m[name].get("agreement_with_llm") is not None:
            agree = m[name]["agreement_with_llm"]
            add(f"{name} agrees with the LLM on its routing.target_agreement of {100 * agreement:g} % of tokens "
                "(within 1 point)", agree, agree >= agreement - 0.01)
    if "fedhlm" in m and "fedhlm_no_p2p" in m:
        # fewer LLM tokens count only when peers resolved some: thresholds learned in two runs differ too
        peer, llm, llm_off = m["fedhlm"]["tokens"]["peer"], m["fedhlm"]["tokens"]["llm"], m["fedhlm_no_p2p"]["tokens"]["llm"]
        add("P2P lowers LLM transmissions vs no P2P (with peer hits)",
            {"fedhlm": llm, "fedhlm_no_p2p": llm_off, "peer_resolved": peer}, peer > 0 and llm < llm_off)
    sweep = report.get("lambda_sweep") or {}
    if sweep.get("fedhlm_no_p2p") and sweep.get("static_hlm"):
        st = sorted(sweep["static_hlm"], key=lambda p: p["llm_share"])
        worst = None
        for p in sweep["fedhlm_no_p2p"]:
            ref = float(np.interp(p["llm_share"], [s["llm_share"] for s in st], [s["accuracy"] for s in st]))
            gap = p["accuracy"] - ref
            worst = gap if worst is None else min(worst, gap)
        add("across the lambda sweep FedHLM accuracy >= static HLM at the same LLM share (worst gap)", worst,
            worst is not None and worst >= -0.005)
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("fedhlm", "torch", "lightning", "transformers", "paho-mqtt", "sentence-transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    from fedhlm.reporting import plots

    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=_json_default))
    if report.get("methods"):
        try:
            report["plots"] = [str(p) for p in plots.write_all(report, out_dir)]
            path.write_text(json.dumps(report, indent=2, default=_json_default))
        except Exception:
            log.exception("plots failed")
    print_table(report)
    print(f"[fedhlm] report: {path}", flush=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def print_table(report: dict[str, Any]) -> None:
    methods = report.get("methods", {})
    if not methods:
        return
    print(f"\n{'method':15s} {'acc':>6s} {'LLM%':>6s} {'local':>6s} {'peer':>5s} {'llm':>5s} {'expl':>5s} "
          f"{'up KB':>8s} {'down KB':>8s} {'p50 ms':>7s} {'p99 ms':>7s}")
    for name, m in methods.items():
        t, b, lat = m["tokens"], m["bytes"], m["latency_ms"]
        print(f"{name:15s} {100 * m['accuracy']:6.2f} {100 * m['llm_share']:6.2f} {t['local']:6d} {t['peer']:5d} "
              f"{t['llm']:5d} {t['exploration']:5d} {b['uplink'] / 1024:8.1f} {b['downlink'] / 1024:8.1f} "
              f"{lat['p50']:7.2f} {lat['p99']:7.2f}")
    w = report.get("workload") or {}
    if w.get("repeat_deliveries"):
        print(f"workload: {w['articles']} articles, {w['total_deliveries']} deliveries (mean {w['deliveries']:g}, Zipf s "
              f"{w['zipf_s']:g}, {100 * w['repeats_same_cluster']:.0f} % of repeats in the first recipient's cluster, "
              f"{w.get('near_repeat_deliveries', 0)} of them another outlet's version)")
    for name, m in methods.items():
        peer = m.get("peer", {})
        cache = peer.get("edge_cache")
        if cache and cache["requests"]:
            ci = peer.get("label_error_ci95")
            err = (f"reused tokens wrong {100 * peer['label_error']:.1f} % (95 % CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}; "
                   f"the SLM on the same tokens {100 * peer['slm_error_same_tokens']:.1f} %)" if ci else "nothing reused")
            print(f"  {name}: edge caches answered {cache['hits']} of {cache['requests']} tokens "
                  f"({100 * cache['hit_rate']:.1f} %), {cache['entries']} entries; the clients' own caches "
                  f"{peer.get('own_cache_hits', 0)}; {err}")
            learned = {e: c["delta"] for e, c in cache["by_edge"].items() if "delta_bands" in c}
            if learned:
                print("    learned delta per edge: " + ", ".join(f"{e} {d:.3f}" for e, d in sorted(learned.items())))
            near = (peer.get("by_delivery") or {}).get("near_repeat")
            if near and near["tokens"]:
                wrong = "-" if near["label_error"] is None else f"{100 * near['label_error']:.1f} %"
                slm = "-" if near["slm_error_same_tokens"] is None else f"{100 * near['slm_error_same_tokens']:.1f} %"
                print(f"    near repeats: {near['tokens']} tokens, {near['llm']} to the LLM, {near['reused']} answered "
                      f"from a cache, {wrong} of those wrong (the SLM on them {slm})")
    ref = report.get("reference")
    if ref:
        shares = "  ".join(f"{100 * p['share']:g}%: {100 * p['uncertainty']:.2f} / {100 * p['oracle']:.2f}"
                           for p in ref["at_shares"])
        print(f"reference (hindsight, not methods), accuracy of the uncertainty curve / the oracle at a share sent: {shares}")
        for name, m in ref["methods"].items():
            if m["oracle_gain_captured"] is not None and 0 < m["llm_share"] < 1:
                print(f"  {name} takes {100 * m['oracle_gain_captured']:.0f} % of the oracle's gain at its share "
                      f"{100 * m['llm_share']:.1f} % (uncertainty curve there: {100 * m['uncertainty_at_share']:.2f} %)")
    for t in report.get("targets", []):
        mark = "MET " if t["met"] else "MISS"
        print(f"  [{mark}] {t['goal']}: {t['measured']}")
    for name, reasons in (report.get("degraded") or {}).items():
        print(f"  DEGRADED {name}: {'; '.join(reasons)} - its numbers are not those of a healthy deployment")
    print(f"status: {report.get('status')}, wall {report.get('wall_s')} s")
