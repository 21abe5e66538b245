"""`fedhlm fit|validate|test` through the Lightning CLI with a tiny random model and the generated corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedhlm.cli.lightning import main
from fedhlm.models.cache import cache_folder, full_config, read_fit_config
from fedhlm.models.precision import runnable_trainer_args
from fedhlm.models.store import cached_models, config_hash

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_ARGS = [
    "--data.source=synthetic",
    "--data.synthetic_size=200",
    "--data.batch_size=16",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
TINY_ARGS = [
    "--model.init_args.hidden_size=32",
    "--model.init_args.num_layers=1",
    "--model.init_args.intermediate_size=64",
    "--model.init_args.embeddings_from=null",
    *RUN_ARGS,
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path))
    return tmp_path


def test_print_config_shows_the_module_and_data_arguments(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / "slm.yaml"), "--print_config"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: fedhlm.models.slm.SLMModule" in out and "topk: 8" in out and "distill_weight: 1.0" in out
    assert "source: auto" in out and "cache: true" in out


def test_every_shipped_config_parses(capsys):
    for name in ("slm.yaml", "llm.yaml", "head.yaml"):
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(CONFIGS / name), "--print_config"])
        assert stop.value.code == 0, name
    out = capsys.readouterr().out
    assert "class_path: fedhlm.models.llm.LLMRefiner" in out
    assert "class_path: fedhlm.models.head_fit.CentralHeadModule" in out and "optimizer: adam" in out


@pytest.mark.parametrize("kind", ["slm", "llm", "head"])
def test_shipped_config_names_the_same_cached_model_as_the_simulation(kind, capsys):
    """`fedhlm fit --config configs/<kind>.yaml` trains the folder a simulation (read_fit_config ->
    get_or_train) looks for: the CLI's parsed sections and the simulation's give one cache key."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / f"{kind}.yaml"), "--print_config"])
    parsed = yaml.safe_load(capsys.readouterr().out)
    # the CLI makes the precision runnable here before it takes the key, as the simulation does (models.precision)
    trainer = runnable_trainer_args(parsed["trainer"])
    from_cli = full_config(kind, parsed["model"]["init_args"], parsed["data"], trainer)
    _, folder, _ = cache_folder(kind, read_fit_config(CONFIGS / f"{kind}.yaml"))
    assert folder.name == f"{kind}-{config_hash(from_cli)}"


def test_fast_dev_run_fits_a_tiny_model_and_saves_nothing(private_cache):
    assert main(["fit", "--config", str(CONFIGS / "slm.yaml"), *TINY_ARGS, "--trainer.fast_dev_run=true"]) == 0
    assert [m["kind"] for _, m in cached_models()] == ["llm"]  # only the teacher slm.yaml distils from


