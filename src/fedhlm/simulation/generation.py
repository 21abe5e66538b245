"""`fedhlm simulate` with `generation.enabled` (issue 18): multi-token generation through the router.

Each client writes the target of its test articles (`data.objectives`: the title from the description, or
the article's continuation), token by token with its SLM (`models.generation.SLMSequenceDrafter`), routing
every token through its policy and threshold head (`roles.generation.SessionRouter`); an offloaded token is
verified in the LLM's session of that sequence over MQTT. The methods are those of classification: the SLM
alone, the LLM for every token (the quality reference), U-HLM's static threshold fitted on calibration
prompts, and FedHLM's learned heads federated through edges and the cloud, whose labels are the generation
verdicts; `fedhlm` adds the peer step through the edges' caches (`p2p.resolver: edge`), which pays on a
workload with repeats (`workload.deliveries`). Every method that talks gets its own private brokers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm.core.settings import UNCALIBRATED_TAU, ClientSettings
from fedhlm.core.termination import raise_if_terminated
from fedhlm.simulation.config import SimConfig
from fedhlm.simulation.methods import METHODS, Method


@dataclass
class GenerationPrepared:
    """What every method of a generation run shares."""

    slm: Any  # the SLM's causal LM (torch module)
    llm: Any  # models.llm.LLMRefiner, its sessions the workers' KV caches
    tokenizer: Any
    items: list[Any]  # test NewsItems
    prompts: dict[int, list[int]]  # uid -> the generation task's prompt ids
    task: str  # the generation task, in words (`data.objectives`)
    references: dict[int, str]  # uid -> the real target, decoded
    calib_prompts: list[list[int]]
    plan: Any  # simulation.run.ClientPlan
    contexts: dict[int, Any]  # uid -> the prompt's representation for the peer step (empty: no p2p method)
    workload: dict[str, Any]  # the report's workload section
    folders: dict[str, str]
    source: str
    top_k: int

    @property
    def stop_id(self) -> int:
        return int(self.tokenizer.sep_token_id)


def prepare_generation(cfg: SimConfig, progress: bool = True) -> GenerationPrepared:
    """The two title models (trained once into the cache), the test and calibration descriptions, the plan."""
    from fedhlm.data.module import NewsDataModule
    from fedhlm.data.objectives import generation_task
    from fedhlm.data.partition import stratified_subset
    from fedhlm.models.backbone import load_causal_lm
    from fedhlm.models.cache import fit_config_with, get_or_train
    from fedhlm.models.llm import LLMRefiner
    from fedhlm.simulation.run import add_repeats, plan_clients

    overrides = cfg.data.model_overrides()
    slm_cfg, llm_cfg = fit_config_with(cfg.models.slm, overrides), fit_config_with(cfg.models.llm, overrides)
    slm_folder = get_or_train("gen", slm_cfg, progress=progress)
    llm_folder = get_or_train("gen", llm_cfg, progress=progress)
    slm = load_causal_lm(slm_folder).eval()
    llm = LLMRefiner(pretrained=str(llm_folder), max_sessions=max(256, 4 * cfg.federation.clients)).eval()
    data = NewsDataModule(**llm_cfg["data"])
    data.setup()
    splits = data.splits
    items = list(splits.test) if not cfg.data.inputs else stratified_subset(splits.test, cfg.data.inputs, seed=cfg.seed)
    max_length, task = int(llm_cfg["data"].get("max_length", 64)), generation_task(data.objective)
    plan = plan_clients(cfg, items, data.task.num_classes)
    workload = add_repeats(cfg, items, plan)  # repeat deliveries join `items` under new uids
    uids = [it.uid for it in items]
    prompts = dict(zip(uids, task.prompts(data.tokenizer, items, max_length)))
    calib = task.prompts(data.tokenizer, data.calib_items()[: cfg.generation.calib_prompts], max_length)
    contexts: dict[int, Any] = {}
    if any(METHODS[m].p2p for m in cfg.methods):  # one embedding per prompt, as a device computes it once
        from fedhlm.models.embedder import ContextEmbedder

        texts = [data.tokenizer.decode(prompts[u], skip_special_tokens=True) for u in uids]
        contexts = dict(zip(uids, ContextEmbedder().encode(texts)))
    return GenerationPrepared(
        slm=slm, llm=llm, tokenizer=data.tokenizer, items=items, prompts=prompts, task=task.label,
        references=dict(zip(uids, task.references(data.tokenizer, items, max_length))), calib_prompts=calib,
        plan=plan, contexts=contexts, workload=workload, folders={"slm": str(slm_folder), "llm": str(llm_folder)},
        source=data.source_name or "?", top_k=cfg.routing.top_k)


def calibration(cfg: SimConfig, prep: GenerationPrepared) -> dict[str, Any]:
    """U-HLM's static threshold for generation: the SLM drafts each calibration title greedily; the LLM
    verifies every draft in a session (the service's own verification); (entropy, beta) pairs -> the line."""
    import torch

    from fedhlm.maths.threshold import uhlm_threshold
    from fedhlm.models.generation import SLMSequenceDrafter

    u, beta = [], []
    for i, prompt in enumerate(prep.calib_prompts):
        drafter, key, sequence, synced = SLMSequenceDrafter(prep.slm, prep.top_k, seed=cfg.seed), f"calib/{i}", list(prompt), 0
        proposal = drafter.open(prompt)
        for _ in range(cfg.generation.max_new_tokens):
            _, _, b, _ = prep.llm.verify_in_session(
                key, sequence[synced:], synced, torch.from_numpy(proposal.topk_ids.astype("int64")),
                torch.from_numpy(proposal.topk_probs), None, proposal.draft_token, mode=cfg.routing.verify)
            synced = len(sequence)
            u.append(float(proposal.features[0]))
            beta.append(float(b))
            sequence.append(proposal.draft_token)
            if proposal.draft_token == prep.stop_id or len(sequence) - len(prompt) == cfg.generation.max_new_tokens:
                break
            proposal = drafter.append(proposal.draft_token)
        prep.llm.end_session(key)
    fit = uhlm_threshold(np.asarray(u), np.asarray(beta), cfg.routing.lam)
    return {**fit, "pairs": len(u), "mean_beta": float(np.mean(beta)) if beta else None,
            "u": np.asarray(u), "beta": np.asarray(beta)}


def slm_alone(prep: GenerationPrepared, prompt: list[int], max_new: int, seed: int) -> tuple[list[int], list[Any]]:
    """The SLM's greedy title on the device, nothing sent (the slm_only method)."""
    from fedhlm.models.generation import SLMSequenceDrafter
    from fedhlm.roles.generation import GeneratedToken

    drafter, tokens, steps = SLMSequenceDrafter(prep.slm, prep.top_k, seed=seed), [], []
    proposal = drafter.open(prompt)
    for _ in range(max_new):
        steps.append(GeneratedToken(len(prompt) + len(tokens), proposal.draft_token, proposal.draft_token, "local",
                                    latency_ms=proposal.ms))
        tokens.append(proposal.draft_token)
        if proposal.draft_token == prep.stop_id or len(tokens) == max_new:
            break
        proposal = drafter.append(proposal.draft_token)
    return tokens, steps


def run_generation_method(method: Method, cfg: SimConfig, prep: GenerationPrepared, *, static_tau: float,
                          init_tau: float, bar=None) -> dict[str, Any]:  # noqa: ANN001
    """One method over its own brokers: uid -> tokens, every routed step, bytes and the LLM workers' numbers."""
    import torch

    from fedhlm.core.records import ModelLimits
    from fedhlm.models.generation import SLMSequenceDrafter
    from fedhlm.models.head_fit import TorchHead, routing_head
    from fedhlm.models.kv_cache import RefinerSessions
    from fedhlm.roles.deployment import Deployment, DeploymentSpec
    from fedhlm.roles.generation import SessionRouter
    from fedhlm.transport.topology import TOPOLOGIES

    plan, gen = prep.plan, cfg.generation
    items = prep.items
    tokens: dict[int, list[int]] = {}
    steps: dict[int, list[Any]] = {}  # uid -> its GeneratedTokens
    if not method.needs_network:
        for r, by_client in enumerate(plan.rounds):
            for idx in by_client.values():
                for i in idx:
                    uid = items[i].uid
                    tokens[uid], steps[uid] = slm_alone(prep, prep.prompts[uid], gen.max_new_tokens, cfg.seed)
            raise_if_terminated()
            if bar is not None:
                bar.update(1)
        return {"tokens": tokens, "steps": steps, "bytes": None, "llm": None, "fallbacks": 0, "edges": {}}
    settings = ClientSettings.from_config(cfg, client_id="-", edge_id="-", policy=method.policy, static_tau=static_tau,
                                          p2p=dataclasses.replace(cfg.p2p, enabled=method.p2p))  # the method decides
    contexts = prep.contexts if method.p2p else {}

    def q_fn(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return prep.llm.q_probs({"input_ids": ids, "attention_mask": mask, "last_index": last})

    config = prep.llm.model.config
    spec = DeploymentSpec(
        assignment=plan.assignment, client=settings,
        head_factory=lambda: TorchHead(routing_head(cfg.routing, init_tau, cfg.seed), engine=cfg.routing.fit_engine),
        q_fn=q_fn, class_of=lambda t: t, llm_sessions=RefinerSessions(prep.llm), session_ttl_s=gen.session_ttl_s,
        llm_limits=ModelLimits(int(config.vocab_size), int(config.max_position_embeddings)),
        pad_id=prep.tokenizer.pad_token_id or 0)
    users = {**{c: "client" for c in plan.assignment}, **{e: "edge" for e in spec.edges}, "cloud": "cloud",
             "llm": "llm", "admin": "admin"}
    prep.llm.sessions.clear()
    with TOPOLOGIES[cfg.topology](users, plan.assignment) as topology:
        dep = Deployment(spec, topology.address).start()
        try:
            for r, by_client in enumerate(plan.rounds):
                def work(client, r=r):  # noqa: ANN001, ANN202
                    router = SessionRouter(client)
                    return [(items[i].uid, router.generate(SLMSequenceDrafter(prep.slm, prep.top_k, seed=cfg.seed),
                                                           prep.prompts[items[i].uid], gen.max_new_tokens, r,
                                                           stop_ids={prep.stop_id},
                                                           context=contexts.get(items[i].uid)))
                            for i in by_client.get(client.id, [])]

                for done in dep.run_clients(r, work).values():
                    for uid, g in done:
                        tokens[uid], steps[uid] = g.tokens, g.steps
                raise_if_terminated()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{method.name} r{r}")
        finally:
            drained = time.monotonic() + 5.0  # the last titles' SessionEnds (QoS 1) may still be on their way
            while prep.llm.sessions and time.monotonic() < drained:
                time.sleep(0.05)
            counts = dep.byte_counts()
            edges = {eid: e.resolver.report() for eid, e in dep.edges.items() if e.resolver is not None}
            stats = [w.stats for w in dep.llm]
            fallbacks = sum(c.counters.fallbacks for c in dep.clients.values())
            dep.stop()
    llm = {"session_tokens": sum(s.session_tokens for s in stats), "new_tokens_encoded": sum(s.session_new_tokens for s in stats),
           "misses": sum(s.session_misses for s in stats), "ended": sum(s.sessions_ended for s in stats),
           "expired": sum(s.sessions_expired for s in stats), "compute_s": sum(s.compute_s for s in stats),
           "sessions_left": len(prep.llm.sessions)}
    llm["ms_per_verified_token"] = 1000.0 * llm["compute_s"] / llm["session_tokens"] if llm["session_tokens"] else None
    return {"tokens": tokens, "steps": steps, "bytes": counts, "llm": llm, "fallbacks": fallbacks, "edges": edges}


def reencode_cost(prep: GenerationPrepared, sequences: list[list[list[int]]], batch: int = 1) -> dict[str, Any]:
    """LLM compute per verified token when every token of a sequence is verified (LLM only), with `batch`
    sequences in flight as a worker serving that many generating clients has them: a sequence that ends makes
    room for the next one (continuous batching). In sessions, each tick opens the new sequences in one pass and
    encodes the next token of every other one in another; re-encoding, each tick runs every sequence's whole
    prefix in one padded pass. The times are the forward passes'."""
    import torch

    if not sequences:
        return {"sequences": 0, "batch": batch, "speedup": None}
    llm = prep.llm
    # the schedule: which sequences are in flight at each tick, and how far each has got (the same for both)
    waiting = list(range(len(sequences)))
    flight: dict[int, int] = {}  # sequence -> verified tokens so far
    ticks: list[list[tuple[int, int]]] = []
    while waiting or flight:
        while waiting and len(flight) < batch:
            flight[waiting.pop(0)] = 0
        ticks.append(sorted(flight.items()))
        for i in list(flight):
            flight[i] += 1
            if flight[i] > len(sequences[i][1]):  # the prompt's verdict and one per token generated
                del flight[i]
    session_s = reencode_s = 0.0
    start = time.perf_counter()
    for tick in ticks:
        openings = [(f"bench/{i}", sequences[i][0], 0) for i, done in tick if done == 0]
        steps = [(f"bench/{i}", [sequences[i][1][done - 1]], len(sequences[i][0]) + done - 1) for i, done in tick if done]
        with llm.serving():
            llm.sessions.extend_many(llm.model, openings + steps, llm.device)
    session_s = time.perf_counter() - start
    for i in range(len(sequences)):
        llm.end_session(f"bench/{i}")
    start = time.perf_counter()
    for tick in ticks:
        prefixes = [sequences[i][0] + sequences[i][1][:done] for i, done in tick]
        width = max(len(p) for p in prefixes)
        llm.q_probs({"input_ids": torch.tensor([p + [0] * (width - len(p)) for p in prefixes]),
                     "attention_mask": torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prefixes]),
                     "last_index": torch.tensor([len(p) - 1 for p in prefixes])})
    reencode_s = time.perf_counter() - start
    n = sum(len(out) + 1 for _, out in sequences)
    session_tokens = sum(len(prompt) + len(out) for prompt, out in sequences)
    reencode_tokens = sum(sum(range(len(prompt), len(prompt) + len(out) + 1)) for prompt, out in sequences)
    s_ms, r_ms = 1000.0 * session_s / n, 1000.0 * reencode_s / n
    # a one-token pass is bound by reading the weights, not by its arithmetic: what a batch shares
    return {"sequences": len(sequences), "batch": batch, "ticks": len(ticks), "verified_tokens": n,
            "session_ms_per_token": s_ms, "reencode_ms_per_token": r_ms, "speedup": r_ms / s_ms if s_ms > 0 else None,
            "tokens_encoded": {"session": session_tokens, "reencode": reencode_tokens,
                               "ratio": reencode_tokens / session_tokens if session_tokens else None}}


