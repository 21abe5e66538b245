"""`fedhlm fit|validate|test` through the Lightning CLI with a tiny random model and the generated corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedhlm.cli.lightning import main
from fedhlm.models.cache import DEFAULT_TRAINER, full_config
from fedhlm.models.store import cached_models, config_hash

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_ARGS = [
    "--model.init_args.hidden_size=32",
    "--model.init_args.num_layers=1",
    "--model.init_args.intermediate_size=64",
    "--model.init_args.embeddings_from=null",
    "--data.source=synthetic",
    "--data.synthetic_size=200",
    "--data.batch_size=16",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
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
    assert "class_path: fedhlm.models.slm.SLMModule" in out and "fit_target: lm" in out
    assert "source: auto" in out and "cache: true" in out


def test_every_shipped_config_parses(capsys):
    for name in ("slm.yaml", "llm.yaml", "head.yaml"):
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(CONFIGS / name), "--print_config"])
        assert stop.value.code == 0, name
    assert "class_path: fedhlm.models.llm.LLMRefiner" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["slm", "llm"])
def test_shipped_config_names_the_same_cached_model_as_get_or_train_defaults(kind, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / f"{kind}.yaml"), "--print_config"])
    parsed = yaml.safe_load(capsys.readouterr().out)
    from_cli = full_config(kind, parsed["model"]["init_args"], parsed["data"], parsed["trainer"])
    assert config_hash(from_cli) == config_hash(full_config(kind, {}, {}, DEFAULT_TRAINER[kind]))


def test_fast_dev_run_fits_a_tiny_model_and_saves_nothing(private_cache):
    assert main(["fit", "--config", str(CONFIGS / "slm.yaml"), *TINY_ARGS, "--trainer.fast_dev_run=true"]) == 0
    assert cached_models() == []


def test_fit_saves_into_the_cache_and_test_evaluates_the_cached_model(private_cache, capsys):
    run = [*TINY_ARGS, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2"]
    assert main(["fit", "--config", str(CONFIGS / "slm.yaml"), *run]) == 0
    [(folder, metrics)] = cached_models()
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


RANDOM_TINY = {"pretrained": None, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
               "embeddings_from": None}


@pytest.mark.parametrize(("kind", "tiny"), [("slm", RANDOM_TINY), ("llm", RANDOM_TINY), ("llm", {"pretrained": "minilm"})],
                         ids=["slm-random", "llm-random", "llm-pretrained"])
def test_the_cli_and_get_or_train_train_the_same_weights(kind, tiny, tmp_path, monkeypatch):
    """Both paths name the same cache folder, so they must fill it with the same model: dropout included,
    whatever state the random generator was left in (a pretrained start does not reseed it)."""
    import torch
    from safetensors.torch import load_file

    from fedhlm.models.cache import get_or_train

    data = {"source": "synthetic", "synthetic_size": 200, "batch_size": 16}
    trainer = {"max_steps": 3, "limit_val_batches": 1, "limit_test_batches": 1}
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "cli"))
    args = [f"--model.init_args.{k}={'null' if v is None else v}" for k, v in tiny.items()]
    args += [f"--data.{k}={v}" for k, v in data.items()] + [f"--trainer.{k}={v}" for k, v in trainer.items()]
    assert main(["fit", "--config", str(CONFIGS / f"{kind}.yaml"), *args, "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false"]) == 0
    [(from_cli, _)] = cached_models()
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "api"))
    torch.manual_seed(1234)  # whatever state the caller left the generator in
    from_api = get_or_train(kind, {"model": tiny, "data": data, "trainer": trainer}, progress=False)
    assert from_api.name == from_cli.name
    a, b = load_file(from_cli / "model.safetensors"), load_file(from_api / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
