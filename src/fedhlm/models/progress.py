"""Training progress as plain lines with an ETA, for logs and terminals that are not a TTY.

Lightning's live progress bar redraws one terminal line; written into a log file (CI, `nohup`,
`make run > run.log`) it shows nothing until the end. `ProgressLines` prints one line every
`every_s` seconds instead - step, share done, epoch, last loss, elapsed time and ETA - and stays
quiet where a live bar is visible (a TTY), so the two never draw over each other.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from lightning.pytorch import Callback, LightningModule, Trainer


def format_duration(seconds: float) -> str:
    """'1 h 02 min', '12 min 05 s', '42 s': readable at a glance in a log line."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class ProgressLines(Callback):
    """One progress line every `every_s` seconds of training (and one at the end)."""

    def __init__(self, name: str = "", every_s: float = 30.0, stream: TextIO | None = None,
                 only_without_tty: bool = True) -> None:
        self.name, self.every_s, self.only_without_tty = name, every_s, only_without_tty
        self._stream = stream
        self._start = self._last = 0.0
        self._total = 0
        self._loss: float | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def active(self) -> bool:
        return not (self.only_without_tty and self.stream.isatty())

    def _emit(self, text: str) -> None:
        print(f"training {self.name}: {text}" if self.name else f"training: {text}", file=self.stream, flush=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = self._last = time.monotonic()
        total = trainer.estimated_stepping_batches
        self._total = int(total) if total != float("inf") else 0
        if self.active:
            self._emit(f"{self._total or '?'} optimiser steps, {trainer.max_epochs} epoch(s)")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "item"):
            self._loss = float(loss.detach().float().item())
        now = time.monotonic()
        if not self.active or now - self._last < self.every_s:
            return
        self._last = now
        step, elapsed = trainer.global_step, now - self._start
        done = step / self._total if self._total else 0.0
        eta = f", ETA {format_duration(elapsed / done * (1 - done))}" if done > 0 else ""
        loss = f", loss {self._loss:.4f}" if self._loss is not None else ""
        self._emit(f"step {step}/{self._total or '?'} ({100 * done:.0f} %), epoch {trainer.current_epoch + 1}/"
                   f"{trainer.max_epochs}{loss}, {format_duration(elapsed)} elapsed{eta}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active:
            self._emit(f"trained {trainer.global_step} steps in {format_duration(time.monotonic() - self._start)}")
