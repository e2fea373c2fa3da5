"""Issue 23: presets wherever a config is accepted, sweeps that grow, the cheapest configuration within a drop of
float, one accuracy unit (percent), log x axes chosen for log-spaced values, plots that never pool silently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import make_conv_net
from sweep_fake_runner import fake_run_point
from typer.testing import CliRunner

from photosim._config import load_config, preset_names
from photosim.cli import app
from photosim.engine.executor import simulate
from photosim.errors import PhotosimError
from photosim.experiments import sweep as sweep_module
from photosim.experiments.plot import choose_xscale, plot_results, pooled_columns
from photosim.experiments.query import cheapest
from photosim.experiments.sweep import LOG, MANIFEST, RESULTS, SUMMARY, load_sweep, run_sweep
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.config import load_hardware
from photosim.hardware.plan import HardwarePlan

BASE: dict[str, Any] = {"model": "digits-cnn", "repeats": 2}


def words(text: str) -> str:
    return " ".join(text.split())


def energy_run_point(point: dict[str, Any], cache: dict[Any, Any]) -> list[dict[str, Any]]:
    """fake_run_point plus an energy column that grows with the weight bits (a photonics section's totals)."""
    return [{**row, "energy_per_inference_J": 1e-9 * point["quant"].w_bits, "energy_per_mac_J": 1e-15}
            for row in fake_run_point(point, cache)]


def run(out: Path, config: dict[str, Any], **options: Any) -> sweep_module.SweepResult:
    options.setdefault("runner", fake_run_point)
    return run_sweep(config, out, progress=False, **options)


# presets by name -------------------------------------------------------------------------------------------------

def test_axes_and_variants_take_presets_by_name() -> None:
    named = load_sweep({"base": BASE, "grid": {"hw": ["photonic-8bit", "shot-noise-limited"],
                                               "quant": ["w8a8", "w4a4-first-last-8bit"]}})
    assert [p.config.hw for p in named.points[::2]] == [load_hardware("photonic-8bit"),
                                                       load_hardware("shot-noise-limited")]
    assert named.points[1].config.quant == load_config(QuantSpec, "w4a4-first-last-8bit")
    assert named.points[0].settings == {"hw": "photonic-8bit", "quant": "w8a8"}  # labels keep the names
    inline = load_sweep({"base": BASE, "grid": {
        "hw": [load_hardware(n).model_dump() for n in ("photonic-8bit", "shot-noise-limited")],
        "quant": [load_config(QuantSpec, n).model_dump() for n in ("w8a8", "w4a4-first-last-8bit")]}})
    assert [p.hash for p in named.points] == [p.hash for p in inline.points]

    # a variant naming a preset, an axis setting a key inside it (variants merge first, axes last)
    variants = load_sweep({"base": BASE, "variants": {"ring": {"hw": "microring-weight-bank"}},
                           "grid": {"hw.photonics.laser_power_mw": [0.01, 0.1]}})
    assert [p.config.hw.photonics.laser_power_mw for p in variants.points] == [0.01, 0.1]
    assert variants.points[0].config.hw.tile == load_hardware("microring-weight-bank").tile
    with pytest.raises(PhotosimError, match=r"point 1 \(hw=no-such-chip\).*neither a file nor a shipped hw preset"):
        load_sweep({"grid": {"hw": ["ideal", "no-such-chip"]}})
    with pytest.raises(PhotosimError, match="variant 'a'.*'nope' is neither"):
        load_sweep({"variants": {"a": {"quant": "nope"}}})
    with pytest.raises(PhotosimError, match="variant 'a' sets 'hw.tile', which the axis 'hw'"):
        load_sweep({"grid": {"hw": ["ideal"]}, "variants": {"a": {"hw.tile": 8}}})  # the axis would wipe it


def test_a_preset_axis_has_its_own_column_and_plot(tmp_path: Path) -> None:
    result = run(tmp_path, {"base": BASE, "grid": {"hw": ["ideal", "aihwkit-inference"]}})
    results = pd.read_csv(tmp_path / RESULTS)
    assert list(results["hw"].drop_duplicates()) == ["ideal", "aihwkit-inference"]
    assert [p.name for p in result.plots] == ["top1_vs_hw.png"]


def test_python_api_takes_a_preset_name() -> None:
    qmodel = make_conv_net()
    for name in preset_names("hw"):
        assert HardwarePlan.resolve(qmodel, name).config == load_hardware(name)
    x = torch.rand(4, 3, 12, 12)
    by_name = simulate(qmodel, x, hw="aihwkit-inference", seed=3)
    assert torch.equal(by_name, simulate(qmodel, x, hw=load_hardware("aihwkit-inference"), seed=3))


# sweeps that grow ------------------------------------------------------------------------------------------------

def test_a_grown_or_reordered_grid_reuses_finished_points(tmp_path: Path) -> None:
    first = run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [8, 6]}})
    rows = pd.read_csv(tmp_path / RESULTS).set_index(["point_hash", "repeat"])
    calls: list[int] = []
    grown = {"name": "grown", "base": BASE, "grid": {"quant.w_bits": [2, 8, 4, 6]}}
    second = run(tmp_path, grown, runner=lambda p, c: calls.append(p["quant"].w_bits) or fake_run_point(p, c))
    assert (first.ran, second.ran, second.skipped, sorted(calls)) == (2, 2, 2, [2, 4])
    again = pd.read_csv(tmp_path / RESULTS)
    assert list(again["quant.w_bits"].drop_duplicates()) == [2, 8, 4, 6]  # the new order
    kept = again.set_index(["point_hash", "repeat"]).loc[rows.index]
    assert (kept["top1_pct"] == rows["top1_pct"]).all()  # the finished points' rows, unchanged
    assert json.loads((tmp_path / MANIFEST).read_text())["config"]["name"] == "grown"
    shrunk = run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [4]}}, runner=None)  # nothing to run
    assert (shrunk.ran, len(pd.read_csv(tmp_path / RESULTS))) == (0, 2)
    assert len((tmp_path / LOG).read_text().splitlines()) == 4  # the log keeps every finished point


