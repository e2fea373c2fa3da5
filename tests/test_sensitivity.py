"""Layer sensitivity and mixed precision on the built-in digits models, with real values."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_conv_net
from typer.testing import CliRunner

from photosim._config import exact_glob, load_config
from photosim.cli import app
from photosim.errors import PhotosimError
from photosim.experiments.fidelity import FloatReference, output_snr_db
from photosim.experiments.mixed_precision import cost, search_mixed_precision
from photosim.experiments.sensitivity import layer_sensitivity
from photosim.frontend.algorithms.selection import top1_agreement
from photosim.frontend.data import load_dataset
from photosim.frontend.models import load_model
from photosim.frontend.ptq import quantize
from photosim.frontend.qconfig import QuantSpec
from photosim.ir.summary import bits_per_mac

CALIBRATION = load_dataset("digits", "calibration")


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return load_model("digits-cnn").module


def test_exact_glob_matches_only_its_name() -> None:
    for name in ("conv1", "features[0]*", "a?b"):
        assert fnmatchcase(name, exact_glob(name))
    assert not fnmatchcase("features0x", exact_glob("features[0]*"))


def test_label_free_metrics() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert top1_agreement(reference, reference) == 1.0 and output_snr_db(reference, reference) == float("inf")
    assert top1_agreement(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), reference) == 0.5
    assert output_snr_db(reference * 1.1, reference) == pytest.approx(20.0)


def test_bits_per_mac_weights_each_layer_by_its_macs() -> None:
    assert bits_per_mac(make_conv_net(w_bits=4, a_bits=8)) == (4.0, 8.0)
    spec = QuantSpec(layers=[{"match": "fc2", "w_bits": 2}])
    w, a = bits_per_mac(quantize(load_model("digits-cnn").module, CALIBRATION, spec))
    assert a == 8.0 and w == pytest.approx(8 - 6 * 320 / (4608 + 18432 + 2048 + 320))  # fc2: 320 of 25408 MACs


def test_hardware_probe_ranks_the_only_coarse_layer_first(cnn: torch.nn.Module) -> None:
    hw = {"layers": [{"match": "conv2", "adc": {"bits": 2}}]}  # only conv2 is coarse on this chip
    result = layer_sensitivity(cnn, CALIBRATION, hw=hw)
    table = result.layers
    assert list(table["layer"])[0] == "conv2" and set(table["layer"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert table.loc[0, "agreement_drop"] > 0.3
    others = table[table["layer"] != "conv2"]
    assert (others["agreement_drop"] == 0).all() and (others["snr_loss_db"] == 0).all()


def test_bit_probe_narrows_one_layer_and_matches_an_explicit_override(cnn: torch.nn.Module) -> None:
    test = load_dataset("digits", "test")
    result = layer_sensitivity(cnn, CALIBRATION, w_bits=2, metric="snr", test=test)
    table = result.layers.set_index("layer")
    assert list(table.index) == ["conv2", "fc2", "conv1", "fc1"]  # measured on the shipped weights
    assert (table["w_bits"] == 2).all() and (table["a_bits"] == 8).all()
    assert table["snr_loss_db"].is_monotonic_decreasing and (table["snr_loss_db"] > 3).all()
    reference = FloatReference(cnn, CALIBRATION, 512, test)
    explicit = reference.score(quantize(cnn, CALIBRATION, QuantSpec(layers=[{"match": "conv2", "w_bits": 2}])))
    assert table.loc["conv2", "agreement"] == explicit.agreement and table.loc["conv2", "snr_db"] == explicit.snr_db
    assert table.loc["conv2", "test_top1"] == explicit.test_top1
    assert result.base.test_top1 == pytest.approx(355 / 360)  # W8A8 digits-cnn on the test split


def test_activation_probe_includes_the_graph_input(cnn: torch.nn.Module) -> None:
    table = layer_sensitivity(cnn, CALIBRATION, a_bits=3).layers
    assert set(table["layer"]) == {"input", "conv1", "conv2", "fc1", "fc2"}
    assert table["w_bits"].isna().sum() == 1 and (table["a_bits"] == 3).all()


def test_sensitivity_needs_a_probe(cnn: torch.nn.Module) -> None:
    with pytest.raises(PhotosimError, match="--bits"):
        layer_sensitivity(cnn, CALIBRATION)
    with pytest.raises(PhotosimError, match="metric"):
        layer_sensitivity(cnn, CALIBRATION, w_bits=4, metric="accuracy")


def test_mixed_precision_meets_its_target_and_its_yaml_reproduces_the_model(cnn: torch.nn.Module,
                                                                             tmp_path: Path) -> None:
    result = search_mixed_precision(cnn, CALIBRATION, 0.98, choices=(8, 4, 3))
    assert result.score.agreement >= 0.98 and result.base.agreement == 1.0
    assert result.cost < 6 < result.base_cost == 8  # well below 8 bits per MAC operand
    path = tmp_path / "mixed.yaml"
    path.write_text(result.yaml())
    spec = load_config(QuantSpec, path)
    assert spec == result.spec and spec.layers
    again = quantize(cnn, CALIBRATION, spec)
    assert all(torch.equal(again.tensors[k], result.qmodel.tensors[k]) for k in result.qmodel.tensors)
    assert [n.output_q for n in again.nodes] == [n.output_q for n in result.qmodel.nodes]
    assert FloatReference(cnn, CALIBRATION, 512).score(again).agreement == result.score.agreement
    assert cost(again) == result.cost


def test_mixed_precision_refuses_unreachable_or_bad_targets(cnn: torch.nn.Module) -> None:
    with pytest.raises(PhotosimError, match=r"\(0, 1\]"):
        search_mixed_precision(cnn, CALIBRATION, 99.0)
    with pytest.raises(PhotosimError, match="below the target"):
        search_mixed_precision(cnn, CALIBRATION, 1.0, choices=(2,))
    with pytest.raises(PhotosimError, match="from 2 to 16"):
        search_mixed_precision(cnn, CALIBRATION, 0.9, choices=(8, 1))


runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_sensitivity_writes_csv_and_plot(tmp_path: Path) -> None:
    report, plot = tmp_path / "s.csv", tmp_path / "s.png"
    result = invoke("sensitivity", "--model", "digits-cnn", "--bits", "3", "--bits-of", "weights", "--test",
                    "--limit", "90", "--report", report, "--plot", plot)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(report)
    assert list(table["rank"]) == [1, 2, 3, 4] and {"agreement_drop_pts", "snr_loss_db", "test_drop_pts"} <= set(table)
    assert table["agreement_pct"].between(0, 100).all() and table["agreement_pct"].max() > 1  # percent, not 0-1
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_cli_mixed_precision_writes_a_config_quantize_accepts(tmp_path: Path) -> None:
    config = tmp_path / "mixed.yaml"
    result = invoke("mixed-precision", "--model", "digits-cnn", "--target", "0.97", "--choices", "8,4", "-o", config)
    assert result.exit_code == 0, result.output
    assert "bits per MAC" in result.output and config.read_text().startswith("# mixed precision")
    result = invoke("quantize", "--model", "digits-cnn", "--config", config, "--limit", "60",
                    "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sensitivity", "--model", "digits-cnn"], "--bits"),
        (["sensitivity", "--bits", "4", "--bits-of", "biases"], "--bits-of"),
        (["sensitivity", "--bits", "1"], "w_bits"),
        (["sensitivity", "--bits", "4", "--metric", "loss"], "metric"),
        (["sensitivity", "--bits", "4", "--plot", "/nonexistent/s.png"], "does not exist"),
        (["mixed-precision", "-o", "m.yaml", "--target", "1.5"], "(0, 1]"),
        (["mixed-precision", "-o", "m.yaml", "--choices", "8,x"], "--choices"),
    ],
)
def test_cli_bad_input_exits_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
