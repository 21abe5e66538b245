"""Where the refiner's LLM runs, behind one interface: a QFunction with its request limits.

`local` loads the `models.llm` checkpoint into the refiner's process (trained once when missing);
`openai` talks to a remote OpenAI-compatible completions server (`models.remote`). Either one
serves a pool of `fedhlm llm` workers on the shared subscription, or a simulation's in-process
workers, the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from fedhlm.core.records import ModelLimits
from fedhlm.core.settings import LLMBackendName, RemoteLLMSettings
from fedhlm.data.task import Task
from fedhlm.maths.verification import QFunction
from fedhlm.models.cache import fit_config_with, get_or_train
from fedhlm.models.kv_cache import RefinerSessions
from fedhlm.models.llm import LLMRefiner


class ServedLLM(Protocol):
    """What a refiner needs of its LLM, wherever it runs."""

    config: dict[str, Any]  # the fit config of a local model; the server's description for a remote one
    folder: Path | None  # the model cache folder of a local model

    @property
    def q_fn(self) -> QFunction: ...

    def limits(self) -> ModelLimits: ...


class ServingLLM:
    """The cached LLM a refiner serves: its next-token distribution for batches of contexts."""

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        self.config, self.folder = config, folder
        self.llm = LLMRefiner(pretrained=str(folder), task=config["model"]["task"]).eval()
        self.tokenizer = self.llm.tokenizer

    @property
    def sessions(self) -> RefinerSessions:
        """Generation sessions (per-sequence KV caches) live in the refiner itself."""
        return RefinerSessions(self.llm)

    def limits(self) -> ModelLimits:
        """The vocabulary and positions a request to this LLM must stay within."""
        config = self.llm.model.config
        return ModelLimits(vocab_size=int(config.vocab_size), max_positions=int(config.max_position_embeddings))

    @torch.no_grad()
    def q_fn(self, input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The LLM's next-token distribution after each context (what the refiner service calls)."""
        return self.llm.q_probs({"input_ids": input_ids, "attention_mask": mask, "last_index": last})


def load_llm(config: str | Path, *, data_overrides: dict[str, Any] | None = None, progress: bool = True) -> ServingLLM:
    """The LLM of a `fedhlm fit` YAML from the model cache (trained once when missing)."""
    cfg = fit_config_with(config, data_overrides)
    return ServingLLM(cfg, get_or_train(cfg.get("kind") or "llm", cfg, progress=progress))  # a title LLM: "gen"


class LocalBackend:
    """The cached checkpoint of `models.llm`, in this process."""

    name = "local"

    def load(self, llm_config: str | Path, remote: RemoteLLMSettings, *, data_overrides: dict[str, Any] | None,
             tokenizer: Any | None, task: Task | str | None, progress: bool) -> ServedLLM:
        return load_llm(llm_config, data_overrides=data_overrides, progress=progress)


class OpenAIBackend:
    """A remote completions server with log-probabilities (llama.cpp, vLLM, SGLang, Ollama)."""

    name = "openai"

    def load(self, llm_config: str | Path, remote: RemoteLLMSettings, *, data_overrides: dict[str, Any] | None,
             tokenizer: Any | None, task: Task | str | None, progress: bool) -> ServedLLM:
        from fedhlm.models.remote_llm import RemoteLLM

        return RemoteLLM.connect(remote, tokenizer=tokenizer, task=task)


LLM_BACKENDS: dict[str, LocalBackend | OpenAIBackend] = {b.name: b for b in (LocalBackend(), OpenAIBackend())}


def load_served_llm(backend: LLMBackendName, llm_config: str | Path, remote: RemoteLLMSettings | None = None, *,
                    data_overrides: dict[str, Any] | None = None, tokenizer: Any | None = None,
                    task: Task | str | None = None, progress: bool = True) -> ServedLLM:
    """The run's LLM from its backend; `tokenizer` and `task` are the requests' (a remote server needs them)."""
    return LLM_BACKENDS[backend].load(llm_config, remote or RemoteLLMSettings(), data_overrides=data_overrides,
                                      tokenizer=tokenizer, task=task, progress=progress)
