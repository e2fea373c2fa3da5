"""Model files that are readable safetensors but inconsistent: `load` refuses them naming the culprit,
and `photosim inspect` exits 2 without a traceback. Each row corrupts one thing of a good file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_conv_net
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from photosim.cli import app
from photosim.errors import PhotosimError
from photosim.ir.format import METADATA_KEY, load

Doc = dict[str, Any]
Tensors = dict[str, torch.Tensor]


def _node(doc: Doc, name: str) -> dict[str, Any]:
    return next(n for n in doc["nodes"] if n["name"] == name)


def _set(node: str, /, **values: Any) -> Callable[[Doc, Tensors], None]:
    """An edit that overwrites keys of one node's JSON entry."""
    return lambda doc, tensors: _node(doc, node).update(values)


def _input_shape(shape: list[Any]) -> Callable[[Doc, Tensors], None]:
    return lambda doc, tensors: doc["input"].update(shape=shape)


def _tensor(key: str, convert: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Doc, Tensors], None]:
    return lambda doc, tensors: tensors.update({key: convert(tensors[key])})


def _flatten_to_reshape(doc: Doc, tensors: Tensors) -> None:
    flat = _node(doc, "flat")
    del flat["start_dim"]
    flat.update(op="reshape", shape=[5])


def _one_input_add(doc: Doc, tensors: Tensors) -> None:
    res = _node(doc, "res")
    res["inputs"] = res["inputs"][:1]
    for key in ("scale", "zero_point", "bits", "signed", "qmin", "qmax"):
        res[f"input_{key}"] = res[f"input_{key}"][:1]


# The good model (tests/conftest.py make_conv_net): input 'x' (3, 12, 12) -> conv1 (8 channels, 3x3, pad 1)
# -> relu1 (clamp) -> pool1 (maxpool 3/2 pad 1 ceil: 7x7) -> dw (depthwise) -> grouped (1x1, 2 groups)
# -> res = grouped + pool1 -> avg (avgpool 3/2 pad 1: 4x4) -> gap (adaptive 1x1) -> flat -> fc (8 -> 10).
CORRUPTIONS: list[tuple[str, Callable[[Doc, Tensors], None], str, str]] = [
    # (id, edit, culprit named in the message, what the message says)
    ("conv-in-channels", _input_shape([4, 12, 12]), "'conv1'", "4 channels but in_channels is 3"),
    ("linear-in-features", _set("gap", output_size=[2, 2]), "'fc'", "32 features but in_features is 8"),
    ("add-shapes", _set("grouped", stride=[2, 2]), "'res'", "different shapes"),
    ("reshape-elements", _flatten_to_reshape, "'flat'", "cannot reshape"),
    ("pool-kernel-too-large", _set("avg", kernel=[11, 11]), "'avg'", "larger than the padded input"),
    ("conv-output-empty", _set("conv1", dilation=[7, 7]), "'conv1'", "the output would be 0x0"),
    ("kernel-zero", _set("pool1", kernel=[0, 3]), "'pool1'", "'kernel' is \\[0, 3\\]"),
    ("stride-zero", _set("conv1", stride=[0, 1]), "'conv1'", "'stride' is \\[0, 1\\]"),
    ("dilation-negative", _set("pool1", dilation=[-1, 1]), "'pool1'", "'dilation' is \\[-1, 1\\]"),
    ("padding-negative", _set("conv1", padding=[-1, 0]), "'conv1'", "'padding' is \\[-1, 0\\]"),
    ("string-groups", _set("dw", groups="8"), "'dw'", "'groups' is '8'"),
    ("bool-start-dim", _set("flat", start_dim=True), "'flat'", "'start_dim' is True"),
    ("float-in-features", _set("fc", in_features=8.0), "'fc'", "'in_features' is 8.0"),
    ("string-ceil-mode", _set("pool1", ceil_mode="yes"), "'pool1'", "'ceil_mode' is 'yes'"),
    ("pair-of-three", _set("avg", stride=[2, 2, 2]), "'avg'", "a list of two integers"),
    ("absurd-input", _input_shape([3, 100000, 100000]), "'x'", "more than photosim's limit"),
    ("terabyte-intermediate", _input_shape([3, 20000, 20000]), "'conv1'", "more than photosim's limit"),
    ("empty-input-dim", _input_shape([3, 0, 12]), "graph input", "positive integers"),
    ("string-input-dim", _input_shape(["3", 12, 12]), "graph input", "positive integers"),
    ("weight-int16-for-8-bits", _tensor("conv1.weight", lambda t: t.to(torch.int16)), "'conv1'",
     "dtype torch.int16; the spec's integer dtype for it is torch.int8"),
    ("weight-int32", _tensor("fc.weight", lambda t: t.to(torch.int32)), "'fc'", "torch.int8"),
    ("bias-int64-for-32-bits", _tensor("dw.bias", lambda t: t.to(torch.int64)), "'dw'", "torch.int32"),
    ("bias-int16", _tensor("dw.bias", lambda t: t.to(torch.int16)), "'dw'", "torch.int32"),
    ("weight-scale-float64", _tensor("fc.weight_scale", lambda t: t.double()), "'fc'", "float dtype"),
    ("bias-float-float64", lambda d, t: t.update({"fc.bias_float": torch.zeros(10, dtype=torch.float64)}), "'fc'",
     "fc.bias_float"),
    ("fractional-zero-point", _set("conv1", output_zero_point=31.5), "'conv1'", "zero point 31.5"),
    ("pool-changes-zero-point", _set("pool1", output_zero_point=5), "'pool1'", "keeps its input's quantization"),
    ("consumer-zero-point", _set("relu1", input_zero_point=[5]), "'relu1'", "differs from that of 'conv1'"),
    ("duplicate-name", _set("relu1", name="conv1"), "'conv1'", "names must be unique"),
    ("add-one-input", _one_input_add, "'res'", "are not 2"),
]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    make_conv_net().save(path)
    return path


def _corrupt(good: Path, out: Path, edit: Callable[[Doc, Tensors], None]) -> Path:
    """A copy of ``good`` with its JSON graph and tensors changed by ``edit``, written as a safetensors file."""
    tensors = load_file(str(good))
    with open(good, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    doc = json.loads(header["__metadata__"][METADATA_KEY])
    edit(doc, tensors)
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(doc)})
    return out


def test_the_good_file_loads(good_file: Path) -> None:
    assert [n.name for n in load(good_file).nodes][-1] == "fc"


@pytest.mark.parametrize(("edit", "culprit", "message"), [row[1:] for row in CORRUPTIONS],
                         ids=[row[0] for row in CORRUPTIONS])
def test_inconsistent_file_is_refused_naming_the_culprit(good_file: Path, tmp_path: Path, edit, culprit: str,
                                                         message: str) -> None:
    bad = _corrupt(good_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(PhotosimError, match=message) as info:
        load(bad)
    assert culprit in str(info.value)
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "Traceback" not in output and culprit in output
