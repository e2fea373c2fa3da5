"""The benchmark as a smoke test: nothing is timed, every configuration is reported."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from photosim.cli import app
from photosim.engine import onednn
from photosim.experiments.bench import CONFIGS, BenchSettings, run_benchmark

needs_onednn = pytest.mark.skipif(not onednn.limb_bits(), reason="oneDNN int8 convolutions are unavailable")
TILED = CONFIGS[2].hw


def test_quick_benchmark_reports_every_configuration(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = run_benchmark(BenchSettings.quick(model="digits-cnn", memory=False), json_path=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = [row["name"] for row in result["configs"]]
    assert names == ["float eval", *(c.name for c in CONFIGS)]
    assert all(row["images_per_s"] > 0 and row["ratio"] > 0 for row in result["configs"])
    assert result["machine"]["threads"] == 2 and result["diagnostics"] is True
    assert [row["target"] for row in result["configs"][1:]] == [c.cpu_target for c in CONFIGS]


def test_peak_memory_is_measured_in_subprocesses() -> None:
    result = run_benchmark(BenchSettings.quick(model="digits-cnn"), configs=CONFIGS[3:4])
    float_row, row = result["configs"]
    assert float_row["peak_rss_mib"] > 0 and row["peak_rss_mib"] > 0
    assert row["peak_over_float_mib"] == pytest.approx(row["peak_rss_mib"] - float_row["peak_rss_mib"])


def test_bench_command_prints_the_table() -> None:
    result = CliRunner().invoke(app, ["bench", "--quick", "--model", "digits-cnn", "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "digits-cnn, batch 8" in result.output and "W12A12" in result.output
