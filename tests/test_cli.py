"""The command line through typer's test runner: outputs, files, and exit code 2 with no traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from photosim.cli import app
from photosim.experiments.sweep import run_sweep
from photosim.ir.format import load

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "cnn4.safetensors"
    result = invoke("quantize", "--model", "digits-cnn", "--w-bits", "4", "--a-bits", "4", "-o", path)
    assert result.exit_code == 0, result.output
    assert "fake-quant" in result.output and "float 98.33%" in result.output
    return path


def test_quantize_writes_a_loadable_file(model_file: Path) -> None:
    qm = load(model_file)
    assert qm.provenance["model"] == "digits-cnn" and qm.node("conv1").w_bits == 4


def test_quantize_ptq_flags(tmp_path: Path) -> None:
    path = tmp_path / "ptq.safetensors"
    result = invoke("quantize", "--model", "digits-cnn", "--w-bits", "4", "--a-bits", "4", "--ptq",
                    "equalize,gptq,bias_correction", "--activation-range", "symmetric", "--output-bits", "6",
                    "--calib-samples", "64", "-o", path)
    assert result.exit_code == 0, result.output
    qm = load(path)
    assert qm.provenance["quant_spec"]["ptq"] == ["equalize", "gptq", "bias_correction"]
    out = qm.node("fc2").output_q
    assert (out.bits, out.signed, out.zero_point) == (6, True, 0)
    bad = invoke("quantize", "--model", "digits-cnn", "--ptq", "gptq,gpfq", "-o", tmp_path / "bad.safetensors")
    assert bad.exit_code == 2 and "pick one of them" in bad.output and "Traceback" not in bad.output


def test_inspect_lists_layers_with_macs_and_accumulator_bits(model_file: Path) -> None:
    result = invoke("inspect", model_file)
    assert result.exit_code == 0, result.output
    for text in ("conv1", "fc2", "4/4/4", "total MACs per sample"):
        assert text in result.output


def test_models_and_eval() -> None:
    result = invoke("models")
    assert result.exit_code == 0 and "digits-resnet" in result.output and "99.44%" in result.output
    result = invoke("eval", "--model", "digits-cnn", "--limit", "100")
    assert result.exit_code == 0 and "100 images" in result.output


def test_run_file_reports_float_fake_quant_integer_and_hardware(model_file: Path, tmp_path: Path) -> None:
    report, layers = tmp_path / "run.csv", tmp_path / "layers.csv"
    result = invoke("run", model_file, "--noise", "0.002", "--tile", "16", "--adc-bits", "8", "--repeats", "2",
                    "--limit", "120", "--report", report, "--layer-report", layers)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(report)
    assert list(table["stage"]) == ["float", "fake-quant", "integer (float)", "hardware (2 repeats)"]
    assert table.loc[2, "top1"] == pytest.approx(table.loc[1, "top1"], abs=2.0)  # engine ~ fake-quant
    assert "output noise sigma used" in result.output
    per_layer = pd.read_csv(layers)
    assert set(per_layer["layer"]) == {"conv1", "conv2", "fc1", "fc2"} and set(per_layer["repeat"]) == {0, 1}
    assert set(per_layer["backend"]) == {"fused-cpu"} and per_layer["declined"].str.contains("fused-triton").all()


def test_inspect_hw_shows_each_layers_backend_and_a_required_backend_is_checked(model_file: Path) -> None:
    result = runner.invoke(app, ["inspect", str(model_file), "--hw", "photonic-8bit"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ conv1 ") and "analog" in line]
    assert len(rows) == 1 and "fused-cpu" in rows[0]
    result = invoke("run", model_file, "--backend", "onednn", "--limit", "20")
    assert result.exit_code == 2 and "layer 'fc1' cannot run on the required backend (onednn: runs convolutions " \
                                      "only)" in " ".join(result.output.split())
    result = invoke("run", model_file, "--tile", "16", "--backend", "torch", "--limit", "20")
    assert result.exit_code == 0 and "fused-cpu" not in result.output


def test_run_with_no_arguments_is_the_demo() -> None:
    result = invoke("run", "--limit", "60")
    assert result.exit_code == 0, result.output
    assert "digits-resnet W8A8" in result.output and "integer (float)" in result.output


def test_run_with_a_hardware_preset_and_snr() -> None:
    result = invoke("run", "--model", "digits-cnn", "--hw", "photonic-8bit", "--limit", "60")
    assert result.exit_code == 0, result.output
    assert "hardware (1 repeat)" in result.output and "0.00226" in result.output  # enob 8 -> sigma


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--overflow", "clip"], "accumulator.overflow"),
        (["run", "--noise", "-1"], "noise.output.sigma"),
        (["run", "--device", "gpu"], "unknown device 'gpu'"),
        (["run", "--batch-size", "0"], "--batch-size"),
        (["quantize", "--w-bits", "17", "-o", "x.safetensors"], "w_bits"),
        (["run", "--model", "nope"], "unknown model 'nope'"),
        (["run", "--data", "mnist", "--model", "digits-cnn"], "--download"),
        (["run", "--hw", "missing-preset"], "neither a file nor a shipped hw preset"),
        (["inspect", "pyproject.toml"], "not a readable safetensors"),
        (["import-torch", "nowhere.py:build", "-o", "x.safetensors"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_message(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_bad_yaml_key_in_quant_config(tmp_path: Path) -> None:
    config = tmp_path / "q.yaml"
    config.write_text("w_bits: 4\nobserver: maxmin\n")
    result = invoke("quantize", "--config", config, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 2 and "observer" in result.output


def test_real_sweep_rows_match_the_run_workflow(tmp_path: Path) -> None:
    sweep = {"base": {"model": "digits-cnn", "limit": 80, "repeats": 2},
             "grid": {"hw.noise.output.sigma": [0.0, 0.002]}}
    result = run_sweep(sweep, tmp_path / "out", progress=False)
    rows = pd.read_csv(tmp_path / "out" / "results.csv")
    assert result.ran == 2 and len(rows) == 4
    ideal = rows[rows["hw.noise.output.sigma"] == 0]
    assert (ideal["top1_pct"] == ideal["ideal_top1_pct"]).all() and (ideal["drop_vs_ideal_pts"] == 0).all()
    assert rows["float_top1_pct"].iloc[0] == pytest.approx(100 * 79 / 80)  # digits-cnn on the first 80 test images
