"""Sweeps: expansion, validation errors, results on disk, resume, refusal to overwrite, executors agree."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from sweep_fake_runner import fake_run_point
from typer.testing import CliRunner

from photosim.cli import app
from photosim.errors import PhotosimError
from photosim.experiments import sweep as sweep_module
from photosim.experiments.point import MODEL_KEYS
from photosim.experiments.sweep import LOG, MANIFEST, RESULTS, SUMMARY, group_points, load_sweep, run_sweep
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.config import HardwareConfig, load_hardware

TESTS = Path(__file__).parent
EXPERIMENTS = sorted((TESTS.parent / "experiments").glob("*.yaml"))
SWEEP: dict[str, Any] = {
    "name": "test",
    "base": {"model": "digits-cnn", "repeats": 2, "seed": 1},
    "variants": {"cnn": {"model": "digits-cnn"}, "resnet": {"model": "digits-resnet"}},
    "zip": {"quant.w_bits": [8, 6, 4], "quant.a_bits": [8, 6, 4]},
    "grid": {"hw.requant": ["float", "fixedpoint"]},
}
POINTS, ROWS = 12, 24


def changed(**sections: Any) -> dict[str, Any]:
    """SWEEP with top-level sections replaced."""
    return {**copy.deepcopy(SWEEP), **sections}


def stable_csv(path: Path) -> str:
    """A results/summary CSV without what describes the execution, not the result: wall time, cache fills."""
    frame = pd.read_csv(path)
    return frame.drop(columns=[c for c in frame if c == "point_wall_s" or c.startswith("built_cache")]).to_csv()


def words(text: str) -> str:
    """Terminal output with line wrapping undone."""
    return " ".join(text.split())


def run(out: Path, config: Any = None, **options: Any) -> sweep_module.SweepResult:
    options.setdefault("runner", fake_run_point)
    return run_sweep(SWEEP if config is None else config, out, progress=False, **options)


def test_variants_zip_and_grid_expand_in_order() -> None:
    points = load_sweep(SWEEP).points
    assert len(points) == POINTS
    assert [p.index for p in points] == list(range(POINTS))
    assert [p.variant for p in points] == ["cnn"] * 6 + ["resnet"] * 6
    assert [(p.config.quant.w_bits, p.config.quant.a_bits, p.config.hw.requant) for p in points[:6]] == [
        (8, 8, "float"), (8, 8, "fixedpoint"), (6, 6, "float"), (6, 6, "fixedpoint"), (4, 4, "float"),
        (4, 4, "fixedpoint")]
    assert {p.config.model for p in points[6:]} == {"digits-resnet"}
    assert len({p.hash for p in points}) == POINTS


def test_grid_is_the_cartesian_product() -> None:
    points = load_sweep({"grid": {"quant.w_bits": [8, 4, 2], "hw.noise.output.sigma": [0.0, 0.01]}}).points
    assert [(p.config.quant.w_bits, p.config.hw.noise.output.sigma) for p in points] == [
        (8, 0.0), (8, 0.01), (4, 0.0), (4, 0.01), (2, 0.0), (2, 0.01)]
    assert all(p.variant is None for p in points)


def test_points_are_complete_configs_with_content_hashes() -> None:
    point = load_sweep(SWEEP).points[0]
    assert set(point.config.model_dump()) >= {"model", "weights", "num_classes", "cifar_stem", "data", "data_root",
                                              "download", "limit", "quant", "hw", "repeats", "seed", "batch_size",
                                              "device"}
    assert isinstance(point.config.quant, QuantSpec) and isinstance(point.config.hw, HardwareConfig)
    assert point.config.quant.bias_bits == 32  # defaults filled in
    explicit = changed(base={**SWEEP["base"], "quant": {"bias_bits": 32}})
    assert load_sweep(explicit).points[0].hash == point.hash  # a default written out is the same point
    reseeded = changed(base={**SWEEP["base"], "seed": 2})
    assert load_sweep(reseeded).points[0].hash != point.hash


def test_point_hashes_are_those_of_untyped_points() -> None:
    """Values computed before points were typed (a per-layer override, a ptq string, snr_db replaced by sigma in one
    variant): the typed points hash the same dump, so existing results folders resume."""
    sweep = load_sweep({"base": {"model": "digits-cnn", "quant": {"w_bits": 6, "ptq": "equalize"},
                                 "hw": {"tile": 64, "noise": {"output": {"snr_db": 30}},
                                        "layers": [{"match": "fc", "adc": {"bits": 8}}]}},
                        "variants": {"snr": {}, "sigma": {"hw.noise.output.sigma": 0.01}}})
    assert (sweep.hash, [p.hash for p in sweep.points]) == ("6fdd41ad5238cfff", ["42bd54defbc2dbc7",
                                                                                 "4b44f6998afd099b"])


def test_points_sharing_the_fields_marked_as_model_share_a_group() -> None:
    assert MODEL_KEYS == ("model", "weights", "num_classes", "cifar_stem", "data", "data_root", "download", "quant")
    groups = group_points(load_sweep(SWEEP).points)
    assert [[index for index, _ in group] for group in groups] == [[i, i + 1] for i in range(0, POINTS, 2)]


def test_runners_get_typed_sections_that_survive_pickling() -> None:
    """Worker processes receive each point's fields with quant and hw validated (per-layer overrides included)."""
    sweep = load_sweep({"base": {"quant": {"layers": [{"match": "fc", "w_bits": 4}]},
                                 "hw": {"layers": [{"match": "fc", "noise": {"output": {"enob": 6}}}]}}})
    [[(_, point)]] = group_points(sweep.points)
    assert isinstance(point["quant"], QuantSpec) and isinstance(point["hw"], HardwareConfig)
    assert pickle.loads(pickle.dumps(point)) == point == dict(sweep.points[0].config)


