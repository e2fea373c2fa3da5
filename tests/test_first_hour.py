"""Issue 23, a user's first hour: the ADC range on the command line and in every report, which images form each
split, full names when piped, user code imported from its own folder with its errors located, a quiet Ctrl-C,
no stray blank lines, plurals, HardwareRun.summary and the README's Python example run as written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from photosim.cli import app
from photosim.errors import PhotosimError
from photosim.hardware.config import hardware_with_flags, load_hardware, parse_adc_range

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
LONG = "features_block_with_a_long_descriptive_name_that_a_terminal_would_cut"


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# 1. ADC range ----------------------------------------------------------------------------------------------------

def test_adc_range_flag_parses_and_maps_to_the_config() -> None:
    assert parse_adc_range("calibrated") == "calibrated" and parse_adc_range("0.25") == 0.25
    assert hardware_with_flags(load_hardware(None), adc_bits=6, adc_range="0.5").adc.range == 0.5
    assert hardware_with_flags(load_hardware(None), adc_bits=6).adc.range == "full"  # the default: worst case
    for bad in ("0", "1.5", "half", "nan"):
        with pytest.raises(PhotosimError, match="--adc-range"):
            parse_adc_range(bad)
    with pytest.raises(PhotosimError, match="no layer has one"):
        hardware_with_flags(load_hardware(None), adc_range="calibrated")


def test_run_shows_the_adc_range_in_the_header_and_layer_report(tmp_path: Path) -> None:
    layers = tmp_path / "layers.csv"
    result = invoke("run", "--model", "digits-cnn", "--limit", "30", "--adc-bits", "6", "--adc-range", "0.25",
                    "--layer-report", layers)
    assert result.exit_code == 0, result.output
    assert "ADC: 6-bit, range 0.25 of full scale" in result.output
    frame = pd.read_csv(layers)
    assert set(frame["adc_range"]) == {"fraction"} and (frame["adc_range_fraction"] == 0.25).all()
    assert (frame["adc_range_value"] > 0).all()
    result = invoke("run", "--model", "digits-cnn", "--limit", "30", "--adc-bits", "6", "--layer-report", layers)
    assert "ADC: 6-bit, full-scale range (worst case)" in result.output and "--adc-range calibrated" in result.output
    assert set(pd.read_csv(layers)["adc_range"]) == {"full"}
    result = invoke("run", "--model", "digits-cnn", "--limit", "30", "--adc-bits", "6", "--adc-range", "calibrated",
                    "--layer-report", layers)
    assert result.exit_code == 0 and "ADC: 6-bit, calibrated range" in result.output
    frame = pd.read_csv(layers)
    assert set(frame["adc_range"]) == {"calibrated"} and (frame["adc_range_fraction"] < 1).all()
    result = invoke("run", "--model", "digits-cnn", "--limit", "30")
    assert "ADC: ideal readout (no ADC)" in result.output
    for bad in (["--adc-range", "2", "--adc-bits", "6"], ["--adc-range", "full"]):
        result = invoke("run", "--model", "digits-cnn", "--limit", "30", *bad)
        assert result.exit_code == 2 and "--adc-range" in result.output and "Traceback" not in result.output


# 2. Which images -------------------------------------------------------------------------------------------------

def test_data_command_says_which_images_form_each_split() -> None:
    from photosim.frontend.data import load_dataset, split_indices

    result = invoke("data")
    assert result.exit_code == 0, result.output
    for text in ("digits", "calibration", "positions 0..359", "divided by 16", "cifar10", "random labels"):
        assert text in result.output
    result = invoke("data", "digits", "--split", "test", "--indices")
    shown = [int(i) for i in result.output.strip().split(",")]
    assert shown == split_indices("digits", "test") and len(shown) == len(load_dataset("digits", "test")) == 360
    train, calibration = set(split_indices("digits", "train")), set(split_indices("digits", "calibration"))
    assert not (set(shown) & train or set(shown) & calibration or train & calibration)
    assert invoke("data", "nosuch").exit_code == 2 and invoke("data", "digits", "--indices").exit_code == 2


def test_synthetic_data_warns_that_accuracy_is_meaningless() -> None:
    result = invoke("eval", "--model", "digits-cnn", "--data", "synthetic", "--limit", "20")
    assert result.exit_code == 0 and "random labels" in result.output and "chance level" in result.output
    assert "random labels" not in invoke("eval", "--model", "digits-cnn", "--limit", "20").output


# 7. Full names when piped; 9. no blank lines, plurals -------------------------------------------------------------

def _long_model(folder: Path) -> Path:
    (folder / "long_helper.py").write_text("CHANNELS = 4\n")
    path = folder / "long_model.py"
    path.write_text(textwrap.dedent(f"""
        from torch import nn
        from long_helper import CHANNELS  # a module beside the file: imported without PYTHONPATH

        class Net(nn.Module):
            input_shape = (1, 8, 8)

            def __init__(self):
                super().__init__()
                self.{LONG} = nn.Conv2d(1, CHANNELS, 3, padding=1)
                self.relu = nn.ReLU()
                self.flatten = nn.Flatten()
                self.fc = nn.Linear(CHANNELS * 64, 10)

            def forward(self, x):
                return self.fc(self.flatten(self.relu(self.{LONG}(x))))
        """))
    return path


@pytest.fixture(scope="module")
def long_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long")
    out = folder / "long.safetensors"
    result = invoke("quantize", "--model", f"{_long_model(folder)}:Net", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_piped_output_keeps_full_names(long_file: Path) -> None:
    result = invoke("inspect", long_file)
    assert result.exit_code == 0 and LONG in result.output and "…" not in result.output
    result = invoke("budget", long_file, "--hw", "microring-weight-bank")
    assert result.exit_code == 0 and LONG in result.output and "…" not in result.output
    result = invoke("run", long_file, "--adc-bits", "8", "--limit", "20")
    assert result.exit_code == 0, result.output
    assert LONG in result.output and "…" not in result.output
    assert result.output.splitlines()[0].strip(), "run starts with its header, not blank lines"
    assert "1 repeat," in result.output and "hardware (1 repeat)" in result.output and "(s)" not in result.output


# 8. User code ----------------------------------------------------------------------------------------------------

def test_user_code_errors_name_the_file_and_line(tmp_path: Path) -> None:
    model = tmp_path / "broken_model.py"
    model.write_text("def build():\n    x = 1\n    raise ValueError('my bug')\n")
    result = invoke("eval", "--model", f"{model}:build", "--limit", "5")
    assert result.exit_code == 2 and "my bug" in result.output and "Traceback" not in result.output
    assert f"{model}, line 3" in result.output
    bad_import = tmp_path / "bad_import.py"
    bad_import.write_text("import no_such_module_beside_it\n")
    result = invoke("eval", "--model", f"{bad_import}:build")
    assert result.exit_code == 2 and f"{bad_import}, line 1" in result.output
    script = tmp_path / "torch_script.py"
    script.write_text("def build():\n    return helper()\n\n\ndef helper():\n    return 1 / 0\n")
    result = invoke("import-torch", f"{script}:build", "-o", tmp_path / "t.safetensors")
    assert result.exit_code == 2 and f"{script}, line 6" in result.output and "ZeroDivisionError" in result.output


def test_custom_noise_error_names_the_file_and_line(tmp_path: Path, long_file: Path) -> None:
    (tmp_path / "noise_helper.py").write_text("SCALE = 'not a number'\n")
    noise = tmp_path / "my_noise.py"
    noise.write_text("from noise_helper import SCALE\n\n\ndef noisy(p, context):\n    return p * SCALE\n")
    hw = tmp_path / "hw.yaml"
    hw.write_text(f"noise: {{custom: {{function: '{noise}:noisy'}}}}\n")
    result = invoke("run", long_file, "--hw", hw, "--limit", "5")
    assert result.exit_code == 2 and f"{noise}, line 5" in result.output and "Traceback" not in result.output


# 9. Quiet Ctrl-C on a sweep --------------------------------------------------------------------------------------

SLEEPY = textwrap.dedent("""
    import sys, time
    from photosim.experiments.executors import execute

    def runner(point, cache):
        if point["slow"]:
            time.sleep(60)
        return [{"x": point["i"]}]

    if __name__ == "__main__":
        groups = [[(0, {"i": 0, "slow": False})], [(1, {"i": 1, "slow": True})], [(2, {"i": 2, "slow": True})]]
        try:
            for index, rows, _ in execute(groups, runner, workers=2):
                print("finished", index, flush=True)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
