"""``fedhlm data info`` and ``fedhlm data fetch ag_news``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

from fedhlm.data.fetch import AG_NEWS_BASE_URL, AG_NEWS_SHA256, fetch_ag_news
from fedhlm.data.items import CLASS_NAMES
from fedhlm.data.partition import split_items, stratified_subset
from fedhlm.data.sources import SOURCES, default_fetch_dir, resolve_source


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhlm data", description="data utilities")
    sub = parser.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="print the source, its size and label counts, and the split sizes")
    info.add_argument("--source", choices=SOURCES, default="auto")
    info.add_argument("--path", default=None,
                      help="data file or folder (default: $FEDHLM_DATA, then ../shared/data/ag_news)")
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
    name, items = resolve_source(args.source, args.path, synthetic_size=args.synthetic_size, seed=args.seed)
    items = stratified_subset(items, args.limit, seed=args.seed)
    counts = Counter(it.label for it in items)
    print(f"source: {name}")
    print(f"items: {len(items)}")
    for label, cls in enumerate(CLASS_NAMES):
        print(f"  {label} {cls:<9} {counts.get(label, 0)}")
    sizes = split_items(items, seed=args.seed).sizes()
    print("splits: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
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
