"""The op table: one declaration per op, complete everywhere it is looked up, and shapes without execution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ModelBuilder, make_cnn_ops_net, make_conv_net, qp

from photosim.engine.executor import KERNELS, kernel
from photosim.frontend.capture import SUPPORTED
from photosim.ir.fakequant import exp_table, run_node
from photosim.ir.ops import OPS, AttrError, Op, conv_output_size, infer_shapes, register_op
from photosim.ir.ranges import int_range, max_int, max_magnitude, min_int, narrow_range, smallest_int_dtype

README = Path(__file__).resolve().parents[1] / "README.md"


def test_a_second_op_of_the_same_name_is_refused() -> None:
    before = dict(OPS)

    class Twin(Op):
        name = "conv2d"

    with pytest.raises(ValueError, match="registered twice"):
        register_op(Twin)
    assert before == OPS


def test_every_op_has_an_integer_kernel_and_kernels_only_for_ops() -> None:
    assert set(KERNELS) == set(OPS)
    with pytest.raises(ValueError, match="not an op"):
        kernel("softmax")(lambda engine, node, xs: xs[0])
    with pytest.raises(ValueError, match="registered twice"):
        kernel("conv2d")(lambda engine, node, xs: xs[0])


def test_every_op_declares_a_float_reference_shapes_and_docs() -> None:
    for op in OPS.values():
        assert type(op).reference is not Op.reference, op.name
        assert op.description and op.layers, op.name
        if op.weighted:
            assert type(op).weight_shape is not Op.weight_shape and type(op).dot_length is not Op.dot_length


def test_readme_supported_layers_and_capture_message_name_every_op() -> None:
    text = README.read_text()
    section = text[text.index("## Supported layers"):]
    section = " ".join(section[: section.index("\n## ", 3)].replace("`", "").split())
    for op in OPS.values():
        for layer in op.layers:
            assert layer in section, f"README's supported layers miss {layer!r} ({op.name})"
            assert layer in SUPPORTED


def test_inferred_shapes_match_the_executed_reference() -> None:
    """Every node of two graphs that together use every op: the formula's shape is the shape torch computes."""
    model, extra = make_conv_net(), make_cnn_ops_net()
    norm = ModelBuilder((5, 6), qp(0.05, 16, 8))
    norm.add("norm", "layer_norm", ["x"], qp(0.02, 128, 8), eps=1e-5)
    norm.tensors["norm.gamma"], norm.tensors["norm.beta"] = torch.linspace(0.5, 1.5, 6), torch.zeros(6)
    norm.add("keys", "permute", ["norm"], dims=[0, 2, 1])
    norm.add("scores", "matmul", ["norm", "keys"], qp(0.05, 128, 8))  # (5, 5)
    norm.add("scaled", "scale", ["scores"], qp(0.02, 128, 8), factor=0.5)
    norm.add("weights", "softmax", ["scaled"], qp(1 / 255, 0, 8))
    norm.tensors["weights.exp"] = exp_table(norm.nodes[-1])
    norm.add("token", "constant", ["x"], qp(0.01, 128, 8), shape=[1, 6])
    norm.tensors["token.value"] = torch.linspace(-1, 1, 6).reshape(1, 6)
    norm.add("tokens", "concat", ["token", "norm"], qp(0.02, 128, 8), dim=1)  # (6, 6)
    norm.add("rolled", "roll", ["tokens"], dim=1, shift=2)
    norm.add("padded", "pad", ["rolled"], dim=2, before=1, after=2)  # (6, 9)
    norm.add("unit", "l2_normalize", ["padded"], qp(1 / 127, 0, 8, signed=True), eps=1e-12)
    norm = norm.build()
    assert {n.op for n in model.nodes + extra.nodes + norm.nodes} == set(OPS) - {"reshape"}
    inferred = {}
    for graph in (norm, extra, model):
        shapes = inferred[graph.nodes[0].name] = infer_shapes(graph.input_name, graph.input_shape, graph.nodes)
        values = {graph.input_name: torch.zeros(2, *graph.input_shape, dtype=torch.float64)}
        for node in graph.nodes:
            values[node.name] = run_node(graph, node, *(values[i] for i in node.inputs))
            assert tuple(values[node.name].shape[1:]) == shapes[node.name], node.name
    # by hand: 2 gated + 4 input channels of 6x6, transposed, averaged over one spatial dimension
    assert inferred["gate_in"]["both"] == (6, 6, 6) and inferred["gate_in"]["rows"] == (6, 6)
    shapes = inferred["conv1"]
    # hand-computed: 12x12, conv pad 1 -> 12x12; maxpool 3/2 pad 1 ceil -> 7x7; avgpool 3/2 pad 1 ceil -> 4x4
    assert shapes["conv1"] == (8, 12, 12) and shapes["pool1"] == (8, 7, 7) and shapes["avg"] == (8, 4, 4)
    assert shapes["flat"] == (8,) and shapes["fc"] == (10,)