""")


def test_ctrl_c_stops_local_workers_without_their_tracebacks(tmp_path: Path) -> None:
    script = tmp_path / "sleepy.py"
    script.write_text(SLEEPY)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "finished 0"
    time.sleep(1.0)  # the other workers are inside their sleeping points
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    start = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - start < 20
    assert err.strip() == "interrupted" and "Traceback" not in err and "KeyboardInterrupt" not in err


# 10. HardwareRun.summary and the README's Python API example ------------------------------------------------------

def test_hardware_run_summary_has_mean_std_and_ci() -> None:
    from photosim.experiments.workflow import HardwareRun

    run = HardwareRun([{"repeat": r, "top1": t, "top5": None} for r, t in enumerate((0.9, 0.8, 1.0))],
                      pd.DataFrame())
    row = run.summary().iloc[0]
    assert row["n"] == 3 and row["top1_mean"] == pytest.approx(0.9) and row["top1_std"] == pytest.approx(0.1)
    assert row["top1_ci95"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5) and "top5_mean" not in row
    with pytest.raises(PhotosimError, match="no metric 'energy'"):
        run.summary(["energy"])


def test_readme_python_api_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes m.safetensors
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    summary = namespace["run"].summary()
    assert int(summary["n"].iloc[0]) == 5 and 0.5 < summary["top1_mean"].iloc[0] <= 1
    assert namespace["logits"].shape == (32, 10) and (tmp_path / "m.safetensors").is_file()
