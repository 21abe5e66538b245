"""The SLM/LLM pair of a run: found in (or trained into) the model cache, then used in batches.

The SLM drafts inputs in batches (each simulated client drafts its own through
`models.drafter.SLMDrafter`; the pair's instance is shared), and the LLM answers the
refiner's batched verification requests. The static-threshold baseline (U-HLM) is calibrated here,
in-process, on the calibration split: the LLM's verdicts there are the fit's labels.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhlm.data import NewsItem, encode_prompts, prompt_text
from fedhlm.models.cache import SPLIT_DATA_KEYS, fit_config_with, get_or_train
from fedhlm.models.store import METRICS_FILE
from fedhlm.core.records import Drafted, TokenInput
from fedhlm.core.settings import LLMBackendName, RemoteLLMSettings
from fedhlm.models.llm_backend import load_served_llm
from fedhlm.models.slm import SLMModule
from fedhlm.maths.speculative import VerifyMode
from fedhlm.maths.verification import Draft, verify_drafts
from fedhlm.maths.route_features import FeatureSet, WhitenedPCA
from fedhlm.maths.threshold import uhlm_threshold

log = logging.getLogger(__name__)


class DraftingSLM:
    """The cached SLM a client drafts with: prompt encoding, the batched routing view, token -> class.

    `features` picks what the routing head sees (`maths.route_features.FEATURE_SETS`); a set that reads
    the SLM's hidden state needs :meth:`fit_features` (the whitened PCA, on the calibration split) first.
    """

    def __init__(self, config: dict[str, Any], folder: Path, top_k: int | None = None,
                 features: FeatureSet | None = None) -> None:
        self.config, self.folder = config, folder
        self.features = features or FeatureSet()
        self.pca: WhitenedPCA | None = None
        slm_args = {k: v for k, v in config["model"].items() if k not in {"pretrained", "teacher"}}
        self.slm = SLMModule(pretrained=str(folder), **slm_args).eval()
        if top_k is not None:
            self.slm.topk = top_k  # how much of the distribution an offloaded token carries
        self.tokenizer = self.slm.tokenizer
        self.max_length = int(config["data"].get("max_length", 64))
        self._class_of = {tok: c for c, tok in enumerate(self.slm.verbaliser_ids)}

    @property
    def configs(self) -> dict[str, dict[str, Any]]:
        return {"slm": self.config}

    def class_of(self, token: int) -> int:
        return self._class_of.get(int(token), -1)

    @contextlib.contextmanager
    def _lm_head_io(self) -> Iterator[dict[str, torch.Tensor]]:
        """While open, the last batch's routed-position hidden states [B, H] and logits [B, V], as the SLM's
        LM head saw them (its input and output): the forward pass the draft runs anyway, not a second one."""
        seen: dict[str, torch.Tensor] = {}

        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen["hidden"], seen["logits"] = args[0], output

        handle = self.slm.model.get_output_embeddings().register_forward_hook(hook)
        try:
            yield seen
        finally:
            handle.remove()

    @property
    def hidden_size(self) -> int:
        """Width of the hidden state the LM head reads (the SLM's own context representation)."""
        return int(self.slm.model.get_output_embeddings().weight.shape[1])

    def _route(self, batch: dict[str, torch.Tensor], want_hidden: bool = False) -> dict[str, torch.Tensor]:
        """The SLM's routing view of a batch, its features extended to this drafter's feature set
        (`want_hidden`: also the routed position's hidden state, as "hidden")."""
        basic = self.features.name == FeatureSet.name
        if basic and not want_hidden:
            return self.slm.route_batch(batch)
        with self._lm_head_io() as seen:
            out = self.slm.route_batch(batch)
        hidden = seen["hidden"]
        if hidden.ndim == 3:  # a model whose LM head ran over every position
            hidden = hidden[torch.arange(hidden.shape[0]), batch["last_index"]]
        out["hidden"] = hidden
        if basic:
            return out
        label_ids = torch.tensor(self.slm.verbaliser_ids, dtype=torch.long)
        logits = seen["logits"] if seen["logits"].ndim == 2 else self.slm.next_logits(batch)
        out["features"] = self.features.assemble(out["features"], logits, label_ids, hidden, self.pca)
        return out

    @torch.no_grad()
    def fit_features(self, items: Sequence[NewsItem], batch_size: int = 64) -> None:
        """Fit what the feature set needs on these (calibration) items: the whitened PCA of the hidden state."""
        if not self.features.hidden:
            return
        hidden = []
        for lo in range(0, len(items), batch_size):
            chunk = list(items[lo : lo + batch_size])
            batch = encode_prompts(self.tokenizer, chunk, max_length=self.max_length, suffix=self.slm.task.prompt_suffix)
            with self._lm_head_io() as seen:
                self.slm.route_batch(batch)
            h = seen["hidden"]
            hidden.append(h[torch.arange(h.shape[0]), batch["last_index"]] if h.ndim == 3 else h)
        self.pca = WhitenedPCA.fit(torch.cat(hidden), self.features.hidden_dim)

    @torch.no_grad()
    def draft(self, items: Sequence[NewsItem], embeddings: np.ndarray | None = None, batch_size: int = 64,
              hidden_embeddings: bool = False) -> Drafted:
        """TokenInputs for every item, in order (the SLM's batched forward passes, timed). Their P2P
        `embedding`: the given `embeddings`, or with `hidden_embeddings` the SLM's own hidden state at the
        routed position (L2-normalised), or none."""
        inputs: list[TokenInput] = []
        start = time.perf_counter()
        for lo in range(0, len(items), batch_size):
            chunk = list(items[lo : lo + batch_size])
            batch = encode_prompts(self.tokenizer, chunk, max_length=self.max_length, suffix=self.slm.task.prompt_suffix)
            out = self._route(batch, want_hidden=hidden_embeddings)
            own = torch.nn.functional.normalize(out["hidden"].float(), dim=-1).numpy() if hidden_embeddings else None
            for i, item in enumerate(chunk):
                last = int(batch["last_index"][i])
                inputs.append(TokenInput(
                    uid=item.uid,
                    context_ids=batch["input_ids"][i, : last + 1].numpy().astype(np.int32),
                    draft_token=int(out["draft_token"][i]),
                    topk_ids=out["topk_ids"][i].numpy().astype(np.int32),
                    topk_probs=out["topk_probs"][i].float().numpy(),
                    tail_mass=float(out["tail_mass"][i]),
                    features=out["features"][i].float().numpy(),
                    embedding=own[i] if own is not None else None if embeddings is None else embeddings[lo + i],
                ))
        return Drafted(inputs, time.perf_counter() - start)


def load_slm(config: str | Path, *, data_overrides: dict[str, Any] | None = None, top_k: int | None = None,
             progress: bool = True, features: FeatureSet | None = None) -> DraftingSLM:
    """The SLM of a `fedhlm fit` YAML from the model cache (trained once when missing)."""
    cfg = fit_config_with(config, data_overrides)
    return DraftingSLM(cfg, get_or_train("slm", cfg, progress=progress), top_k, features)


class HybridModels:
    """Both cached models of a run in one process (a simulation), and the static-threshold calibration."""

    def __init__(self, slm_config: str | Path, llm_config: str | Path, *, data_overrides: dict[str, Any] | None = None,
                 top_k: int | None = None, progress: bool = True, features: FeatureSet | None = None,
                 llm_backend: LLMBackendName = "local", remote: RemoteLLMSettings | None = None) -> None:
        self.drafting = load_slm(slm_config, data_overrides=data_overrides, top_k=top_k, progress=progress,
                                 features=features)
        self.serving = load_served_llm(llm_backend, llm_config, remote, data_overrides=data_overrides,
                                       tokenizer=self.drafting.tokenizer, task=self.drafting.slm.task, progress=progress)
        self.configs = {"slm": self.drafting.config, "llm": self.serving.config}
        self.folders = {"slm": self.drafting.folder, "llm": self.serving.folder}
        slm_data, llm_data = self.configs["slm"]["data"], self.configs["llm"]["data"]
        if self.serving.folder is not None and any(slm_data.get(k) != llm_data.get(k) for k in SPLIT_DATA_KEYS):
            log.warning("the SLM and LLM configs split the data differently (%s vs %s): one model may have trained "
                        "on the other's held-out inputs", {k: slm_data.get(k) for k in SPLIT_DATA_KEYS},
                        {k: llm_data.get(k) for k in SPLIT_DATA_KEYS})
        self.slm = self.drafting.slm
        self.tokenizer = self.drafting.tokenizer
        self.class_of = self.drafting.class_of
        self.draft = self.drafting.draft
        self.q_fn = self.serving.q_fn
        self.llm_limits = self.serving.limits
        self._calib_beta: dict[tuple, np.ndarray] = {}  # (uids, mode) -> beta: a lambda sweep asks again and again

    def metrics(self) -> dict[str, dict[str, Any]]:
        """What each model's metrics.json says of it (test accuracy, macro-F1, ECE, parameters, train time)."""
        import json

        keys = ("test_acc", "test_macro_f1", "test_ece", "params", "train_seconds", "data_source", "data_sizes")
        out = {}
        for kind, folder in self.folders.items():
            if folder is None:  # a remote LLM: what serves it, not a cached model's test metrics
                out[kind] = dict(self.configs[kind]["model"])
                continue
            path = folder / METRICS_FILE
            metrics = json.loads(path.read_text()) if path.is_file() else {}
            out[kind] = {k: metrics.get(k) for k in keys}
        return out

    @torch.no_grad()
    def llm_verdicts(self, drafts: Sequence[TokenInput], mode: VerifyMode, batch_size: int = 64
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

    def calibration_beta(self, calib: Sequence[TokenInput], mode: VerifyMode) -> np.ndarray:
        """The LLM's beta for each calibration draft (computed once per split and mode: a sweep asks often)."""
        key = (tuple(d.uid for d in calib), mode)
        if key not in self._calib_beta:
            self._calib_beta[key] = self.llm_verdicts(calib, mode)[0]
        return self._calib_beta[key]

    def static_threshold(self, calib: Sequence[TokenInput], lam: float, mode: VerifyMode) -> dict[str, float]:
        """U-HLM's threshold: fit beta = a u + b on the calibration split, tau = (lam - b) / a."""
        beta = self.calibration_beta(calib, mode)
        u = np.array([d.features[0] for d in calib])
        return {**uhlm_threshold(u, beta, lam), "calibration_inputs": len(calib)}


def context_texts(items: Sequence[NewsItem]) -> list[str]:
    """What a peer query embeds: the text the token is generated from."""
    return [prompt_text(item) for item in items]
