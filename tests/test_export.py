"""`fedhlm export`: a tiny random SLM to ONNX (KV cache, int8), head, tokenizer, manifest; parity with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhlm.data import NewsItem, encode_prompts, load_tokenizer
from fedhlm.cli.export import main
from fedhlm.models.export import INT8_FILE, MANIFEST_FILE, MODEL_FILE, PARITY_ATOL, export
from fedhlm.models.backbone import load_causal_lm, next_token_logits
from fedhlm.models.slm import SLMModule
from fedhlm.transport.codec import SCHEMA_VERSION
from fedhlm.maths.uncertainty import FEATURE_NAMES

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "embeddings_from": None}
TEXTS = ["stocks fell as markets slid", "the team won the cup final in extra time after a long and hard season " * 3,
         "a new chip", "leaders met at the summit to talk about trade and the climate"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_slm")
    SLMModule(**TINY, seed=3).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def exported(tiny_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    return out, export(str(tiny_folder), out, quantize="int8", max_length=32)


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    items = [NewsItem(i, i % 4, f"headline {i}", TEXTS[i % len(TEXTS)]) for i in range(n)]
    return encode_prompts(load_tokenizer(), items, max_length=32)


def test_export_writes_one_folder_with_a_complete_manifest(exported) -> None:
    out, manifest = exported
    assert {p.name for p in out.iterdir()} == {MODEL_FILE, INT8_FILE, "head.json", "tokenizer.json", MANIFEST_FILE}
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk == manifest
    assert manifest["wire_schema_version"] == SCHEMA_VERSION
    assert manifest["feature_names"] == list(FEATURE_NAMES)
    assert manifest["prompt"]["verbaliser_ids"] == [2088, 2998, 2449, 2671]
    assert manifest["prompt"]["cls_id"] == 101 and manifest["prompt"]["suffix_ids"] == [8476, 1024]
    assert manifest["vocabulary"]["size"] == 30522 and manifest["vocabulary"]["hash"].startswith("sha256:")
    assert manifest["graph"]["layers"] == 2 and manifest["graph"]["head_dim"] == 16
    assert manifest["routing"]["topk"] == 8 and manifest["routing"]["draft"] == "greedy"
    head = json.loads((out / "head.json").read_text())
    assert head == {"mode": "scalar", "params": {"tau": 0.5, "temperature": 0.1}, "min_temperature": 0.001,
                    "entropy_index": 0}
    # int8 stores the weight matrices in a byte each
    assert (out / INT8_FILE).stat().st_size < 0.6 * (out / MODEL_FILE).stat().st_size


def test_onnx_logits_match_pytorch_on_padded_prompts(exported, tiny_folder) -> None:
    import onnxruntime as ort

    from fedhlm.models.export import GraphShape, onnx_logits

    out, manifest = exported
    model = load_causal_lm(tiny_folder).eval()
    b = batch(6)
    assert (b["attention_mask"] == 0).any()  # right padding is exercised
    with torch.no_grad():
        ref = next_token_logits(model, b["input_ids"], b["attention_mask"], b["last_index"]).numpy()
    shape = GraphShape.of(model)
    fp32 = onnx_logits(ort.InferenceSession(str(out / MODEL_FILE)), shape, b)
    int8 = onnx_logits(ort.InferenceSession(str(out / INT8_FILE)), shape, b)
    assert np.abs(fp32 - ref).max() < PARITY_ATOL
    assert manifest["parity"]["fp32"]["max_abs_logit_diff"] < PARITY_ATOL
    # int8 is an approximation: close, not equal, and the same greedy token on these prompts
    assert 1e-5 < np.abs(int8 - ref).max() < 0.5
    assert (int8.argmax(-1) == ref.argmax(-1)).all()


def test_kv_cache_steps_give_the_logits_of_the_full_prefix(exported, tiny_folder) -> None:
    from fedhlm_device.runtime import ExportedSLM

    out, _ = exported
    slm = ExportedSLM(out)
    model = load_causal_lm(tiny_folder).eval()
    prompt = slm.encoder.ids("markets rallied on friday")
    gen = slm.generate(prompt, 5)
    assert len(gen.tokens) == 5 and len(gen.token_ms) == 4
    full = torch.tensor([prompt + gen.tokens[:-1]])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0]  # every position, no cache
    greedy = logits[len(prompt) - 1 :].argmax(-1).tolist()
    assert greedy == gen.tokens  # each cached step reproduced the uncached forward's next token


def test_export_cli_refuses_a_missing_model(tmp_path, capsys) -> None:
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope" in capsys.readouterr().err


def test_the_device_prompt_length_defaults_to_the_trained_one(tiny_folder, tmp_path) -> None:
    """A model trained on 48-token prompts is exported for 48 (BBC's long articles train on 128), not 64."""
    import json
    import shutil

    from fedhlm.models.export import model_max_length
    from fedhlm.models.store import METRICS_FILE

    assert model_max_length(tiny_folder) == 64  # no metrics.json: the default
    folder = tmp_path / "trained"
    shutil.copytree(tiny_folder, folder)
    (folder / METRICS_FILE).write_text(json.dumps({"config": {"model": {"task": "bbc_news"}, "data": {"max_length": 48}}}))
    manifest = export(str(folder), tmp_path / "out")
    assert manifest["prompt"]["max_length"] == 48 and manifest["prompt"]["task"] == "bbc_news"
