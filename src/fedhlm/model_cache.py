"""Trained models on disk: train once, reuse after; ``fedhlm models`` lists them.

A model lives in ``$FEDHLM_HOME/models/<name>-<hash>`` (default
``~/.cache/fedhlm/models``), where the hash is of its full configuration - module
arguments (defaults filled in), data arguments and training length - and of the code that
builds, feeds and trains the models (`TRAINING_CODE`, comments and docstrings ignored), so
a changed setting or a changed model definition trains a new model instead of silently
reusing an old one. Each folder is a
Hugging Face ``save_pretrained`` folder (model + tokenizer), plus ``metrics.json`` (test
accuracy, parameters, training time, data source, the configuration) and, for an SLM,
``threshold_head.pt`` once its head was trained (``fit_target="head"``). A folder appears only once complete (written aside, then renamed).

The modules' defaults are what ``configs/slm.yaml`` and ``configs/llm.yaml`` spell out and
:data:`DEFAULT_TRAINER` is their training length, so ``get_or_train("slm")`` and
``fedhlm fit --config configs/slm.yaml`` name - and reuse - the same folder.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedhlm.hf_models import ModelFolderError, check_model_folder

log = logging.getLogger(__name__)

HOME_VAR = "FEDHLM_HOME"
METRICS_FILE = "metrics.json"
HEAD_FILE = "threshold_head.pt"
KINDS: dict[str, str] = {"slm": "fedhlm.slm.SLMModule", "llm": "fedhlm.llm.LLMRefiner"}
# what decides the trained weights besides module and data arguments
TRAIN_KEYS: dict[str, Any] = {"max_epochs": None, "max_steps": -1, "limit_train_batches": None, "accumulate_grad_batches": 1}
DEFAULT_TRAINER: dict[str, dict[str, Any]] = {"slm": {"max_epochs": 4}, "llm": {"max_epochs": 2}}
# modules whose code decides the trained weights (relative to the fedhlm package)
TRAINING_CODE = ("classifier.py", "hf_models.py", "slm.py", "llm.py", "threshold.py", "uncertainty.py",
                 "data/encoding.py", "data/items.py", "data/module.py", "data/reader.py", "data/sources.py",
                 "data/synthetic.py", "data/partition.py")


def cache_root() -> Path:
    """``$FEDHLM_HOME/models``, else ``~/.cache/fedhlm/models``."""
    home = os.environ.get(HOME_VAR)
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "fedhlm") / "models"


def module_class(kind: str) -> type:
    """The LightningModule class of a model kind ("slm" or "llm")."""
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {sorted(KINDS)}, got {kind!r}")
    module, name = KINDS[kind].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def kind_of(model: Any) -> str:
    """"slm" or "llm" for a module instance or class (by the classes in KINDS)."""
    for kind in KINDS:
        if isinstance(model, module_class(kind)) or model is module_class(kind):
            return kind
    raise ValueError(f"{type(model).__name__} is not a cacheable model kind")


def _signature_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def full_config(kind: str, model: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
                trainer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The configuration that identifies a trained model, with every default written out."""
    from fedhlm.data.module import NewsDataModule

    model_args = {**_signature_defaults(module_class(kind)), **dict(model or {})}
    data_args = {**_signature_defaults(NewsDataModule), **dict(data or {})}
    data_args.pop("num_workers", None)  # does not change the result
    trainer_args = dict(trainer or {})
    train_args = {k: trainer_args.get(k, default) for k, default in TRAIN_KEYS.items()}
    return _jsonable({"kind": kind, "model": model_args, "data": data_args, "trainer": train_args,
                      "code": training_code_fingerprint()})


@functools.cache
def training_code_fingerprint() -> str:
    """`code_fingerprint` of this package's `TRAINING_CODE`."""
    return code_fingerprint(Path(__file__).resolve().parent, TRAINING_CODE)


def code_fingerprint(root: Path, names: tuple[str, ...]) -> str:
    """Hash of the syntax trees of `names` under `root`, without docstrings: edits to comments, docs or
    layout keep the cached models, a change to what the code does retrains them."""
    digest = hashlib.sha256()
    for name in names:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        digest.update(name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return digest.hexdigest()[:16]


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a configuration (sorted-key JSON)."""
    text = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
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


def save_to_cache(module: Any, folder: Path, metrics: Mapping[str, Any]) -> Path:
    """Write model, tokenizer, head and metrics.json aside, then move into ``folder`` (atomic on one disk)."""
    import torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    module.save_pretrained(str(staging))
    head = getattr(module, "head", None)
    if head is not None and getattr(module, "fit_target", None) == "head":  # only a trained head is worth keeping
        torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, staging / HEAD_FILE)
    (staging / METRICS_FILE).write_text(json.dumps(_jsonable(dict(metrics)), indent=2, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def get_or_train(
    kind: str,
    config: Mapping[str, Any] | None = None,
    data: Any | None = None,
    *,
    name: str | None = None,
    root: Path | None = None,
    progress: bool = True,
) -> Path:
    """Path of the trained model of this kind and configuration, training (and testing) it only once.

    ``config`` has optional sections ``model`` (module arguments), ``data``
    (NewsDataModule arguments) and ``trainer`` (Lightning Trainer arguments; default
    a few epochs). ``data`` may be a ready NewsDataModule, whose arguments then count.
    """
    config = dict(config or {})
    trainer_args = {**DEFAULT_TRAINER[kind], **dict(config.get("trainer") or {})} if kind in DEFAULT_TRAINER else {}
    data_args = dict(data.hparams) if data is not None else dict(config.get("data") or {})
    full = full_config(kind, config.get("model"), data_args, trainer_args)
    folder = model_dir(name or kind, full, root)
    if is_complete(folder):
        log.info("using cached %s model %s", kind, folder)
        return folder
    from lightning.pytorch import Trainer

    from fedhlm.data.module import NewsDataModule

    datamodule = data if data is not None else NewsDataModule(**data_args)
    module = module_class(kind)(**dict(config.get("model") or {}))
    trainer = Trainer(
        **{"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
           "enable_progress_bar": progress, "enable_model_summary": False, **trainer_args}
    )
    log.info("training %s model into %s", kind, folder)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    tested = trainer.test(module, datamodule=datamodule, verbose=False)
    return save_to_cache(module, folder, training_metrics(module, datamodule, full, seconds, tested[0] if tested else {}))


def training_metrics(module: Any, datamodule: Any, config: Mapping[str, Any], seconds: float | None,
                     tested: Mapping[str, Any]) -> dict[str, Any]:
    """What metrics.json records about a trained model."""
    splits = getattr(datamodule, "splits", None)
    return {
        "kind": kind_of(module),
        "params": module.num_parameters(),
        "train_seconds": None if seconds is None else round(seconds, 2),
        "data_source": getattr(datamodule, "source_name", None),
        "data_sizes": splits.sizes() if splits is not None else None,
        **{k: float(v) for k, v in tested.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": dict(config),
    }


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
    """The newest complete cached model called ``name`` (folder ``<name>-<hash>``)."""
    base = root or cache_root()
    for folder, _ in cached_models(base):
        if folder.name.rsplit("-", 1)[0] == name:
            return folder
    raise ModelFolderError(f"no cached model named {name!r} in {base} (train one with `fedhlm fit --config configs/{name}.yaml`)")


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
