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
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedhlm.core.settings import ClientSettings
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
    if role in ("edge", "cloud"):
        p.add_argument("--initial-params", default=None, metavar="NPZ",
                       help="the round-0 head as written by `fedhlm deploy` (initial_head.npz); without it the head "
                            "is built here from the config, which loads torch (about 400 MB more per process)")
    if role == "edge":
        p.add_argument("--clients", required=True, help="comma-separated client ids of this cluster")
        p.add_argument("--neighbours", default="", help="comma-separated edge ids to forward peer queries to")
    if role == "cloud":
        p.add_argument("--edges", required=True, help="comma-separated edge ids")
    if role == "client":
        p.add_argument("--edge", required=True, help="the edge id of this client's cluster")
        p.add_argument("--shard", default="0/1", type=shard,
                       help="i/N: this client takes the i-th of N shares of the test inputs; i,j,.../N with --ids: "
                            "one process runs several clients")
        p.add_argument("--ids", default=None, help="comma-separated client ids run by this process (one per shard)")
        p.add_argument("--credentials", default=None,
                       help="JSON file {client id: broker URL} (mode 0600) for --ids; written by `fedhlm deploy`")
    if role == "llm":
        p.add_argument("--group", default="llm", help="shared-subscription group of the LLM workers")
    return p


def shard(text: str) -> tuple[list[int], int]:
    """'i/N' or 'i,j,.../N' with 0 <= i < N, as argparse's type (a bad value is a one-line usage error)."""
    try:
        left, total_text = text.split("/")
        indices, total = [int(i) for i in left.split(",")], int(total_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N or i,j,.../N, e.g. 0/12, got {text!r}") from None
    if not all(0 <= i < total for i in indices) or len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"need distinct 0 <= i < N, got {text!r}")
    return indices, total


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
    args.credentials_map = {}
    if getattr(args, "credentials", None):
        try:
            args.credentials_map = json.loads(Path(args.credentials).read_text())
        except (OSError, ValueError) as exc:
            print(f"fedhlm {role}: --credentials {args.credentials}: {exc}", file=sys.stderr)
            return 2
        if not args.broker and getattr(args, "ids", None):
            args.broker = args.credentials_map.get(args.ids.split(",")[0])
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
    if role == "client":
        try:
            args.client_ids = _client_ids(args, role_id, args.shard[0])
        except ValueError as exc:  # --ids / --shard / --credentials that do not fit together
            print(f"fedhlm {role}: {exc}", file=sys.stderr)
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


def _initial_params(cfg, path: str | None = None) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The head every role of a process deployment starts from (`models.head_fit.initial_head_params`), read
    from `path` (the launcher's initial_head.npz) where given: an edge or the cloud then never imports torch."""
    if path is not None:
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}
    from fedhlm.models.head_fit import initial_head_params

    return initial_head_params(cfg.routing, cfg.seed)


RETAINED_MODEL_WAIT_S = 2.0  # how long a starting client waits for its edge's retained model
SERVING_THREADS = 64  # clients of one process that serve their tokens at once


def _print_round(members: str, total: int) -> Callable[[dict], None]:
    """One line per closed round of a server role, so that an operator sees it progress."""
    def show(entry: dict) -> None:
        print(f"round {entry['round']}: {len(entry['participants'])} of {total} {members}, {entry['samples']} samples, "
              f"tau={entry['tau']:.4f}", flush=True)
    return show


