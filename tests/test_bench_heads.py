"""`fedhlm bench heads` end to end with tiny models: drafts with every feature, LLM verdicts, the table."""

from __future__ import annotations

import json

import pytest

from fedhlm.bench import heads
from test_simulate import tiny_configs


@pytest.mark.slow
def test_bench_heads_writes_the_ablation_table_and_plot(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    out = tmp_path / "out"
    rc = heads.main(["--config", "configs/quick.yaml", "--set", f"models.slm={slm}", "--set", f"models.llm={llm}",
                     "--set", "data.source=synthetic", "--set", "data.inputs=80", "--shares", "0.1,0.3",
                     "--hidden-dim", "4", "--folds", "2", "--steps", "40", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "heads.json").read_text())
    assert (out / "heads.png").stat().st_size > 0
    assert result["test_articles"] == 80 and result["calibration_articles"] > 4
    assert len(result["feature_names"]) == 12 and result["feature_names"][0] == "entropy"
    subsets = {r["features"] for r in result["rows"]}
    assert {"entropy", "basic (4)", "entropy+hidden", "all (12)"} <= subsets
    scalar = next(r for r in result["rows"] if r["head"] == "scalar")
    assert set(scalar["cross_fit"]) == {"0.1", "0.3"}
    for r in result["rows"]:  # no router beats the oracle at its share
        assert all(r["cross_fit"][s] <= result["oracle"][s] + 1e-9 for s in ("0.1", "0.3"))
    assert "oracle (hindsight)" in capsys.readouterr().out
