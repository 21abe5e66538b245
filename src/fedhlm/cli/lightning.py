"""``fedhlm fit|validate|test``: the Lightning CLI over the model kinds of the cache and NewsDataModule.

The schema is the constructors' signatures (``--print_config`` shows it):
``model: {class_path: <a class of fedhlm.models.cache.KINDS>, init_args: ...}`` - the SLM
(``fedhlm.models.slm.SLMModule``), the LLM (``fedhlm.models.llm.LLMRefiner``) or the
centralised head fit (``fedhlm.models.head_fit.CentralHeadModule``) - ``data:``
NewsDataModule's arguments, ``trainer:`` Lightning's. After ``fit`` the model is tested
and written into the model cache (:mod:`fedhlm.models.cache`) under the hash of its
configuration; ``validate``/``test`` without ``--ckpt_path`` load that cached model when
it exists, so ``fedhlm test --config configs/slm.yaml`` evaluates what ``fit`` made.
"""

from __future__ import annotations

import logging
import time
import sys
import warnings
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedhlm.data.module import NewsDataModule
from fedhlm.models.cache import KINDS, full_config, kind_of, module_class, save_to_cache, training_metrics
from fedhlm.models.progress import ProgressLines
from fedhlm.models.store import is_complete, model_dir

log = logging.getLogger(__name__)

SUBCOMMANDS = ("fit", "validate", "test")


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class FedHLMCLI(LightningCLI):
    """LightningCLI plus the model cache: save after fit, load for validate/test."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the task is the data's: the model answers in that task's verbalisers (one source, data.task)
        parser.link_arguments("data.task", "model.init_args.task")
        parser.add_argument("--cache", type=bool, default=True,
                            help="after fit, test and save the model into the model cache; "
                                 "for validate/test, load the cached model of this config")
        parser.add_argument("--cache_name", type=str | None, default=None,
                            help=f"name of the cached model (default: its kind, one of {', '.join(KINDS)})")

    def before_instantiate_classes(self) -> None:
        """A ``config:<llm yaml>`` teacher becomes that LLM on this fit's task and files (trained first when
        missing), before the student is built: the module alone would not know the fit's data. A bf16 precision
        this machine would emulate becomes float32 (`models.precision`)."""
        from fedhlm.models.cache import resolve_teacher
        from fedhlm.models.precision import runnable_precision

        cfg = self._cfg()
        if cfg.trainer is not None:  # bf16 only where it is not emulated, before the cache key is taken from it
            cfg.trainer.precision = runnable_precision(cfg.trainer.precision)
        init = getattr(cfg.model, "init_args", None) if cfg.model is not None else None
        teacher = getattr(init, "teacher", None) if init is not None else None
        if isinstance(teacher, str) and teacher.startswith("config:"):
            init.teacher = resolve_teacher(teacher, _plain(cfg.data), train=True)

    # ---- cache bookkeeping -----------------------------------------------------------------
    def _cfg(self) -> Namespace:
        return self.config[self.subcommand]

    def _cache_folder(self):
        cfg = self._cfg()
        model_cfg = _plain(cfg.model)
        model_args = model_cfg.get("init_args", {}) if isinstance(model_cfg, dict) else {}
        kind = kind_of(self.model)
        full = full_config(kind, model_args, _plain(cfg.data), _plain(cfg.trainer))
        return kind, full, model_dir(cfg.cache_name or kind, full)

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        cfg = self._cfg()
        if not cfg.cache:
            return
        if self.trainer.fast_dev_run:
            log.warning("fast_dev_run: the model is not saved into the cache")
            return
        seconds = time.perf_counter() - getattr(self, "_fit_started", time.perf_counter())
        _, full, folder = self._cache_folder()
        tested = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        results = tested[0] if tested else {}
        metrics = training_metrics(self.model, self.datamodule, full, seconds, results)
        save_to_cache(self.model, folder, metrics)
        summary = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(results.items()))
        print(f"saved {metrics['kind']} model to {folder} ({summary or 'not tested'})")

    def _load_cached(self) -> None:
        cfg = self._cfg()
        if not cfg.cache or cfg.get("ckpt_path"):
            return
        _, _, folder = self._cache_folder()
        if is_complete(folder):
            self.model.load_backbone(str(folder))
            print(f"evaluating the cached model {folder}")
        else:
            log.warning("no cached model for this configuration (%s): evaluating the model as initialised", folder)

    def before_validate(self) -> None:
        self._load_cached()

    def before_test(self) -> None:
        self._load_cached()


def main(argv: list[str] | None = None) -> int:
    """``fedhlm fit|validate|test [--config FILE] [overrides]``; argv[0] is the subcommand."""
    argv = list(argv or [])
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: fedhlm {{{','.join(SUBCOMMANDS)}}} --config configs/slm.yaml [--print_config] [overrides]")
        return 2
    from fedhlm.data.reader import DataFileError

    try:
        _run_cli(argv)
    except (DataFileError, FileNotFoundError) as exc:  # a bad data file is the user's to fix: no traceback
        print(f"fedhlm {argv[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_cli(argv: list[str]) -> None:
    with warnings.catch_warnings():
        # `fedhlm` passes its own argv on; LightningCLI warns when sys.argv also holds arguments
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        for kind in KINDS:
            module_class(kind)  # imported, so their short class names resolve
        FedHLMCLI(
            LightningModule,
            NewsDataModule,
            subclass_mode_model=True,
            save_config_callback=None,
            auto_configure_optimizers=False,  # the modules' configure_optimizers are the only optimisers
            trainer_defaults={"logger": False, "enable_checkpointing": False,
                              "callbacks": [ProgressLines()]},  # lines with an ETA where no live bar shows
            args=argv,
        )
