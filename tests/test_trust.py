"""The trust contract: a model file never runs code, nothing a user owns is overwritten, bad input exits 2.

Each table row is (argv, text naming the culprit). Placeholders in braces are files of the ``ws``
workspace: {model} an integer file, {weights} a state_dict, {config} a quant YAML, {hw} a hardware YAML,
{net} a model script (``{net}:Net``), {script} an import-torch script, {results} a sweep results.csv,
{dir} a folder, {missing} a path in a missing folder, {mw} an integer file whose provenance records {weights},
{pagemap} one whose provenance records /proc/self/pagemap, {loop} a symlink to itself, {fifo} a named pipe,
{huge} a sparse 17 GiB file, {sweep} a sweep file, {presets} the shipped presets' folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from sweep_fake_runner import fake_run_point
from typer.testing import CliRunner

from photosim._config import PRESETS_DIR
from photosim.cli import app
from photosim.experiments import sweep as sweep_module
from photosim.frontend.models import DigitsCNN
from photosim.ir.format import load

runner = CliRunner()
NET = "import torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x\n"


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def flat(result) -> str:
    """The output as one line (rich wraps long messages)."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A workspace of input files, one per kind a command reads."""
    root = tmp_path_factory.mktemp("trust")
    files = {name: root / name for name in ("model.safetensors", "w.pt", "q.yaml", "hw.yaml", "net.py",
                                             "ptq.py", "results.csv", "dir")}
    result = invoke("quantize", "--model", "digits-cnn", "--limit", "60", "-o", files["model.safetensors"])
    assert result.exit_code == 0, result.output
    torch.save(DigitsCNN().state_dict(), files["w.pt"])
    files["q.yaml"].write_text("w_bits: 8\n")
    files["hw.yaml"].write_text("tile: 16\n")
    files["net.py"].write_text(NET)
    files["ptq.py"].write_text("def build():\n    raise RuntimeError('must not run')\n")
    pd.DataFrame({"a": [1, 2], "top1": [0.5, 0.6]}).to_csv(files["results.csv"], index=False)
    files["dir"].mkdir()
    qmodel = load(files["model.safetensors"])
    for name, weights in (("mw.safetensors", files["w.pt"]), ("pagemap.safetensors", "/proc/self/pagemap")):
        qmodel.provenance = {"model": "digits-cnn", "weights": str(weights), "weights_sha256": "0"}
        qmodel.save(root / name)
    (root / "loop").symlink_to(root / "loop")
    os.mkfifo(root / "fifo")
    with open(root / "huge.pt", "wb") as huge:
        huge.truncate(17 << 30)  # sparse: no disk used
    (root / "sweep.yaml").write_text("base: {model: digits-cnn, limit: 60}\ngrid: {quant.w_bits: [8, 6]}\n")
    return {"model": files["model.safetensors"], "weights": files["w.pt"], "config": files["q.yaml"],
            "hw": files["hw.yaml"], "net": files["net.py"], "script": files["ptq.py"],
            "results": files["results.csv"], "dir": files["dir"], "missing": root / "no-such-folder" / "out.csv",
            "mw": root / "mw.safetensors", "pagemap": root / "pagemap.safetensors", "loop": root / "loop",
            "fifo": root / "fifo", "huge": root / "huge.pt", "sweep": root / "sweep.yaml", "presets": PRESETS_DIR,
            "root": root}


def argv(row: list[str], ws: dict[str, Path]) -> list[str]:
    return [arg.format(**ws) for arg in row]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: a refused command changes none of them."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def no_work(monkeypatch) -> None:
    """Fail the test if a command starts loading a model, a file or data: it must refuse before."""
    def started(*_args, **_kwargs):
        raise AssertionError("the command started working before refusing its arguments")

    for target in ("photosim.frontend.models.load_model", "photosim.ir.format.load",
                   "photosim.frontend.torch_import.import_torch", "photosim.experiments.plot.plot_results",
                   "photosim.experiments.bench.run_benchmark"):
        monkeypatch.setattr(target, started)


