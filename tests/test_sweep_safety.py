"""A sweep folder is days of computing: --force deletes only what photosim wrote, corrupt bookkeeping is a clear
error, one run at a time holds the folder, the CSVs are not rewritten per point, an unreachable Ray fails fast."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from sweep_fake_runner import fake_run_point
from typer.testing import CliRunner

from photosim.cli import app
from photosim.experiments import sweep as sweep_module
from photosim.experiments.sweep import LOCK, LOG, MANIFEST, RESULTS, SUMMARY

SWEEP: dict[str, Any] = {"name": "safety", "base": {"model": "digits-cnn", "repeats": 2},
                         "grid": {"quant.w_bits": [8, 6, 4], "hw.requant": ["float", "fixedpoint"]}}
POINTS = 6


def words(text: str) -> str:
    """Terminal output with line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def sweep_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SWEEP as a file, run by the fake runner."""
    monkeypatch.setattr(sweep_module, "default_runner", lambda: fake_run_point)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    return path


def sweep_cli(path: Path, out: Path, *options: str) -> Any:
    return CliRunner().invoke(app, ["sweep", str(path), "-o", str(out), "--no-progress", *options])


def assert_refused(result: Any, *fragments: str) -> None:
    """Exit code 2, no traceback, every fragment in the (unwrapped) message."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in words(result.output)


def test_force_deletes_only_what_photosim_wrote(sweep_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert sweep_cli(sweep_file, out).exit_code == 0
    outside = tmp_path / "sentinel.txt"
    outside.write_text("keep me")
    (tmp_path / "top1_vs_x.png").write_text("a plot-named file outside the folder")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "top1_vs_y.png").write_text("in a subfolder")
    (out / "top1_vs_link.png").symlink_to(outside)
    (out / "top1_vs_old.png").write_text("an old plot")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["sweep_hash"] = manifest["base_hash"] = "0" * 16  # another sweep's folder (another base), whose
    manifest["config"] = None  # manifest lists files photosim never wrote
    manifest["plots"] += ["../sentinel.txt", str(outside), "../top1_vs_x.png", "notes.txt", "sub/top1_vs_y.png",
                          "top1_vs_link.png", "top1_vs_old.png", ".", "..", ""]  # with the plots it did write
    (out / MANIFEST).write_text(json.dumps(manifest))

    result = sweep_cli(sweep_file, out, "--force")
    assert result.exit_code == 0, result.output
    assert outside.read_text() == "keep me" and (tmp_path / "top1_vs_x.png").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "top1_vs_y.png").exists()
    assert (out / "top1_vs_link.png").is_symlink() and (out / "top1_vs_link.png").read_text() == "keep me"
    assert not (out / "top1_vs_old.png").exists()  # a plot the old sweep wrote
    assert len(pd.read_csv(out / RESULTS)) == POINTS * 2


CORRUPT = [  # (file, content, texts the message must contain)
    (MANIFEST, "{not json", [MANIFEST, "corrupt (not JSON)", "delete it"]),
    (MANIFEST, "[1, 2]", [MANIFEST, "corrupt", "valid dictionary", "delete it"]),
    (MANIFEST, json.dumps({"sweep_hash": 5, "source": "x", "plots": []}), [MANIFEST, "sweep_hash", "valid string"]),
    (MANIFEST, json.dumps({"sweep_hash": "abc", "source": "x", "plots": "top1.png"}), [MANIFEST, "plots",
                                                                                       "valid list"]),
    (MANIFEST, json.dumps({"sweep_hash": "abc", "source": "x"}), [MANIFEST, "plots", "Field required"]),
    (LOG, "{}\n", [f"{LOG} line 1", "hash", "Field required", "delete that line"]),
    (LOG, "[]\n", [f"{LOG} line 1", "valid dictionary", "delete that line"]),
    (LOG, "not json\n", [f"{LOG} line 1 is corrupt (not JSON)", "delete that line"]),
    (LOG, json.dumps({"hash": "h", "variant": None, "params": {}, "rows": "none", "point_wall_s": 1.0}) + "\n",
     [f"{LOG} line 1", "rows", "valid list"]),
    (LOG, json.dumps({"hash": 7, "variant": None, "params": {}, "rows": [], "point_wall_s": "fast"}) + "\n",
     [f"{LOG} line 1", "hash", "point_wall_s"]),
]


@pytest.mark.parametrize(("name", "content", "expected"), CORRUPT, ids=[f"{n}:{c[:20]}" for n, c, _ in CORRUPT])
def test_corrupt_bookkeeping_is_a_clear_error(sweep_file: Path, tmp_path: Path, name: str, content: str,
                                              expected: list[str]) -> None:
    out = tmp_path / "out"
    assert sweep_cli(sweep_file, out).exit_code == 0
    (out / name).write_text(content)
    for options in ((), ("--force",)):
        assert_refused(sweep_cli(sweep_file, out, *options), str(out / name), *expected)


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(sweep_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    second: list[Any] = []

    def runner(point: dict[str, Any], cache: dict[Any, Any]) -> list[dict[str, Any]]:
        if not second:  # while this run holds the folder, another one tries to write into it
            second.append(sweep_cli(sweep_file, out))
        return fake_run_point(point, cache)

    result = sweep_module.run_sweep(sweep_file, out, runner=runner, progress=False)
    assert result.ran == POINTS
    assert_refused(second[0], str(out), "in use by another sweep run", f"pid {os.getpid()}", "started",
                   "choose another -o directory")
    assert f"pid {os.getpid()}" in (out / LOCK).read_text()
    again = sweep_cli(sweep_file, out)  # the lock ended with the first run
    assert again.exit_code == 0 and f"ran 0 points, {POINTS} already finished" in words(again.output)


def test_the_lock_file_alone_does_not_make_a_folder_foreign(sweep_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("pid 1 on elsewhere, started long ago\n")  # left by a run killed before its manifest
    result = sweep_cli(sweep_file, out)
    assert result.exit_code == 0, result.output
    assert f"ran {POINTS} points" in words(result.output)


def test_csvs_are_written_once_per_run_not_per_point(sweep_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = sweep_module.write_csv_atomic
    monkeypatch.setattr(sweep_module, "write_csv_atomic", lambda frame, path: written.append(Path(path).name)
                        or real(frame, path))
    result = sweep_module.run_sweep(sweep_file, tmp_path / "out", progress=False)
    assert result.ran == POINTS and sorted(written) == [RESULTS, SUMMARY]
    assert len(pd.read_csv(tmp_path / "out" / RESULTS)) == POINTS * 2
    assert len((tmp_path / "out" / LOG).read_text().splitlines()) == POINTS


def _closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_ray_address_fails_fast(sweep_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    for options in ((), ("--dry-run",)):
        result = sweep_cli(sweep_file, tmp_path / "out", "--executor", "ray", "--address", address, *options)
        assert_refused(result, f"cannot reach a Ray cluster at --address {address}", "leave --address out")
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "out").exists()
