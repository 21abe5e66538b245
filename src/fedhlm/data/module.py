"""NewsDataModule: a task's training and evaluation files as Lightning loaders of classification prompts."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from fedhlm.data.encoding import load_tokenizer, verbaliser_token_ids
from fedhlm.data.objectives import make_collator
from fedhlm.data.items import NewsItem
from fedhlm.data.reader import DataFileError
from fedhlm.data.partition import Splits, partition, split_items, stratified_subset
from fedhlm.data.sources import SOURCES, Corpus, resolve_corpus
from fedhlm.data.task import DEFAULT_TASK, load_task

log = logging.getLogger(__name__)


class NewsDataModule(LightningDataModule):
    """A news task's articles as prompts for one-token classification.

    Batches are ``encode_prompts`` dicts: input_ids, attention_mask, last_index, labels, uid.
    Validation and calibration articles are carved from the training file; the test split is
    the evaluation file when the task has one (AG News: train.csv / test.csv), else carved too.

    Args:
        task: a shipped task name (``configs/tasks/<name>.yaml``) or a task YAML path: the
            classes, their verbalisers, the prompt suffix and the usual file names.
        source: "auto" (the task's files when found, else the generated corpus with a
            warning), "files" (the files or an error) or "synthetic".
        train_path: training file (or a folder holding the task's file); None searches
            $FEDHLM_DATA and ../shared/data/<task folder>.
        eval_path: evaluation file; None uses the task's, when it names one.
        tokenizer: tokenizer folder; None uses the bundled all-MiniLM-L6-v2.
        max_length: tokens per prompt, counting [CLS] and the task's prompt suffix.
        batch_size: prompts per batch.
        seed: seeds the generated corpus, the limit, the splits and the shuffling.
        synthetic_size: articles in the generated training corpus (a quarter more for evaluation).
        limit: train on at most this many articles, stratified by label (after validation and
            calibration are carved); None trains on all.
        eval_limit: test on at most this many evaluation articles, stratified; None tests on all.
        num_workers: DataLoader worker processes.
        holdout: shares of the training file kept for validation, calibration and - only
            where there is no evaluation file - testing.
        hard_fraction: share of mixed-topic articles in the generated corpus.
        objective: what a batch is for: "classify" (the prompts above) or a generation task of
            `fedhlm.data.objectives` ("title": description in, title out; "continue": the article's
            first tokens in, the next ones out): a causal language model's training pairs.
    """

    def __init__(
        self,
        task: str = DEFAULT_TASK,
        source: str = "auto",
        train_path: str | None = None,
        eval_path: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        synthetic_size: int = 4000,
        limit: int | None = None,
        eval_limit: int | None = None,
        num_workers: int = 0,
        holdout: tuple[float, float, float] = (0.03, 0.03, 0.0),
        hard_fraction: float = 0.2,
        objective: str = "classify",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = load_task(task)
        if source not in SOURCES:
            raise ValueError(f"data.source: must be one of {SOURCES}, got {source!r}")
        shares = tuple(float(x) for x in holdout)
        if len(shares) != 3 or any(x < 0 for x in shares) or sum(shares) >= 1:
            raise ValueError(f"data.holdout: must be 3 non-negative shares (val, calib, test) summing to < 1, "
                             f"got {tuple(holdout)}")
        for name, value in (("limit", limit), ("eval_limit", eval_limit)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name}: must be >= 1 (or null for all), got {value}")
        self.source = source
        self.train_path = train_path
        self.eval_path = eval_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.synthetic_size = synthetic_size
        self.limit = limit
        self.eval_limit = eval_limit
        self.num_workers = num_workers
        self.holdout = shares
        self.hard_fraction = hard_fraction
        self.tokenizer = load_tokenizer(tokenizer)
        verbaliser_token_ids(self.tokenizer, self.task)  # a task the tokenizer cannot answer fails here
        self.objective = objective
        self.collate = make_collator(objective, self.tokenizer, max_length, self.task)
        self.source_name: str | None = None
        self.corpus: Corpus | None = None
        self.splits: Splits | None = None

    def setup(self, stage: str | None = None) -> None:
        """Resolve the source and split it, once (every later stage reuses the same splits)."""
        if self.splits is not None:
            return
        corpus = resolve_corpus(
            self.task, self.source, self.train_path, self.eval_path, synthetic_size=self.synthetic_size,
            seed=self.seed, hard_fraction=self.hard_fraction,
        )
        val, calib, test = self.holdout
        if corpus.eval is not None and test > 0:
            raise ValueError(f"data.holdout: the test share must be 0 when there is an evaluation file "
                             f"({corpus.eval_file or 'generated'}), got {test}")
        if corpus.eval is None and test == 0:
            raise ValueError(f"data.holdout: task {self.task.name!r} has no evaluation file here, so the test share "
                             f"must be > 0, got {self.holdout}")
        if not corpus.train:
            raise ValueError(f"data: no training article left: every one of {corpus.train_file} is also in the "
                             f"evaluation file {corpus.eval_file} (give data.eval_path another file)")
        carved = split_items(corpus.train, fractions=(1 - val - calib - test, val, calib, test), seed=self.seed)
        empty = [name for name, part, share in (("train", carved.train, 1.0), ("validation", carved.val, val),
                                                ("calibration", carved.calib, calib), ("test", carved.test, test))
                 if share > 0 and not part]
        if empty:  # caught here, not as an empty loader deep inside training or calibration
            raise DataFileError(f"{corpus.train_file or corpus.name}: {len(corpus.train)} training article(s) are too "
                                f"few to carve the {', '.join(empty)} split(s) of data.holdout {self.holdout}")
        train = stratified_subset(carved.train, self.limit, seed=self.seed)
        evaluation = carved.test if corpus.eval is None else list(corpus.eval)
        self.splits = Splits(train=train, val=carved.val, calib=carved.calib,
                             test=stratified_subset(evaluation, self.eval_limit, seed=self.seed))
        self.corpus = corpus
        self.source_name = corpus.name
        counts = dict(sorted(Counter(it.label for it in train).items()))
        log.info("data: task=%s source=%s train labels=%s splits=%s", self.task.name, corpus.name, counts,
                 self.splits.sizes())

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
