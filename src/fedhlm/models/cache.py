"""Trained models on disk: train once, reuse after; ``fedhlm models`` lists them.

A model lives in ``$FEDHLM_HOME/models/<name>-<hash>`` (default
``~/.cache/fedhlm/models``), where the hash is of its full configuration - module
arguments (defaults filled in), data arguments and training length - and of the code that
builds, feeds and trains the models (`TRAINING_CODE`, comments and docstrings ignored), so
a changed setting or a changed model definition trains a new model instead of silently
reusing an old one. Each folder is a
Hugging Face ``save_pretrained`` folder (model + tokenizer), plus ``metrics.json`` (test
accuracy, parameters, training time, data source, the configuration) and, for a ``head`` fit
(the SLM with its centrally trained head), ``threshold_head.pt``: each module's ``save_pretrained``
writes what it trained. A folder appears only once complete (written aside, then renamed).

A simulation reads its models' fit YAMLs (:func:`read_fit_config`) with the parser ``fedhlm fit``
uses, so ``fedhlm fit --config configs/slm.yaml`` and a simulation naming ``configs/slm.yaml`` name -
and reuse - the same folder. :data:`DEFAULT_TRAINER` is the training length of a config that gives none.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedhlm.models.precision import runnable_trainer_args
from fedhlm.models.store import METRICS_FILE, jsonable, is_complete, model_dir

log = logging.getLogger(__name__)

KINDS: dict[str, str] = {"slm": "fedhlm.models.slm.SLMModule", "llm": "fedhlm.models.llm.LLMRefiner",
                         "head": "fedhlm.models.head_fit.CentralHeadModule", "gen": "fedhlm.models.title_lm.TitleLM"}
# what decides the trained weights besides module and data arguments
TRAIN_KEYS: dict[str, Any] = {"max_epochs": None, "max_steps": -1, "limit_train_batches": None, "accumulate_grad_batches": 1,
                              "precision": None}
# what of a data section decides which article lands in which split: a distilled SLM's teacher inherits
# these from the student, and a run warns when its SLM and LLM differ in them (one model's held-out
# articles would be the other's training articles)
SPLIT_DATA_KEYS = ("task", "source", "train_path", "eval_path", "seed", "holdout", "synthetic_size")
DEFAULT_TRAINER: dict[str, dict[str, Any]] = {"slm": {"max_epochs": 4}, "llm": {"max_epochs": 2}, "head": {"max_epochs": 1},
                                              "gen": {"max_epochs": 1}}
# modules whose code decides the trained weights, by module name: the fingerprint reads their source
# wherever the package puts them, and ignores where each import comes from, so a move retrains nothing
TRAINING_CODE = ("fedhlm.models.classifier", "fedhlm.models.backbone", "fedhlm.models.slm", "fedhlm.models.llm",
                 "fedhlm.maths.threshold", "fedhlm.maths.uncertainty", "fedhlm.maths.distill", "fedhlm.models.teacher",
                 "fedhlm.data.encoding", "fedhlm.data.objectives", "fedhlm.data.items",
                 "fedhlm.data.module", "fedhlm.data.reader", "fedhlm.data.sources", "fedhlm.data.synthetic",
                 "fedhlm.data.partition", "fedhlm.data.task")
# what else decides a kind's trained weights: the central head fit labels its pairs with the verification maths
KIND_CODE: dict[str, tuple[str, ...]] = {"head": ("fedhlm.models.head_fit", "fedhlm.maths.speculative"),
                                         "gen": ("fedhlm.models.title_lm",)}


def module_class(kind: str) -> type:
    """The LightningModule class of a model kind ("slm", "llm", "head" or "gen")."""
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {sorted(KINDS)}, got {kind!r}")
    module, name = KINDS[kind].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def kind_of_class_path(class_path: str) -> str:
    """The kind of a fit config's ``model.class_path`` (a class of KINDS or a subclass of one)."""
    module, _, name = class_path.rpartition(".")
    return kind_of(getattr(importlib.import_module(module), name))


def kind_of(model: Any) -> str:
    """The kind ("slm", "llm", "head") of a module instance or class (by the classes in KINDS)."""
    for kind in KINDS:
        if isinstance(model, module_class(kind)) or model is module_class(kind):
            return kind
    raise ValueError(f"{type(model).__name__} is not a cacheable model kind")


