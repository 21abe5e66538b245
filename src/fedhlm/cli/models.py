"""`fedhlm models`: the cached models with their task, test accuracy, macro-F1 and calibration error."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedhlm.models.store import HOME_VAR, cache_root, cached_models


def _number(value: object, width: int, percent: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "-".rjust(width)
    return f"{100 * value:{width - 1}.2f}%" if percent else f"{value:{width}.{3 if width < 8 else 1}f}"


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
    print(f"{'model':<22} {'kind':<4} {'task':<9} {'params':>11} {'test acc':>8} {'macro-F1':>8} {'ECE':>6} "
          f"{'train s':>8}  data")
    for folder, m in models:
        task = ((m.get("config") or {}).get("model") or {}).get("task", "?")
        print(f"{folder.name:<22} {m.get('kind', '?'):<4} {task:<9} {m.get('params', 0):>11,} "
              f"{_number(m.get('test_acc'), 8, percent=True)} {_number(m.get('test_macro_f1'), 8, percent=True)} "
              f"{_number(m.get('test_ece'), 6)} {_number(m.get('train_seconds'), 8)}  "
              f"{m.get('data_source', '?')} {m.get('data_sizes') or {}}")
    print(f"({root})")
    return 0
