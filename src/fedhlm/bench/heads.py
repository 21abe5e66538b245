"""`fedhlm bench heads`: which routing features carry the signal (the ablation table of the routing issue).

With a simulation config's models and articles: every calibration and test article is drafted with
the widest feature set (`hidden`: the four basic scores, the four label scores, `--hidden-dim` whitened
PCA components of the SLM's hidden state fitted on the calibration split) and verified by the LLM.
Column subsets are then fitted as linear and mlp heads (`reporting.head_ablation`) and compared with the
uncertainty curve (the scalar head) and the oracle at equal shares sent. Writes heads.json and
heads.png under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm.maths.route_features import LABEL_FEATURE_NAMES, feature_set
from fedhlm.maths.uncertainty import FEATURE_NAMES


def column_subsets(names: tuple[str, ...]) -> dict[str, list[int]]:
    """The ablation's rows: entropy alone, then groups added to it (entropy stays column 0 of each)."""
    idx = {n: i for i, n in enumerate(names)}
    basic = [idx[n] for n in FEATURE_NAMES]
    label = [idx[n] for n in LABEL_FEATURE_NAMES]
    hidden = [i for n, i in idx.items() if n.startswith("hidden_")]
    return {
        "entropy": [0],
        "entropy+max_prob+margin": [0, idx["max_prob"], idx["top2_margin"]],
        "basic (4)": basic,
        "entropy+label (5)": [0, *label],
        "basic+label (8)": basic + label,
        "entropy+hidden": [0, *hidden],
        f"all ({len(names)})": basic + label + hidden,
    }


def measure(config: str | None, overrides: list[str], shares: list[float], hidden_dim: int, folds: int,
            steps: int = 400, progress: bool = True) -> dict[str, Any]:
    from fedhlm.reporting.head_ablation import Pairs, ablation, oracle_row
    from fedhlm.simulation import run as sim
    from fedhlm.simulation.config import load_config

    cfg = load_config(config, [*overrides, "routing.features=hidden", f"routing.hidden_dim={hidden_dim}",
                               "methods=[slm_only]", "delta_sweep=[]", "lambda_sweep=[]"])
    start = time.perf_counter()
    prep = sim.prepare_inputs(cfg, progress)
    models = prep.models
    print(f"[bench heads] drafting and verifying {len(prep.calib)} calibration and {len(prep.items)} test articles",
          flush=True)

    def pairs(drafts, labels) -> Pairs:  # noqa: ANN001
        beta, llm_class = models.llm_verdicts(drafts, cfg.routing.verify)
        slm_class = np.array([models.class_of(d.draft_token) for d in drafts])
        return Pairs(np.stack([d.features for d in drafts]).astype(np.float32), beta.astype(np.float32),
                     slm_class == labels, llm_class == labels)

    calib_labels = np.array([it.label for it in _calibration_items(prep)])
    calib = pairs(prep.calib, calib_labels)
    test_drafts = models.draft(prep.items).inputs
    test = pairs(test_drafts, np.array([it.label for it in prep.items]))
    labelled_s = time.perf_counter() - start
    names = feature_set("hidden", hidden_dim).names()
    subsets = column_subsets(names)
    print(f"[bench heads] fitting {len(subsets)} feature subsets x heads x {len(shares)} shares "
          f"(calibration fit + {folds}-fold cross-fit)", flush=True)
    rows = ablation(calib, test, subsets, shares, k=folds, temperature=cfg.routing.temperature,
                    hidden=cfg.routing.head_hidden, steps=steps)
    return {
        "config": config, "overrides": overrides, "task": prep.task.name, "shares": shares, "hidden_dim": hidden_dim, "folds": folds, "steps": steps,
        "feature_names": list(names), "models": {k: str(v) for k, v in models.folders.items()},
        "calibration_articles": len(calib.beta), "test_articles": len(test.beta),
        "slm_accuracy": float(test.slm_correct.mean()), "llm_accuracy": float(test.llm_correct.mean()),
        "only_llm_right": int(np.sum(~test.slm_correct & test.llm_correct)),
        "only_slm_right": int(np.sum(test.slm_correct & ~test.llm_correct)),
        "calibration_slm_wrong": int(np.sum(~calib.slm_correct)),
        "oracle": oracle_row(test, shares), "rows": rows,
        "labelling_s": round(labelled_s, 1), "wall_s": round(time.perf_counter() - start, 1),
    }


def _calibration_items(prep) -> list:  # noqa: ANN001
    """The calibration split's items, in the order `prep.calib` drafted them."""
    from fedhlm.data.module import NewsDataModule

    dm = NewsDataModule(**prep.models.configs["slm"]["data"])
    dm.setup()
    items = list(dm.splits.calib)
    if [it.uid for it in items] != [d.uid for d in prep.calib]:
        raise RuntimeError("calibration split and its drafts differ in order")
    return items


def print_table(result: dict[str, Any]) -> None:
    shares = result["shares"]
    head = "  ".join(f"{100 * s:>5g}%" for s in shares)
    print(f"\n{result['task']}: {result['test_articles']} test articles, SLM {100 * result['slm_accuracy']:.2f} %, "
          f"LLM {100 * result['llm_accuracy']:.2f} %, only the LLM right on {result['only_llm_right']}")
    print(f"{'features':26s} {'head':6s} | calibration fit: {head} | cross-fit: {head}")
    for r in result["rows"]:
        cal = "  ".join(f"{100 * r['calibration_fit'][s]:6.2f}" for s in shares)
        cross = "  ".join(f"{100 * r['cross_fit'][s]:6.2f}" for s in shares)
        print(f"{r['features']:26s} {r['head']:6s} | {' ' * 17}{cal} | {' ' * 11}{cross}")
    oracle = "  ".join(f"{100 * result['oracle'][s]:6.2f}" for s in shares)
    print(f"{'oracle (hindsight)':26s} {'':6s} | {' ' * 17}{oracle} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhlm bench heads", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper.yaml", help="simulation config: its models and articles")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--shares", default="0.02,0.05,0.1,0.2", help="shares sent, comma-separated")
    parser.add_argument("--hidden-dim", type=int, default=16, help="PCA components of the hidden state")
    parser.add_argument("--folds", type=int, default=5, help="cross-fitting folds on the test articles")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps of each head fit")
    parser.add_argument("--out", default="runs/bench-heads", help="folder for heads.json and heads.png")
    args = parser.parse_args(argv)
    shares = [float(s) for s in args.shares.split(",") if s]
    result = measure(args.config, args.set, shares, args.hidden_dim, args.folds, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heads.json").write_text(json.dumps(result, indent=2, default=str))
    from fedhlm.reporting.plots import feature_ablation

    feature_ablation(result, out / "heads.png")
    print_table(result)
    print(f"[bench heads] {out / 'heads.json'}, {out / 'heads.png'} ({result['wall_s']} s)")
    return 0