def test_a_changed_base_is_refused_naming_what_changed(tmp_path: Path) -> None:
    run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [8, 6]}})
    with pytest.raises(PhotosimError, match=r"different sweep.*its base differs in repeats 2 -> 3.*--force"):
        run(tmp_path, {"base": {**BASE, "repeats": 3}, "grid": {"quant.w_bits": [8, 6, 4]}})
    # the same base written differently (a default spelled out, a preset pasted) is the same base
    same = {**BASE, "hw": load_hardware("ideal").model_dump(), "seed": 0}
    assert run(tmp_path, {"base": same, "grid": {"quant.w_bits": [8, 6]}}).skipped == 2


def test_manifests_of_earlier_versions_still_resume_and_grow(tmp_path: Path) -> None:
    run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [8, 6]}})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["base_hash"]  # written before the base had a hash of its own: its config gives it
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [8, 6, 4]}}).ran == 1
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["base_hash"], manifest["config"]  # nothing says what its base was: only the same sweep resumes
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [8, 6, 4]}}).ran == 0
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PhotosimError, match="different sweep"):
        run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [8, 6, 4, 2]}})


def test_a_log_of_fractions_gives_tables_in_percent(tmp_path: Path) -> None:
    """The log keeps the runner's fractions (folders of earlier versions resume); the tables are percent."""
    run(tmp_path, {"base": BASE, "grid": {"quant.w_bits": [8, 6]}})
    logged = json.loads((tmp_path / LOG).read_text().splitlines()[0])["rows"][0]
    summary = pd.read_csv(tmp_path / SUMMARY)
    assert 0 < logged["top1"] < 1 and summary["top1_pct_mean"].iloc[0] == pytest.approx(
        100 * np.mean([r["top1"] for r in json.loads((tmp_path / LOG).read_text().splitlines()[0])["rows"]]))


