"""Plots of sweep results: valid PNG files for numeric and categorical axes, errors naming the column."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from photosim.cli import app
from photosim.errors import PhotosimError
from photosim.experiments.plot import default_plots, plot_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results_csv(tmp_path: Path) -> Path:
    """A results table like a sweep's: 2 models x 3 bit widths x 2 ADC settings x 3 repeats."""
    rng = np.random.default_rng(0)
    rows = [{"model": model, "quant.w_bits": bits, "quant.a_bits": bits, "hw.adc.bits": adc, "repeat": repeat,
             "top1": 0.97 - 0.03 * (8 - bits) + rng.normal(0, 0.005), "float_top1": 0.97 + 0.01 * (model == "b")}
            for model in ("a", "b") for bits in (8, 6, 4) for adc in (None, 6) for repeat in range(3)]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 100


def test_plot_results_writes_a_png_beside_the_csv(results_csv: Path) -> None:
    path = plot_results(results_csv, "quant.w_bits", hue=["model"])
    assert path == results_csv.parent / "top1_vs_quant.w_bits_by_model.png"
    assert_png(path)


def test_categorical_axis_with_missing_values(results_csv: Path, tmp_path: Path) -> None:
    assert_png(plot_results(results_csv, "hw.adc.bits", "top1", ["model", "quant.w_bits"], tmp_path / "adc.png"))


def test_default_plots_one_per_axis(results_csv: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(results_csv)
    paths = default_plots(frame, [["quant.w_bits", "quant.a_bits"], ["hw.adc.bits"]], tmp_path, hue=["model"])
    assert [p.name for p in paths] == ["top1_vs_quant.w_bits.png", "top1_vs_hw.adc.bits.png"]
    for path in paths:
        assert_png(path)
    assert default_plots(frame.drop(columns="top1"), [["hw.adc.bits"]], tmp_path) == []


@pytest.mark.parametrize(("x", "y", "hue", "message"), [
    ("w_bits", "top1", [], "no column 'w_bits'.*available: model, quant.w_bits"),
    ("quant.w_bits", "model", [], "--y 'model' is not a numeric column"),
    ("quant.w_bits", "top1", ["colour"], "no column 'colour'"),
])
def test_bad_columns_are_named(results_csv: Path, x: str, y: str, hue: list[str], message: str) -> None:
    with pytest.raises(PhotosimError, match=message):
        plot_results(results_csv, x, y, hue)


def test_missing_results_file(tmp_path: Path) -> None:
    with pytest.raises(PhotosimError, match="does not exist"):
        plot_results(tmp_path / "nope.csv", "quant.w_bits")


def test_cli_plot(results_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "figure.png"
    ok = CliRunner().invoke(app, ["plot", str(results_csv), "--x", "quant.w_bits", "--hue", "model",
                                  "--hue", "hw.adc.bits", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert_png(out)
    bad = CliRunner().invoke(app, ["plot", str(results_csv), "--x", "bits"])
    assert bad.exit_code == 2 and "no column 'bits'" in bad.output and "Traceback" not in bad.output
