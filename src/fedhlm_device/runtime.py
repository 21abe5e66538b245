"""The exported SLM under ONNX Runtime: prompt scoring, routing views, greedy generation with a KV cache.

A folder written by `fedhlm export` is checked before use (manifest version, wire schema,
vocabulary hash of tokenizer.json), so a device never routes with ids its peers and the
LLM would read differently.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhlm.core.wire import SCHEMA_VERSION
from fedhlm.core.records import TokenInput
from fedhlm_device.features import FEATURE_NAMES, RouteView, route_view
from fedhlm_device.head import ScalarHead
from fedhlm_device.prompt import PromptEncoder

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
PRECISIONS = ("fp32", "int8")


class ExportFolderError(ValueError):
    """An export folder that is missing, incomplete or made for another wire/vocabulary; names the path."""


def vocabulary_hash(tokenizer_file: Path) -> str:
    """sha256 of the vocabulary in id order (the same function as fedhlm.models.export's)."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    ordered = "\n".join(token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    return "sha256:" + hashlib.sha256(ordered.encode()).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ExportFolderError(f"{folder}: no {MANIFEST_FILE} (write the folder with `fedhlm export`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportFolderError(f"{path}: unreadable: {err}") from err
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ExportFolderError(f"{path}: manifest_version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION}")
    if manifest.get("wire_schema_version") != SCHEMA_VERSION:
        raise ExportFolderError(f"{path}: wire_schema_version {manifest.get('wire_schema_version')!r}, this client "
                                f"speaks {SCHEMA_VERSION}")
    if tuple(manifest.get("feature_names", ())) != FEATURE_NAMES:
        raise ExportFolderError(f"{path}: feature_names {manifest.get('feature_names')} differ from {list(FEATURE_NAMES)}")
    return manifest


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    prefill_ms: float
    token_ms: list[float]  # per generated token after the first (one cached step each)


class ExportedSLM:
    """One ONNX Runtime session over an export folder; `precision` picks slm.onnx or slm.int8.onnx."""

    def __init__(self, folder: str | Path, precision: str = "fp32", threads: int | None = None,
                 check_vocabulary: bool = True) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ExportFolderError(f"model folder not found: {self.folder}")
        self.manifest = read_manifest(self.folder)
        if precision not in PRECISIONS:
            raise ExportFolderError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        models = self.manifest["files"]["models"]
        if precision not in models:
            raise ExportFolderError(f"{self.folder}: no {precision} model (export with --quantize int8)")
        self.precision = precision
        files = self.manifest["files"]
        tokenizer_file = self.folder / files["tokenizer"]
        for needed in (self.folder / models[precision], tokenizer_file, self.folder / files["head"]):
            if not needed.is_file():
                raise ExportFolderError(f"{self.folder}: missing {needed.name}")
        if check_vocabulary and vocabulary_hash(tokenizer_file) != self.manifest["vocabulary"]["hash"]:
            raise ExportFolderError(f"{tokenizer_file}: vocabulary hash differs from the manifest's")
        prompt = self.manifest["prompt"]
        self.encoder = PromptEncoder(tokenizer_file, prompt["cls_id"], prompt["suffix_ids"], prompt["pad_id"],
                                     prompt["max_length"])
        self.verbaliser_ids = np.asarray(prompt["verbaliser_ids"], np.int64)
        self.routing = dict(self.manifest["routing"])
        if self.routing.get("draft", "greedy") != "greedy":
            raise ExportFolderError(f"{self.folder}: draft {self.routing['draft']!r}; the device drafts greedily")
        graph = self.manifest["graph"]
        self.layers, self.heads, self.head_dim = graph["layers"], graph["heads"], graph["head_dim"]
        self.max_position = graph["max_position"]
        self.past_names = [n for n in graph["inputs"] if n.startswith("past.")]
        self.present_names = [n for n in graph["outputs"] if n.startswith("present.")]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.folder / models[precision]), options,
                                            providers=["CPUExecutionProvider"])

    def head(self) -> ScalarHead:
        """A fresh head from head.json."""
        return ScalarHead.from_json(json.loads((self.folder / self.manifest["files"]["head"]).read_text()))

    def class_of(self, token: int) -> int:
        """Class index of a token id, -1 for a token that is no verbaliser."""
        hits = np.flatnonzero(self.verbaliser_ids == int(token))
        return int(hits[0]) if hits.size else -1

    # -- scoring ------------------------------------------------------------------------
    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.heads, 0, self.head_dim), np.float32) for n in self.past_names}

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Next-token logits [B, V] after each prompt's last_index."""
        feeds = {k: np.asarray(batch[k], np.int64) for k in ("input_ids", "attention_mask", "last_index")}
        feeds |= self._empty_past(feeds["input_ids"].shape[0])
        return self.session.run(["logits"], feeds)[0]

    def route(self, texts: Sequence[str], rng: np.random.Generator | None = None) -> tuple[dict[str, np.ndarray], RouteView]:
        batch = self.encoder.encode(texts)
        view = route_view(self.logits(batch), self.verbaliser_ids, topk=int(self.routing["topk"]),
                          samples=int(self.routing["samples"]),
                          sample_temperature=float(self.routing["sample_temperature"]),
                          normalise_entropy=bool(self.routing["normalise_entropy"]), rng=rng)
        return batch, view

    def token_inputs(self, texts: Sequence[str], uids: Sequence[int],
                     rng: np.random.Generator | None = None, embeddings: np.ndarray | None = None,
                     batch_size: int = 32) -> list[TokenInput]:
        """Draft every text (batched) into what DeviceClient.run_round routes; as fedhlm.models.hybrid's `draft`."""
        out: list[TokenInput] = []
        for lo in range(0, len(texts), batch_size):
            batch, view = self.route(list(texts[lo : lo + batch_size]), rng)
            for i in range(batch["input_ids"].shape[0]):
                j, last = lo + i, int(batch["last_index"][i])
                out.append(TokenInput(
                    uid=int(uids[j]),
                    context_ids=batch["input_ids"][i, : last + 1].astype(np.int32),
                    draft_token=int(view.draft_token[i]), topk_ids=view.topk_ids[i], topk_probs=view.topk_probs[i],
                    tail_mass=float(view.tail_mass[i]), features=view.features[i],
                    embedding=None if embeddings is None else np.asarray(embeddings[j], np.float32),
                ))
        return out

    # -- generation -----------------------------------------------------------------------
    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], total: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feed `ids` [1, n] after `past`; returns (logits [V] after the last one, the new past)."""
        n = ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "last_index": np.array([n - 1], np.int64), **past}
        out = self.session.run(["logits", *self.present_names], feeds)
        return out[0][0], dict(zip(self.past_names, out[1:]))

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Generation:
        """Greedy continuation with the KV cache (at most max_position tokens in all)."""
        ids = list(prompt_ids)
        budget = min(max_new_tokens, self.max_position - len(ids))
        if budget < 1:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_position {self.max_position}")
        start = time.perf_counter()
        logits, past = self.step(np.array([ids]), self._empty_past(1), len(ids))
        prefill_ms = (time.perf_counter() - start) * 1000.0
        out, times = [int(logits.argmax())], []
        for _ in range(budget - 1):
            t0 = time.perf_counter()
            logits, past = self.step(np.array([[out[-1]]]), past, len(ids) + len(out))
            times.append((time.perf_counter() - t0) * 1000.0)
            out.append(int(logits.argmax()))
        return Generation(out, prefill_ms, times)