# the question a user came with -------------------------------------------------------------------------------------

def results_table(drops: dict[float, list[float]], energy: dict[float, float]) -> pd.DataFrame:
    """Rows of a results.csv (accuracy in percent): one point per laser power, one row per repeat."""
    return pd.DataFrame([{"point": i, "point_hash": f"h{i}", "hw.photonics.laser_power_mw": power,
                          "hw.adc.bits": 8, "repeat": r, "top1_pct": 97.0 - d, "float_top1_pct": 97.0,
                          "drop_vs_float_pts": d, "energy_per_inference_J": energy[power]}
                         for i, (power, ds) in enumerate(drops.items()) for r, d in enumerate(ds)])


def test_cheapest_within_a_drop_of_float() -> None:
    table = results_table({0.001: [5.0, 6.0], 0.01: [0.6, 1.2], 0.1: [0.1, 0.2]},
                          {0.001: 1e-10, 0.01: 1e-9, 0.1: 1e-8})
    answer = cheapest(table, cost="energy_per_inference_J", max_drop=1.0)
    assert answer.best["hw.photonics.laser_power_mw"] == 0.01 and answer.points == 3
    assert answer.best["drop_vs_float_pts_mean"] == pytest.approx(0.9)
    assert answer.best["top1_pct_ci95"] > 0 and answer.settings == ["hw.photonics.laser_power_mw"]
    assert list(answer.candidates["point"]) == [1, 2]
    assert cheapest(table, max_drop=1.0, confident=True).best["point"] == 2  # 0.9 ± 3.8 may exceed 1
    fractions = table.assign(top1=table["top1_pct"] / 100, float_top1=0.97, drop_vs_float=table["drop_vs_float_pts"]
                             / 100).drop(columns=["top1_pct", "float_top1_pct", "drop_vs_float_pts"])
    assert cheapest(fractions, max_drop=1.0).best["point"] == 1  # a results.csv of an earlier version
    with pytest.raises(PhotosimError, match="none of the 3 points.*0.1 point.*smallest drop is 0.15.*point 2"):
        cheapest(table, max_drop=0.1)
    with pytest.raises(PhotosimError, match="--cost 'laser_J' is no column.*energy_per_inference_J"):
        cheapest(table, cost="laser_J")


def test_cli_best_and_energy_in_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep_module, "default_runner", lambda: energy_run_point)
    path = tmp_path / "bits.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"quant.w_bits": [8, 6, 4, 3]}}))
    swept = CliRunner().invoke(app, ["sweep", str(path), "-o", str(tmp_path / "out"), "--no-progress"])
    assert swept.exit_code == 0, swept.output
    assert "J / inference" in swept.output and "top-1 % (95% CI)" in swept.output and "8e-09" in swept.output
    csv = str(tmp_path / "out" / RESULTS)
    ok = CliRunner().invoke(app, ["best", csv, "--cost", "energy_per_inference_J", "--max-drop", "8"])
    assert ok.exit_code == 0, ok.output
    assert "quant.w_bits=6" in words(ok.output) and "points below float" in ok.output
    by_bits = CliRunner().invoke(app, ["best", csv, "--cost", "quant.w_bits", "--max-drop", "100"])
    assert by_bits.exit_code == 0 and "quant.w_bits=3" in words(by_bits.output)
    for args, message in [(["--cost", "joules"], "--cost 'joules' is no column"),
                          (["--cost", "hw.requant"], "is not a numeric column"),
                          (["--max-drop", "0.01"], "none of the 4 points")]:
        bad = CliRunner().invoke(app, ["best", csv, *args])
        assert bad.exit_code == 2 and message in words(bad.output) and "Traceback" not in bad.output


