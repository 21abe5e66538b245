"""`fedhlm client|edge|cloud|llm`: one role as its own process, against any broker.

The same classes a simulation runs as threads; here each gets its broker URL (with its own
credentials) and its share of the work from the command line and a simulation config, so
roles can run on separate hosts:

    fedhlm llm    --broker mqtt://llm:PASS@host:1883 --config configs/quick.yaml
    fedhlm cloud  --broker mqtt://cloud:PASS@host:1883 --edges e0,e1,e2
    fedhlm edge   --broker mqtt://e0:PASS@host:1883 --clients c000,c003,c006,c009
    fedhlm client --broker mqtt://c000:PASS@host:1883 --edge e0 --shard 0/12 --config configs/quick.yaml

`FEDHLM_BROKER` may hold the URL instead of `--broker` (keeps the password out of `ps`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import numpy as np

from fedhlm.simulation.config import ConfigError, load_config
from fedhlm.transport.address import BrokerAddress

log = logging.getLogger(__name__)


def _parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fedhlm {role}", description=f"run the {role} role as its own process")
    p.add_argument("--broker", default=os.environ.get("FEDHLM_BROKER"),
                   help="mqtt://user:pass@host:port (default: $FEDHLM_BROKER)")
    p.add_argument("--id", default=None, help="role id (default: the broker username)")
    p.add_argument("--config", default=None, help="simulation config (routing, federation, p2p sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", default=None, help="state file of an edge or the cloud (resume after restart)")
    if role == "edge":
        p.add_argument("--clients", required=True, help="comma-separated client ids of this cluster")
        p.add_argument("--neighbours", default="", help="comma-separated edge ids to forward peer queries to")
    if role == "cloud":
        p.add_argument("--edges", required=True, help="comma-separated edge ids")
    if role == "client":
        p.add_argument("--edge", required=True, help="the edge id of this client's cluster")
        p.add_argument("--shard", default="0/1", help="i/N: this client takes the i-th of N shares of the test inputs")
    if role == "llm":
        p.add_argument("--group", default="llm", help="shared-subscription group of the LLM workers")
    return p


def _wait_for_signal(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def main(argv: list[str]) -> int:
    role, rest = argv[0], argv[1:]
    args = _parser(role).parse_args(rest)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    if not args.broker:
        print(f"fedhlm {role}: --broker (or FEDHLM_BROKER) is required", file=sys.stderr)
        return 2
    try:
        address = BrokerAddress.from_url(args.broker)
        cfg = load_config(args.config, args.overrides)
    except (ValueError, ConfigError) as exc:
        print(f"fedhlm {role}: {exc}", file=sys.stderr)
        return 2
    role_id = args.id or address.username
    if not role_id:
        print(f"fedhlm {role}: give --id or a username in the broker URL", file=sys.stderr)
        return 2
    return {"llm": run_llm, "cloud": run_cloud, "edge": run_edge, "client": run_client}[role](args, cfg, address, role_id)


def _initial_params(cfg) -> dict[str, np.ndarray]:
    from fedhlm.maths.threshold import ThresholdHead

    tau = 0.5 if cfg.routing.init_tau is None else cfg.routing.init_tau
    head = ThresholdHead(tau=tau, temperature=cfg.routing.temperature)
    return {k: v.detach().numpy() for k, v in head.state_dict().items()}


def run_llm(args, cfg, address: BrokerAddress, role_id: str) -> int:
    from fedhlm.models.hybrid import HybridModels
    from fedhlm.roles.llm_service import LLMService

    models = HybridModels(cfg.models.slm, cfg.models.llm)
    service = LLMService(address, models.q_fn, group=args.group, mode=cfg.routing.verify,
                         pad_id=models.tokenizer.pad_token_id or 0, seed=cfg.seed).start()
    print(f"LLM worker {role_id} serving {address.public_url}", flush=True)
    stop = threading.Event()
    _wait_for_signal(stop)
    service.stop()
    print(f"served {service.stats.requests} requests in {service.stats.batches} batches", flush=True)
    return 0


def run_cloud(args, cfg, address: BrokerAddress, role_id: str) -> int:
    from fedhlm.roles.cloud import CloudServer

    cloud = CloudServer(role_id, address, args.edges.split(","), _initial_params(cfg), quorum=1.0,
                        deadline_s=cfg.federation.round_deadline_s, method=cfg.federation.aggregation,
                        checkpoint=args.checkpoint).start()
    print(f"cloud {role_id} at round {cloud.round}, edges {args.edges}", flush=True)
    stop = threading.Event()
    _wait_for_signal(stop)
    cloud.stop()
    return 0


def run_edge(args, cfg, address: BrokerAddress, role_id: str) -> int:
    from fedhlm.roles.edge import EdgeServer

    neighbours = [e for e in args.neighbours.split(",") if e]
    edge = EdgeServer(role_id, address, args.clients.split(","), _initial_params(cfg),
                      quorum=cfg.federation.quorum, deadline_s=cfg.federation.round_deadline_s,
                      method=cfg.federation.aggregation, cloud_every=cfg.federation.cloud_every,
                      global_wait_s=3 * cfg.federation.round_deadline_s, neighbours=neighbours,
                      checkpoint=args.checkpoint).start()
    print(f"edge {role_id} at round {edge.round}, clients {args.clients}", flush=True)
    stop = threading.Event()
    _wait_for_signal(stop)
    edge.stop()
    return 0


def run_client(args, cfg, address: BrokerAddress, role_id: str) -> int:
    from fedhlm.data.module import NewsDataModule
    from fedhlm.data import partition
    from fedhlm.models.embedder import ContextEmbedder
    from fedhlm.models.head_fit import TorchHead
    from fedhlm.models.hybrid import HybridModels, context_texts
    from fedhlm.roles.client import Client, ClientSettings
    from fedhlm.maths.threshold import ThresholdHead

    index, total = (int(x) for x in args.shard.split("/"))
    models = HybridModels(cfg.models.slm, cfg.models.llm, top_k=cfg.routing.top_k)
    dm = NewsDataModule(**models.configs["slm"]["data"])
    dm.setup()
    test = list(dm.splits.test)[: cfg.data.inputs or None]
    part = partition([it.label for it in test], total, alpha=cfg.data.alpha, seed=cfg.seed)[index]
    mine = [test[i] for i in part]
    embedder = ContextEmbedder() if cfg.p2p.enabled else None
    drafts = models.draft(mine, embedder.encode(context_texts(mine)) if embedder else None)
    tau = cfg.routing.init_tau if cfg.routing.init_tau is not None else 0.5
    settings = ClientSettings(
        client_id=role_id, edge_id=args.edge, policy="learned", exploration=cfg.routing.exploration,
        importance_weights=cfg.routing.importance_weights,
        lam=cfg.routing.lam, local_steps=cfg.routing.local_steps, lr=cfg.routing.lr, optimizer=cfg.routing.optimizer,
        lr_decay=cfg.routing.lr_decay, llm_timeout_s=cfg.routing.llm_timeout_s,
        llm_retries=cfg.routing.llm_retries, noise_std=cfg.routing.noise_std,
        round_wait_s=2 * cfg.federation.round_deadline_s, personalise=cfg.federation.personalise,
        p2p=cfg.p2p.enabled, delta=cfg.p2p.delta, p2p_deadline_s=cfg.p2p.deadline_ms / 1000, p2p_scope=cfg.p2p.scope,
        audit=cfg.p2p.audit, embedder_name=embedder.name if embedder else "none", seed=cfg.seed,
    )
    head = TorchHead(ThresholdHead(tau=tau, temperature=cfg.routing.temperature), engine=cfg.routing.fit_engine)
    client = Client(settings, address, head, models.class_of,
                    embedder.dim if embedder else 384).start()
    chunks = np.array_split(np.arange(len(drafts.inputs)), cfg.federation.rounds)
    correct = total_tokens = 0
    try:
        for r, chunk in enumerate(chunks):
            records = client.run_round(r, [drafts.inputs[i] for i in chunk], drafts.ms_per_token)
            client.finish_round(r)
            correct += sum(1 for t in records if t.final == t.label)
            total_tokens += len(records)
            llm = sum(1 for t in records if t.route == "llm")
            print(f"round {r}: {len(records)} tokens, {llm} to the LLM, tau={client.head.effective_tau():.4f}",
                  flush=True)
    finally:
        client.stop()
    print(f"client {role_id}: accuracy {correct / max(1, total_tokens):.4f} over {total_tokens} tokens", flush=True)
    time.sleep(0.1)
    return 0