def test_fit_saves_into_the_cache_and_test_evaluates_the_cached_model(private_cache, capsys):
    run = [*TINY_ARGS, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2"]
    assert main(["fit", "--config", str(CONFIGS / "slm.yaml"), *run]) == 0
    err = capsys.readouterr().err  # not a TTY: progress comes as lines, the last one the total
    assert "training: 2 optimiser steps" in err and "training: trained 2 steps in " in err
    [(folder, metrics)] = [(f, m) for f, m in cached_models() if m["kind"] == "slm"]
    assert folder.parent == private_cache / "models" and folder.name.startswith("slm-")
    assert metrics["kind"] == "slm" and metrics["data_source"] == "synthetic" and "test_acc" in metrics
    assert (folder / "tokenizer.json").is_file()
    assert not (folder / "threshold_head.pt").exists()  # an lm fit leaves the head untrained: not saved
    capsys.readouterr()
    assert main(["test", "--config", str(CONFIGS / "slm.yaml"), *run]) == 0
    assert f"evaluating the cached model {folder}" in capsys.readouterr().out


def test_unknown_subcommand_prints_usage(capsys):
    assert main(["train"]) == 2
    assert "usage: fedhlm" in capsys.readouterr().out


def test_code_fingerprint_ignores_comments_docstrings_and_import_origins_but_not_code(tmp_path, monkeypatch) -> None:
    """The model cache key includes the training code: a stale model is not reused after the model changes,
    and moving a module (its imports now name other paths) does not retrain."""
    import importlib

    from fedhlm.models.cache import code_fingerprint, training_code_fingerprint

    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "fp_probe.py"

    def fingerprint(text: str) -> str:
        src.write_text(text)
        importlib.invalidate_caches()
        return code_fingerprint(("fp_probe",))

    before = fingerprint('"""Doc."""\nfrom a.old import g\n\ndef f(x):\n    """Say why."""\n    return g(x) + 1  # one\n')
    assert fingerprint('"""Other words."""\nfrom b.new.home import g\n\n\ndef f(x):\n    return g(x) + 1\n') == before
    assert fingerprint('"""Doc."""\nfrom a.old import h as g\n\ndef f(x):\n    return g(x) + 1\n') == before
    assert fingerprint('"""Doc."""\nfrom a.old import h\n\ndef f(x):\n    return g(x) + 1\n') != before
    assert fingerprint('"""Doc."""\nfrom a.old import g\n\ndef f(x):\n    return g(x) + 2\n') != before
    with pytest.raises(ModuleNotFoundError, match="TRAINING_CODE"):
        code_fingerprint(("fedhlm.no_such_module",))
    assert full_config("slm")["code"] == training_code_fingerprint()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> dict[str, str]:
    """A tiny random SLM and LLM folder: what configs/head.yaml pairs."""
    from fedhlm.models.llm import LLMRefiner
    from fedhlm.models.slm import SLMModule

    root = tmp_path_factory.mktemp("pair")
    SLMModule(**RANDOM_TINY, seed=2).save_pretrained(str(root / "slm"))
    LLMRefiner(**RANDOM_TINY, seed=1).save_pretrained(str(root / "llm"))
    return {"pretrained": str(root / "slm"), "teacher": str(root / "llm")}


def test_head_config_fits_only_the_head_and_caches_the_slm_with_it(tiny_pair, private_cache, capsys):
    """configs/head.yaml: the frozen SLM and the LLM label prompts; the cached folder is the SLM plus its trained head."""
    import torch
    from safetensors.torch import load_file

    from fedhlm.maths.threshold import annealed_temperature
    from fedhlm.models.slm import SLMModule

    run = [f"--model.init_args.pretrained={tiny_pair['pretrained']}", f"--model.init_args.teacher={tiny_pair['teacher']}",
           "--model.init_args.tau=10.0", "--model.init_args.temperature=1.0",  # a random SLM's entropy is near 10.3
           *RUN_ARGS, "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2"]
    assert main(["fit", "--config", str(CONFIGS / "head.yaml"), *run]) == 0
    [(folder, metrics)] = cached_models()
    assert folder.name.startswith("head-") and metrics["kind"] == "head"
    assert {"test_routing_loss", "test_offload_rate"} <= set(metrics)
    head = torch.load(folder / "threshold_head.pt", weights_only=True)
    assert float(head["tau"]) != 10.0  # trained
    assert float(head["temperature"]) == pytest.approx(annealed_temperature(2, 1.0, 0.02, 0.995))  # head.yaml anneals
    a, b = load_file(folder / "model.safetensors"), load_file(f"{tiny_pair['pretrained']}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)  # the SLM itself is untouched
    assert SLMModule(pretrained=str(folder)).head.tau.item() == pytest.approx(float(head["tau"]))
    capsys.readouterr()
    assert main(["test", "--config", str(CONFIGS / "head.yaml"), *run]) == 0
    assert f"evaluating the cached model {folder}" in capsys.readouterr().out


RANDOM_TINY = {"pretrained": None, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
               "embeddings_from": None}


@pytest.mark.parametrize(("kind", "tiny"), [("slm", RANDOM_TINY), ("llm", RANDOM_TINY), ("llm", {"pretrained": "minilm"}),
                                            ("head", "tiny_pair")],
                         ids=["slm-random", "llm-random", "llm-pretrained", "head"])
def test_the_cli_and_get_or_train_train_the_same_weights(kind, tiny, tmp_path, monkeypatch, request):
    """Both paths name the same cache folder, so they must fill it with the same model: dropout included,
    whatever state the random generator was left in (a pretrained start does not reseed it)."""
    import torch
    from safetensors.torch import load_file

    from fedhlm.models.cache import get_or_train

    if isinstance(tiny, str):  # head.yaml's settings on a tiny pair, whose entropy is near 10.3
        shipped = yaml.safe_load((CONFIGS / "head.yaml").read_text())["model"]["init_args"]
        tiny = {**shipped, **request.getfixturevalue(tiny), "tau": 10.0, "temperature": 1.0}

    if kind == "slm":  # slm.yaml distils from configs/llm.yaml's LLM: off here, tested in test_models
        tiny = {**tiny, "teacher": None, "distill_weight": 0.0}
    data = {"source": "synthetic", "synthetic_size": 200, "batch_size": 16}
    trainer = {"max_steps": 3, "limit_val_batches": 1, "limit_test_batches": 1}
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "cli"))
    args = [f"--model.init_args.{k}={'null' if v is None else v}" for k, v in tiny.items()]
    args += [f"--data.{k}={v}" for k, v in data.items()] + [f"--trainer.{k}={v}" for k, v in trainer.items()]
    assert main(["fit", "--config", str(CONFIGS / f"{kind}.yaml"), *args, "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false"]) == 0
    [(from_cli, _)] = [(f, m) for f, m in cached_models() if m["kind"] == kind]
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "api"))
    torch.manual_seed(1234)  # whatever state the caller left the generator in
    from fedhlm.models.cache import read_fit_config

    shipped_cfg = read_fit_config(CONFIGS / f"{kind}.yaml")  # what the CLI read from the same YAML
    from_api = get_or_train(kind, {"model": {**shipped_cfg["model"], **tiny}, "data": {**shipped_cfg["data"], **data},
                                   "trainer": {**shipped_cfg["trainer"], **trainer}}, progress=False)
    assert from_api.name == from_cli.name
    a, b = load_file(from_cli / "model.safetensors"), load_file(from_api / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    heads = [folder / "threshold_head.pt" for folder in (from_cli, from_api)]
    assert heads[0].exists() == heads[1].exists() == (kind == "head")
    if kind == "head":
        a, b = (torch.load(h, weights_only=True) for h in heads)
        assert float(a["tau"]) != 10.0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_malformed_training_file_ends_fit_with_one_line_naming_it(private_cache, capsys):
    bad = private_cache / "bad.csv"
    bad.write_text("label,title,description\n1,a,b\nx,c,d\n")
    assert main(["fit", "--config", str(CONFIGS / "slm.yaml"), *TINY_ARGS, f"--data.train_path={bad}", "--data.source=files",
                 "--trainer.fast_dev_run=true"]) == 1
    err = capsys.readouterr().err
    assert f"fedhlm fit: {bad}: line 3: label 'x' is not an integer" in err and "Traceback" not in err
