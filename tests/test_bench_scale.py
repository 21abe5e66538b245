"""`fedhlm bench scale` on tiny models: every size runs over a real broker and is written out."""

from __future__ import annotations

import json

import pytest
import yaml

from fedhlm.bench import scale
from test_simulate import tiny_configs


@pytest.mark.slow
def test_scale_bench_runs_each_size_and_reports_throughput(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDHLM_HOME", str(tmp_path / "home"))
    slm, llm = tiny_configs(tmp_path)
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"slm": slm, "llm": llm}, "data": {"source": "synthetic"},
                                   "federation": {"round_deadline_s": 5}, "routing": {"top_k": 4}}))
    out = tmp_path / "scale.json"
    rc = scale.main(["--config", str(cfg), "--sizes", "2,8", "--inputs", "16", "--rounds", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["sizes"]
    assert [r["clients"] for r in rows] == [2, 8]
    for r in rows:
        assert "error" not in r, r
        assert r["tokens"] == 16 and r["tokens_per_s"] > 0 and r["messages"] > 0
        assert r["peak_rss_mb"] > 0 and r["in_process_tokens_per_s"] > 0


def test_edge_count_keeps_clusters_of_the_asked_size() -> None:
    assert [scale.edge_count(n) for n in (2, 10, 100, 1000)] == [1, 2, 10, 10]
    assert [scale.edge_count(n, 25) for n in (10, 100, 1000, 1001)] == [1, 4, 40, 41]


def test_a_bad_cluster_size_is_refused_before_any_work(capsys) -> None:
    assert scale.main(["--clients-per-edge", "0"]) == 2
    assert "--clients-per-edge" in capsys.readouterr().err
