"""Model files that are readable safetensors but inconsistent: `load` refuses them naming the culprit,
and `photosim inspect` exits 2 without a traceback. Each row corrupts one thing of a good file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ModelBuilder, make_cnn_ops_net, make_conv_net, qp
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


def _concat_of(count: int) -> Callable[[Doc, Tensors], None]:
    """The concat node 'both' of make_cnn_ops_net reading the graph input ``count`` times."""
    def edit(doc: Doc, tensors: Tensors) -> None:
        both = _node(doc, "both")
        both["inputs"] = ["x"] * count
        for key in ("scale", "zero_point", "bits", "signed", "qmin", "qmax"):
            both[f"input_{key}"] = both[f"input_{key}"][1:] * count
    return edit


# The good model (tests/conftest.py make_conv_net): input 'x' (3, 12, 12) -> conv1 (8 channels, 3x3, pad 1)
# -> relu1 (clamp) -> pool1 (maxpool 3/2 pad 1 ceil: 7x7) -> dw (depthwise) -> grouped (1x1, 2 groups)
# -> res = grouped + pool1 -> avg (avgpool 3/2 pad 1: 4x4) -> gap (adaptive 1x1) -> flat -> fc (8 -> 10).
CORRUPTIONS: list[tuple[str, Callable[[Doc, Tensors], None], str, str]] = [
    # (id, edit, culprit named in the message, what the message says)
    ("conv-in-channels", _input_shape([4, 12, 12]), "'conv1'", "4 channels but in_channels is 3"),
    ("linear-in-features", _set("gap", output_size=[2, 2]), "'fc'",
     "32 features in its last dimension but in_features is 8"),
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
    # work sized from the attributes before anything is allocated (issue 25, case 8)
    ("stride-2-to-the-62", _set("conv1", stride=[2**62, 2**62]), "'conv1'", "'stride' is .*<= 1048576"),
    ("stride-2-to-the-31", _set("conv1", stride=[2**31, 1]), "'conv1'", "'stride' is .*<= 1048576"),
    ("dilation-2-to-the-40", _set("pool1", dilation=[2**40, 1]), "'pool1'", "'dilation' is"),
    ("padding-8188-terabyte-patches", _set("dw", padding=[8188, 8188]), "'dw'",
     "1.93e\\+10 elements of im2col patches per sample"),
    ("padding-strided-huge-padded-input", _set("dw", padding=[20000, 20000], stride=[10000, 10000]), "'dw'",
     "elements of zero-padded input per sample"),
    ("groups-2-to-the-40", _set("dw", groups=2**40, in_channels=2**40, out_channels=2**40), "'dw'",
     "'in_channels' is"),
]

# The same for the ops of make_cnn_ops_net: x (4, 6, 6) -> gate_in = x[:, 0:2], value = x[:, 2:4] -> gate (table,
# sigmoid) -> gated = gate * value -> both = concat(gated, x) on dim 1 -> turned (permute 0, 1, 3, 2) -> rows (mean 2).
CNN_OPS_CORRUPTIONS: list[tuple[str, Callable[[Doc, Tensors], None], str, str]] = [
    ("concat-of-100000-inputs", _concat_of(100_000), "'both'", "100000 inputs; photosim concatenates at most 1024"),
    ("concat-dim-huge", _set("both", dim=2**62), "'both'", "'dim' is"),
    ("concat-dim-past-the-end", _set("both", dim=4), "'both'", "do not all have dimension 4"),
    ("permute-dims-out-of-range", _set("turned", dims=[0, 1, 3, 7]), "'turned'", "must be a permutation"),
    ("permute-dims-too-few", _set("turned", dims=[0, 2, 1]), "'turned'", "do not permute an input of 4"),
    ("permute-batch-moved", _set("turned", dims=[1, 0, 2, 3]), "'turned'", "keeping the batch"),
    ("slice-past-the-end", _set("value", stop=99), "'value'", "slice 2:99 of dimension 1 does not fit"),
    ("slice-huge", _set("value", start=2**62, stop=2**63 - 1), "'value'", "'start' is"),
    ("slice-dim-past-the-end", _set("value", dim=9), "'value'", "does not fit the input"),
    ("mean-dims-past-the-end", _set("rows", dims=[5]), "'rows'", "reach past the input's 3 dimensions"),
    ("mean-dims-huge", _set("rows", dims=[2**62]), "'rows'", "'dims' is"),
    ("mul-no-broadcast", _set("gated", inputs=["gate", "x"]), "'gated'", "do not broadcast"),
    ("table-wrong-size", _tensor("gate.table", lambda t: t[:100]), "'gate'", "must be int32 of shape \\(256,\\)"),
    ("table-unknown-function", _set("gate", function="relu"), "'gate'", "'function' is 'relu'"),
]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    make_conv_net().save(path)
    return path


@pytest.fixture(scope="module")
def good_cnn_ops_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "cnn-ops.safetensors"
    make_cnn_ops_net().save(path)
    return path


@pytest.fixture(scope="module")
def good_16_bit_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A table over 16-bit codes (65536 entries: the largest a file may hold)."""
    from photosim.ir.fakequant import lookup_table

    m = ModelBuilder((2, 3, 3), qp(0.001, 0, 16, signed=True))
    m.add("act", "table", ["x"], qp(1 / 255, 0, 8), function="sigmoid")
    m.tensors["act.table"] = lookup_table(m.nodes[-1])
    path = tmp_path_factory.mktemp("good") / "table16.safetensors"
    m.build().save(path)
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
    _refused(_corrupt(good_file, tmp_path / "bad.safetensors", edit), culprit, message)


def _refused(bad: Path, culprit: str, message: str) -> None:
    """``load`` refuses the file naming the culprit, and ``inspect`` exits 2 with it, no traceback."""
    with pytest.raises(PhotosimError, match=message) as info:
        load(bad)
    assert culprit in str(info.value)
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "Traceback" not in output and culprit in output


@pytest.mark.parametrize(("edit", "culprit", "message"), [row[1:] for row in CNN_OPS_CORRUPTIONS],
                         ids=[row[0] for row in CNN_OPS_CORRUPTIONS])
def test_inconsistent_new_op_is_refused_naming_the_culprit(good_cnn_ops_file: Path, tmp_path: Path, edit,
                                                           culprit: str, message: str) -> None:
    assert [n.name for n in load(good_cnn_ops_file).nodes][-1] == "rows"
    _refused(_corrupt(good_cnn_ops_file, tmp_path / "bad.safetensors", edit), culprit, message)


@pytest.mark.parametrize(("edit", "message"), [
    (_tensor("act.table", lambda t: t[:256]), "'act.table' is torch.int32 of shape \\(256,\\); it must be int32 of "
                                              "shape \\(65536,\\)"),
    (_tensor("act.table", lambda t: t.to(torch.int64)), "torch.int64"),
    (_tensor("act.table", lambda t: t[:1 << 15]), "it must be int32 of shape \\(65536,\\)"),
], ids=["256-entries-for-16-bits", "int64", "half-the-entries"])
def test_table_over_16_bit_codes_of_the_wrong_size_is_refused(good_16_bit_table: Path, tmp_path: Path, edit,
                                                              message: str) -> None:
    assert load(good_16_bit_table).tensors["act.table"].shape == (65536,)
    _refused(_corrupt(good_16_bit_table, tmp_path / "bad.safetensors", edit), "'act'", message)
