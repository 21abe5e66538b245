"""bf16 autocast only where the machine has native bf16 kernels (else it is emulated, ~35x slower than fp32)."""

from __future__ import annotations

import pytest

from fedhlm.models import precision
from fedhlm.models.cache import cache_folder


@pytest.mark.parametrize("native,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_bf16_is_kept_only_where_it_is_native(monkeypatch, native: bool, expected: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert precision.runnable_precision("bf16-mixed") == expected
    assert precision.runnable_precision("16-mixed") == "16-mixed" and precision.runnable_precision(None) is None


def test_the_cache_key_names_the_precision_that_actually_trains(monkeypatch, tmp_path) -> None:
    config = {"model": {"pretrained": None, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
              "data": {"source": "synthetic"}, "trainer": {"max_epochs": 1, "precision": "bf16-mixed"}}
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    full, folder, trainer_args = cache_folder("slm", config, root=tmp_path)
    assert trainer_args["precision"] == "32-true" and full["trainer"]["precision"] == "32-true"
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    full_bf16, folder_bf16, _ = cache_folder("slm", config, root=tmp_path)
    assert full_bf16["trainer"]["precision"] == "bf16-mixed" and folder_bf16 != folder

