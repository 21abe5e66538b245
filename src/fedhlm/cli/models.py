"""`fedhlm models`: the cached models with their test accuracy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedhlm.models.store import HOME_VAR, cache_root, cached_models


def main(argv: list[str] | None = None) -> int:
    """``fedhlm models``: list the cached models with their test accuracy."""
    parser = argparse.ArgumentParser(prog="fedhlm models", description="list the cached models")
    parser.add_argument("--root", type=Path, default=None, help=f"cache folder (default ${HOME_VAR}/models or ~/.cache/fedhlm/models)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    root = args.root or cache_root()
    models = cached_models(root)
    if args.json:
        print(json.dumps([{"path": str(f), **m} for f, m in models], indent=2))
        return 0
    if not models:
        print(f"no cached models in {root}")
        return 0
    print(f"{'model':<22} {'kind':<4} {'params':>11} {'test acc':>8} {'train s':>8}  data")
    for folder, m in models:
        acc = m.get("test_acc")
        acc_text = f"{100 * acc:7.2f}%" if isinstance(acc, (int, float)) else "       -"
        secs = m.get("train_seconds")
        secs_text = f"{secs:8.1f}" if isinstance(secs, (int, float)) else "       -"
        sizes = m.get("data_sizes") or {}
        print(f"{folder.name:<22} {m.get('kind', '?'):<4} {m.get('params', 0):>11,} {acc_text} {secs_text}  "
              f"{m.get('data_source', '?')} {sizes}")
    print(f"({root})")
    return 0
