"""NewsDataModule: the corpus as Lightning loaders of classification prompts."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from fedhlm.data.encoding import PromptCollator, load_tokenizer
from fedhlm.data.items import NewsItem
from fedhlm.data.partition import Splits, partition, split_items, stratified_subset
from fedhlm.data.sources import resolve_source

log = logging.getLogger(__name__)


class NewsDataModule(LightningDataModule):
    """AG News (or a label,text CSV, or the generated corpus) as prompts for one-token classification.

    Batches are ``encode_prompts`` dicts: input_ids, attention_mask, last_index, labels, uid.

    Args:
        source: "auto" (AG News when found, else the synthetic corpus with a warning),
            "ag_news", "csv" or "synthetic".
        path: data file or folder; None looks at $FEDHLM_DATA and ../shared/data/ag_news.
        tokenizer: tokenizer folder; None uses the bundled all-MiniLM-L6-v2.
        max_length: tokens per prompt, counting [CLS] and the "topic :" suffix.
        batch_size: prompts per batch.
        seed: seeds the generated corpus, the limit, the splits and the shuffling.
        synthetic_size: articles in the generated corpus.
        limit: keep at most this many articles, stratified by label, for fast runs; None keeps all.
        num_workers: DataLoader worker processes.
        fractions: train, val, calib, test shares of the corpus.
        hard_fraction: share of mixed-topic articles in the generated corpus.
        label_base: first label value of a "csv" source (AG News is 1-based).
    """

    def __init__(
        self,
        source: str = "auto",
        path: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        synthetic_size: int = 4000,
        limit: int | None = None,
        num_workers: int = 0,
        fractions: tuple[float, float, float, float] = (0.6, 0.1, 0.1, 0.2),
        hard_fraction: float = 0.2,
        label_base: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = source
        self.path = path
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.synthetic_size = synthetic_size
        self.limit = limit
        self.num_workers = num_workers
        self.fractions = tuple(fractions)
        self.hard_fraction = hard_fraction
        self.label_base = label_base
        self.tokenizer = load_tokenizer(tokenizer)
        self.collate = PromptCollator(self.tokenizer, max_length)
        self.source_name: str | None = None
        self.splits: Splits | None = None

    def setup(self, stage: str | None = None) -> None:
        """Resolve the source and split it, once (every later stage reuses the same splits)."""
        if self.splits is not None:
            return
        name, items = resolve_source(
            self.source, self.path, synthetic_size=self.synthetic_size, seed=self.seed,
            hard_fraction=self.hard_fraction, label_base=self.label_base,
        )
        items = stratified_subset(items, self.limit, seed=self.seed)
        self.source_name = name
        self.splits = split_items(items, fractions=self.fractions, seed=self.seed)
        counts = dict(sorted(Counter(it.label for it in items).items()))
        log.info("data: source=%s items=%d labels=%s splits=%s", name, len(items), counts, self.splits.sizes())

    def _splits(self) -> Splits:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        return self.splits

    def dataloader(self, items: Sequence[NewsItem], *, shuffle: bool = False) -> DataLoader:
        """A loader of prompt batches over any items (a client's share, the calibration split)."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            list(items), batch_size=self.batch_size, shuffle=shuffle, generator=generator,
            collate_fn=self.collate, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader(self._splits().train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader(self._splits().val)

    def test_dataloader(self) -> DataLoader:
        return self.dataloader(self._splits().test)

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader(self._splits().test)

    def calib_items(self) -> list[NewsItem]:
        """The split kept apart for fitting thresholds (never trained on, never reported on)."""
        return self._splits().calib

    def client_items(
        self, num_clients: int, *, alpha: float | None = None, seed: int | None = None
    ) -> list[list[NewsItem]]:
        """The train split shared out across clients: IID (alpha None) or Dirichlet(alpha) label skew."""
        train = self._splits().train
        seed = self.seed if seed is None else seed
        parts = partition([it.label for it in train], num_clients, alpha=alpha, seed=seed)
        return [[train[i] for i in part] for part in parts]