REFUSED_BEFORE_WORK = [
    # an output equal to an input, for each output flag
    (["quantize", "--model", "digits-cnn", "--weights", "{weights}", "-o", "{weights}"], "same file as --weights"),
    (["quantize", "--model", "digits-cnn", "--config", "{config}", "--output", "{config}"], "same file as --config"),
    (["quantize", "--model", "{net}:Net", "-o", "{net}"], "same file as --model"),
    (["run", "{model}", "--report", "{model}"], "same file as MODEL_FILE"),
    (["run", "{model}", "--hw", "{hw}", "--layer-report", "{hw}"], "same file as --hw"),
    (["run", "--model", "digits-cnn", "--weights", "{weights}", "--layer-report", "{weights}"],
     "same file as --weights"),
    (["run", "{model}", "--float-model", "{net}:Net", "--report", "{net}"], "same file as --float-model"),
    (["run", "{model}", "--report", "{root}/r.csv", "--layer-report", "{root}/r.csv"], "another output"),
    (["import-torch", "{script}:build", "-o", "{script}"], "same file as SPEC"),
    (["plot", "{results}", "--x", "a", "-o", "{results}"], "same file as RESULTS"),
    (["bench", "--model", "{net}:Net", "--json", "{net}"], "same file as --model"),
    # an output equal to a file an input leads to: the weights a model file records, a preset named by its stem
    (["run", "{mw}", "--report", "{weights}"], "'{weights}' is the same file as the weights recorded in "
                                               "MODEL_FILE '{mw}'"),
    (["run", "{mw}", "--layer-report", "{weights}"], "same file as the weights recorded in MODEL_FILE '{mw}'"),
    (["budget", "{model}", "--hw", "microring-weight-bank", "--report",
      "{presets}/hw/microring-weight-bank.yaml"], "same file as the shipped preset of --hw 'microring-weight-bank'"),
    (["mixed-precision", "--config", "w4a4-first-last-8bit", "-o", "{presets}/quant/w4a4-first-last-8bit.yaml"],
     "same file as the shipped preset of --config 'w4a4-first-last-8bit'"),
    (["run", "{model}", "--hw", "photonic-8bit", "--report", "{presets}/hw/photonic-8bit.yaml"],
     "same file as the shipped preset of --hw 'photonic-8bit'"),
    # outputs that cannot be written: a folder, a missing folder, /proc, a device
    (["quantize", "--model", "digits-cnn", "-o", "{dir}"], "is a directory"),
    (["import-torch", "{script}:build", "-o", "{dir}"], "is a directory"),
    (["run", "{model}", "--report", "{dir}"], "is a directory"),
    (["run", "{model}", "--report", "{missing}"], "no-such-folder' does not exist; create it first"),
    (["plot", "{results}", "--x", "a", "-o", "{missing}"], "no-such-folder' does not exist"),
    (["bench", "--json", "{missing}"], "no-such-folder' does not exist"),
    (["run", "{model}", "--layer-report", "/proc/photosim.csv"], "folder '/proc' refuses new files"),
    (["bench", "--json", "/proc/self/photosim.json"], "refuses new files"),
    (["quantize", "--model", "digits-cnn", "-o", "/dev/null"], "not a regular file"),
    (["run", "{model}", "--report", "{loop}"], "--report '{loop}' is a symlink loop"),
    (["quantize", "--model", "digits-cnn", "-o", "{loop}"], "--output '{loop}' is a symlink loop"),
    (["plot", "{results}", "--x", "a", "-o", "{root}/plot.xyz"], "its suffix .xyz is no image format"),
    (["plot", "{results}", "--x", "a", "-o", "{root}/plot"], "it has no suffix naming a format; end the file "
                                                             "name with one of .avif, .eps,"),
    # sweep folders that cannot hold results: a file, a kernel folder, a symlink loop; a malformed Ray address
    (["sweep", "{sweep}", "-o", "{results}"], "sweep output -o '{results}' is a file, not a folder"),
    (["sweep", "{sweep}", "-o", "/proc/photosim-sweep"], "lies in a kernel folder"),
    (["sweep", "{sweep}", "-o", "/sys/photosim-sweep"], "lies in a kernel folder"),
    (["sweep", "{sweep}", "-o", "{loop}"], "sweep output -o '{loop}' is a symlink loop"),
    (["sweep", "{sweep}", "-o", "{root}/ray-out", "--executor", "ray", "--address", "127.0.0.1:"],
     "--address '127.0.0.1:' is not HOST:PORT"),
    # a folder where a file is expected
    (["run", "{dir}"], "MODEL_FILE '{dir}' is a directory"),
    (["inspect", "{dir}"], "model file '{dir}' is a directory"),
    (["quantize", "--model", "digits-cnn", "--weights", "{dir}", "-o", "{root}/m.safetensors"],
     "--weights '{dir}' is a directory"),
    (["quantize", "--model", "digits-cnn", "--config", "{dir}", "-o", "{root}/m.safetensors"],
     "--config '{dir}' is a directory"),
    (["run", "{model}", "--hw", "{dir}"], "--hw '{dir}' is a directory"),
    (["plot", "{dir}", "--x", "a"], "RESULTS '{dir}' is a directory"),
    (["eval", "--weights", "{dir}"], "--weights '{dir}' is a directory"),
    # a device where a file is expected
    (["run", "{model}", "--hw", "/dev/null"], "--hw '/dev/null' is not a regular file"),
    (["run", "{fifo}"], "MODEL_FILE '{fifo}' is not a regular file"),
    (["plot", "{fifo}", "--x", "a"], "RESULTS '{fifo}' is not a regular file"),
    (["inspect", "{fifo}"], "MODEL_FILE '{fifo}' is not a regular file"),
    # kernel files whose size is not their content
    (["run", "/proc/self/pagemap"], "MODEL_FILE '/proc/self/pagemap' is a kernel file under /proc"),
    (["quantize", "--model", "digits-cnn", "--weights", "/proc/self/pagemap", "-o", "{root}/m.safetensors"],
     "--weights '/proc/self/pagemap' is a kernel file under /proc"),
    # devices
    (["bench", "--device", "gpu"], "unknown device 'gpu'"),
    (["run", "{model}", "--device", "tpu"], "unknown device 'tpu'"),
    (["bench", "--device", "meta"], "unknown device 'meta'"),
    (["run", "{model}", "--device", "meta"], "unknown device 'meta'"),
    # options that only make sense together
    (["run", "--float-model", "digits-cnn"], "--float-model 'digits-cnn' needs a model file"),
]