def test_base_sections_may_name_a_preset_or_yaml_file(tmp_path: Path) -> None:
    """`hw: PRESET` and `quant: FILE.yaml` in base work as --hw and --quant do; axes still set their keys."""
    quant = tmp_path / "quant.yaml"
    quant.write_text(yaml.safe_dump({"w_bits": 4}))
    named = load_sweep({"base": {"hw": "microring-weight-bank", "quant": str(quant)}, "grid": {"hw.tile": [16, 32]}})
    preset = load_hardware("microring-weight-bank")
    inline = load_sweep({"base": {"hw": preset.model_dump(), "quant": {"w_bits": 4}}, "grid": {"hw.tile": [16, 32]}})
    assert [p.hash for p in named.points] == [p.hash for p in inline.points]
    assert [(p.config.hw.tile, p.config.quant.w_bits) for p in named.points] == [(16, 4), (32, 4)]
    assert named.points[0].config.hw == preset
    with pytest.raises(PhotosimError, match="neither a file nor a shipped hw preset"):
        load_sweep({"base": {"hw": "no-such-chip"}})


BAD_SWEEPS = [
    ({"bogus": 1}, ["bogus"]),
    ({"base": {"modle": "digits-cnn"}}, ["modle"]),
    ({"grid": {"quant.w_bitz": [4]}}, ["quant.w_bitz", "w_bits"]),
    ({"grid": {"hw.noise.outptu.sigma": [0.1]}}, ["hw.noise.outptu.sigma", "output"]),
    ({"grid": {"model.depth": [1]}}, ["model.depth", "single value"]),
    ({"grid": {"quant.w_bits": [8, 1]}}, ["quant.w_bits", "greater than or equal to 2"]),
    ({"grid": {"hw.accumulator.overflow": ["wrap", "explode"]}}, ["hw.accumulator.overflow", "saturate"]),
    ({"grid": {"quant.w_bits": []}}, ["quant.w_bits", "no values"]),
    ({"grid": {"quant.w_bits": 8}}, ["grid.quant.w_bits", "valid list"]),
    ({"zip": {"quant.w_bits": [8, 4], "quant.a_bits": [8]}}, ["equal lengths", "quant.a_bits: 1"]),
    ({"grid": {"quant.w_bits": [8]}, "zip": {"quant.w_bits": [4]}}, ["quant.w_bits", "same setting"]),
    ({"grid": {"hw.noise": [{}], "hw.noise.output.sigma": [0.1]}}, ["hw.noise", "same setting"]),
    ({"grid": {"quant.w_bits": [8]}, "variants": {"a": {"quant.w_bits": 4}}}, ["variant 'a'", "quant.w_bits"]),
    ({"grid": {"quant.w_bits": [8, 8]}}, ["same configuration"]),
    ({"grid": {"hw.noise.output": [{"sigma": 0.1, "snr_db": 20}]}}, ["hw.noise.output", "one of sigma"]),
]


