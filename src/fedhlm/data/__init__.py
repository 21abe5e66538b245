"""News data for FedHLM: tasks (classes and verbalisers), their files or a generated corpus, splits, partitions, prompts.

Pure pieces (reading, generation, splitting, partitioning, encoding) import without
Lightning; ``NewsDataModule`` loads on first use (``fedhlm data`` is `fedhlm.cli.data`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedhlm.data.encoding import (
    PromptCollator,
    encode_prompts,
    load_tokenizer,
    verbaliser_token_ids,
)
from fedhlm.data.fetch import fetch_ag_news
from fedhlm.data.items import NewsItem, prompt_text
from fedhlm.data.partition import Splits, label_histograms, partition, split_items, stratified_subset
from fedhlm.data.reader import clean_text, read_news_csv
from fedhlm.data.sources import SOURCES, Corpus, drop_overlap, find_file, resolve_corpus, text_key
from fedhlm.data.task import DEFAULT_TASK, Task, TaskClass, TaskError, load_task
from fedhlm.data.synthetic import synthetic_corpus

if TYPE_CHECKING:
    from fedhlm.data.module import NewsDataModule

__all__ = [
    "DEFAULT_TASK", "SOURCES", "Corpus", "NewsDataModule", "NewsItem", "PromptCollator", "Splits",
    "Task", "TaskClass", "TaskError", "clean_text", "drop_overlap", "encode_prompts", "fetch_ag_news",
    "find_file", "label_histograms", "load_task", "load_tokenizer", "partition",
    "prompt_text", "read_news_csv", "resolve_corpus", "split_items", "stratified_subset",
    "synthetic_corpus", "text_key", "verbaliser_token_ids",
]


def __getattr__(name: str) -> Any:
    if name == "NewsDataModule":
        from fedhlm.data.module import NewsDataModule

        return NewsDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