@pytest.mark.parametrize(("row", "message"), REFUSED_BEFORE_WORK)
def test_bad_arguments_are_refused_before_any_work(row: list[str], message: str, ws, no_work) -> None:
    before = snapshot(ws["root"])
    result = invoke(*argv(row, ws))
    assert result.exit_code == 2, result.output
    assert message.format(**ws) in flat(result)
    assert "Traceback" not in result.output
    assert snapshot(ws["root"]) == before  # nothing overwritten, no probe or temp file left behind


REFUSED = [
    (["run", "--model", "[/x]", "--limit", "60"], "unknown model '[/x]'"),
    (["eval", "--model", "[bold]x[/bold]"], "unknown model '[bold]x[/bold]'"),
    (["run", "--seed", "-1"], "--seed"),
    (["run", "{model}", "--hw", "{root}/boom.yaml", "--limit", "60"],
     "custom noise function {root}/noise.py:boom raised ZeroDivisionError on layer 'conv1'"),
    (["run", "{model}", "--hw", "{root}/shape.yaml", "--limit", "60"],
     "custom noise function {root}/noise.py:scalar returned float on layer 'conv1'"),
    (["run", "{model}", "--weights", "{root}/mismatch.pt", "--float-model", "digits-cnn", "--limit", "60"],
     "does not match the model: unexpected keys [extra]; check"),
    (["run", "{pagemap}", "--limit", "60"], "weights file named in the model file's provenance "
                                            "'/proc/self/pagemap' is a kernel file under /proc"),
    (["eval", "--model", "digits-cnn", "--weights", "{huge}"], "weights file '{huge}' is 17.0 GiB, over "
                                                                "photosim's limit of 16 GiB"),
    (["run", "{model}", "--repeats", "100000000", "--limit", "60"], "Invalid value for '--repeats': Input should "
                                                                     "be less than or equal to 10000"),
]