@pytest.mark.parametrize(("sweep", "expected"), BAD_SWEEPS, ids=[str(s) for s, _ in BAD_SWEEPS])
def test_bad_sweep_names_the_culprit(sweep: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(PhotosimError) as info:
        load_sweep(sweep)
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_shipped_experiments_validate(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.points and sweep.config.axes


def test_run_writes_results_summary_manifest_and_plots(tmp_path: Path) -> None:
    result = run(tmp_path)
    results = pd.read_csv(tmp_path / RESULTS)
    assert len(results) == ROWS and result.ran == POINTS and result.skipped == 0
    assert {"point", "point_hash", "variant", "quant.w_bits", "quant.a_bits", "hw.requant", "hw.noise.output.sigma",
            "repeat", "top1_pct", "float_top1_pct", "ideal_top1_pct", "drop_vs_float_pts",
            "point_wall_s"} <= set(results)
    assert not {"top1", "float_top1", "drop_vs_float"} & set(results)  # one unit: percent, named so
    assert results["float_top1_pct"].iloc[0] == pytest.approx(97.0)  # the runner's fraction 0.97
    assert results["drop_vs_float_pts"].to_numpy() == pytest.approx(
        (results["float_top1_pct"] - results["top1_pct"]).to_numpy())
    assert list(results["point"]) == sorted(results["point"])
    summary = pd.read_csv(tmp_path / SUMMARY)
    assert len(summary) == POINTS and (summary["n"] == 2).all()
    assert {"top1_pct_mean", "top1_pct_std", "top1_pct_ci95", "quant.w_bits"} <= set(summary)
    assert "repeat" not in summary and "repeat_mean" not in summary
    # the quantized model of each (model, quant) pair was built once and reused by both hardware points
    assert (results.groupby(["variant", "quant.w_bits"])["built_cache"].sum() == 1).all()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["sweep_hash"] == load_sweep(SWEEP).hash
    assert sorted(manifest["plots"]) == ["top1_vs_hw.requant.png", "top1_vs_quant.w_bits.png"]
    for plot in result.plots:
        assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_resume_after_interrupt_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    run(tmp_path / "whole")
    calls: list[dict[str, Any]] = []

    def interrupted(point: dict[str, Any], cache: dict[Any, Any]) -> list[dict[str, Any]]:
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(point)
        return fake_run_point(point, cache)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", runner=interrupted)
    log = tmp_path / "resumed" / LOG
    assert len(log.read_text().splitlines()) == 5
    assert len(pd.read_csv(tmp_path / "resumed" / RESULTS)) == 10
    with log.open("a") as handle:
        handle.write('{"hash": "torn wri')  # a crash in the middle of appending a line

    calls.clear()
    result = run(tmp_path / "resumed", runner=lambda p, c: calls.append(p) or fake_run_point(p, c))
    assert (result.ran, result.skipped, len(calls)) == (POINTS - 5, 5, POINTS - 5)
    for name in (RESULTS, SUMMARY):
        assert stable_csv(tmp_path / "resumed" / name) == stable_csv(tmp_path / "whole" / name)
    assert run(tmp_path / "resumed", runner=None).ran == 0  # nothing left: the real runner is never needed


def test_corrupt_log_line_is_reported(tmp_path: Path) -> None:
    run(tmp_path)
    log = tmp_path / LOG
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    with pytest.raises(PhotosimError, match="line 2 is corrupt"):
        run(tmp_path)


def test_refuses_a_different_sweep_or_foreign_directory_without_force(tmp_path: Path) -> None:
    run(tmp_path / "out")
    assert run(tmp_path / "out", changed(name="renamed", description="same points")).ran == 0
    other = changed(base={**SWEEP["base"], "repeats": 3})
    with pytest.raises(PhotosimError, match="different sweep.*--force"):
        run(tmp_path / "out", other)
    assert len(pd.read_csv(tmp_path / "out" / RESULTS)) == ROWS  # untouched
    result = run(tmp_path / "out", other, force=True)
    assert result.ran == POINTS and len(pd.read_csv(tmp_path / "out" / RESULTS)) == POINTS * 3

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(PhotosimError, match="not empty"):
        run(tmp_path / "foreign")
    run(tmp_path / "foreign", force=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_variant_selection(tmp_path: Path) -> None:
    result = run(tmp_path, variants=["resnet"])
    assert result.ran == POINTS // 2 and set(result.results["variant"]) == {"resnet"}
    assert run(tmp_path).ran == POINTS // 2  # the same directory takes the other variant later
    with pytest.raises(PhotosimError, match="no variant 'vgg'.*cnn, resnet"):
        run(tmp_path, variants=["vgg"])


@pytest.mark.parametrize(("options", "message"), [
    ({"executor": "dask"}, "unknown executor 'dask'; use one of local, ray"),
    ({"workers": 0}, "--workers must be a positive integer"),
    ({"address": "auto"}, "--address"),
])
def test_bad_executor_options(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(PhotosimError, match=message):
        run(tmp_path, **options)
    assert not (tmp_path / MANIFEST).exists()


def test_missing_weights_fail_before_anything_runs(tmp_path: Path) -> None:
    bad = changed(variants={"trained": {"model": "torchvision:resnet18", "weights": "missing.pt"}})
    with pytest.raises(PhotosimError, match="'missing.pt' does not exist.*--variant"):
        run(tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def test_worker_processes_match_this_process(tmp_path: Path) -> None:
    run(tmp_path / "serial")
    run(tmp_path / "processes", workers=2)
    assert stable_csv(tmp_path / "processes" / RESULTS) == stable_csv(tmp_path / "serial" / RESULTS)
    results = pd.read_csv(tmp_path / "processes" / RESULTS)
    assert (results.groupby(["variant", "quant.w_bits"])["built_cache"].sum() == 1).all()


def test_ray_matches_local(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        run(tmp_path / "ray", executor="ray", workers=2)
    finally:
        ray.shutdown()
    run(tmp_path / "local")
    assert stable_csv(tmp_path / "ray" / RESULTS) == stable_csv(tmp_path / "local" / RESULTS)


def test_cli_bad_sweep_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"quant.w_bitz": [8, 4]}}))
    result = CliRunner().invoke(app, ["sweep", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "quant.w_bitz" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_runs_resumes_and_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep_module, "default_runner", lambda: fake_run_point)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    args = ["sweep", str(path), "-o", str(tmp_path / "out"), "--no-progress"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"ran {POINTS} points" in words(first.output) and "resnet" in first.output  # summary table
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and f"ran 0 points, {POINTS} already finished" in words(again.output)
    listing = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--variant", "cnn"])
    assert listing.exit_code == 0 and f"{POINTS // 2} points" in listing.output