def _signature_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}


def with_data_task(model: Mapping[str, Any] | None, data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Module arguments whose ``task`` is the data's: ``data.task`` is the one source of a fit's task."""
    from fedhlm.data.module import NewsDataModule

    task = dict(data or {}).get("task", _signature_defaults(NewsDataModule)["task"])
    return {**dict(model or {}), "task": task}


def full_config(kind: str, model: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
                trainer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The configuration that identifies a trained model, with every default written out."""
    from fedhlm.data.module import NewsDataModule

    model_args = {**_signature_defaults(module_class(kind)), **with_data_task(model, data)}
    data_args = {**_signature_defaults(NewsDataModule), **dict(data or {})}
    if "teacher" in model_args:
        model_args["teacher"] = resolve_teacher(model_args["teacher"], data_args, train=False)
    data_args.pop("num_workers", None)  # does not change the result
    trainer_args = dict(trainer or {})
    train_args = {k: trainer_args.get(k, default) for k, default in TRAIN_KEYS.items()}
    return jsonable({"kind": kind, "model": model_args, "data": data_args, "trainer": train_args,
                      "code": training_code_fingerprint(KIND_CODE.get(kind, ()))})


@functools.cache
def training_code_fingerprint(extra: tuple[str, ...] = ()) -> str:
    """`code_fingerprint` of `TRAINING_CODE` (and of a kind's `extra` modules)."""
    return code_fingerprint(TRAINING_CODE + extra)


def code_fingerprint(modules: tuple[str, ...]) -> str:
    """Hash of the syntax trees of `modules`, without docstrings and with each import reduced to the names
    it binds: edits to comments, docs, layout or a module's location keep the cached models, a change to
    what the code does retrains them."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise ModuleNotFoundError(f"training code module {name} not found (TRAINING_CODE is out of date)")
        digest.update(_normalised_tree(Path(spec.origin).read_text()).encode() + b"\0")
    return digest.hexdigest()[:16]


def _normalised_tree(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = [alias.asname or alias.name.split(".")[0] for alias in node.names]
            node.__class__ = ast.Import  # what is bound counts, not where it came from
            node.names = [ast.alias(name=n) for n in bound]
            for field in ("module", "level"):
                if hasattr(node, field):
                    delattr(node, field)
    return ast.dump(tree)


def read_fit_config(path: str | Path) -> dict[str, Any]:
    """The model / data / trainer sections of a `fedhlm fit` YAML, as get_or_train takes them.

    Read by the Lightning CLI's parser over the classes `fedhlm fit` uses, so a key the fit would
    refuse (a misspelt init arg, an unknown data option) fails here, before any training; model
    and data come back with every default written out, the trainer section as given.
    """
    from jsonargparse import ActionConfigFile, ArgumentError, namespace_to_dict
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningArgumentParser

    from fedhlm.data.module import NewsDataModule

    path = config_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found")
    parser = LightningArgumentParser(exit_on_error=False, allow_abbrev=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=bool | int, default=True)
    for name, kind in (("cache", bool | None), ("cache_name", str | None), ("ckpt_path", str | None)):
        parser.add_argument(f"--{name}", type=kind, default=None)  # `fedhlm fit` options: allowed, unused here
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True, required=False)  # as `fedhlm fit`
    parser.add_lightning_class_args(NewsDataModule, "data")
    parser.link_arguments("data.task", "model.init_args.task")  # as `fedhlm fit`: data.task is the one source
    parser.add_argument("--trainer", type=dict, default={})  # as given: get_or_train adds its own defaults
    try:
        cfg = namespace_to_dict(parser.parse_args([f"--config={path}"] if path.read_text().strip() else []))
    except ArgumentError as exc:
        raise ValueError(f"model config {path}: {' '.join(str(exc).split())}") from None
    class_path = (cfg.get("model") or {}).get("class_path")
    return {
        "kind": kind_of_class_path(class_path) if class_path else None,
        "model": dict((cfg.get("model") or {}).get("init_args") or {}),
        "data": dict(cfg["data"]),
        "trainer": dict(cfg["trainer"] or {}),
    }


CONFIG_PREFIX = "config:"


def fit_config_with(path: str | Path, data_overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A fit YAML's sections (:func:`read_fit_config`) with a run's data overrides, the model's task following an
    overridden data.task."""
    cfg = read_fit_config(path)
    cfg["data"].update(data_overrides or {})
    cfg["model"] = with_data_task(cfg["model"], cfg["data"])
    return cfg


def config_path(path: str | Path) -> Path:
    """A fit config's path: as given (relative to the working directory), else relative to the repository."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        from fedhlm.data.task import REPO_ROOT

        repo = REPO_ROOT / p
        if repo.exists():
            return repo
    return p


def resolve_teacher(spec: str | None, data: Mapping[str, Any] | None = None, *, train: bool = True,
                    progress: bool = True) -> str | None:
    """A teacher given as ``config:<llm fit YAML>`` becomes ``cache:<folder>`` of that LLM, on the student's
    task and files (``data``'s SPLIT_DATA_KEYS): trained once when missing, or (``train=False``, what a
    cache key needs) only named. Other specs are returned as they are. The folder name carries the LLM's
    hash, so a changed LLM config changes the distilled SLM's key too."""
    if spec is None or not str(spec).startswith(CONFIG_PREFIX):
        return spec
    cfg = read_fit_config(str(spec)[len(CONFIG_PREFIX):])
    cfg["data"].update({k: v for k, v in dict(data or {}).items() if k in SPLIT_DATA_KEYS})
    cfg["model"] = with_data_task(cfg["model"], cfg["data"])
    kind = cfg.get("kind") or "llm"  # a title student's teacher is a title model ("gen")
    folder = get_or_train(kind, cfg, progress=progress) if train else cache_folder(kind, cfg)[1]
    return f"cache:{folder.name}"


def save_to_cache(module: Any, folder: Path, metrics: Mapping[str, Any]) -> Path:
    """Write what the module saves (model, tokenizer, a trained head) and metrics.json aside, then move into
    ``folder`` (atomic on one disk)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    module.save_pretrained(str(staging))
    (staging / METRICS_FILE).write_text(json.dumps(jsonable(dict(metrics)), indent=2, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def cache_folder(kind: str, config: Mapping[str, Any], *, name: str | None = None, root: Path | None = None
                 ) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """(full configuration, cache folder, trainer arguments) of a model: where get_or_train puts it."""
    trainer_args = {**DEFAULT_TRAINER[kind], **dict(config.get("trainer") or {})} if kind in DEFAULT_TRAINER else {}
    trainer_args = runnable_trainer_args(trainer_args)  # bf16 only where it is not emulated; the key says which ran
    full = full_config(kind, config.get("model"), config.get("data"), trainer_args)
    return full, model_dir(name or kind, full, root), trainer_args


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
    data_args = dict(data.hparams) if data is not None else dict(config.get("data") or {})
    full, folder, trainer_args = cache_folder(kind, {**config, "data": data_args}, name=name, root=root)
    if is_complete(folder):
        log.info("using cached %s model %s", kind, folder)
        return folder
    teacher = dict(config.get("model") or {}).get("teacher")
    if teacher is not None:
        resolve_teacher(teacher, data_args, train=True, progress=progress)  # the teacher exists before the student
    from lightning.pytorch import Trainer

    from fedhlm.data.module import NewsDataModule

    datamodule = data if data is not None else NewsDataModule(**data_args)
    module = module_class(kind)(**{k: full["model"][k] for k in with_data_task(config.get("model"), data_args)})
    from fedhlm.models.progress import ProgressLines

    trainer = Trainer(
        **{"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
           "enable_progress_bar": progress, "enable_model_summary": False,
           "callbacks": [ProgressLines(folder.name)] if progress else [], **trainer_args}
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
        "machine": training_machine(),
        "config": dict(config),
    }


def training_machine() -> dict[str, Any]:
    """What decides the trained weights besides the config and the code: float kernels differ by CPU
    instruction set and thread count (the order of reductions), so one machine retrains bit for bit and
    another lands near, not on, the same weights."""
    import platform

    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