@pytest.fixture
def noise_configs(ws) -> None:
    """Hardware YAMLs whose custom noise function raises or returns a scalar; a state_dict with one key too many."""
    (ws["root"] / "noise.py").write_text("def boom(p, context):\n    return 1 / 0\n\n"
                                         "def scalar(p, context):\n    return 0.5\n")
    for name, function in (("boom", "boom"), ("shape", "scalar")):
        spec = f"{ws['root']}/noise.py:{function}"
        (ws["root"] / f"{name}.yaml").write_text(f"noise: {{custom: {{function: '{spec}'}}}}\n")
    torch.save({**DigitsCNN().state_dict(), "extra": torch.zeros(1)}, ws["root"] / "mismatch.pt")


@pytest.mark.parametrize(("row", "message"), REFUSED)
def test_bad_input_found_while_working_exits_2(row: list[str], message: str, ws, noise_configs) -> None:
    result = invoke(*argv(row, ws))
    assert result.exit_code == 2, result.output
    assert message.format(**ws) in flat(result)
    assert "Traceback" not in result.output


def test_relative_code_paths_stay_inside_the_current_folder(ws) -> None:
    outside = os.path.relpath(ws["net"], Path.cwd())
    assert outside.startswith("..")
    result = invoke("eval", "--model", f"{outside}:Net", "--limit", "60")
    assert result.exit_code == 2 and "lies outside the current folder" in flat(result)
    assert "Traceback" not in result.output


