"""News data for FedHLM: AG News or a generated corpus, splits, client partitions, prompts.

Pure pieces (reading, generation, splitting, partitioning, encoding) import without
Lightning; ``NewsDataModule`` loads on first use (``fedhlm data`` is `fedhlm.cli.data`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedhlm.data.encoding import (
    PromptCollator,
    encode_prompts,
    generation_pairs,
    load_tokenizer,
    verbaliser_token_ids,
)
from fedhlm.data.fetch import fetch_ag_news
from fedhlm.data.items import CLASS_NAMES, NUM_CLASSES, PROMPT_SUFFIX, VERBALISERS, NewsItem, prompt_text
from fedhlm.data.partition import Splits, label_histograms, partition, split_items, stratified_subset
from fedhlm.data.reader import clean_text, read_news_csv
from fedhlm.data.sources import SOURCES, ag_news_candidates, find_ag_news, resolve_source
from fedhlm.data.synthetic import synthetic_corpus

if TYPE_CHECKING:
    from fedhlm.data.module import NewsDataModule

__all__ = [
    "CLASS_NAMES", "NUM_CLASSES", "PROMPT_SUFFIX", "SOURCES", "VERBALISERS",
    "NewsDataModule", "NewsItem", "PromptCollator", "Splits",
    "ag_news_candidates", "clean_text", "encode_prompts", "fetch_ag_news", "find_ag_news",
    "generation_pairs", "label_histograms", "load_tokenizer", "partition",
    "prompt_text", "read_news_csv", "resolve_source", "split_items", "stratified_subset",
    "synthetic_corpus", "verbaliser_token_ids",
]


def __getattr__(name: str) -> Any:
    if name == "NewsDataModule":
        from fedhlm.data.module import NewsDataModule

        return NewsDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