@pytest.mark.parametrize("size", [1, 4, 5, 7, 12])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), [(1, 1, 0, 1), (2, 2, 1, 1), (3, 2, 1, 2),
                                                                     (3, 3, 1, 1), (4, 3, 2, 1)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_window_output_size_is_pytorchs(size: int, kernel: int, stride: int, padding: int, dilation: int,
                                        ceil_mode: bool) -> None:
    x = torch.zeros(1, 1, size, size)
    try:
        expected = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode).shape[-1]
    except RuntimeError:  # "output size is too small": the formula must say so too
        expected = None
    got = conv_output_size(size, kernel, stride, padding, dilation, ceil_mode)
    assert got == expected if expected is not None else got < 1


@pytest.mark.parametrize(
    ("op", "attrs", "shapes", "expected"),
    [
        ("conv2d", {"in_channels": 4, "out_channels": 6, "kernel": [3, 1], "stride": [2, 1], "padding": [1, 0],
                    "dilation": [1, 1], "groups": 2}, [(4, 7, 5)], (6, 4, 5)),
        ("linear", {"in_features": 12, "out_features": 3}, [(12,)], (3,)),
        ("add", {}, [(2, 3), (2, 3)], (2, 3)),
        ("adaptive_avgpool2d", {"output_size": [2, 1]}, [(5, 9, 9)], (5, 2, 1)),
        ("flatten", {"start_dim": 2}, [(2, 3, 4)], (2, 12)),
        ("reshape", {"shape": [-1, 4]}, [(2, 3, 4)], (6, 4)),
    ],
)
def test_output_shapes_by_hand(op: str, attrs: dict, shapes: list, expected: tuple) -> None:
    OPS[op].check_attrs(attrs)
    assert OPS[op].output_shape(attrs, shapes) == expected


@pytest.mark.parametrize(
    ("op", "attrs", "message"),
    [
        ("maxpool2d", {"kernel": [0, 2], "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1],
                       "ceil_mode": False}, "'kernel' is \\[0, 2\\]"),
        ("maxpool2d", {"kernel": [2, 2], "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1],
                       "ceil_mode": 0}, "'ceil_mode' is 0"),
        ("maxpool2d", {"kernel": [2, 2], "stride": [1, 1], "padding": [2, 0], "dilation": [1, 1],
                       "ceil_mode": False}, "exceeds half the kernel"),
        ("linear", {"in_features": True, "out_features": 3}, "'in_features' is True"),
        ("linear", {"in_features": "4", "out_features": 3}, "'in_features' is '4'"),
        ("linear", {"in_features": 4}, "\\['out_features'\\] are missing"),
        ("reshape", {"shape": [-1, -1]}, "at most one -1"),
        ("avgpool2d", {"kernel": [2, 2], "stride": [1, 1], "padding": [0, 0], "ceil_mode": False,
                       "count_include_pad": True, "divisor_override": 0}, "'divisor_override' is 0"),
        ("conv2d", {"in_channels": 4, "out_channels": 6, "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
                    "dilation": [1, 1], "groups": 4}, "groups 4 must divide"),
    ],
)
def test_bad_attributes_are_named(op: str, attrs: dict, message: str) -> None:
    with pytest.raises(AttrError, match=message):
        OPS[op].check_attrs(attrs)


def test_integer_ranges_by_hand() -> None:
    assert int_range(8) == (-128, 127) and int_range(8, signed=False) == (0, 255)
    assert int_range(2) == (-2, 1) and int_range(16, signed=False) == (0, 65535)
    assert narrow_range(4) == (-7, 7) and max_magnitude(4) == 8 and min_int(3, signed=False) == 0
    assert max_int(32) == 2147483647
    assert [smallest_int_dtype(*int_range(b)) for b in (2, 8, 9, 16, 17, 33)] == [
        torch.int8, torch.int8, torch.int16, torch.int16, torch.int32, torch.int64]
    with pytest.raises(ValueError, match="does not fit"):
        smallest_int_dtype(0, 1 << 63)


def test_the_op_table_is_the_only_list_of_ops_in_the_code() -> None:
    """No module outside the op table lists ops as a tuple of names (the old _OBSERVED_OPS, WEIGHTED_OPS...)."""
    names = "|".join(OPS)
    pattern = re.compile(rf'\(\s*"({names})",\s*"({names})"')
    package = Path(__file__).resolve().parents[1] / "photosim"
    offenders = [str(p) for p in package.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
