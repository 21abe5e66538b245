"""Where the articles come from: AG News from a path, any label,text CSV, or the generated corpus.

AG News is never part of the repository: it is found through an argument, the
``FEDHLM_DATA`` variable (a file, or a folder holding ``ag_news_dev.csv``, ``train.csv``
or ``test.csv``), the project's shared folder beside the repository
(``../shared/data/ag_news/``) or the folder ``fedhlm data fetch ag_news`` fills.
Without it ``auto`` falls back to the generated corpus, loudly.
"""

from __future__ import annotations

import logging
import os
from os import PathLike
from pathlib import Path

from fedhlm.data.items import NewsItem
from fedhlm.data.reader import read_news_csv
from fedhlm.data.synthetic import synthetic_corpus

log = logging.getLogger(__name__)

SOURCES = ("auto", "ag_news", "csv", "synthetic")
ENV_VAR = "FEDHLM_DATA"
# a folder's files in order of preference: the development slice, then the official splits
AG_NEWS_FILES = ("ag_news_dev.csv", "train.csv", "test.csv")
SHARED_RELATIVE = Path("..") / "shared" / "data" / "ag_news"
REPO_ROOT = Path(__file__).resolve().parents[3]  # src/fedhlm/data/sources.py -> repository root


def default_fetch_dir() -> Path:
    """Where ``fedhlm data fetch ag_news`` puts the CSVs unless told otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedhlm" / "ag_news"


def _in_folder(folder: Path) -> list[Path]:
    return [folder / name for name in AG_NEWS_FILES]


def ag_news_candidates(path: str | PathLike[str] | None = None) -> list[Path]:
    """The files that would be tried, in order (an explicit path is the only candidate)."""
    if path is not None:
        p = Path(path)
        return _in_folder(p) if p.is_dir() else [p]
    out: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        out += _in_folder(p) if p.is_dir() else [p]
    for root in (REPO_ROOT, Path.cwd()):
        out += _in_folder(root / SHARED_RELATIVE)
    out += _in_folder(default_fetch_dir())
    unique: dict[Path, Path] = {}
    for c in out:
        unique.setdefault(c.resolve(), c)
    return list(unique.values())


def find_ag_news(path: str | PathLike[str] | None = None) -> Path | None:
    """The first existing AG News CSV among the candidates, or None."""
    return next((c for c in ag_news_candidates(path) if c.is_file()), None)


def resolve_source(
    source: str = "auto",
    path: str | PathLike[str] | None = None,
    *,
    synthetic_size: int = 4000,
    seed: int = 0,
    hard_fraction: float = 0.2,
    label_base: int = 1,
) -> tuple[str, list[NewsItem]]:
    """(source name, items) for ``source`` in SOURCES.

    ``auto``: AG News when found, else the synthetic corpus with a warning, and the name is
    then "synthetic". ``ag_news`` asked for and not found raises FileNotFoundError naming
    every path tried; so does an explicit ``path`` that does not exist. ``csv`` needs
    ``path`` (label,text or class,title,description rows; ``label_base`` is the first label).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "synthetic":
        return "synthetic", synthetic_corpus(synthetic_size, seed=seed, hard_fraction=hard_fraction)
    if source == "csv":
        if path is None:
            raise ValueError("source 'csv' needs a path to the CSV file")
        items = read_news_csv(path, label_base=label_base)
        log.info("data: csv %s (%d items)", path, len(items))
        return "csv", items
    env = os.environ.get(ENV_VAR)
    if path is None and env and not Path(env).exists():
        log.warning("%s=%s does not exist; looking for AG News elsewhere", ENV_VAR, env)
    found = find_ag_news(path)
    if found is None and (source == "ag_news" or path is not None):
        tried = ", ".join(str(c) for c in ag_news_candidates(path))
        raise FileNotFoundError(f"AG News not found; tried: {tried} (set {ENV_VAR} or run `fedhlm data fetch ag_news`)")
    if found is None:
        tried = ", ".join(str(c) for c in ag_news_candidates())
        log.warning(
            "AG NEWS NOT FOUND (tried %s): falling back to the SYNTHETIC news corpus (%d items, seed %d); "
            "results are not AG News results. Set %s to the AG News CSV to use it.",
            tried, synthetic_size, seed, ENV_VAR,
        )
        return "synthetic", synthetic_corpus(synthetic_size, seed=seed, hard_fraction=hard_fraction)
    items = read_news_csv(found)
    log.info("data: ag_news %s (%d items)", found, len(items))
    return "ag_news", items
