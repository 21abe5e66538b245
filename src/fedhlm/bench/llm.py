"""`fedhlm bench llm`: verified tokens/s of each LLM backend, in process and behind an LLM worker over MQTT.

The config's SLM drafts `--articles` test articles once; each backend (`local`: the config's
`models.llm` checkpoint in this process; `openai`: the server at `models.remote.url`) then verifies
half of the drafts directly (`verify_drafts` in batches of `--batch`, the q function alone) and the
other half (a server's prompt cache must not answer from the first pass) through an LLM service on a
private broker with `--clients` clients asking at once (what a deployment gets: transport, queueing,
batching). Printed and written to llm.json / llm.png:
tokens/s, latency p50/p99 per request, and the LLM's accuracy and agreement with the SLM.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _drafts(cfg, articles: int):  # noqa: ANN001
    """The SLM, the test items and its drafts of them (no LLM loaded)."""
    from fedhlm.data.module import NewsDataModule
    from fedhlm.models.hybrid import load_slm
    from fedhlm.simulation.run import test_items

    slm = load_slm(cfg.models.slm, data_overrides=cfg.data.model_overrides(), top_k=cfg.routing.top_k)
    dm = NewsDataModule(**slm.config["data"])
    dm.setup()
    items = test_items(cfg, dm.splits)[:articles]
    return slm, items, slm.draft(items).inputs


def direct(served, drafts: list, labels: np.ndarray, class_of, mode: str, batch: int) -> dict[str, Any]:  # noqa: ANN001
    """The q function alone: verify_drafts in batches, timed."""
    import torch

    from fedhlm.maths.verification import Draft, verify_drafts

    finals, gen = [], torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for lo in range(0, len(drafts), batch):
        chunk = [Draft(d.context_ids, d.topk_ids, d.topk_probs, d.draft_token) for d in drafts[lo : lo + batch]]
        v = verify_drafts(served.q_fn, chunk, pad_id=0, mode=mode, generator=gen)
        finals.extend(class_of(int(t)) for t in v.token)
    wall = time.perf_counter() - start
    finals_a = np.array(finals)
    slm = np.array([class_of(d.draft_token) for d in drafts])
    return {"tokens": len(drafts), "wall_s": round(wall, 3), "tokens_per_s": round(len(drafts) / wall, 2),
            "accuracy": round(float((finals_a == labels).mean()), 4),
            "agrees_with_slm": round(float((finals_a == slm).mean()), 4)}


def through_service(served, drafts: list, mode: str, clients: int, timeout_s: float) -> dict[str, Any]:  # noqa: ANN001
    """An LLM service with this backend on a private broker; `clients` endpoints ask at once."""
    from fedhlm.roles.llm_service import LLMService
    from fedhlm.transport import topics
    from fedhlm.transport.broker import LocalBroker
    from fedhlm.transport.endpoint import Endpoint
    from fedhlm.transport.messages import TokenRequest

    names = [f"c{i:02d}" for i in range(clients)]
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    with LocalBroker({**{n: "client" for n in names}, "llm": "llm"}) as broker:
        worker = LLMService(broker.address("llm"), served.q_fn, mode=mode, limits=served.limits()).start()
        try:
            def ask(name: str, share: list) -> None:  # noqa: ANN001
                with Endpoint(broker.address(name)) as ep:
                    ep.wait_connected()
                    for seq, d in enumerate(share):
                        request = TokenRequest(client_id=name, session_id="bench", seq=seq, round=0,
                                               context_ids=d.context_ids, draft_token=d.draft_token,
                                               topk_ids=d.topk_ids, topk_probs=d.topk_probs, tail_mass=d.tail_mass,
                                               features=d.features, reason="uncertain")
                        t0 = time.perf_counter()
                        try:
                            ep.request(topics.llm_request(), request, topics.client_llm_reply(name), timeout_s=timeout_s)
                        except TimeoutError:
                            with lock:
                                failures[0] += 1
                            continue
                        with lock:
                            latencies.append(time.perf_counter() - t0)

            threads = [threading.Thread(target=ask, args=(n, drafts[i::clients])) for i, n in enumerate(names)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
        finally:
            worker.stop()
    ms = np.array(latencies) * 1000.0 if latencies else np.zeros(1)
    return {"tokens": len(latencies), "timeouts": failures[0], "wall_s": round(wall, 3),
            "tokens_per_s": round(len(latencies) / wall, 2), "latency_ms_p50": round(float(np.percentile(ms, 50)), 1),
            "latency_ms_p99": round(float(np.percentile(ms, 99)), 1), "batches": worker.stats.batches}


def measure(config: str, overrides: list[str], backends: list[str], articles: int, batch: int, clients: int,
            timeout_s: float) -> dict[str, Any]:
    from fedhlm.models.llm_backend import load_served_llm
    from fedhlm.simulation.config import load_config

    cfg = load_config(config, overrides)
    slm, items, drafts = _drafts(cfg, articles)
    labels = np.array([it.label for it in items])
    result: dict[str, Any] = {"config": config, "articles": len(items), "batch": batch, "clients": clients,
                              "mode": cfg.routing.verify, "backends": {}}
    for name in backends:
        print(f"[bench llm] {name}: loading", flush=True)
        served = load_served_llm(name, cfg.models.llm, cfg.models.remote, data_overrides=cfg.data.model_overrides(),
                                 tokenizer=slm.tokenizer, task=slm.slm.task)
        row = {"llm": served.config["model"] if served.folder is None else str(served.folder)}
        # each half of the articles once: a server's prompt cache must not answer the second pass from the first
        half = len(drafts) // 2
        row["direct"] = direct(served, drafts[:half], labels[:half], slm.class_of, cfg.routing.verify, batch)
        print(f"[bench llm] {name} direct: {row['direct']}", flush=True)
        row["service"] = through_service(served, drafts[half:], cfg.routing.verify, clients, timeout_s)
        print(f"[bench llm] {name} through MQTT: {row['service']}", flush=True)
        if hasattr(served, "stats"):
            row["remote_calls"] = served.stats.as_dict()
        result["backends"][name] = row
    result["slm_accuracy"] = round(float((np.array([slm.class_of(d.draft_token) for d in drafts]) == labels).mean()), 4)
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    from fedhlm.reporting.plots import _save, plt

    names = list(result["backends"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(names))
    for offset, kind in ((-0.2, "direct"), (0.2, "service")):
        ax.bar(x + offset, [result["backends"][n][kind]["tokens_per_s"] for n in names], width=0.4,
               label="q function alone" if kind == "direct" else f"LLM worker over MQTT ({result['clients']} clients)")
    ax.set_xticks(x, [f"{n}\nacc {100 * result['backends'][n]['direct']['accuracy']:.1f} %" for n in names])
    ax.set_ylabel("verified tokens / s")
    ax.set_title(f"LLM backends, {result['articles']} articles")
    ax.legend(fontsize=7)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhlm bench llm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quick.yaml", help="simulation config: its models and articles")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. models.remote.url=http://127.0.0.1:8080/v1")
    parser.add_argument("--backends", default="local,openai", help="comma-separated: local, openai")
    parser.add_argument("--articles", type=int, default=200, help="half verified directly, half through the worker")
    parser.add_argument("--batch", type=int, default=16, help="drafts per direct verification call")
    parser.add_argument("--clients", type=int, default=8, help="clients asking the worker at once")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request through the worker (s)")
    parser.add_argument("--out", default="runs/bench-llm", help="folder for llm.json and llm.png")
    args = parser.parse_args(argv)
    from fedhlm.models.llm_backend import LLM_BACKENDS

    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in LLM_BACKENDS]
    if unknown or args.articles < 1 or args.batch < 1 or args.clients < 1:
        parser.error(f"--backends: unknown {unknown}" if unknown else "--articles, --batch and --clients must be >= 1")
    result = measure(args.config, args.set, backends, args.articles, args.batch, args.clients, args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, out / "llm.png")
    print(json.dumps(result["backends"], indent=1, default=str))
    print(f"[bench llm] {out / 'llm.json'}, {out / 'llm.png'}")
    return 0
