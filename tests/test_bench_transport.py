"""`fedhlm bench transport` against a real private broker, and its sizing and summary arithmetic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedhlm import bench
from fedhlm.cli.main import main as fedhlm_main
from fedhlm.bench.transport import SIZES, latency_summary, main, sized_request, sized_update, throughput_summary
from fedhlm.transport.codec import encode


def test_sized_messages_encode_to_the_target_size() -> None:
    for target in (1_000, 10_000):
        assert abs(len(encode(sized_update(target))) - target) <= 4
        assert abs(len(encode(sized_request(target))) - target) <= 4
    # below the smallest form: one array element, no smaller
    assert len(encode(sized_update(100))) == 110
    assert sized_update(100).params["w"].size == 1
    assert sized_request(100).context_ids.size == 1


def test_summaries_compute_rate_loss_and_percentiles() -> None:
    rate = throughput_summary(sent=200, received=150, seconds=0.5)
    assert rate["msgs_per_s"] == 300.0
    assert rate["received_ratio"] == 0.75
    assert throughput_summary(sent=10, received=0, seconds=0.0)["msgs_per_s"] == 0.0
    latency = latency_summary([float(ms) for ms in range(1, 101)], timeouts=2)
    assert latency["count"] == 100 and latency["timeouts"] == 2
    assert latency["p50_ms"] == pytest.approx(50.5)
    assert latency["p99_ms"] == pytest.approx(99.01)
    assert latency["max_ms"] == 100.0


def test_bench_dispatch_refuses_unknown_names() -> None:
    assert bench.main(["nope"]) == 2
    assert fedhlm_main(["bench", "nope"]) == 2
    if importlib.util.find_spec("fedhlm.bench.device") is None:
        assert bench.main(["device"]) == 2  # listed, but its module does not exist yet


def test_quick_run_reports_every_size_for_fedhlm_and_bare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.json"
    assert main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert {(case["size"], case["qos"]) for case in cases} == {(size, qos) for size in SIZES for qos in (0, 1)}
    for case in cases:
        assert case["stream_bytes"] >= min(case["size"], 110)
        for side in ("fedhlm", "bare"):
            rate, rtt = case[side]["throughput"], case[side]["rtt"]
            assert rate["sent"] == 200
            assert 0 < rate["received"] <= rate["sent"]
            assert rate["msgs_per_s"] > 0
            assert rtt["count"] > 0
            assert 0 < rtt["p50_ms"] <= rtt["p99_ms"] <= rtt["max_ms"]
        if case["qos"] == 1:  # QoS 1 is acknowledged end to end: nothing may go missing
            assert case["fedhlm"]["throughput"]["received"] == case["bare"]["throughput"]["received"] == 200
    assert result["machine"]["cpu_count"] >= 1
    assert result["machine"]["paho_mqtt"].startswith("2.")
    table = capsys.readouterr().out
    assert "fedhlm msg/s" in table and "10000 B" in table