@pytest.fixture
def crafted(ws, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(sentinel, script): a script that creates the sentinel when imported, and defines Net and build."""
    sentinel, script = tmp_path / "SENTINEL", tmp_path / "evil.py"
    script.write_text(f"open({str(sentinel)!r}, 'w').close()\n{NET}\ndef build():\n    return Net()\n")
    yield sentinel, script
    assert not sentinel.exists(), "a model file made photosim import code"


@pytest.mark.parametrize("provenance", [
    {"model": "{script}:Net", "weights": None, "num_classes": None, "cifar_stem": False},
    {"source": "torch.ao.quantization", "model": "{script}:build"},
    {"model": "digits-cnn", "weights": "{script}", "weights_sha256": "0"},
])
def test_a_model_file_never_runs_the_code_its_provenance_names(provenance, ws, crafted, tmp_path: Path) -> None:
    sentinel, script = crafted
    qmodel = load(ws["model"])
    qmodel.provenance = {k: v.format(script=script) if isinstance(v, str) else v for k, v in provenance.items()}
    path, report = tmp_path / "crafted.safetensors", tmp_path / "r.csv"
    qmodel.save(path)
    result = invoke("run", path, "--limit", "60", "--report", report)
    assert result.exit_code == 0, result.output
    assert "float baseline skipped" in flat(result) and "--float-model path.py:Net --weights w.pt" in flat(result)
    assert "float" not in list(pd.read_csv(report)["stage"])
    assert not sentinel.exists()


def test_float_model_flag_gives_the_baseline_of_a_file(ws, tmp_path: Path) -> None:
    qmodel = load(ws["model"])
    qmodel.provenance = {"source": "elsewhere"}
    path, report = tmp_path / "anon.safetensors", tmp_path / "r.csv"
    qmodel.save(path)
    result = invoke("run", path, "--float-model", "digits-cnn", "--limit", "60", "--report", report)
    assert result.exit_code == 0, result.output
    assert "float baseline skipped" not in flat(result)
    assert list(pd.read_csv(report)["stage"])[0] == "float"


def test_a_builtin_provenance_still_gives_the_float_baseline(ws, tmp_path: Path) -> None:
    result = invoke("run", ws["model"], "--limit", "60", "--report", tmp_path / "r.csv")
    assert result.exit_code == 0 and "float baseline skipped" not in flat(result)
    assert list(pd.read_csv(tmp_path / "r.csv")["stage"])[0] == "float"


def test_plot_into_a_folder_writes_the_default_name_there(ws, tmp_path: Path) -> None:
    result = invoke("plot", ws["results"], "--x", "a", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "top1_vs_a.png").is_file() and f"wrote {tmp_path / 'top1_vs_a.png'} (PNG)" in flat(result)


def test_plot_writes_the_format_its_suffix_names(ws, tmp_path: Path) -> None:
    result = invoke("plot", ws["results"], "--x", "a", "-o", tmp_path / "p.svg")
    assert result.exit_code == 0 and f"wrote {tmp_path / 'p.svg'} (SVG)" in flat(result)
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_umask_permissions_and_replaced_files_keep_theirs(ws, tmp_path: Path, umask_022) -> None:
    model, report, layers, png = (tmp_path / n for n in ("m.safetensors", "r.csv", "l.csv", "p.png"))
    layers.write_text("old\n")
    layers.chmod(0o640)
    assert invoke("quantize", "--model", "digits-cnn", "--limit", "60", "-o", model).exit_code == 0
    assert invoke("run", model, "--limit", "60", "--report", report, "--layer-report", layers,
                  "--noise", "0.01").exit_code == 0
    assert invoke("plot", ws["results"], "--x", "a", "-o", png).exit_code == 0
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (model, report, png, layers)}
    assert modes == {"m.safetensors": "0o644", "r.csv": "0o644", "p.png": "0o644", "l.csv": "0o640"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "m.safetensors", "p.png", "r.csv"]


def test_a_full_disk_is_named_once_and_earlier_outputs_survive(ws, tmp_path: Path, monkeypatch) -> None:
    real = pathlib.Path.write_text

    def full(self: Path, *args, **kwargs):
        if "layers" in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    report, layers = tmp_path / "r.csv", tmp_path / "layers.csv"
    result = invoke("run", ws["model"], "--limit", "60", "--report", report, "--layer-report", layers)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat(result).count(f"no space left on {tmp_path}") == 1 and "layers.csv was not written" in flat(result)
    assert list(pd.read_csv(report)["stage"])[0] == "float"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``folder`` (root only; the test is skipped where mounting is not allowed)."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount permission")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs with one 4 KiB page free."""
    with tmpfs(tmp_path / "small", "size=64k") as mount:
        (mount / "filler").write_bytes(b"x" * (60 * 1024))
        yield mount


def test_a_read_only_folder_is_refused_before_any_work(ws, tmp_path: Path, no_work) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        result = invoke("run", ws["model"], "--report", mount / "r.csv")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"folder '{mount}' refuses new files (Read-only file system)" in flat(result)


def test_a_really_full_disk(ws, small_disk: Path) -> None:
    report, layers = small_disk / "r.csv", small_disk / "layers.csv"
    result = invoke("run", ws["model"], "--limit", "60", "--repeats", "8", "--noise", "0.002", "--report", report,
                    "--layer-report", layers)  # the report fits in the free page, the layer report does not
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert flat(result).count(f"no space left on {small_disk}") == 1
    assert list(pd.read_csv(report)["stage"])[0] == "float"
    result = invoke("quantize", "--model", "digits-cnn", "--limit", "60", "-o", small_disk / "m.safetensors")
    assert result.exit_code == 2 and "no space left on" in flat(result) and "Traceback" not in result.output
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "r.csv"]


def test_an_output_symlink_is_written_through(tmp_path: Path) -> None:
    from photosim._files import write_text_atomic

    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"


def test_a_gpu_number_beyond_the_machine_is_refused(monkeypatch) -> None:
    from photosim.engine.executor import check_device
    from photosim.errors import PhotosimError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(PhotosimError, match="'cuda:3': this machine has 1 CUDA GPU"):
        check_device("cuda:3")