# plots ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "scale"), [
    ([0.0003, 0.001, 0.003, 0.01, 0.03], "log"),
    ([1, 2, 4, 8, 16, 32, 64], "log"),
    ([0, 0.0003, 0.001, 0.003, 0.01, 0.03], "symlog"),
    ([2, 4, 6, 8], "linear"),
    ([1, 10, 20, 30, 40], "linear"),  # spans more than a decade, but evenly
    ([-1, 0.01, 0.1, 1], "linear"),
])
def test_the_x_scale_follows_the_spacing(values: list[float], scale: str) -> None:
    assert choose_xscale(values) == scale


@pytest.fixture
def swept_csv(tmp_path: Path) -> Path:
    """Results with three swept settings: bits (zipped weights and activations), ADC bits, noise (log-spaced)."""
    rng = np.random.default_rng(0)
    rows = [{"point": 0, "quant.w_bits": bits, "quant.a_bits": bits, "hw.adc.bits": adc,
             "hw.noise.output.sigma": sigma, "repeat": r, "top1": 0.97 - sigma - 0.01 * (8 - bits)
             + rng.normal(0, 0.003), "float_top1": 0.97}
            for bits in (8, 4) for adc in (6, 8) for sigma in (0.0003, 0.003, 0.03) for r in range(2)]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_plot_never_pools_silently(swept_csv: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(swept_csv)
    assert pooled_columns(frame, "hw.noise.output.sigma", ["quant.w_bits"]) == ["hw.adc.bits"]
    assert pooled_columns(frame, "hw.noise.output.sigma", []) == ["quant.w_bits", "hw.adc.bits"]  # a_bits zipped
    assert pooled_columns(frame, "hw.noise.output.sigma", ["quant.w_bits", "hw.adc.bits"]) == []
    base = ["plot", str(swept_csv), "--x", "hw.noise.output.sigma", "--hue", "quant.w_bits", "-o"]
    facet = CliRunner().invoke(app, [*base, str(tmp_path / "facet.png")])
    assert facet.exit_code == 0, facet.output
    assert "one panel per value of hw.adc.bits" in words(facet.output)
    pooled = CliRunner().invoke(app, [*base, str(tmp_path / "pool.png"), "--others", "pool"])
    assert pooled.exit_code == 0 and "each marker averages over hw.adc.bits" in words(pooled.output)
    fixed = CliRunner().invoke(app, [*base, str(tmp_path / "fixed.png"), "--where", "hw.adc.bits=6"])
    assert fixed.exit_code == 0 and "note" not in fixed.output
    for args, message in [(["--where", "hw.adc.bits=5"], "matches no row; hw.adc.bits takes the values 6, 8"),
                          (["--where", "bits"], "write COLUMN=VALUE"), (["--others", "mix"], "unknown --others"),
                          (["--xscale", "cubic"], "unknown x scale 'cubic'")]:
        bad = CliRunner().invoke(app, [*base, str(tmp_path / "bad.png"), *args])
        assert bad.exit_code == 2 and message in words(bad.output), bad.output
    for name in ("facet.png", "pool.png", "fixed.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_plot_reads_percent_and_chooses_log_axes(swept_csv: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    scales: list[str] = []
    original = Axes.set_xscale
    monkeypatch.setattr(Axes, "set_xscale", lambda self, value, **kw: scales.append(value) or original(self, value,
                                                                                                       **kw))
    hue = ["quant.w_bits", "hw.adc.bits"]
    assert plot_results(swept_csv, "hw.noise.output.sigma", "top1", hue, tmp_path / "auto.png").is_file()
    assert scales == ["log"]  # top1 (fractions in this CSV) is plotted as top1_pct on a log-spaced x
    scales.clear()
    plot_results(swept_csv, "hw.noise.output.sigma", hue=hue, out=tmp_path / "lin.png", xscale="linear")
    assert scales == []
    frame = pd.read_csv(swept_csv).assign(model="digits-cnn")
    frame.to_csv(tmp_path / "named.csv", index=False)
    with pytest.raises(PhotosimError, match="a log x scale need a numeric x column; 'model'"):
        plot_results(tmp_path / "named.csv", "model", out=tmp_path / "x.png", xscale="log", others="pool")
