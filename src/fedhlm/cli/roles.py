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
from collections.abc import Callable

import numpy as np

from fedhlm.core.settings import UNCALIBRATED_TAU, ClientSettings
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
        p.add_argument("--shard", default="0/1", type=shard, help="i/N: this client takes the i-th of N shares of the test inputs")
    if role == "llm":
        p.add_argument("--group", default="llm", help="shared-subscription group of the LLM workers")
    return p


def shard(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N, as argparse's type (a bad value is a one-line usage error, not a traceback)."""
    try:
        index, total = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N, e.g. 0/12, got {text!r}") from None
    if not 0 <= index < total:
        raise argparse.ArgumentTypeError(f"need 0 <= i < N, got {text!r}")
    return index, total


def _wait_for_signal(stop: threading.Event, endpoint=None) -> int:  # noqa: ANN001
    """Serve until SIGINT/SIGTERM (0), or until the role's endpoint gave up (1, with the reason on stderr)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if endpoint is not None and endpoint.refusal:
            print(f"fedhlm: stopping: {endpoint.refusal}", file=sys.stderr)
            return 1
    return 0


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
    unreachable = address.unreachable()
    if unreachable:  # before loading any model: a typo in the URL should not cost minutes
        print(f"fedhlm {role}: cannot reach the broker at {address.public_url}: {unreachable}", file=sys.stderr)
        return 1
    try:
        return {"llm": run_llm, "cloud": run_cloud, "edge": run_edge, "client": run_client}[role](args, cfg, address,
                                                                                              role_id)
    except (TimeoutError, ConnectionError, PermissionError) as exc:  # the broker refused or dropped us
        print(f"fedhlm {role}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while a client serves its rounds (servers wait in _wait_for_signal)
        print(f"fedhlm {role}: interrupted; stopped cleanly", file=sys.stderr)
        return 130


def _initial_params(cfg) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The head every role of a process deployment starts from: `routing.init_tau`, else the uncalibrated
    default (processes have no calibration split to fit U-HLM's threshold on; a simulation does)."""
    from fedhlm.core.operating_point import with_curve
    from fedhlm.models.head_fit import routing_head

    tau = UNCALIBRATED_TAU if cfg.routing.init_tau is None else cfg.routing.init_tau
    head = routing_head(cfg.routing, tau, cfg.seed)
    return with_curve({k: v.detach().numpy() for k, v in head.state_dict().items()}, cfg.routing)


RETAINED_MODEL_WAIT_S = 2.0  # how long a starting client waits for its edge's retained model


def _print_round(members: str, total: int) -> Callable[[dict], None]:
    """One line per closed round of a server role, so that an operator sees it progress."""
    def show(entry: dict) -> None:
        print(f"round {entry['round']}: {len(entry['participants'])} of {total} {members}, {entry['samples']} samples, "
              f"tau={entry['tau']:.4f}", flush=True)
    return show


def run_llm(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    from fedhlm.models.hybrid import load_llm
    from fedhlm.roles.llm_service import LLMService

    llm = load_llm(cfg.models.llm, data_overrides=cfg.data.model_overrides())  # the LLM only: a refiner never needs the SLM
    service = LLMService(address, llm.q_fn, group=args.group, mode=cfg.routing.verify, limits=llm.limits(),
                         max_age_s=cfg.routing.llm_timeout_s,
                         pad_id=llm.tokenizer.pad_token_id or 0, seed=cfg.seed).start()
    print(f"LLM worker {role_id} serving {address.public_url}", flush=True)
    rc = _wait_for_signal(threading.Event(), service.endpoint)
    service.stop()
    print(f"served {service.stats.requests} requests in {service.stats.batches} batches", flush=True)
    return rc


def run_cloud(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    from fedhlm.roles.cloud import CloudServer

    cloud = CloudServer.from_settings(role_id, address, args.edges.split(","), _initial_params(cfg), cfg.federation,
                                      checkpoint=args.checkpoint).start()
    print(f"cloud {role_id} at round {cloud.round}, edges {args.edges}", flush=True)
    cloud.round_hooks.append(_print_round("edges", len(args.edges.split(","))))
    rc = _wait_for_signal(threading.Event(), cloud.endpoint)
    cloud.stop()
    return rc


def run_edge(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    from fedhlm.roles.edge import EdgeServer
    from fedhlm.roles.edge_cache import EdgeResolver

    neighbours = [e for e in args.neighbours.split(",") if e]
    members = args.clients.split(",")
    edge = EdgeServer.from_settings(role_id, address, members, _initial_params(cfg), cfg.federation,
                                    neighbours=neighbours, checkpoint=args.checkpoint,
                                    resolver=EdgeResolver.from_settings(role_id, members, cfg.p2p)).start()
    print(f"edge {role_id} at round {edge.round}, clients {args.clients}", flush=True)
    edge.round_hooks.append(_print_round("clients", len(members)))
    rc = _wait_for_signal(threading.Event(), edge.endpoint)
    edge.stop()
    return rc


def run_client(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    """One client of a process deployment: the simulation's inputs for shard i of N, its own SLM, its own head."""
    from fedhlm.data import partition
    from fedhlm.data.module import NewsDataModule
    from fedhlm.maths.route_features import feature_set
    from fedhlm.models.drafter import SLMDrafter
    from fedhlm.models.embedder import context_representation
    from fedhlm.models.head_fit import TorchHead, routing_head
    from fedhlm.models.hybrid import load_slm
    from fedhlm.roles.client import Client
    from fedhlm.simulation.run import plan_rounds, test_items

    index, total = args.shard
    slm = load_slm(cfg.models.slm, data_overrides=cfg.data.model_overrides(), top_k=cfg.routing.top_k,
                   features=feature_set(cfg.routing.features, cfg.routing.hidden_dim))
    dm = NewsDataModule(**slm.configs["slm"]["data"])
    dm.setup()
    slm.fit_features(list(dm.splits.calib))  # the feature map a simulation fits: same split, same map
    test = test_items(cfg, dm.splits)  # the same articles, the same shares and rounds as a simulation
    part = partition([it.label for it in test], total, alpha=cfg.data.alpha, seed=cfg.seed)[index]
    rounds = plan_rounds([part], [role_id], cfg.federation.rounds)
    embedder = context_representation(cfg.p2p.representation, slm) if cfg.p2p.enabled else None
    settings = ClientSettings.from_config(cfg, client_id=role_id, edge_id=args.edge, policy="learned",
                                          embedder_name=embedder.name if embedder else "none")
    tau = UNCALIBRATED_TAU if cfg.routing.init_tau is None else cfg.routing.init_tau
    head = TorchHead(routing_head(cfg.routing, tau, cfg.seed), engine=cfg.routing.fit_engine)
    client = Client(settings, address, head, slm.class_of, embedder.dim if embedder else 384,
                    drafter=SLMDrafter(slm, embedder)).start()
    label_of = {item.uid: item.label for item in test}
    correct = total_tokens = 0
    # a restarted client joins the round its edge is collecting (its retained model says which), not round 0,
    # whose updates the edge would refuse as stale; a fresh federation has no model yet: it starts at 0
    client.wait_model(0, timeout_s=RETAINED_MODEL_WAIT_S)
    first = client.current_round()
    if first:
        print(f"client {role_id}: edge {args.edge} is at round {first}; rounds 0-{first - 1} are over", flush=True)
    try:
        for r, by_client in enumerate(rounds):
            if r < first:
                continue
            records = client.serve_round(r, [test[i] for i in by_client[role_id]])
            client.finish_round(r)
            correct += sum(1 for t in records if t.final == label_of[t.uid])
            total_tokens += len(records)
            llm = sum(1 for t in records if t.route == "llm")
            print(f"round {r}: {len(records)} tokens, {llm} to the LLM, tau={client.head.effective_tau():.4f}",
                  flush=True)
    finally:
        client.stop()
    print(f"client {role_id}: accuracy {correct / max(1, total_tokens):.4f} over {total_tokens} tokens", flush=True)
    time.sleep(0.1)
    return 0