def run_llm(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    from fedhlm.data import load_tokenizer
    from fedhlm.models.cache import read_fit_config
    from fedhlm.models.llm_backend import load_served_llm
    from fedhlm.roles.llm_service import LLMService

    # the LLM only (a refiner never needs the SLM); a remote one is told the requests' vocabulary and task
    slm_fit = read_fit_config(cfg.models.slm)
    tokenizer = load_tokenizer(slm_fit["model"].get("tokenizer"))
    llm = load_served_llm(cfg.models.llm_backend, cfg.models.llm, cfg.models.remote,
                          data_overrides=cfg.data.model_overrides(), tokenizer=tokenizer,
                          task=cfg.data.task or slm_fit["model"].get("task"))
    service = LLMService(address, llm.q_fn, group=args.group, mode=cfg.routing.verify, limits=llm.limits(),
                         max_age_s=cfg.routing.llm_timeout_s, pad_id=tokenizer.pad_token_id or 0, seed=cfg.seed,
                         sessions=getattr(llm, "sessions", None),  # a remote engine keeps none here
                         session_ttl_s=cfg.generation.session_ttl_s).start()
    where = cfg.models.remote.url if cfg.models.llm_backend == "openai" else "in this process"
    print(f"LLM worker {role_id} serving {address.public_url}; LLM {cfg.models.llm_backend} ({where})", flush=True)
    rc = _wait_for_signal(threading.Event(), service.endpoint)
    service.stop()
    print(f"served {service.stats.requests} requests in {service.stats.batches} batches", flush=True)
    return rc


def run_cloud(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    from fedhlm.roles.cloud import CloudServer

    cloud = CloudServer.from_settings(role_id, address, args.edges.split(","), _initial_params(cfg, args.initial_params),
                                      cfg.federation,
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
    edge = EdgeServer.from_settings(role_id, address, members, _initial_params(cfg, args.initial_params), cfg.federation,
                                    neighbours=neighbours, checkpoint=args.checkpoint,
                                    resolver=EdgeResolver.from_settings(role_id, members, cfg.p2p)).start()
    print(f"edge {role_id} at round {edge.round}, clients {args.clients}", flush=True)
    edge.round_hooks.append(_print_round("clients", len(members)))
    rc = _wait_for_signal(threading.Event(), edge.endpoint)
    edge.stop()
    return rc


def run_client(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    """The clients of one process: each its own share of the simulation's inputs (shard i of N), its own
    connection, head and rounds; one SLM and one network thread for all of them, as a site gateway would."""
    if cfg.generation.enabled:
        return run_generating_client(args, cfg, address, role_id)

    from fedhlm.data import partition
    from fedhlm.data.module import NewsDataModule
    from fedhlm.maths.route_features import feature_set
    from fedhlm.models.drafter import SLMDrafter
    from fedhlm.models.embedder import context_representation
    from fedhlm.models.head_fit import TorchHead, routing_head
    from fedhlm.models.hybrid import load_slm
    from fedhlm.roles.client import Client
    from fedhlm.simulation.run import plan_rounds, test_items
    from fedhlm.transport.network import OwnThreads, SharedLoop

    process_start = time.monotonic()
    indices, total = args.shard
    ids = args.client_ids
    addresses = {cid: address if len(ids) == 1 else BrokerAddress.from_url(args.credentials_map[cid]) for cid in ids}
    slm = load_slm(cfg.models.slm, data_overrides=cfg.data.model_overrides(), top_k=cfg.routing.top_k,
                   features=feature_set(cfg.routing.features, cfg.routing.hidden_dim))
    dm = NewsDataModule(**slm.configs["slm"]["data"])
    dm.setup()
    slm.fit_features(list(dm.splits.calib))  # the feature map a simulation fits: same split, same map
    test = test_items(cfg, dm.splits)  # the same articles, the same shares and rounds as a simulation
    parts = partition([it.label for it in test], total, alpha=cfg.data.alpha, seed=cfg.seed)
    rounds = plan_rounds([parts[i] for i in indices], ids, cfg.federation.rounds)
    embedder = context_representation(cfg.p2p.representation, slm) if cfg.p2p.enabled else None
    drafter = SLMDrafter(slm, embedder)
    network = SharedLoop(name="clients") if len(ids) > 1 else OwnThreads()
    tau = cfg.routing.process_tau
    clients = {}
    for cid in ids:
        settings = ClientSettings.from_config(cfg, client_id=cid, edge_id=args.edge, policy="learned",
                                              embedder_name=embedder.name if embedder else "none")
        head = TorchHead(routing_head(cfg.routing, tau, cfg.seed), engine=cfg.routing.fit_engine)
        clients[cid] = Client(settings, addresses[cid], head, slm.class_of, embedder.dim if embedder else 384,
                              drafter=drafter, network=network).start()
    label_of = {item.uid: item.label for item in test}

    def serve(client, r: int, items: list) -> str:  # noqa: ANN001
        records = client.serve_round(r, items)
        with lock:  # the clients serve on threads of their own
            tally["correct"] += sum(1 for t in records if t.final == label_of[t.uid])
            tally["tokens"] += len(records)
        llm = sum(1 for t in records if t.route == "llm")
        return f"{len(records)} tokens, {llm} to the LLM"

    tally, lock = {"correct": 0, "tokens": 0}, threading.Lock()
    ready_s = time.monotonic() - process_start  # models, data and every connection up
    _serve_rounds(args, clients, network, [{cid: [test[i] for i in idx] for cid, idx in by_client.items()}
                                           for by_client in rounds], serve)
    print(f"client {_ids_text(ids)}: accuracy {tally['correct'] / max(1, tally['tokens']):.4f} over {tally['tokens']} "
          f"tokens; ready in {ready_s:.1f} s, rounds in {time.monotonic() - process_start - ready_s:.1f} s", flush=True)
    time.sleep(0.1)
    return 0


def run_generating_client(args, cfg, address: BrokerAddress, role_id: str) -> int:  # noqa: ANN001
    """`generation.enabled`: the clients of this process write the targets of their share of the test articles
    (`data.objectives`: titles, continuations) token by token with the generation SLM, each token routed by the
    client's head; an uncertain one goes through the edge's cache (`p2p.resolver: edge`) or is verified in the
    LLM's session of its sequence (`roles.generation.SessionRouter`), exactly as in a generation simulation.
    The heads learn from the verdicts and federate through the edge as in classification."""
    from fedhlm.data import partition
    from fedhlm.data.module import NewsDataModule
    from fedhlm.data.objectives import generation_task
    from fedhlm.models.backbone import load_causal_lm
    from fedhlm.models.cache import fit_config_with, get_or_train
    from fedhlm.models.generation import SLMSequenceDrafter
    from fedhlm.models.head_fit import TorchHead, routing_head
    from fedhlm.reporting.generation import rouge_l
    from fedhlm.roles.client import Client
    from fedhlm.roles.generation import SessionRouter
    from fedhlm.simulation.run import plan_rounds, test_items
    from fedhlm.transport.network import OwnThreads, SharedLoop

    process_start = time.monotonic()
    indices, total = args.shard
    ids = args.client_ids
    addresses = {cid: address if len(ids) == 1 else BrokerAddress.from_url(args.credentials_map[cid]) for cid in ids}
    slm_cfg = fit_config_with(cfg.models.slm, cfg.data.model_overrides())
    slm = load_causal_lm(get_or_train(slm_cfg.get("kind") or "gen", slm_cfg)).eval()
    dm = NewsDataModule(**slm_cfg["data"])
    dm.setup()
    test = test_items(cfg, dm.splits)  # the articles, shares and rounds of a generation simulation
    task, max_length = generation_task(dm.objective), int(slm_cfg["data"].get("max_length", 64))
    prompts = dict(zip((it.uid for it in test), task.prompts(dm.tokenizer, test, max_length)))
    references = dict(zip((it.uid for it in test), task.references(dm.tokenizer, test, max_length)))
    parts = partition([it.label for it in test], total, alpha=cfg.data.alpha, seed=cfg.seed)
    rounds = plan_rounds([parts[i] for i in indices], ids, cfg.federation.rounds)
    contexts: dict = {}  # uid -> the prompt's embedding
    if cfg.p2p.through_edge:  # the peer step: each prompt's embedding, once, as a device would compute it
        from fedhlm.models.embedder import ContextEmbedder

        mine = [test[i].uid for by_client in rounds for idx in by_client.values() for i in idx]
        texts = [dm.tokenizer.decode(prompts[u], skip_special_tokens=True) for u in mine]
        contexts = dict(zip(mine, ContextEmbedder().encode(texts))) if mine else {}
    p2p = cfg.p2p if cfg.p2p.through_edge else dataclasses.replace(cfg.p2p, enabled=False)  # never a broadcast
    network = SharedLoop(name="clients") if len(ids) > 1 else OwnThreads()
    clients = {}
    for cid in ids:
        settings = ClientSettings.from_config(cfg, client_id=cid, edge_id=args.edge, policy="learned", p2p=p2p)
        head = TorchHead(routing_head(cfg.routing, cfg.routing.process_tau, cfg.seed), engine=cfg.routing.fit_engine)
        clients[cid] = Client(settings, addresses[cid], head, lambda t: t, 384, network=network).start()
    stop = {int(dm.tokenizer.sep_token_id)}
    texts: dict[int, str] = {}  # uid -> the sequence written
    tally, lock = {"tokens": 0, "llm": 0}, threading.Lock()

    def serve(client, r: int, items: list) -> str:  # noqa: ANN001
        router, written = SessionRouter(client), {}
        sent = tokens = 0
        for item in items:
            gen = router.generate(SLMSequenceDrafter(slm, cfg.routing.top_k, seed=cfg.seed), prompts[item.uid],
                                  cfg.generation.max_new_tokens, r, stop_ids=stop, context=contexts.get(item.uid))
            written[item.uid] = dm.tokenizer.decode([t for t in gen.tokens if t not in stop])
            sent += sum(1 for step in gen.steps if step.route == "llm")
            tokens += len(gen.tokens)
        with lock:  # the clients serve on threads of their own
            texts.update(written)
            tally["tokens"] += tokens
            tally["llm"] += sent
        words = sum(len(text.split()) for text in written.values())
        return f"{len(items)} sequences, {words} words, {sent} tokens to the LLM"

    ready_s = time.monotonic() - process_start
    _serve_rounds(args, clients, network, [{cid: [test[i] for i in idx] for cid, idx in by_client.items()}
                                           for by_client in rounds], serve)
    done = [it for it in test if it.uid in texts]
    score = rouge_l([texts[it.uid] for it in done], [references[it.uid] for it in done]) if done else 0.0
    print(f"client {_ids_text(ids)}: {len(done)} sequences, {tally['tokens']} tokens, {tally['llm']} to the LLM, "
          f"ROUGE-L {score:.4f}; ready in {ready_s:.1f} s, rounds in {time.monotonic() - process_start - ready_s:.1f} s",
          flush=True)
    time.sleep(0.1)
    return 0


def _ids_text(ids: list[str]) -> str:
    return ",".join(ids) if len(ids) < 4 else f"{ids[0]}..{ids[-1]} ({len(ids)})"


def _serve_rounds(args, clients: dict, network, rounds: list[dict[str, list]],  # noqa: ANN001
                  serve: Callable[..., str]) -> None:
    """The clients' rounds: each serves its inputs of the round (`serve(client, round, items)` -> a progress line),
    all at once so that their LLM round trips overlap (and the worker batches them); then every update goes out
    before any client waits for the edge's model (the edge needs a quorum of them), and the waits overlap."""
    from concurrent.futures import ThreadPoolExecutor

    from fedhlm.transport.network import SharedLoop

    ids = list(clients)
    prefix = (lambda cid: f"{cid} ") if len(ids) > 1 else (lambda cid: "")
    # a restarted client joins the round its edge is collecting (its retained model says which), not round 0,
    # whose updates the edge would refuse as stale; a fresh federation has no model yet: it starts at 0
    first_client = clients[ids[0]]
    first_client.wait_model(0, timeout_s=RETAINED_MODEL_WAIT_S)
    first = first_client.current_round()
    if first:
        print(f"client {','.join(ids)}: edge {args.edge} is at round {first}; rounds 0-{first - 1} are over", flush=True)
    pool = ThreadPoolExecutor(max_workers=min(SERVING_THREADS, len(ids)), thread_name_prefix="serve")
    try:
        for r, by_client in enumerate(rounds):
            if r < first:
                continue
            futures = {cid: pool.submit(serve, c, r, by_client.get(cid, [])) for cid, c in clients.items()}
            lines = {cid: f.result() for cid, f in futures.items()}
            for c in clients.values():
                c.send_round_update(r)
            for c in clients.values():
                c.adopt_round_model(r)
            for cid, line in lines.items():
                print(f"{prefix(cid)}round {r}: {line}, tau={clients[cid].head.effective_tau():.4f}", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for c in clients.values():
            c.stop()
        if isinstance(network, SharedLoop):
            network.close()


def _client_ids(args, role_id: str, indices: list[int]) -> list[str]:  # noqa: ANN001
    """The ids this client process runs: its own (one shard), or `--ids` (one per shard index)."""
    if not args.ids:
        if len(indices) != 1:
            raise ValueError(f"--shard names {len(indices)} shares: give as many --ids (and --credentials)")
        return [role_id]
    ids = [i for i in args.ids.split(",") if i]
    if len(ids) != len(indices):
        raise ValueError(f"--ids names {len(ids)} clients but --shard {len(indices)} shares")
    missing = [cid for cid in ids if cid not in args.credentials_map]
    if missing:
        raise ValueError(f"--credentials has no URL for {missing[0]}")
    return ids
