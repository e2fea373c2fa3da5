"""Settings: one merge rule (dotted keys, exclusive groups) for CLI flags, per-layer overrides and sweep axes;
bad config input exits 2 naming the culprit and is never silently accepted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from photosim._config import LayerOverride, merge_settings, with_overrides
from photosim._yaml import MAX_YAML_BYTES, read_yaml
from photosim.cli import app
from photosim.errors import PhotosimError
from photosim.experiments.sweep import load_sweep
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.config import HardwareConfig, OutputNoise, hardware_with_flags, load_hardware
from photosim.hardware.noise import sigma_from_enob, sigma_from_snr_db

SNR40, ENOB6 = sigma_from_snr_db(40), sigma_from_enob(6)


def words(text: str) -> str:
    """Terminal output with line wrapping undone."""
    return " ".join(text.split())


# --- one merge rule ---------------------------------------------------------------------------------------------

MERGES = [  # (base, updates, merged)
    ({"tile": 8}, {"adc.bits": 6}, {"tile": 8, "adc": {"bits": 6}}),
    ({"adc": {"bits": 8, "range": "full"}}, {"adc.bits": 4}, {"adc": {"bits": 4, "range": "full"}}),
    ({"adc": {"bits": 8, "range": "full"}}, {"adc": {"bits": 4}}, {"adc": {"bits": 4}}),  # a section replaced
    ({"noise": {"output": {"snr_db": 40}}}, {"noise.output.sigma": 0.1}, {"noise": {"output": {"sigma": 0.1}}}),
    ({"noise": {"output": {"sigma": 0.1, "snr_db": None, "enob": None}}}, {"noise.output.enob": 6},
     {"noise": {"output": {"enob": 6}}}),
    ({"noise": {"output": {"sigma": 0.1}}}, {"noise.output.snr_db": 30, "noise.output.enob": 5},
     {"noise": {"output": {"enob": 5}}}),  # the later of two updates wins
    ({"noise": {"shot": {"sigma": 0.1}}}, {"noise.shot.sigma": 0.2}, {"noise": {"shot": {"sigma": 0.2}}}),
]


@pytest.mark.parametrize(("base", "updates", "merged"), MERGES, ids=[str(u) for _, u, _ in MERGES])
def test_merge_settings_sets_keys_and_drops_the_rest_of_an_exclusive_group(
        base: dict[str, Any], updates: dict[str, Any], merged: dict[str, Any]) -> None:
    before = repr(base)
    assert merge_settings(HardwareConfig, base, updates) == merged
    assert repr(base) == before  # the base is not modified


def _by_flag(base: dict[str, Any], key: str, value: float) -> OutputNoise:
    assert key == "sigma"  # the only noise flag: --noise SIGMA
    return hardware_with_flags(load_hardware({"noise": {"output": base}}), noise=value).noise.output


def _by_layer(base: dict[str, Any], key: str, value: float) -> OutputNoise:
    hw = load_hardware({"noise": {"output": base}, "layers": [{"match": "fc*", "noise": {"output": {key: value}}}]})
    assert hw.for_layer("conv1").noise.output == OutputNoise(**base)  # unmatched layers keep the global setting
    return hw.for_layer("fc1").noise.output


def _by_axis(base: dict[str, Any], key: str, value: float) -> OutputNoise:
    sweep = load_sweep({"base": {"hw": {"noise": {"output": base}}}, "grid": {f"hw.noise.output.{key}": [value]}})
    return sweep.points[0].config.hw.noise.output


PATHS = {"flag": _by_flag, "layer": _by_layer, "axis": _by_axis}
EXCLUSIVE = [  # (path, base output noise, key set later, value, sigma used, what the merged setting says)
    ("flag", {"snr_db": 40}, "sigma", 0.02, 0.02, {"sigma": 0.02, "snr_db": None, "enob": None}),
    ("flag", {"enob": 8}, "sigma", 0.0, 0.0, {"sigma": 0.0, "snr_db": None, "enob": None}),
    ("layer", {"enob": 6}, "sigma", 0.1, 0.1, {"sigma": 0.1, "snr_db": None, "enob": None}),
    ("layer", {"sigma": 0.1}, "snr_db", 40, SNR40, {"sigma": None, "snr_db": 40, "enob": None}),
    ("layer", {"snr_db": 40}, "enob", 6, ENOB6, {"sigma": None, "snr_db": None, "enob": 6}),
    ("axis", {"snr_db": 40}, "sigma", 0.02, 0.02, {"sigma": 0.02, "snr_db": None, "enob": None}),
    ("axis", {"sigma": 0.02}, "enob", 6, ENOB6, {"sigma": None, "snr_db": None, "enob": 6}),
    ("axis", {"enob": 6}, "snr_db", 40, SNR40, {"sigma": None, "snr_db": 40, "enob": None}),
]


@pytest.mark.parametrize(("path", "base", "key", "value", "sigma", "dump"), EXCLUSIVE,
                         ids=[f"{p}-{k}-over-{next(iter(b))}" for p, b, k, *_ in EXCLUSIVE])
def test_the_later_noise_setting_wins_in_every_path(path: str, base: dict[str, Any], key: str, value: float,
                                                    sigma: float, dump: dict[str, Any]) -> None:
    noise = PATHS[path](base, key, value)
    assert noise.sigma == pytest.approx(sigma)
    assert noise.model_dump() == dump


def test_flag_over_a_shipped_preset_given_as_enob() -> None:
    preset = load_hardware("photonic-8bit")
    assert preset.noise.output.enob == 8 and preset.noise.output.sigma == pytest.approx(sigma_from_enob(8))
    flagged = hardware_with_flags(preset, noise=0.003, tile=16)
    assert (flagged.noise.output.sigma, flagged.noise.output.enob, flagged.tile) == (0.003, None, 16)
    assert flagged.adc == preset.adc and flagged.noise.weight_static == preset.noise.weight_static


def test_noise_is_normalised_to_sigma_and_dumps_as_given() -> None:
    for given, sigma in (({"snr_db": 40}, SNR40), ({"enob": 6}, ENOB6), ({"sigma": 0.03}, 0.03), ({}, None)):
        noise = OutputNoise(**given)
        assert noise.sigma == (pytest.approx(sigma) if sigma else None)
        assert noise.resolved_sigma == pytest.approx(sigma or 0.0)
        assert noise.model_dump(exclude_unset=True) == given
        assert OutputNoise.model_validate(noise.model_dump()) == noise  # a dump validates back


def test_one_input_giving_two_keys_of_a_group_is_still_refused() -> None:
    with pytest.raises(PhotosimError, match="noise.output.*give one of sigma, snr_db or enob, not sigma and enob"):
        load_hardware({"noise": {"output": {"sigma": 0.1, "enob": 6}}})
    with pytest.raises(PhotosimError, match="layers.0.noise.output.*not snr_db and enob"):
        load_hardware({"layers": [{"match": "fc", "noise": {"output": {"snr_db": 30, "enob": 6}}}]})


def test_per_layer_overrides_merge_leaves_and_survive_a_dump() -> None:
    hw = load_hardware({"tile": 64, "adc": {"bits": 8, "range": "calibrated"}, "noise": {"shot": {"sigma": 0.1}},
                        "layers": [{"match": "conv*", "adc": {"bits": None}, "noise": {"output": {"enob": 6}}},
                                   {"match": "conv1", "tile": None}]})
    conv1 = hw.for_layer("conv1")
    assert (conv1.tile, conv1.adc.bits, conv1.adc.range, conv1.noise.shot.sigma) == (None, None, "calibrated", 0.1)
    assert conv1.noise.output.sigma == pytest.approx(ENOB6)
    assert hw.for_layer("conv2").tile == 64 and hw.for_layer("fc").adc.bits == 8
    assert hw.model_dump()["layers"] == [{"match": "conv*", "adc": {"bits": None}, "noise": {"output": {"enob": 6}}},
                                         {"match": "conv1", "tile": None}]
    again = load_hardware(hw.model_dump(mode="json"))  # what a sweep point hands its runner
    assert all(again.for_layer(n) == hw.for_layer(n) for n in ("conv1", "conv2", "fc"))


def test_quant_overrides_use_the_same_machinery() -> None:
    spec = QuantSpec(w_bits=4, a_bits=4, layers=[{"match": "conv*", "w_bits": 8}, {"match": "conv1", "a_bits": 6}])
    assert (spec.for_layer("conv1").w_bits, spec.for_layer("conv1").a_bits) == (8, 6)
    assert (spec.for_layer("fc").w_bits, spec.for_layer("fc").a_bits) == (4, 4)
    assert isinstance(spec.layers[0], LayerOverride)
    assert isinstance(load_hardware({"layers": [{"match": "fc"}]}).layers[0], LayerOverride)
    assert spec.unmatched_overrides(["conv1", "fc"]) == []
    assert with_overrides(spec, w_bits=6, a_bits=None).for_layer("fc").w_bits == 6
    assert QuantSpec.model_validate(spec.model_dump()) == spec


def test_points_and_hashes_are_unchanged() -> None:
    """Point hashes are a pure function of the configuration: the unified merge rule kept those of the code before it
    (these values add the `pytorch_cpu` hardware setting, which every point config now holds, and the quantization
    keys of issue 14, `activation_range`, `output_bits` and `ptq`, whose defaults change low-bit results)."""
    expected = {
        "6035fb94edc58f3d": ({"base": {"hw": {"noise": {"output": {"snr_db": 40}}}}, "grid": {"quant.w_bits": [8, 4]}},
                             ["38b33b7d87c05729", "dc793760afc2b89c"]),
        "541c9d391420a434": ({"base": {"hw": {"tile": 64, "adc": {"bits": 8, "range": "calibrated"},
                                              "noise": {"output": {"enob": 8}, "weight_static": {"sigma": 0.002}}}},
                              "grid": {"hw.noise.output.enob": [6, 8]}}, ["14f9f6399d5e0557", "fe9f069c5ed96ae5"]),
        "0a64a4ce3fa34e9a": ({"grid": {"hw.noise.output.sigma": [0.0, 0.01]},
                              "variants": {"a": {"model": "digits-cnn"}, "b": {"quant.w_bits": 4}}},
                             ["d7474b825db53f46", "fec0c2502beb953a", "d0b66a4243627ab0", "7db01fe536243a90"]),
    }
    for sweep_hash, (config, point_hashes) in expected.items():
        sweep = load_sweep(config)
        assert (sweep.hash, [p.hash for p in sweep.points]) == (sweep_hash, point_hashes)


# --- bad input: exit 2, no traceback, the culprit named ---------------------------------------------------------

ALIAS_BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]) + "\nnoise: {output: {sigma: 0.1}}\n"
BAD_HW = [  # (hw YAML text, texts the message must contain)
    ("noise: {output: {snr_db: .nan}}\n", ["noise.output.snr_db", "finite"]),
    ("noise: {output: {sigma: .inf}}\n", ["noise.output.sigma", "finite"]),
    ("noise: {output: {enob: .inf}}\n", ["noise.output.enob", "finite"]),
    ("adc: {bits: 8, range: calibrated, percentile: .nan}\n", ["adc.percentile"]),
    ("adc: {bits: 8, range: .inf}\n", ["adc.range", "finite"]),
    ("noise: {weight_static: {sigma: -.inf}}\n", ["noise.weight_static.sigma"]),
    ("tile: 16\nadc: {bits: 8}\ntile: 32\n", ["duplicate key 'tile'", "first given on line 1", "line 3"]),
    ("adc: {bits: 8, bits: 4}\n", ["duplicate key 'bits'", "line 1"]),
    ("layers:\n  - {match: fc, requant: doublefloat}\n", ["layers.0.requant", "Input should be", "fixedpoint"]),
    ("requant: pytorch\npytorch_cpu: arm\n", ["pytorch_cpu", "avx512-vnni"]),
    ("layers:\n  - {match: fc, adc: null}\n", ["layers.0.adc"]),
    (ALIAS_BOMB, ["aliases", str(100_000)]),
    ("a: &a [*a]\n", ["recursive alias"]),
]


@pytest.mark.parametrize(("text", "expected"), BAD_HW, ids=[t[:30] for t, _ in BAD_HW])
def test_bad_hardware_file_exits_2(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text(text)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["run", "--hw", str(path), "--limit", "10"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and str(path) in words(result.output)
    for fragment in expected:
        assert fragment in words(result.output)
    assert time.perf_counter() - start < 20  # refused before any model is built


@pytest.mark.parametrize(("args", "expected"), [
    (["--noise", "inf"], ["noise.output.sigma", "finite"]),
    (["--noise", "nan"], ["noise.output.sigma", "finite"]),
    (["--requant", "bogus"], ["requant", "Input should be"]),
    (["--percentile", "nan"], ["percentile"]),
    (["--config", "QUANT"], ["duplicate key 'w_bits'"]),
], ids=["noise-inf", "noise-nan", "requant", "percentile-nan", "quant-duplicate"])
def test_bad_flags_exit_2(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    quant = tmp_path / "quant.yaml"
    quant.write_text("w_bits: 8\nw_bits: 4\n")
    result = CliRunner().invoke(app, ["run", *[str(quant) if a == "QUANT" else a for a in args], "--limit", "10"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in words(result.output)


def test_oversized_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(PhotosimError, match="larger than 1 MiB"):
        read_yaml(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("common: &c {bits: 8, range: full}\nadc:\n  <<: *c\n  bits: 4\n")
    assert read_yaml(path)["adc"] == {"bits": 4, "range": "full"}


BAD_SWEEPS = [  # (sweep YAML text, texts the message must contain)
    ("", ["sweep needs a `base` section", "sets none"]),
    ("# only a comment\n", ["sweep needs a `base` section"]),
    ("name: empty\ndescription: nothing to run\n", ["sweep needs a `base` section"]),
    ("grid: {}\nvariants: {}\n", ["sweep needs a `base` section"]),
    ("base: {seed: -1}\n", ["base.seed", "greater than or equal to 0"]),
    ("base: {model: digits-cnn}\ngrid: {seed: [0, -3]}\n", ["point 1", "seed", "greater than or equal to 0"]),
    ("grid: {hw.noise.output.snr_db: [40, .nan]}\n", ["point 1", "hw.noise.output.snr_db", "finite"]),
    ("grid: {quant.percentile: [.nan]}\n", ["quant.percentile"]),
    ("base: {hw: {layers: [{match: fc, requant: exact}]}}\n", ["hw.layers.0.requant", "Input should be"]),
    ("base: {model: digits-cnn}\nbase: {model: digits-resnet}\n", ["duplicate key 'base'", "line 2"]),
    ("grid: {quant.w_bits: [8, 4]}\ngrid: {quant.a_bits: [8]}\n", ["duplicate key 'grid'"]),
    ("base: {weights: missing.pt, model: torchvision:resnet18}\n", ["'missing.pt' does not exist"]),  # preflight
    ("base: {model: no-such-net}\n", ["unknown model 'no-such-net'"]),
    ("base: {data: no-such-data}\n", ["unknown dataset 'no-such-data'"]),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize(("text", "expected"), BAD_SWEEPS, ids=[t[:40] or "empty" for t, _ in BAD_SWEEPS])
def test_bad_sweep_file_exits_2_in_dry_run_as_in_a_run(tmp_path: Path, text: str, expected: list[str],
                                                       dry_run: bool) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", str(path), "-o", str(out), "--no-progress",
                                      *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in words(result.output)
    assert not out.exists()


def test_a_sweep_with_only_base_is_one_point(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"base": {"model": "digits-cnn"}}))
    sweep = load_sweep(path)
    assert [(p.index, p.label) for p in sweep.points] == [(0, "base")]
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0 and "1 point of" in result.output


def test_dry_run_checks_executor_options_too(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"base": {"model": "digits-cnn"}}))
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--workers", "0"])
    assert result.exit_code == 2 and "--workers must be a positive integer" in words(result.output)
