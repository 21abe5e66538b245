"""`fedhlm export`: one folder that a device runs the SLM client from, without PyTorch.

    fedhlm export --model cache:slm --format onnx [--quantize int8] --out DIR

writes

    slm.onnx        the SLM with a KV cache: (input_ids, attention_mask, last_index, past.*) ->
                    (logits after last_index [B, V], present.*); an empty past scores a prompt
    slm.int8.onnx   with --quantize int8: weights quantised by onnxruntime's quantize_dynamic
    head.json       the threshold head (scalar: tau, temperature)
    tokenizer.json  the WordPiece tokenizer (the `tokenizers` library reads it)
    manifest.json   versions, vocabulary hash, prompt ids, verbalisers, top-k, feature names,
                    wire schema version, graph shapes, and the parity measured at export

Only the prompt's last row goes through the LM head (as `hf_models.next_token_logits`
does): the vocabulary projection at every position would cost ten times the encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhlm import __version__
from fedhlm.models.backbone import load_causal_lm
from fedhlm.models.kv_cache import cache_kwarg
from fedhlm.models.store import HEAD_FILE, METRICS_FILE, minilm_path, resolve_model_path
from fedhlm.core.wire import SCHEMA_VERSION
from fedhlm.maths.uncertainty import FEATURE_NAMES

log = logging.getLogger(__name__)

MODEL_FILE = "slm.onnx"
INT8_FILE = "slm.int8.onnx"
HEAD_JSON = "head.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
OPSET = 17
PARITY_ATOL = 1e-4  # fp32 ONNX vs PyTorch logits, absolute
# routing settings of SLMModule that the device must use the same way (defaults = SLMModule's)
ROUTING_DEFAULTS: dict[str, Any] = {"topk": 8, "samples": 16, "sample_temperature": 1.0, "normalise_entropy": False,
                                    "draft": "greedy", "tau": 0.5, "temperature": 0.1, "head_mode": "scalar"}


class KVCacheLM(nn.Module):
    """The graph that is exported: a BERT decoder step over a flat KV cache.

    (input_ids [B, n], attention_mask [B, p + n], last_index [B], past key/value per layer
    [B, H, p, D]) -> (next-token logits at last_index [B, V], present key/value [B, H, p + n, D]).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from transformers import BertLMHeadModel

        if not isinstance(model, BertLMHeadModel):
            raise ValueError(f"export supports BERT decoders (BertLMHeadModel), got {type(model).__name__}")
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        cache_kw = {cache_kwarg(self.model.bert): cache}
        out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **cache_kw)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = self.model.cls(out.last_hidden_state[rows, last_index])
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


