"""`fedhlm bench scale`: the FedHLM pipeline with 10, 100 and 1000 simulated clients over a real broker.

Clients share one SLM instance (their drafts are computed in one batched pass, as a
gateway would) but each keeps its own MQTT connection, session, head, cache and rounds;
their connections share one network thread (`transport.netloop.NetworkLoop`). Printed per
size: tokens/s, broker messages/s (every role's publishes), peak RSS of this process and
of the broker, wall time, and the ratio of the pipeline's tokens/s to the same models
called in-process without MQTT (SLM drafts + LLM verification of the same offloaded tokens).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any



def in_process_tokens_per_s(prep, records: list, mode: str) -> float:  # noqa: ANN001
    """The same work without MQTT: the SLM's drafts of every item plus one batched LLM verification of the
    offloaded tokens, in one process."""
    models = prep.models
    drafted = models.draft(prep.items)
    by_uid = {d.uid: d for d in drafted.inputs}
    sent = [by_uid[t.uid] for t in records if t.route == "llm"]
    start = time.perf_counter()
    if sent:
        models.llm_verdicts(sent, mode)
    total = drafted.seconds + time.perf_counter() - start
    return len(records) / total if total > 0 else float("inf")


def edge_count(clients: int, clients_per_edge: int | None = None) -> int:
    """Edges for a size: `clients_per_edge` each when given, else a quarter of the clients, at most 10."""
    if clients_per_edge is not None:
        return max(1, -(-clients // clients_per_edge))
    return max(1, min(clients // 4, 10))


def run_size(cfg, prep, clients: int, base_inputs: int,  # noqa: ANN001
             clients_per_edge: int | None = None) -> dict[str, Any]:
    """One pipeline run with `clients` clients over max(base_inputs, clients) inputs (at least one each)."""
    from fedhlm.simulation import run as sim
    from fedhlm.simulation.methods import METHODS

    items = prep.items[: max(base_inputs, clients)]
    edges = edge_count(clients, clients_per_edge)
    size_cfg = replace(cfg, federation=replace(cfg.federation, clients=clients, edges=edges,
                                               clustering="round_robin"))
    prep = replace(prep, items=items, plan=sim.plan_clients(size_cfg, items, prep.task.num_classes))
    method = METHODS["fedhlm"] if size_cfg.p2p.enabled else METHODS["fedhlm_no_p2p"]
    start = time.perf_counter()
    result = sim.run_method(method, size_cfg, prep)
    wall = time.perf_counter() - start
    records = result["records"]
    dep = result["dep"]
    messages = dep.get("messages_sent_total", 0)
    in_proc = in_process_tokens_per_s(prep, records, size_cfg.routing.verify)
    tokens_per_s = len(records) / wall if wall > 0 else 0.0
    return {
        "clients": clients, "edges": edges, "tokens": len(records),
        "llm_tokens": sum(1 for t in records if t.route == "llm"),
        "wall_s": round(wall, 2), "tokens_per_s": tokens_per_s,
        "broker_messages_per_s": messages / wall if wall > 0 else 0.0, "messages": messages,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "broker_peak_rss_mb": dep.get("broker_peak_rss_mb"),
        "in_process_tokens_per_s": in_proc, "pipeline_vs_in_process": tokens_per_s / in_proc if in_proc else None,
        "accuracy": sum(1 for t in records if t.final == t.label) / max(1, len(records)),
        "phases_s": {k: round(v, 2) for k, v in (dep.get("phases_s") or {}).items()},  # connect / rounds / stop
    }


def _phases(row: dict[str, Any]) -> str:
    p = row.get("phases_s") or {}
    return ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in p.items())


def main(argv: list[str] | None = None) -> int:
    from fedhlm.simulation import run as sim
    from fedhlm.simulation.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="fedhlm bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients-per-edge", type=int, default=None,
                        help="cluster size (a peer query reaches every client of its cluster); "
                             "default: a quarter of the clients per edge, at most 10 edges")
    parser.add_argument("--inputs", type=int, default=400, help="test inputs shared by the clients (quick-sized: 400)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="JSON file (default runs/bench-scale-<timestamp>.json)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if args.clients_per_edge is not None and args.clients_per_edge < 1:
        print(f"fedhlm bench scale: --clients-per-edge must be >= 1, got {args.clients_per_edge}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, [*args.overrides, f"federation.rounds={args.rounds}",
                                        f"data.inputs={max(args.inputs, *sizes)}", "methods=[fedhlm]"])
    except ConfigError as exc:
        print(f"fedhlm bench scale: config error: {exc}", file=sys.stderr)
        return 2
    print("[bench scale] preparing models and data ...", flush=True)
    prep = sim.prepare_inputs(cfg, progress=True)
    prep.init_tau = (cfg.routing.init_tau if cfg.routing.init_tau is not None
                     else prep.models.static_threshold(prep.calib, cfg.routing.lam, cfg.routing.verify)["tau"])
    rows = []
    for n in sizes:
        print(f"[bench scale] {n} clients ...", flush=True)
        try:
            rows.append(run_size(cfg, prep, n, args.inputs, args.clients_per_edge))
        except Exception as exc:  # a size that does not run is a result too: say so and go on
            print(f"  {n:5d} clients: FAILED: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"clients": n, "error": f"{type(exc).__name__}: {exc}"})
            continue
        r = rows[-1]
        print(f"  {n:5d} clients: {r['tokens_per_s']:8.1f} tok/s, {r['broker_messages_per_s']:8.1f} msg/s, "
              f"wall {r['wall_s']:7.1f} s ({_phases(r)}), RSS {r['peak_rss_mb']:.0f} MB, "
              f"x{r['pipeline_vs_in_process']:.3f} of in-process", flush=True)
    header = f"{'clients':>7s} {'tokens':>6s} {'tok/s':>8s} {'msg/s':>8s} {'wall s':>7s} {'RSS MB':>7s} {'broker MB':>9s} {'in-proc tok/s':>13s} {'ratio':>6s}"
    print("\n" + header)
    for r in rows:
        if "error" in r:
            print(f"{r['clients']:7d}  failed: {r['error']}")
            continue
        broker_mb = r["broker_peak_rss_mb"] or float("nan")
        print(f"{r['clients']:7d} {r['tokens']:6d} {r['tokens_per_s']:8.1f} {r['broker_messages_per_s']:8.1f} "
              f"{r['wall_s']:7.1f} {r['peak_rss_mb']:7.0f} {broker_mb:9.1f} {r['in_process_tokens_per_s']:13.1f} "
              f"{r['pipeline_vs_in_process']:6.3f}")
    out = Path(args.out or Path("runs") / time.strftime("bench-scale-%Y%m%d-%H%M%S.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sizes": rows, "rounds": args.rounds, "base_inputs": args.inputs,
                               "versions": sim.versions()}, indent=2, default=float))
    print(f"[bench scale] wrote {out}")
    return 0
