"""Trust, round two: physical values the schema refuses, link budgets out of range, crafted model files,
flags that do not apply, hardware that matches nothing, and the settings every row records.

Rows are (argv, text naming the culprit) as in tests/test_trust.py; placeholders in braces are files of the
``inputs`` workspace: {model} an integer file (digits-cnn), {root} its folder, {hw_NAME} hardware YAMLs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ModelBuilder, qp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_trust import flat, invoke, no_work  # noqa: F401  (no_work is a fixture)

from photosim.engine.executor import simulate_codes
from photosim.errors import PhotosimError
from photosim.experiments import workflow
from photosim.experiments.point import BaseSection
from photosim.ir.format import METADATA_KEY, load

OUT_OF_RANGE = "leaves the range photosim can compute"
HARDWARE = {  # hardware YAMLs of the workspace, by name
    "er": "photonics: {extinction_ratio_db: 1.0e-20}\n",
    "coupling": "photonics: {coupling_loss_db: 5000}\n",
    "fanout": f"photonics: {{fan_out: {10 ** 400}}}\n",
    "dim": "photonics: {laser_power_mw: 1.0e-200}\n",
    "programming": "photonics: {programming_error: 1.0e+200}\n",
    "bright": "photonics: {laser_power_mw: 1.0e+30}\n",
    "responsivity": "photonics: {responsivity_a_per_w: 1000}\n",
    "hot": "photonics: {temperature_k: 1.0e+12}\n",
    "bool": "photonics: {temperature_k: true}\n",
    "boolfan": "photonics: {fan_out: true}\n",
    "dark": ("tile: 16\nphotonics: {laser_power_mw: 1.0e-9, coupling_loss_db: 60, waveguide_loss_db: 100, "
             "device_loss_db: 10}\n"),
    "nolayer": "noise: {output: {sigma: 0.01}}\nlayers: [{match: no_such_layer, tile: 8}]\n",
    "nan": "noise: {custom: {function: '{root}/noise.py:nan'}}\n",
    "avx2": "requant: pytorch\npytorch_cpu: avx2\n",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """An integer model, a custom noise file and the hardware YAMLs of HARDWARE (as {hw_NAME})."""
    root = tmp_path_factory.mktemp("trust_inputs")
    model = root / "model.safetensors"
    result = invoke("quantize", "--model", "digits-cnn", "--limit", "60", "-o", model)
    assert result.exit_code == 0, result.output
    (root / "noise.py").write_text("import torch\n\ndef nan(p, context):\n    return p * float('nan')\n")
    files = {"model": str(model), "root": str(root)}
    for name, text in HARDWARE.items():
        path = root / f"{name}.yaml"
        path.write_text(text.replace("{root}", str(root)))
        files[f"hw_{name}"] = str(path)
    return files


def argv(row: list[str], files: dict[str, str]) -> list[str]:
    return [arg.format(**files) for arg in row]


def _crafted(files: dict[str, str], name: str, extra: str) -> str:
    """The workspace model with ``extra`` (JSON text) added as a key of its graph document."""
    path = Path(files["root"]) / f"{name}.safetensors"
    if not path.exists():
        with safe_open(files["model"], "pt") as handle:
            text = handle.metadata()[METADATA_KEY]
        save_file(load_file(files["model"]), str(path), metadata={METADATA_KEY: f'{text[:-1]}, "x": {extra}}}'})
    return str(path)


REFUSED = [
    # physically impossible values, and booleans where numbers belong (items 6 and 12)
    (["budget", "{model}", "--hw", "{hw_er}"], "photonics.extinction_ratio_db"),
    (["budget", "{model}", "--hw", "{hw_coupling}"], "photonics.coupling_loss_db"),
    (["budget", "{model}", "--hw", "{hw_fanout}"], "photonics.fan_out"),
    (["budget", "{model}", "--hw", "{hw_dim}"], "photonics.laser_power_mw"),
    (["budget", "{model}", "--hw", "{hw_programming}"], "photonics.programming_error"),
    (["budget", "{model}", "--hw", "{hw_bright}"], "photonics.laser_power_mw"),
    (["budget", "{model}", "--hw", "{hw_responsivity}"], "photonics.responsivity_a_per_w"),
    (["budget", "{model}", "--hw", "{hw_hot}"], "photonics.temperature_k"),
    (["budget", "{model}", "--hw", "{hw_bool}"], "photonics.temperature_k: Input should be a valid number"),
    (["run", "{model}", "--hw", "{hw_boolfan}"], "photonics.fan_out: Input should be a valid integer"),
    # valid values whose link budget leaves the numbers (item 6)
    (["budget", "{model}", "--hw", "{hw_dark}"], f"the link budget of layer 'conv1' (tiles of L=9 channels) "
                                                  f"{OUT_OF_RANGE}"),
    (["run", "{model}", "--hw", "{hw_dark}", "--limit", "20"], OUT_OF_RANGE),
    (["sensitivity", "--model", "digits-cnn", "--calib-samples", "60", "--hw", "{hw_dark}"], OUT_OF_RANGE),
    # crafted graph documents (item 7)
    (["inspect", "{deep}"], "metadata is nested more than 32 levels deep"),
    (["inspect", "{bigint}"], "metadata holds an integer of 5000 digits"),
    (["run", "{deep}", "--limit", "20"], "metadata is nested more than 32 levels deep"),
    # hardware that matches nothing, noise that is not a number (item 11)
    (["sensitivity", "--model", "digits-cnn", "--calib-samples", "60", "--hw", "{hw_nolayer}"],
     "hardware layer override(s) ['no_such_layer'] match no layer of the model"),
    (["run", "{model}", "--hw", "{hw_nan}", "--limit", "20"],
     "custom noise function {root}/noise.py:nan returned NaN or infinite tile values on layer 'conv1'"),
]


@pytest.mark.parametrize(("row", "message"), REFUSED)
def test_bad_input_exits_2_naming_it(row: list[str], message: str, inputs) -> None:
    files = {**inputs, "deep": _crafted(inputs, "deep", "[" * 100_000 + "]" * 100_000),
             "bigint": _crafted(inputs, "bigint", "9" * 5000)}
    result = invoke(*argv(row, files))
    assert result.exit_code == 2, result.output
    assert message.format(**files) in flat(result)
    assert "Traceback" not in result.output


def test_a_sweep_point_out_of_the_link_budget_exits_2(inputs, tmp_path: Path) -> None:
    sweep = tmp_path / "dark.yaml"
    sweep.write_text("base: {model: digits-cnn, limit: 20, quant: {calibration_samples: 60}, hw: {tile: 16, "
                     "photonics: {laser_power_mw: 1.0e-9, coupling_loss_db: 60, waveguide_loss_db: 100, "
                     "device_loss_db: 10}}}\n")
    result = invoke("sweep", sweep, "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 2 and OUT_OF_RANGE in flat(result), result.output
    assert "Traceback" not in result.output


QUANTIZATION_FLAGS = ["--w-bits", "99", "--ptq", "bogus", "--activation-range", "x", "--output-bits", "0",
                      "--observer", "nosuch", "--config", "nosuch.yaml", "--model", "nosuch"]


def test_quantization_flags_with_a_model_file_are_refused_by_name(inputs, no_work) -> None:  # noqa: F811
    result = invoke("run", inputs["model"], *QUANTIZATION_FLAGS)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("--model, --config, --w-bits, --observer, --ptq, --activation-range, --output-bits do(es) not apply to "
            f"MODEL_FILE '{inputs['model']}'") in flat(result)
    result = invoke("run", inputs["model"], "--weights", "w.pt", "--a-bits", "4")
    assert result.exit_code == 2 and "--a-bits, --weights do(es) not apply" in flat(result)


def test_float_model_flags_apply_with_float_model(inputs, tmp_path: Path) -> None:
    result = invoke("run", inputs["model"], "--float-model", "digits-cnn", "--cifar-stem", "--limit", "20",
                    "--report", tmp_path / "r.csv")
    assert "do(es) not apply" not in flat(result)


def test_the_ideal_baseline_rounds_as_the_hardware_does(inputs, tmp_path: Path, monkeypatch) -> None:
    seen = []
    real = workflow.evaluate

    def recording(qmodel, data, hw=None, **options):
        seen.append(hw)
        return real(qmodel, data, hw, **options)

    monkeypatch.setattr(workflow, "evaluate", recording)
    report = tmp_path / "r.csv"
    result = invoke("run", inputs["model"], "--hw", inputs["hw_avx2"], "--limit", "40", "--report", report)
    assert result.exit_code == 0, result.output
    assert [(hw.requant, hw.pytorch_cpu) for hw in seen] == [("pytorch", "avx2")]
    table = pd.read_csv(report)
    assert set(table["pytorch_cpu_family"]) == {"avx2"}
    assert set(table["batch_size"]) == {256} and set(table["torch_version"]) == {torch.__version__}
    assert set(table["torch_threads"]) == {torch.get_num_threads()} and (table["samples_per_pass"] > 0).all()


def test_the_ideal_config_keeps_only_the_rounding() -> None:
    from photosim.hardware.config import load_hardware

    hw = load_hardware({"requant": "pytorch", "pytorch_cpu": "amx", "tile": 8, "noise": {"output": {"sigma": 0.1}},
                        "layers": [{"match": "fc*", "requant": "float", "tile": 4}, {"match": "conv1", "tile": 2}]})
    assert hw.ideal().model_dump(exclude_defaults=True) == {
        "requant": "pytorch", "pytorch_cpu": "amx", "layers": [{"match": "fc*", "requant": "float"}]}


def test_sweep_rows_record_the_run_settings(inputs) -> None:
    point = {**BaseSection(model="digits-cnn", limit=20, quant={"calibration_samples": 60},
                           hw={"requant": "pytorch", "pytorch_cpu": "avx2", "noise": {"output": {"sigma": 0.01}}},
                           batch_size=7).model_dump()}
    rows = workflow.run_point(point, {})
    assert {row["pytorch_cpu_family"] for row in rows} == {"avx2"}
    assert {row["samples_per_pass"] for row in rows} == {7} and {row["torch_version"] for row in rows} == {
        torch.__version__}


@pytest.mark.parametrize(("settings", "message"), [
    ({"device": "gpu"}, "point 0: unknown device 'gpu'"),
    ({"hw": {"noise": {"custom": {"function": "{root}/noise.py:missing"}}}}, "defines no 'missing'"),
    ({"hw": {"noise": {"custom": {"function": "{root}/absent.py:f"}}}}, "absent.py"),
    ({"hw": {"layers": [{"match": "conv9", "tile": 4}]}},
     "point 0: hardware layer override(s) ['conv9'] match no layer of digits-cnn; layers: conv1, pool1"),
])
def test_check_point_finds_what_only_the_run_would(settings, message, inputs) -> None:
    text = json.dumps(settings).replace("{root}", inputs["root"])
    config = BaseSection.model_validate({"model": "digits-cnn", **json.loads(text)})
    with pytest.raises(PhotosimError) as error:
        workflow.check_point(config, "point 0", {})
    assert message.format(**inputs) in str(error.value)


def test_check_point_passes_a_good_point(inputs) -> None:
    config = BaseSection.model_validate({"model": "digits-cnn", "hw": {
        "layers": [{"match": "fc*", "tile": 4}], "noise": {"custom": {"function": f"{inputs['root']}/noise.py:nan"}}}})
    names: dict[str, list[str]] = {}
    workflow.check_point(config, "point 0", names)
    assert list(names.values()) == [["conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2"]]


def test_a_null_adaptive_output_size_keeps_the_input_size(tmp_path: Path) -> None:
    m = ModelBuilder((2, 3, 5), qp(0.1, 128))
    m.add("gap", "adaptive_avgpool2d", ["x"], qp(0.05, 128), output_size=[3, 2])
    good, null = tmp_path / "good.safetensors", tmp_path / "null.safetensors"
    m.build().save(good)
    with safe_open(str(good), "pt") as handle:
        doc = json.loads(handle.metadata()[METADATA_KEY])
    doc["nodes"][0]["output_size"] = [None, 2]
    save_file(load_file(str(good)), str(null), metadata={METADATA_KEY: json.dumps(doc)})
    model = load(null)
    assert model.node("gap").attrs["output_size"] == [3, 2]
    x = torch.randint(0, 256, (4, 2, 3, 5), dtype=torch.int32)
    assert torch.equal(simulate_codes(model, x), simulate_codes(load(good), x))
    result = invoke("inspect", null)
    assert result.exit_code == 0, result.output