@dataclass(frozen=True)
class GraphShape:
    layers: int
    heads: int
    head_dim: int
    vocab_size: int
    max_position: int

    @classmethod
    def of(cls, model: nn.Module) -> "GraphShape":
        c = model.config
        return cls(c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads, c.vocab_size,
                   c.max_position_embeddings)

    @property
    def past_names(self) -> list[str]:
        return [f"past.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.heads, 0, self.head_dim) for _ in range(2 * self.layers)]


def export_onnx(model: nn.Module, path: Path, opset: int = OPSET) -> GraphShape:
    """Trace `model` (eval mode) into `path` with dynamic batch, sequence and past lengths."""
    model = model.eval()
    shape = GraphShape.of(model)
    wrapper = KVCacheLM(model).eval()
    ids = torch.tensor([[101, 2023, 2003], [101, 2178, 0]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.long)
    last = torch.tensor([2, 1], dtype=torch.long)
    # a non-empty past while tracing, so no shape is frozen at zero
    with torch.no_grad():
        warm = wrapper(ids, mask, last, *shape.empty_past(2))[1:]
    mask_p = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = (torch.tensor([[2000], [2001]]), mask_p, torch.zeros(2, dtype=torch.long), *warm)
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"},
        "last_index": {0: "batch"}, "logits": {0: "batch"},
    }
    dynamic |= {name: {0: "batch", 2: "past"} for name in shape.past_names}
    dynamic |= {name: {0: "batch", 2: "total"} for name in shape.present_names}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes (checked by parity)
        torch.onnx.export(
            wrapper, step, str(path), input_names=["input_ids", "attention_mask", "last_index", *shape.past_names],
            output_names=["logits", *shape.present_names], dynamic_axes=dynamic, opset_version=opset, dynamo=False,
        )
    return shape


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the weights (activations stay float, scaled per batch at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


# -- what goes beside the graph ------------------------------------------------------------


def vocabulary_hash(tokenizer_file: Path) -> str:
    """sha256 of the vocabulary in id order: equal hashes, equal token ids on both sides."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    ordered = "\n".join(token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    return "sha256:" + hashlib.sha256(ordered.encode()).hexdigest()


def routing_settings(folder: Path) -> dict[str, Any]:
    """The SLM's routing arguments from its metrics.json (a cached model), else SLMModule's defaults."""
    settings = dict(ROUTING_DEFAULTS)
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        model_args = json.loads(metrics.read_text()).get("config", {}).get("model", {})
        settings |= {k: model_args[k] for k in ROUTING_DEFAULTS if k in model_args}
    return settings


def head_parameters(folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The scalar head of the folder (threshold_head.pt), else the one its settings start with."""
    mode = settings["head_mode"]
    params = {"tau": float(settings["tau"]), "temperature": float(settings["temperature"])}
    head_file = folder / HEAD_FILE
    if head_file.is_file():
        state = torch.load(head_file, map_location="cpu", weights_only=True)
        if set(state) != {"tau", "temperature"}:
            raise ValueError(f"{head_file}: a device runs scalar heads (tau, temperature), this one has {sorted(state)}")
        params = {k: float(v) for k, v in state.items()}
        mode = "scalar"
    if mode != "scalar":
        raise ValueError(f"{folder}: head_mode {mode!r}; a device runs scalar heads only")
    return {"mode": "scalar", "params": params, "min_temperature": 1e-3, "entropy_index": FEATURE_NAMES.index("entropy")}


def _trained_config(folder: Path) -> dict[str, Any]:
    metrics = folder / METRICS_FILE
    return json.loads(metrics.read_text()).get("config", {}) if metrics.is_file() else {}


def model_task(folder: Path) -> str:
    """The task a cached model was trained for (its metrics.json), else the default task."""
    from fedhlm.data import DEFAULT_TASK

    return _trained_config(folder).get("model", {}).get("task", DEFAULT_TASK)


def model_max_length(folder: Path) -> int:
    """The prompt length a cached model was trained on (its metrics.json), else 64: what a device truncates to."""
    return int(_trained_config(folder).get("data", {}).get("max_length") or 64)


def prompt_ids(tokenizer: Any, task: Any) -> dict[str, Any]:
    """The ids the device puts around an article, taken from the same functions fedhlm.data uses."""
    from fedhlm.data import load_task, verbaliser_token_ids

    task = load_task(task)
    suffix = tokenizer(task.prompt_suffix, add_special_tokens=False)["input_ids"]
    return {
        "task": task.name, "classes": list(task.class_names),
        "cls_id": int(tokenizer.cls_token_id), "pad_id": int(tokenizer.pad_token_id or 0),
        "suffix": task.prompt_suffix, "suffix_ids": [int(i) for i in suffix],
        "verbalisers": list(task.verbalisers), "verbaliser_ids": verbaliser_token_ids(tokenizer, task),
    }


def torch_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    from fedhlm.models.backbone import next_token_logits

    with torch.no_grad():
        return next_token_logits(model.eval(), batch["input_ids"], batch["attention_mask"], batch["last_index"]).numpy()


def onnx_logits(session: Any, shape: GraphShape, batch: dict[str, Any]) -> np.ndarray:
    ids = np.asarray(batch["input_ids"], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.asarray(batch["attention_mask"], dtype=np.int64),
             "last_index": np.asarray(batch["last_index"], dtype=np.int64)}
    feeds |= {name: np.zeros((ids.shape[0], shape.heads, 0, shape.head_dim), np.float32) for name in shape.past_names}
    return session.run(["logits"], feeds)[0]


def probe_batch(tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """A few right-padded prompts of different lengths for the export-time parity check."""
    from fedhlm.data import NewsItem, encode_prompts

    texts = ["stocks fell as markets slid", "the team won the cup final in extra time after a long season",
             "a new chip speeds up phones", "leaders met at the summit"]
    return encode_prompts(tokenizer, [NewsItem(i, i % 4, f"headline {i}", t) for i, t in enumerate(texts)], max_length)


def export(model: str, out: str | Path, *, quantize: str | None = None, max_length: int | None = None,
           opset: int = OPSET) -> dict[str, Any]:
    """Write the device folder for the SLM at `model` (folder or cache:<name>); returns the manifest.
    `max_length` defaults to the prompt length the model was trained on."""
    import onnx
    import onnxruntime as ort
    import transformers

    from fedhlm.data import load_tokenizer

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8, got {quantize!r}")
    folder = resolve_model_path(model)
    max_length = max_length or model_max_length(folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_causal_lm(folder).eval()
    tokenizer_source = folder / TOKENIZER_FILE
    tokenizer = load_tokenizer(folder if tokenizer_source.is_file() else None)
    if not tokenizer_source.is_file():
        tokenizer_source = minilm_path() / TOKENIZER_FILE
    shutil.copyfile(tokenizer_source, out / TOKENIZER_FILE)
    settings = routing_settings(folder)
    head = head_parameters(folder, settings)
    (out / HEAD_JSON).write_text(json.dumps(head, indent=2) + "\n")

    shape = export_onnx(lm, out / MODEL_FILE, opset)
    onnx.checker.check_model(str(out / MODEL_FILE))
    files = {"fp32": MODEL_FILE}
    if quantize == "int8":
        quantize_int8(out / MODEL_FILE, out / INT8_FILE)
        files["int8"] = INT8_FILE

    probe = probe_batch(tokenizer, max_length)
    reference = torch_logits(lm, probe)
    parity = {}
    for precision, name in files.items():
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        diff = float(np.abs(onnx_logits(session, shape, probe) - reference).max())
        parity[precision] = {"max_abs_logit_diff": diff}
        (out / name).chmod(0o644)
    if parity["fp32"]["max_abs_logit_diff"] > PARITY_ATOL:
        raise RuntimeError(f"ONNX export of {folder} differs from PyTorch by {parity['fp32']['max_abs_logit_diff']:.3g} "
                           f"(> {PARITY_ATOL}) on the probe prompts")

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "source": str(folder),
        "versions": {"fedhlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": opset},
        "wire_schema_version": SCHEMA_VERSION,
        "files": {"models": files, "head": HEAD_JSON, "tokenizer": TOKENIZER_FILE},
        "graph": {"layers": shape.layers, "heads": shape.heads, "head_dim": shape.head_dim,
                  "vocab_size": shape.vocab_size, "max_position": shape.max_position,
                  "inputs": ["input_ids", "attention_mask", "last_index", *shape.past_names],
                  "outputs": ["logits", *shape.present_names]},
        "vocabulary": {"size": len(tokenizer), "hash": vocabulary_hash(out / TOKENIZER_FILE)},
        "prompt": {**prompt_ids(tokenizer, model_task(folder)), "max_length": max_length, "format": "[CLS] {title} . {description} {suffix}"},
        "routing": {k: settings[k] for k in ("topk", "samples", "sample_temperature", "normalise_entropy", "draft")},
        "feature_names": list(FEATURE_NAMES),
        "parity": {"atol": PARITY_ATOL, **parity},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