@pytest.fixture
def two_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sweep file of two points, run by the fast fake runner."""
    monkeypatch.setattr(sweep_module, "default_runner", lambda: fake_run_point)
    path = tmp_path / "two_points.yaml"
    path.write_text("base: {model: digits-cnn}\ngrid: {quant.w_bits: [8, 6]}\n")
    return path


def test_force_never_replaces_files_photosim_did_not_record(two_points: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    mine = {"results.csv": "my,results\n", "summary.csv": "my,summary\n", "top1_vs_quant.w_bits.png": "my plot",
            "notes.txt": "mine"}
    for name, text in mine.items():
        (foreign / name).write_text(text)
    result = invoke("sweep", two_points, "-o", foreign, "--force", "--no-progress")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"{foreign} holds results.csv, summary.csv, top1_vs_quant.w_bits.png, which this sweep would write but "
            "photosim did not write there (the folder has no sweep.json)") in flat(result)
    assert {p.name: p.read_text() for p in foreign.iterdir()} == mine  # not even a lock file was added

    for name in ("results.csv", "summary.csv"):
        (foreign / name).unlink()
    (foreign / "top1_vs_quant.w_bits.png").rename(foreign / "kept.png")
    result = invoke("sweep", two_points, "-o", foreign, "--force", "--no-progress")
    assert result.exit_code == 0, result.output  # --force writes beside the user's files when no name clashes
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "kept.png").read_text() == "my plot"

    other = tmp_path / "other.yaml"  # another sweep, whose plot name the folder's sweep.json does not record
    other.write_text("base: {model: digits-cnn}\ngrid: {quant.a_bits: [8, 6]}\n")
    (foreign / "top1_vs_quant.a_bits.png").write_text("my other plot")
    result = invoke("sweep", other, "-o", foreign, "--force", "--no-progress")
    assert result.exit_code == 2 and "holds top1_vs_quant.a_bits.png" in flat(result)
    assert "its sweep.json does not list them" in flat(result)
    assert (foreign / "top1_vs_quant.a_bits.png").read_text() == "my other plot"
    assert (foreign / "results.csv").is_file()  # the first sweep's results stay until a run can replace them


@pytest.mark.parametrize("make_immutable", ["chattr", "tmpfs"])
def test_a_sweep_folder_that_refuses_new_files_is_refused_before_any_work(two_points: Path, tmp_path: Path,
                                                                         make_immutable: str) -> None:
    out = tmp_path / "out"
    if make_immutable == "tmpfs":
        with tmpfs(out, "ro,size=64k"):
            result = invoke("sweep", two_points, "-o", out, "--no-progress")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"sweep output -o '{out}' cannot hold new files (Read-only file system)" in flat(result)
        return
    assert invoke("sweep", two_points, "-o", out, "--no-progress").exit_code == 0
    before = snapshot(out)
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system with attributes")
    try:
        result = invoke("sweep", two_points, "-o", out, "--force", "--no-progress")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"sweep output -o '{out}' cannot hold new files (Operation not permitted)" in flat(result)
    assert snapshot(out) == before


def test_a_sweep_that_fails_before_any_point_leaves_no_folder(two_points: Path, tmp_path: Path) -> None:
    from photosim.errors import PhotosimError

    def fails(point: dict, cache: dict) -> list:
        raise PhotosimError("the first point failed")

    out = tmp_path / "new" / "out"
    with pytest.raises(PhotosimError, match="the first point failed"):
        sweep_module.run_sweep(two_points, out, runner=fails, progress=False)
    assert not out.exists()


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for PID 1 to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_die_with_their_sweep(sig: signal.Signals, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from sweep_fake_runner import sleeping_run_point\n"
        "from photosim.experiments.sweep import run_sweep\n"
        "if __name__ == '__main__':  # spawned workers import this file too\n"
        "    run_sweep({'base': {'model': 'digits-cnn'}, 'grid': {'quant.w_bits': [8, 6]}}, "
        f"{str(tmp_path / 'out')!r}, runner=sleeping_run_point, workers=2, progress=False)\n")
    sweep = subprocess.Popen([sys.executable, str(driver)], env={**os.environ, "PHOTOSIM_TEST_PIDS": str(pids)})
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(pids.iterdir())) == 2, "the two workers did not start"
        below = _descendants(sweep.pid)  # the workers and multiprocessing's resource tracker
        assert {int(p.name) for p in pids.iterdir()} <= below
        sweep.send_signal(sig)
        sweep.wait(10)
        deadline = time.monotonic() + 20
        while any(map(_alive, below)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in below if _alive(pid)], "processes of the killed sweep are still running"
    finally:
        sweep.kill()
        sweep.wait()
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
