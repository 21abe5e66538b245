"""What a classification task is: its classes, one verbaliser token each, its prompt and its files.

A task is a small YAML file (``configs/tasks/<name>.yaml``; AG News and BBC News ship) so
that a new news task needs no code: the class set, the label numbering of its CSV files,
the words the models answer with and where its training and evaluation files are usually
found all come from it. Torch-free; :func:`fedhlm.data.encoding.verbaliser_token_ids`
checks the verbalisers against a tokenizer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/fedhlm/data/task.py -> repository root
TASKS_DIR = REPO_ROOT / "configs" / "tasks"
DEFAULT_TASK = "ag_news"
DEFAULT_SUFFIX = "topic :"  # appended after truncation: the class token always follows the same tokens


class TaskError(ValueError):
    """A task description is missing, unreadable or inconsistent; the message names the field."""


@dataclass(frozen=True)
class TaskClass:
    """One class: its display name and the single token that answers it."""

    name: str
    verbaliser: str


@dataclass(frozen=True)
class Task:
    """A news classification task as one-token generation: ``"{text} {prompt_suffix}"`` -> a verbaliser."""

    name: str
    classes: tuple[TaskClass, ...]
    prompt_suffix: str = DEFAULT_SUFFIX
    label_base: int = 1
    folder: str | None = None  # the task's data folder name under a data root
    train: tuple[str, ...] = ()  # candidate file names of the training file, first found wins
    eval: tuple[str, ...] = ()  # of the evaluation file; empty: carve the test split from the training file

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if len(self.classes) < 2:
            raise TaskError(f"{where}: classes: needs at least 2 classes, got {len(self.classes)}")
        for i, c in enumerate(self.classes):
            if not c.name.strip():
                raise TaskError(f"{where}: classes[{i}].name: must not be empty")
            if not c.verbaliser.strip() or c.verbaliser != c.verbaliser.strip():
                raise TaskError(f"{where}: classes[{i}].verbaliser: must be one word without spaces, "
                                f"got {c.verbaliser!r}")
        words = [c.verbaliser for c in self.classes]
        if len(set(words)) != len(words):
            raise TaskError(f"{where}: classes: verbalisers must differ, got {words}")
        if not self.prompt_suffix.strip():
            raise TaskError(f"{where}: prompt_suffix: must not be empty")
        if not self.train:
            raise TaskError(f"{where}: train: needs at least one file name")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def verbalisers(self) -> tuple[str, ...]:
        return tuple(c.verbaliser for c in self.classes)


def _names(value: Any, field: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TaskError(f"{where}: {field}: must be a file name or a list of them, got {value!r}")


def task_from_mapping(data: Mapping[str, Any], origin: str = "task") -> Task:
    """A Task from a parsed YAML mapping; unknown or mistyped fields are refused by name."""
    where = f"{origin}"
    known = {"name", "classes", "prompt_suffix", "label_base", "folder", "train", "eval"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TaskError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    if not isinstance(data.get("name"), str):
        raise TaskError(f"{where}: name: must be a string, got {data.get('name')!r}")
    raw = data.get("classes")
    if not isinstance(raw, list):
        raise TaskError(f"{where}: classes: must be a list of {{name, verbaliser}}, got {raw!r}")
    classes = []
    for i, c in enumerate(raw):
        if not isinstance(c, Mapping) or set(c) != {"name", "verbaliser"}:
            raise TaskError(f"{where}: classes[{i}]: must be {{name: ..., verbaliser: ...}}, got {c!r}")
        classes.append(TaskClass(name=str(c["name"]), verbaliser=str(c["verbaliser"])))
    label_base = data.get("label_base", 1)
    if not isinstance(label_base, int) or isinstance(label_base, bool):
        raise TaskError(f"{where}: label_base: must be an integer, got {label_base!r}")
    folder = data.get("folder")
    if folder is not None and not isinstance(folder, str):
        raise TaskError(f"{where}: folder: must be a string, got {folder!r}")
    return Task(
        name=data["name"], classes=tuple(classes), prompt_suffix=str(data.get("prompt_suffix", DEFAULT_SUFFIX)),
        label_base=label_base, folder=folder, train=_names(data.get("train"), "train", where),
        eval=_names(data.get("eval"), "eval", where),
    )


def task_path(spec: str | PathLike[str]) -> Path:
    """The YAML file of a task: a shipped name (``ag_news``) or a path."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return p
    return TASKS_DIR / f"{spec}.yaml"


@functools.cache
def _load(path: Path) -> Task:
    if not path.is_file():
        shipped = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        raise TaskError(f"task file not found: {path} (shipped tasks: {', '.join(shipped)})")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TaskError(f"task file {path}: cannot read it: {err}") from err
    if not isinstance(data, Mapping):
        raise TaskError(f"task file {path}: top level must be a mapping")
    return task_from_mapping(data, origin=f"task file {path}")


def load_task(spec: str | PathLike[str] | Task = DEFAULT_TASK) -> Task:
    """A Task from a shipped name, a YAML path, or a Task (returned as it is)."""
    if isinstance(spec, Task):
        return spec
    return _load(task_path(spec).resolve())
