"""Sweep points with a ``finetune`` section: validation, hashes of points without one, defaults shared with
``photosim finetune``, and a real run whose rows equal photosim.finetune judged by the engine directly."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import photosim.experiments.finetune as finetune_module
from photosim.cli import app
from photosim.cli import finetune as finetune_cli
from photosim.errors import PhotosimError
from photosim.experiments.accuracy import evaluate
from photosim.experiments.point import FinetuneSection
from photosim.experiments.sweep import RESULTS, load_sweep, run_sweep, runnable_points
from photosim.experiments.workflow import DataSpec, run_hardware
from photosim.frontend.data import load_dataset
from photosim.frontend.models import load_model
from photosim.frontend.ptq import quantize
from photosim.hardware.config import load_hardware

TUNE = {"epochs": 1, "lr": 0.01}
BASE: dict[str, Any] = {"model": "digits-cnn", "quant": {"w_bits": 4, "a_bits": 4}, "limit": 60, "repeats": 2,
                        "hw": {"tile": 16, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.01}}}}


def test_points_without_finetune_keep_their_hashes() -> None:
    """``finetune: null`` written out, or a PTQ variant beside a fine-tuned one, hashes as a sweep that never
    heard of fine-tuning (test_sweep.py pins these hashes)."""
    pinned = {"base": {"model": "digits-cnn", "quant": {"w_bits": 6, "ptq": "equalize"},
                       "hw": {"tile": 64, "noise": {"output": {"snr_db": 30}},
                              "layers": [{"match": "fc", "adc": {"bits": 8}}]}, "finetune": None},
              "variants": {"snr": {}, "sigma": {"hw.noise.output.sigma": 0.01}}}
    sweep = load_sweep(pinned)
    assert (sweep.hash, [p.hash for p in sweep.points]) == ("6fdd41ad5238cfff", ["42bd54defbc2dbc7",
                                                                                 "4b44f6998afd099b"])
    plain = load_sweep({"base": BASE})
    both = load_sweep({"base": BASE, "variants": {"ptq": {}, "tuned": {"finetune": TUNE}}})
    assert both.base_hash == plain.base_hash
    assert [p.hash for p in both.points][0] == plain.points[0].hash
    assert both.points[1].hash != plain.points[0].hash
    assert both.points[1].config.finetune == FinetuneSection(**TUNE)


def test_finetune_keys_are_axes() -> None:
    """``finetune.epochs`` as an axis; the whole section as one, ``null`` being the PTQ point."""
    points = load_sweep({"base": {**BASE, "finetune": TUNE}, "grid": {"finetune.epochs": [1, 3]}}).points
    assert [p.config.finetune.epochs for p in points] == [1, 3]
    assert {p.config.finetune.lr for p in points} == {0.01}
    points = load_sweep({"base": BASE, "grid": {"finetune": [None, TUNE]}}).points
    assert [p.config.finetune for p in points] == [None, FinetuneSection(**TUNE)]
    assert points[0].hash == load_sweep({"base": BASE}).points[0].hash


BAD = [
    ({"base": {"finetune": {**TUNE, "epoch": 3}}}, ["finetune.epoch", "unknown key"]),
    ({"base": {"finetune": TUNE}, "grid": {"finetune.epoch": [1]}}, ["finetune.epoch", "epochs, lr, optimizer"]),
    ({"base": {"finetune": {"epochs": 0, "lr": 0.01}}}, ["finetune.epochs", "greater than or equal to 1"]),
    ({"base": {"finetune": {"lr": 0.01}}}, ["finetune.epochs", "required"]),
    ({"base": {"finetune": {**TUNE, "lr": -1}}}, ["finetune.lr", "greater than 0"]),
    ({"base": {"finetune": {**TUNE, "optimizer": "adam"}}}, ["finetune.optimizer", "'sgd'"]),
]


@pytest.mark.parametrize(("sweep", "expected"), BAD, ids=[str(s) for s, _ in BAD])
def test_bad_finetune_settings_name_the_key(sweep: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(PhotosimError) as info:
        load_sweep(sweep)
    for text in expected:
        assert text in str(info.value)


def test_cli_exits_2_naming_a_bad_finetune_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": {**BASE, "finetune": {**TUNE, "epoch": 3}}}))
    result = CliRunner().invoke(app, ["sweep", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "finetune.epoch" in result.output
    assert not (tmp_path / "out").exists()


def test_defaults_are_those_of_photosim_finetune() -> None:
    """Every setting is a keyword of photosim.finetune with its default, and of the CLI command with its default;
    epochs and lr are required in all three."""
    api = inspect.signature(finetune_module.finetune).parameters
    cli = inspect.signature(finetune_cli.finetune).parameters
    cli_names = {"batch_size": "train_batch_size"}  # the CLI's --batch-size is the engine's
    for name, field in FinetuneSection.model_fields.items():
        if name in ("epochs", "lr"):
            assert field.is_required() and api[name].default is inspect.Parameter.empty
            assert cli[name].default is inspect.Parameter.empty
            continue
        assert field.default == api[name].default, name
        if name != "weight_decay":  # the CLI has no --weight-decay
            assert field.default == cli[cli_names.get(name, name)].default, name


def test_custom_noise_with_finetune_is_refused_before_running() -> None:
    sweep = load_sweep({"base": {**BASE, "finetune": TUNE,
                                 "hw": {"noise": {"custom": {"function": "sweep_fake_runner:fake_run_point"}}}}})
    with pytest.raises(PhotosimError, match="custom noise.*fine-tuning"):
        runnable_points(sweep)
    runnable_points(load_sweep({"base": {**BASE, "hw": sweep.points[0].config.hw.model_dump()}}))  # PTQ: fine


def test_finetuned_points_are_judged_like_photosim_finetune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two seeds x (fine-tuned, PTQ): one fine-tuning serves both seeds; each row equals run_hardware on
    photosim.finetune's model (or the PTQ model) computed here directly, ideal_top1 being the judged model's."""
    calls = []
    original = finetune_module.finetune

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "finetune", counted)
    fast = {**TUNE, "labels": False}  # trains on the 180 calibration images (the train split has 1,257)
    sweep = {"base": BASE, "variants": {"tuned": {"finetune": fast}, "ptq": {}}, "grid": {"seed": [0, 1]}}
    run_sweep(sweep, tmp_path, progress=False)
    assert len(calls) == 1
    results = pd.read_csv(tmp_path / RESULTS)
    assert list(results["finetuned"]) == [True] * 4 + [False] * 4
    assert list(results["finetune.epochs"].iloc[:4]) == [1] * 4 and results["finetune.epochs"].iloc[4:].isna().all()
    assert list(results["finetune.labels"].iloc[:4]) == [False] * 4

    loaded = load_model("digits-cnn")
    calibration = load_dataset("digits", "calibration", input_shape=loaded.input_shape)
    test = DataSpec(limit=60).split("test", loaded.input_shape)
    hw = load_hardware(BASE["hw"])
    tuned = original(loaded.module, calibration, BASE["quant"], hw, **fast)
    ptq = quantize(loaded.module, calibration, BASE["quant"])
    for row, (qmodel, seed) in enumerate([(tuned, 0), (tuned, 1), (ptq, 0), (ptq, 1)]):
        expected = [100 * r["top1"] for r in run_hardware(qmodel, test, hw, calibration=calibration, repeats=2,
                                                           seed=seed).repeats]
        assert list(results["top1_pct"].iloc[2 * row:2 * row + 2]) == pytest.approx(expected, abs=1e-9)
        ideal = evaluate(qmodel, test, hw.ideal()).top1
        assert results["ideal_top1_pct"].iloc[2 * row] == pytest.approx(100 * ideal, abs=1e-9)

