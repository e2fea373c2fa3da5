"""photosim export / import-onnx from the command line: a round trip that ONNX Runtime confirms code for code, an
imported file simulated on the chip by `photosim run`, and exit code 2 with one message for bad files and for a
missing onnx / onnxruntime package."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import ModelBuilder, make_conv_net, qp, random_weights  # noqa: E402

from photosim.cli import app  # noqa: E402
from photosim.ir.format import QuantizedModel, load  # noqa: E402

runner = CliRunner()
EXTRA_MODULES = ("photosim.ir.onnx_export", "photosim.frontend.onnx_import")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def tiny_model() -> QuantizedModel:
    g = torch.Generator().manual_seed(0)
    m = ModelBuilder((2, 6, 6), qp(1 / 64, 3))
    m.conv("conv", "x", qp(0.05, 0, qmin=0), random_weights((4, 2, 3, 3), 8, g),
           torch.randint(-200, 200, (4,), generator=g), 0.01, padding=1)
    m.add("pool", "maxpool2d", ["conv"], kernel=[2, 2], stride=[2, 2], padding=[0, 0], dilation=[1, 1],
          ceil_mode=False)
    m.add("flat", "flatten", ["pool"], start_dim=1)
    m.linear("fc", "flat", qp(0.1, 120), random_weights((3, 36), 8, g), torch.randint(-99, 99, (3,), generator=g),
             0.02)
    return m.build()


def test_export_import_round_trip_verified_by_onnxruntime(tmp_path) -> None:
    source, exported, back = tmp_path / "m.safetensors", tmp_path / "m.onnx", tmp_path / "back.safetensors"
    tiny_model().save(source)
    result = invoke("export", source, "-o", exported, "--form", "qoperator", "--verify", 32)
    assert result.exit_code == 0, result.output
    assert "opset 13" in result.output and "96 of 96 output codes equal (100.00%)" in result.output
    result = invoke("import-onnx", exported, "-o", back, "--verify", 32)
    assert result.exit_code == 0, result.output
    assert "96 of 96 output codes equal (100.00%)" in result.output
    assert [n.op for n in load(back).nodes] == ["conv2d", "maxpool2d", "flatten", "linear"]
    result = invoke("run", back, "--data", "synthetic", "--limit", 4, "--requant", "onnxruntime", "--tile", 8,
                    "--adc-bits", 8, "--adc-range", "full")
    assert result.exit_code == 0, result.output


def test_bad_inputs_exit_2_with_one_message(tmp_path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x12\x34definitely not protobuf" * 4)
    result = invoke("import-onnx", garbage, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "not a readable ONNX file" in result.output and "Traceback" not in result.output
    wide = tmp_path / "avg.safetensors"
    make_conv_net().save(wide)
    result = invoke("export", wide, "-o", tmp_path / "avg.onnx")
    assert result.exit_code == 2 and "node 'avg' (avgpool2d" in result.output
    assert not (tmp_path / "avg.onnx").exists()
    source = tmp_path / "m.safetensors"
    tiny_model().save(source)
    result = invoke("export", source, "-o", tmp_path / "m.onnx", "--form", "bogus")
    assert result.exit_code == 2 and "unknown ONNX form 'bogus'; use one of qdq, qoperator" in result.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_a_missing_extra_exits_2_naming_the_install(missing: str, tmp_path, monkeypatch) -> None:
    source = tmp_path / "m.safetensors"
    tiny_model().save(source)
    for name in EXTRA_MODULES:  # forget them, so that the command imports them afresh (both restored afterwards)
        parent, _, leaf = name.rpartition(".")
        monkeypatch.setattr(sys.modules[parent], leaf, importlib.import_module(name))
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as for a package that is not installed
    result = invoke("export", source, "-o", tmp_path / "m.onnx", "--verify", 4)
    assert result.exit_code == 2, result.output
    assert f"needs the Python package {missing!r}" in result.output and "photosim[onnx]" in result.output
