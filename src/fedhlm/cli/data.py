"""``fedhlm data info`` and ``fedhlm data fetch ag_news``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

from fedhlm.data.fetch import AG_NEWS_BASE_URL, AG_NEWS_SHA256, fetch_ag_news
from fedhlm.data.sources import SOURCES, default_fetch_dir
from fedhlm.data.task import DEFAULT_TASK, TaskError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhlm data", description="data utilities")
    sub = parser.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="print the task, its files, label counts and the split sizes")
    info.add_argument("--task", default=DEFAULT_TASK, help="shipped task name or task YAML (default: %(default)s)")
    info.add_argument("--source", choices=SOURCES, default="auto")
    info.add_argument("--train-path", default=None,
                      help="training file (default: the task's, in $FEDHLM_DATA or ../shared/data/<folder>)")
    info.add_argument("--eval-path", default=None, help="evaluation file (default: the task's, when it has one)")
    info.add_argument("--synthetic-size", type=int, default=4000)
    info.add_argument("--seed", type=int, default=0)
    info.add_argument("--limit", type=int, default=None)
    fetch = sub.add_parser("fetch", help="download a data set")
    fetch.add_argument("dataset", choices=["ag_news"])
    fetch.add_argument("--dest", default=None, help=f"target folder (default: {default_fetch_dir()})")
    fetch.add_argument("--base-url", default=AG_NEWS_BASE_URL, help="mirror holding train.csv and test.csv")
    fetch.add_argument("--force", action="store_true", help="download even when valid files are present")
    return parser


def _info(args: argparse.Namespace) -> int:
    from fedhlm.data.module import NewsDataModule

    try:
        dm = NewsDataModule(task=args.task, source=args.source, train_path=args.train_path, eval_path=args.eval_path,
                            synthetic_size=args.synthetic_size, seed=args.seed, limit=args.limit)
        dm.setup()
    except (TaskError, ValueError, FileNotFoundError) as err:
        print(f"fedhlm data info: {err}", file=sys.stderr)
        return 2
    assert dm.splits is not None and dm.corpus is not None
    print(f"task: {dm.task.name} ({dm.task.num_classes} classes)  source: {dm.source_name}")
    print(f"train file: {dm.corpus.train_file or '-'}  eval file: {dm.corpus.eval_file or ('generated' if dm.corpus.eval is not None else '- (carved from train)')}")
    if dm.corpus.dropped_overlap:
        print(f"dropped from train (same text in eval): {dm.corpus.dropped_overlap}")
    train, test = Counter(it.label for it in dm.splits.train), Counter(it.label for it in dm.splits.test)
    for label, cls in enumerate(dm.task.classes):
        print(f"  {label} {cls.name:<14} {cls.verbaliser:<14} train {train.get(label, 0):>6}  test {test.get(label, 0):>6}")
    print("splits: " + ", ".join(f"{k}={v}" for k, v in dm.splits.sizes().items()))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    dest = args.dest or default_fetch_dir()
    try:
        digests = fetch_ag_news(dest, base_url=args.base_url, force=args.force)
    except (ConnectionError, ValueError) as err:
        print(f"fedhlm data fetch: {err}", file=sys.stderr)
        return 1
    for path, digest in digests.items():
        pinned = AG_NEWS_SHA256.get(path.name)
        note = "matches the pinned digest" if pinned else "not pinned: checked by row counts"
        print(f"{path}  sha256={digest}  ({note})")
    print(f"use it with: FEDHLM_DATA={dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return _info(args) if args.action == "info" else _fetch(args)
