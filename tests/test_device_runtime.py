"""The device runtime without PyTorch: prompt ids, golden wire vectors, the outbox, no torch in the process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest

from fedhlm.transport.codec import encode
from fedhlm.transport.messages import ThresholdUpdate
from fedhlm_device.outbox import Outbox
from fedhlm_device.prompt import PromptEncoder, prompt_text

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "transport" / "vectors"
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "embeddings_from": None}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from fedhlm.models.export import export
    from fedhlm.models.slm import SLMModule

    folder = tmp_path_factory.mktemp("slm")
    SLMModule(**TINY).save_pretrained(str(folder))
    out = tmp_path_factory.mktemp("export")
    export(str(folder), out, max_length=40)
    return out


def test_prompt_ids_equal_encode_prompts() -> None:
    from fedhlm.data import NewsItem, encode_prompts, load_tokenizer
    from fedhlm.models.store import minilm_path

    items = [NewsItem(0, 0, "Wall St. Bears Claw Back", "Short-sellers, Wall Street's dwindling\\band of ultra-cynics"),
             NewsItem(1, 1, "", "no title here"), NewsItem(2, 2, "Long", "word " * 200),
             NewsItem(3, 3, "Café naïve", "Übermäßig €100 — “quotes”")]
    ref = encode_prompts(load_tokenizer(), items, max_length=40)
    enc = PromptEncoder(minilm_path() / "tokenizer.json", 101, [8476, 1024], 0, max_length=40)
    got = enc.encode([prompt_text(it.title, it.description) for it in items])
    for key in ("input_ids", "attention_mask", "last_index"):
        assert np.array_equal(got[key], ref[key].numpy()), key
    assert got["input_ids"].shape[1] == 40  # the long article was truncated, the suffix kept
    assert got["input_ids"][2, 38:].tolist() == [8476, 1024]


def test_outbox_keeps_an_update_until_removed_and_drops_garbage(tmp_path) -> None:
    box = Outbox(tmp_path)
    update = ThresholdUpdate("c1", "e0", 3, 12, {"tau": np.array(0.4, np.float32),
                                                 "temperature": np.array(0.1, np.float32)})
    path = box.put("fedhlm/v1/edge/e0/update/c1", encode(update))
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1not msgpack")
    (tmp_path / "half.tmp").write_bytes(b"interrupted")
    reopened = Outbox(tmp_path).pending()  # as after a restart
    assert [e.message for e in reopened] == [update] and reopened[0].topic.endswith("/update/c1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # junk and the torn write are gone
    box.remove(path)
    assert len(box) == 0


DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import fedhlm_device
    from fedhlm_device import DeviceClient, DeviceSettings, ExportedSLM, Outbox, ScalarHead, fit_sgd
    from fedhlm.transport.codec import decode, encode, from_json

    folder, vectors, tmp = map(Path, sys.argv[1:4])
    slm = ExportedSLM(folder)
    inputs = slm.token_inputs(["stocks fell as markets slid", "the team won"], [1, 2], np.random.default_rng(0))
    head = slm.head()
    fit_sgd(head, np.stack([i.features for i in inputs]), np.array([0.0, 1.0], np.float32), lam=0.1, steps=3)
    same = 0
    for path in sorted(vectors.glob("*.json")):
        message = from_json(json.loads(path.read_text()))
        wire = path.with_suffix(".msgpack").read_bytes()
        assert encode(message) == wire, path.name
        assert decode(wire) == message, path.name
        same += 1
    box = Outbox(tmp / "outbox")
    box.put("fedhlm/v1/edge/e0/update/c0", path.with_suffix(".msgpack").read_bytes())
    loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "lightning", "transformers", "torchmetrics")]
    print(json.dumps({"vectors": same, "heavy": loaded, "draft": inputs[0].draft_token, "k": len(inputs[0].topk_ids)}))
""")


def test_device_runtime_never_imports_torch_and_encodes_the_golden_vectors(exported, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(exported), str(VECTORS), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["vectors"] == len(list(VECTORS.glob("*.json"))) >= 7
    assert out["k"] == 8 and out["draft"] in (2088, 2998, 2449, 2671)


@pytest.mark.slow
def test_fresh_venv_with_only_the_device_deps_imports_fedhlm_device(tmp_path) -> None:
    """Offline, from the local pip cache only: skipped where the wheels are not cached."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    py = target / "bin" / "python"
    deps = ["onnxruntime>=1.17", "tokenizers>=0.15", "numpy", "paho-mqtt>=2.1,<3", "msgpack", "pyyaml"]
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    wheels = os.environ.get("FEDHLM_WHEELS")  # a folder of wheels, for machines without a warm cache
    extra = ["--find-links", wheels] if wheels else []
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", *extra, *deps], capture_output=True, text=True,
                             env=env, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"pip cannot install the device deps offline here: {install.stderr.strip()[-300:]}")
    probe = ("import sys, fedhlm_device; from fedhlm_device import DeviceClient, ExportedSLM; "
             "assert 'torch' not in sys.modules; print('ok')")
    run = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": os.environ.get("PATH", "")})
    shutil.rmtree(target, ignore_errors=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_bench_device_reports_speed_memory_and_bytes_without_torch(exported, tmp_path, capsys) -> None:
    from fedhlm.bench.device import main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--model", str(exported), "--inputs", "12", "--tokens", "6", "--skip-install",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]  # this export has no int8 model
    assert row["precision"] == "fp32" and row["torch_imported"] is False
    # scored on the model's task's own evaluation articles, read by the project's reader
    assert row["task"] == "ag_news" and row["articles"].endswith("ag_news_dev.csv")
    assert row["inputs"] == 12 and row["gen_tokens"] == 6 and row["tokens_per_s"] > 0
    assert 0 < row["cold_start_s"] <= row["cold_start_wall_s"] and row["peak_rss_mib"] > 20
    # every offloaded input costs one TokenRequest; all offloaded is the upper bound
    assert 0 < row["uplink_bytes_per_1000_inputs"] <= row["uplink_bytes_per_1000_inputs_all_offloaded"]
    assert row["request_bytes_mean"] > 200  # context ids, top-8 and features in one msgpack envelope
    assert "tokens_per_s" in capsys.readouterr().out