def simulate_generation(cfg: SimConfig, out_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Every configured method on the same prompts, split the same way; report.json and a plot in out_dir."""
    from tqdm import tqdm

    from fedhlm.reporting.generation import generation_by_delivery, generation_summary, generation_targets
    from fedhlm.simulation.run import reporting, versions, warm_start

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"status": "running", "kind": "generation", "config": cfg.to_dict(), "seed": cfg.seed,
                              "versions": versions(), "methods": {}}
    with reporting(report, out_dir, write_generation_report):
        print("[fedhlm] preparing the generation models and data ...", flush=True)
        prep = prepare_generation(cfg, progress=show_progress)
        report["data"] = {"task": prep.task, "source": prep.source, "test_prompts": len(prep.items),
                          "calibration_prompts": len(prep.calib_prompts), "assignment": prep.plan.assignment}
        report["workload"] = prep.workload
        report["models"] = prep.folders
        print("[fedhlm] calibrating U-HLM's threshold on generation drafts ...", flush=True)
        static = calibration(cfg, prep)
        u, beta = static.pop("u"), static.pop("beta")
        report["static_hlm"] = static
        init_tau = warm_start(cfg.routing, static["tau"], u, beta)
        report["init_tau"] = init_tau
        decode = lambda ids: prep.tokenizer.decode([t for t in ids if t != prep.stop_id])  # noqa: E731
        order = sorted(cfg.methods, key=lambda m: m != "llm_only")  # the quality reference first
        bar = tqdm(total=cfg.federation.rounds * len(order), desc="rounds", unit="round", disable=not show_progress)
        llm_tokens = None
        for name in order:
            method = METHODS[name]
            tau = static["tau"] if method.calibrated else UNCALIBRATED_TAU
            result = run_generation_method(method, cfg, prep, static_tau=tau, init_tau=init_tau, bar=bar)
            if name == "llm_only":
                llm_tokens = result["tokens"]
            flat = [s for uid in sorted(result["steps"]) for s in result["steps"][uid]]
            entry = generation_summary(flat, result["tokens"], prep.references, decode, llm_tokens)
            if prep.plan.repeat_of:
                entry["by_delivery"] = generation_by_delivery(result["steps"], result["tokens"], prep.references,
                                                              decode, prep.plan.repeat_of, prep.plan.near_repeats)
            entry["llm_service"] = result["llm"]
            entry["fallbacks"] = result["fallbacks"]
            if result["edges"]:
                entry["edge_caches"] = result["edges"]
            if result["bytes"] is not None:
                entry["bytes"] = {"uplink": sum(result["bytes"].uplink.values()),
                                  "downlink": sum(result["bytes"].downlink.values()),
                                  "by_kind": {"uplink": dict(result["bytes"].uplink),
                                              "downlink": dict(result["bytes"].downlink)}}
            entry["examples"] = [{"reference": prep.references[it.uid], "generated": decode(result["tokens"][it.uid])}
                                 for it in prep.items[:3]]
            report["methods"][name] = entry
        bar.close()
        if llm_tokens is not None and cfg.generation.reencode_sequences:
            chosen = [it.uid for it in prep.items[: cfg.generation.reencode_sequences]]
            sequences = [[prep.prompts[u], llm_tokens[u]] for u in chosen]
            # at the run's concurrency (every client generating at once, as the LLM-only method ran), and alone
            report["reencode"] = {**reencode_cost(prep, sequences, batch=min(cfg.federation.clients, len(sequences))),
                                  "alone": reencode_cost(prep, sequences, batch=1)}
        report["targets"] = generation_targets(report["methods"], report.get("reencode"))
        degraded = {n: m["fallbacks"] for n, m in report["methods"].items() if m["fallbacks"]}
        report["status"] = "degraded" if degraded else "complete"
        if degraded:
            report["degraded"] = {n: [f"{k} tokens fell back to the SLM (no verdict)"] for n, k in degraded.items()}
    return report


def write_generation_report(report: dict[str, Any], out_dir: Path) -> None:
    import json

    from fedhlm.reporting import plots
    from fedhlm.simulation.run import _json_default

    path = out_dir / "report.json"
    if report.get("methods"):
        report["plots"] = [str(plots.quality_vs_transmissions(report, out_dir / "quality_vs_transmissions.png"))]
    path.write_text(json.dumps(report, indent=2, default=_json_default))
    print_generation_table(report)
    print(f"[fedhlm] report: {path}", flush=True)


def print_generation_table(report: dict[str, Any]) -> None:
    methods = report.get("methods", {})
    if not methods:
        return
    print(f"\n{'method':15s} {'ROUGE-L':>7s} {'agree':>6s} {'LLM%':>6s} {'edge%':>6s} {'accept':>6s} {'tokens':>6s} "
          f"{'up 1st':>6s} {'up next':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'LLM ms/tok':>10s}")
    for name, m in methods.items():
        up = m["uplink_bytes_per_offloaded_token"]
        llm = m.get("llm_service") or {}
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{name:15s} {m['rouge_l']:7.4f} {fmt(m.get('token_agreement_with_llm'), '6.3f'):>6s} "
              f"{100 * m['llm_share']:6.2f} {100 * m['tokens']['peer'] / max(1, m['tokens']['generated']):6.2f} "
              f"{fmt(m['acceptance_rate'], '6.3f'):>6s} {m['tokens']['generated']:6d} "
              f"{fmt(up['first'], '6.0f'):>6s} {fmt(up['later_mean'], '7.1f'):>7s} {m['latency_ms']['p50']:7.2f} "
              f"{m['latency_ms']['p99']:7.2f} {fmt(llm.get('ms_per_verified_token'), '10.2f'):>10s}")
    for name, m in methods.items():
        for group, g in (m.get("by_delivery") or {}).items():
            if g["tokens"]:
                print(f"{name} {group}: {g['sequences']} sequences, {g['tokens']} tokens, {g['llm']} to the LLM, "
                      f"{g['peer']} from the edge, audited {g['audited']} ({g['wrong']} not the LLM's), "
                      f"ROUGE-L {g['rouge_l']:.4f}")
    if report.get("reencode"):
        r = report["reencode"]
        for label, x in ((f"{r['batch']} sequences at once", r), ("one sequence at a time", r.get("alone"))):
            if x and x.get("speedup") is not None:
                print(f"LLM per verified token, {label}: {x['session_ms_per_token']:.2f} ms in sessions vs "
                      f"{x['reencode_ms_per_token']:.2f} ms re-encoding the prefixes ({x['speedup']:.1f}x wall time; "
                      f"{x['tokens_encoded']['ratio']:.1f}x fewer tokens encoded), {x['sequences']} sequences")
    for t in report.get("targets", []):
        print(f"  [{'MET ' if t['met'] else 'MISS'}] {t['goal']}: {t['measured']}")
