"""Where a task's articles come from: its training and evaluation files, or the generated corpus.

Data sets are never part of the repository. A task's files (``train`` and ``eval`` of its
YAML, by file name) are looked up in an explicit path; else in the ``FEDHLM_DATA`` variable
only (a folder holding the files, or a data root holding the task's folder: the user said
where the data is, so nothing else is used when it is not there); else in the project's
shared folder beside the repository (``../shared/data/<folder>/``) and the folder ``fedhlm
data fetch`` fills. Without them ``auto`` falls back to the generated corpus, loudly;
``files``, an explicit path and ``FEDHLM_DATA`` refuse, naming every path tried.

Training and evaluation articles must be different articles: any training article whose
text is also in the evaluation file is dropped (by normalised text, not row id) and counted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from fedhlm.data.items import NewsItem, prompt_text
from fedhlm.data.reader import read_news_csv
from fedhlm.data.synthetic import synthetic_corpus
from fedhlm.data.task import REPO_ROOT, Task

log = logging.getLogger(__name__)

SOURCES = ("auto", "files", "synthetic")
ENV_VAR = "FEDHLM_DATA"
SHARED_RELATIVE = Path("..") / "shared" / "data"
SYNTHETIC_EVAL_SEED_OFFSET = 7919  # the generated evaluation corpus draws from another seed than the training one


def default_fetch_dir(folder: str = "ag_news") -> Path:
    """Where ``fedhlm data fetch`` puts a data set's files unless told otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedhlm" / folder


def data_folders(task: Task) -> list[Path]:
    """The folders searched for the task's files, in order, without repeats."""
    out: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        if p.is_file():
            p = p.parent
        out += [p] + ([p / task.folder] if task.folder else [])
    elif task.folder:
        for root in (REPO_ROOT, Path.cwd()):
            out.append(root / SHARED_RELATIVE / task.folder)
        out.append(default_fetch_dir(task.folder))
    unique: dict[Path, Path] = {}
    for c in out:
        unique.setdefault(c.resolve(), c)
    return list(unique.values())


def candidates(task: Task, names: tuple[str, ...], path: str | PathLike[str] | None = None) -> list[Path]:
    """The files that would be tried for one of the task's files (an explicit file is the only candidate)."""
    if path is not None:
        p = Path(path)
        return [p / n for n in names] if p.is_dir() else [p]
    return [folder / n for folder in data_folders(task) for n in names]


def find_file(task: Task, names: tuple[str, ...], path: str | PathLike[str] | None = None) -> Path | None:
    """The first existing file among the candidates, or None."""
    return next((c for c in candidates(task, names, path) if c.is_file()), None)


@dataclass(frozen=True)
class Corpus:
    """What a source gave: training articles, evaluation articles (None: carve them from training) and names."""

    name: str
    train: list[NewsItem]
    eval: list[NewsItem] | None
    train_file: str | None = None
    eval_file: str | None = None
    dropped_overlap: int = 0  # training articles removed because the evaluation file holds the same text


def text_key(item: NewsItem) -> str:
    """An article's text normalised for the overlap check (case and whitespace ignored)."""
    return " ".join(prompt_text(item).lower().split())


def drop_overlap(train: list[NewsItem], evaluation: list[NewsItem]) -> tuple[list[NewsItem], int]:
    """Training articles whose text is not in ``evaluation``, and how many were removed."""
    seen = {text_key(it) for it in evaluation}
    kept = [it for it in train if text_key(it) not in seen]
    return kept, len(train) - len(kept)


def _read(task: Task, path: Path) -> list[NewsItem]:
    return read_news_csv(path, label_base=task.label_base, num_classes=task.num_classes)


def resolve_corpus(
    task: Task,
    source: str = "auto",
    train_path: str | PathLike[str] | None = None,
    eval_path: str | PathLike[str] | None = None,
    *,
    synthetic_size: int = 4000,
    seed: int = 0,
    hard_fraction: float = 0.2,
) -> Corpus:
    """The task's corpus from ``source`` in SOURCES.

    ``auto``: the task's files when found, else the generated corpus with a warning (its
    name is then "synthetic"). ``files``: the files, or FileNotFoundError naming every path
    tried; an explicit path that does not exist raises too. ``eval_path`` given, or the task
    naming evaluation files, means a separate evaluation file; a task without one (BBC News)
    carves its test split from the training file.
    """
    if source not in SOURCES:
        raise ValueError(f"data.source: must be one of {SOURCES}, got {source!r}")
    if source == "synthetic":
        return _synthetic(task, synthetic_size, seed, hard_fraction)
    env = os.environ.get(ENV_VAR)
    train_file = find_file(task, task.train, train_path)
    if train_file is None:
        tried = ", ".join(str(c) for c in candidates(task, task.train, train_path))
        if env and train_path is None:
            raise FileNotFoundError(f"{ENV_VAR}={env} holds no {task.name} training file; tried: {tried}")
        if source == "files" or train_path is not None:
            raise FileNotFoundError(f"{task.name} training file not found; tried: {tried} (set {ENV_VAR} or "
                                    f"data.train_path)")
        log.warning("%s NOT FOUND (tried %s): falling back to the SYNTHETIC news corpus (%d items, seed %d); results "
                    "are not %s results. Set %s to the data folder to use it.",
                    task.name.upper(), tried, synthetic_size, seed, task.name, ENV_VAR)
        return _synthetic(task, synthetic_size, seed, hard_fraction)
    train = _read(task, train_file)
    eval_file = find_file(task, task.eval, eval_path) if (task.eval or eval_path is not None) else None
    if eval_file is None and eval_path is not None:
        raise FileNotFoundError(f"{task.name} evaluation file not found: {eval_path}")
    if eval_file is None and task.eval:
        tried = ", ".join(str(c) for c in candidates(task, task.eval))
        log.warning("%s: no evaluation file (tried %s): the test split is carved from %s", task.name, tried, train_file)
    if eval_file is None:
        log.info("data: %s %s (%d items, one file)", task.name, train_file, len(train))
        return Corpus(task.name, train, None, str(train_file), None)
    evaluation = _read(task, eval_file)
    train, dropped = drop_overlap(train, evaluation)
    if dropped:
        log.warning("data: dropped %d training articles whose text is in the evaluation file %s", dropped, eval_file)
    log.info("data: %s train %s (%d items), eval %s (%d items)", task.name, train_file, len(train), eval_file,
             len(evaluation))
    return Corpus(task.name, train, evaluation, str(train_file), str(eval_file), dropped)


def _synthetic(task: Task, size: int, seed: int, hard_fraction: float) -> Corpus:
    """A generated training corpus and a smaller evaluation corpus from another seed, in the task's classes."""
    train = synthetic_corpus(size, seed=seed, hard_fraction=hard_fraction, num_classes=task.num_classes)
    evaluation = synthetic_corpus(max(size // 4, task.num_classes), seed=seed + SYNTHETIC_EVAL_SEED_OFFSET,
                                  hard_fraction=hard_fraction, num_classes=task.num_classes)
    train, dropped = drop_overlap(train, evaluation)
    return Corpus("synthetic", train, evaluation, None, None, dropped)
