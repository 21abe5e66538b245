"""The SLM/LLM pair of a run: found in (or trained into) the model cache, then used in batches.

The SLM drafts every input once, batched (clients of a simulation share one model
instance; what each client sends stays its own), and the LLM answers the refiner's
batched verification requests. The static-threshold baseline (U-HLM) is calibrated here,
in-process, on the calibration split: the LLM's verdicts there are the fit's labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedhlm.data import NewsItem, encode_prompts, prompt_text
from fedhlm.models.llm import LLMRefiner
from fedhlm.models.cache import get_or_train
from fedhlm.roles.client import TokenInput
from fedhlm.models.slm import SLMModule
from fedhlm.maths.speculative import VerifyMode
from fedhlm.maths.verification import Draft, verify_drafts
from fedhlm.maths.threshold import uhlm_threshold

log = logging.getLogger(__name__)


def read_fit_config(path: str | Path) -> dict[str, Any]:
    """The model / data / trainer sections of a `fedhlm fit` YAML, as get_or_train takes them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    model = raw.get("model") or {}
    return {
        "model": dict(model.get("init_args") or {}),
        "data": dict(raw.get("data") or {}),
        "trainer": dict(raw.get("trainer") or {}),
    }


@dataclass
class Drafts:
    """The SLM's output for a list of items, and what it cost."""

    inputs: list[TokenInput]
    seconds: float

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.inputs))


class HybridModels:
    """Loads the two cached models; `kind` configs are `fedhlm fit` YAMLs (trained once when missing)."""

    def __init__(self, slm_config: str | Path, llm_config: str | Path, *, data_overrides: dict[str, Any] | None = None,
                 top_k: int | None = None, progress: bool = True) -> None:
        self.configs = {}
        folders = {}
        for kind, path in (("slm", slm_config), ("llm", llm_config)):
            cfg = read_fit_config(path)
            cfg["data"].update(data_overrides or {})
            self.configs[kind] = cfg
            folders[kind] = get_or_train(kind, cfg, progress=progress)
        self.folders = folders
        split_keys = ("source", "path", "seed", "limit", "fractions", "synthetic_size")
        slm_data, llm_data = self.configs["slm"]["data"], self.configs["llm"]["data"]
        if any(slm_data.get(k) != llm_data.get(k) for k in split_keys):
            log.warning("the SLM and LLM configs split the data differently (%s vs %s): the LLM may have seen "
                        "test inputs", {k: slm_data.get(k) for k in split_keys}, {k: llm_data.get(k) for k in split_keys})
        slm_args = {k: v for k, v in self.configs["slm"]["model"].items() if k not in {"pretrained", "teacher"}}
        self.slm = SLMModule(pretrained=str(folders["slm"]), **slm_args).eval()
        self.llm = LLMRefiner(pretrained=str(folders["llm"])).eval()
        if top_k is not None:
            self.slm.topk = top_k  # how much of the distribution an offloaded token carries
        self.tokenizer = self.slm.tokenizer
        self.max_length = int(self.configs["slm"]["data"].get("max_length", 64))
        self._class_of = {tok: c for c, tok in enumerate(self.slm.verbaliser_ids)}
        self._calib_beta: dict[tuple, np.ndarray] = {}  # (uids, mode) -> beta: a lambda sweep asks again and again

    @property
    def split_seed(self) -> int:
        return int(self.configs["slm"]["data"].get("seed", 0))

    def class_of(self, token: int) -> int:
        return self._class_of.get(int(token), -1)

    @torch.no_grad()
    def draft(self, items: Sequence[NewsItem], embeddings: np.ndarray | None = None, batch_size: int = 64) -> Drafts:
        """TokenInputs for every item, in order (the SLM's batched forward passes, timed)."""
        inputs: list[TokenInput] = []
        start = time.perf_counter()
        for lo in range(0, len(items), batch_size):
            chunk = list(items[lo : lo + batch_size])
            batch = encode_prompts(self.tokenizer, chunk, max_length=self.max_length)
            out = self.slm.route_batch(batch)
            for i, item in enumerate(chunk):
                last = int(batch["last_index"][i])
                inputs.append(TokenInput(
                    uid=item.uid, label=item.label,
                    context_ids=batch["input_ids"][i, : last + 1].numpy().astype(np.int32),
                    draft_token=int(out["draft_token"][i]),
                    topk_ids=out["topk_ids"][i].numpy().astype(np.int32),
                    topk_probs=out["topk_probs"][i].float().numpy(),
                    tail_mass=float(out["tail_mass"][i]),
                    features=out["features"][i].float().numpy(),
                    embedding=None if embeddings is None else embeddings[lo + i],
                ))
        return Drafts(inputs, time.perf_counter() - start)

    @torch.no_grad()
    def q_fn(self, input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The LLM's next-token distribution after each context (what the refiner service calls)."""
        return self.llm.q_probs({"input_ids": input_ids, "attention_mask": mask, "last_index": last})

    @torch.no_grad()
    def llm_verdicts(self, drafts: Sequence[TokenInput], mode: VerifyMode = "greedy", batch_size: int = 64
                     ) -> tuple[np.ndarray, np.ndarray]:
        """In-process verification of drafts, by the service's own path: (beta, final class) per input."""
        betas, finals = [], []
        gen = torch.Generator().manual_seed(0)
        for lo in range(0, len(drafts), batch_size):
            chunk = [Draft(d.context_ids, d.topk_ids, d.topk_probs, d.draft_token) for d in drafts[lo : lo + batch_size]]
            v = verify_drafts(self.q_fn, chunk, pad_id=self.tokenizer.pad_token_id or 0, mode=mode, generator=gen)
            betas.append(v.beta.numpy())
            finals.extend(self.class_of(int(t)) for t in v.token)
        return np.concatenate(betas) if betas else np.zeros(0), np.array(finals)

    def static_threshold(self, calib: Sequence[TokenInput], lam: float, mode: str = "greedy") -> dict[str, float]:
        """U-HLM's threshold: fit beta = a u + b on the calibration split, tau = (lam - b) / a."""
        key = (tuple(d.uid for d in calib), mode)
        if key not in self._calib_beta:
            self._calib_beta[key] = self.llm_verdicts(calib, mode)[0]
        beta = self._calib_beta[key]
        u = np.array([d.features[0] for d in calib])
        return {**uhlm_threshold(u, beta, lam), "calibration_inputs": len(calib)}


def context_texts(items: Sequence[NewsItem]) -> list[str]:
    """What a peer query embeds: the text the token is generated from."""
    return [prompt_text(item) for item in items]
