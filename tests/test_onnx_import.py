"""photosim import-onnx: models quantized by ONNX Runtime's quantize_static (QDQ and QOperator, per-tensor and
per-channel, uint8 and int8 activations, symmetric and asymmetric) and a Brevitas-style QCDQ graph become integer
files on which the onnxruntime requant mode equals ONNX Runtime on every output element; bad files are refused."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402

from photosim.engine.executor import Engine, simulate  # noqa: E402
from photosim.engine.onnx_requant import onnxruntime_codes, quantize_linear  # noqa: E402
from photosim.errors import PhotosimError  # noqa: E402
from photosim.frontend.onnx_import import from_onnx, output_codes, read_onnx  # noqa: E402
from photosim.ir.format import QuantizedModel  # noqa: E402

INT8_QDQ = {"session.qdqisint8allowed": "1"}  # ONNX Runtime runs int8 QDQ convs in float on x86 unless allowed


class SmallNet(nn.Module):
    """conv + ReLU, max pool, residual add + ReLU, global average pool, linear: what ResNets are made of."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.relu(x + self.c2(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def to_onnx_file(module: nn.Module, shape: tuple[int, ...], path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(module.eval(), torch.zeros(1, *shape), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    path.write_bytes(buffer.getvalue())


class Calibration(CalibrationDataReader):
    def __init__(self, shape: tuple[int, ...], count: int = 8) -> None:
        data = torch.randn(count, *shape, generator=torch.Generator().manual_seed(1)).numpy()
        self.batches = iter([{"x": data[i:i + 2]} for i in range(0, count, 2)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantized(float_file, tmp_path, shape: tuple[int, ...], **options) -> object:
    out = tmp_path / "quantized.onnx"
    quantize_static(str(float_file), str(out), Calibration(shape), **options)
    return read_onnx(out)


def assert_exact(proto, model: QuantizedModel, x: torch.Tensor, config: dict | None = None) -> None:
    """ONNX Runtime's output codes equal the onnxruntime mode's (inputs quantized as ONNX Runtime does)."""
    theirs = onnxruntime_codes(proto, output_codes(proto), x, config)
    engine = Engine(model, {"requant": "onnxruntime"}, backend=["torch"])  # the reference backend: no kernel packing
    ours = engine.run(quantize_linear(x, model.input_q))[model.output]
    assert torch.equal(theirs.view_as(ours), ours.long())


@pytest.fixture(scope="module")
def small_net(tmp_path_factory) -> object:
    path = tmp_path_factory.mktemp("float") / "small.onnx"
    to_onnx_file(SmallNet(), (3, 8, 8), path)
    return path


CONFIGS = {
    "qoperator-u8-per-channel": dict(quant_format=QuantFormat.QOperator, per_channel=True,
                                     activation_type=QuantType.QUInt8),
    "qdq-u8-per-tensor": dict(quant_format=QuantFormat.QDQ, per_channel=False, activation_type=QuantType.QUInt8),
    "qoperator-s8-per-channel": dict(quant_format=QuantFormat.QOperator, per_channel=True,
                                     activation_type=QuantType.QInt8),
    "qdq-s8-per-channel": dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8),
    "qoperator-u8-weights": dict(quant_format=QuantFormat.QOperator, per_channel=False,
                                 activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                                 extra_options={"WeightSymmetric": True}),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_quantize_static_models_import_exactly(config: str, small_net, tmp_path) -> None:
    proto = quantized(small_net, tmp_path, (3, 8, 8), **CONFIGS[config])
    model = from_onnx(proto)
    assert [n.op for n in model.nodes] == ["conv2d", "maxpool2d", "conv2d", "add", "adaptive_avgpool2d", "flatten",
                                          "linear"]
    assert model.input_q.signed == ("s8" in config) and model.nodes[0].w_bits == 8
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert_exact(proto, model, x, INT8_QDQ if config.startswith("qdq-s8") else None)


def test_symmetric_activations_import_with_the_float_ops_onnxruntime_keeps(small_net, tmp_path) -> None:
    """Symmetric int8 activations leave ReLUs (zero point 0 is not int8's end), max pools and the global average in
    float between DequantizeLinear and QuantizeLinear: photosim imports clamps and rescales, which its float mode
    runs within a code of ONNX Runtime (the onnxruntime mode has no rule for a float rescale and refuses it)."""
    proto = quantized(small_net, tmp_path, (3, 8, 8), quant_format=QuantFormat.QOperator, per_channel=True,
                      activation_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True})
    model = from_onnx(proto)
    assert [n.op for n in model.nodes].count("clamp") == 2  # the two ReLUs ONNX Runtime keeps
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs = onnxruntime_codes(proto, output_codes(proto), x)
    ours = Engine(model).run(quantize_linear(x, model.input_q))[model.output].long()
    assert int((theirs.view_as(ours) - ours).abs().max()) <= 1


def test_resnet18_imports_exactly_and_runs_on_the_chip(tmp_path) -> None:
    """torchvision's ResNet-18 (random weights and batch-norm statistics) quantized by quantize_static at 32x32."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):  # distinct folded biases (fresh statistics would make them all 0)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
    to_onnx_file(net, (3, 32, 32), tmp_path / "resnet18.onnx")
    proto = quantized(tmp_path / "resnet18.onnx", tmp_path, (3, 32, 32), quant_format=QuantFormat.QOperator,
                      per_channel=True, activation_type=QuantType.QUInt8)
    model = from_onnx(proto, name="resnet18")
    assert sum(n.op == "conv2d" for n in model.nodes) == 20 and sum(n.op == "add" for n in model.nodes) == 8
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert_exact(proto, model, x)
    chip = {"requant": "onnxruntime", "tile": 64, "adc": {"bits": 8, "range": "full"},
            "accumulator": {"bits": 24, "overflow": "saturate"}, "noise": {"output": {"enob": 8}}}
    noisy = simulate(model, x[:1], chip)  # the chip's tiles, ADC, accumulator and noise, as for any other file
    assert noisy.shape == (1, 10) and bool(torch.isfinite(noisy).all())


def qcdq_graph() -> onnx.ModelProto:
    """A Brevitas-style QCDQ graph (QuantizeLinear -> integer Clip -> DequantizeLinear): 4-bit activations, 4-bit
    narrow-range weights quantized in the graph (per channel) and from integers, an int32 bias; uint8 activations
    throughout and a QuantizeLinear after the flatten, as ONNX Runtime fuses only kernels whose input and output
    types agree and whose DequantizeLinear feeds them directly (else it runs them in float)."""
    g = np.random.default_rng(0)
    inits = {
        "x_s": np.array(0.05, np.float32), "x_z": np.array(8, np.uint8), "u4_lo": np.array(0, np.uint8),
        "u4_hi": np.array(15, np.uint8), "s4_lo": np.array(-7, np.int8), "s4_hi": np.array(7, np.int8),
        "w1": (g.standard_normal((6, 3, 3, 3)) * 0.2).astype(np.float32),
        "w1_s": np.full(6, 0.05, np.float32) + np.arange(6, dtype=np.float32) * 0.01, "w1_z": np.zeros(6, np.int8),
        "b1": g.integers(-200, 200, 6).astype(np.int32), "b1_s": np.zeros(6, np.float32),
        "b1_z": np.zeros(6, np.int32), "y1_s": np.array(0.1, np.float32), "y1_z": np.array(0, np.uint8),
        "g_s": np.array(0.04, np.float32), "g_z": np.array(0, np.uint8),
        "w2": g.integers(-7, 8, (4, 6)).astype(np.int8), "w2_s": np.array(0.03, np.float32),
        "w2_z": np.array(0, np.int8), "y2_s": np.array(0.02, np.float32), "y2_z": np.array(125, np.uint8),
    }
    inits["b1_s"] = (inits["x_s"] * inits["w1_s"]).astype(np.float32)

    def n(op: str, ins: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, ins, [out], name=out, **attrs)

    nodes = [
        n("QuantizeLinear", ["x", "x_s", "x_z"], "xq"), n("Clip", ["xq", "u4_lo", "u4_hi"], "xc"),
        n("DequantizeLinear", ["xc", "x_s", "x_z"], "xd"),
        n("QuantizeLinear", ["w1", "w1_s", "w1_z"], "w1q", axis=0), n("Clip", ["w1q", "s4_lo", "s4_hi"], "w1c"),
        n("DequantizeLinear", ["w1c", "w1_s", "w1_z"], "w1d", axis=0),
        n("DequantizeLinear", ["b1", "b1_s", "b1_z"], "b1d", axis=0),
        n("Conv", ["xd", "w1d", "b1d"], "conv", pads=[1, 1, 1, 1]), n("Relu", ["conv"], "relu"),
        n("QuantizeLinear", ["relu", "y1_s", "y1_z"], "y1q"), n("Clip", ["y1q", "u4_lo", "u4_hi"], "y1c"),
        n("DequantizeLinear", ["y1c", "y1_s", "y1_z"], "y1d"), n("GlobalAveragePool", ["y1d"], "gap"),
        n("QuantizeLinear", ["gap", "g_s", "g_z"], "gq"), n("Clip", ["gq", "u4_lo", "u4_hi"], "gc"),
        n("DequantizeLinear", ["gc", "g_s", "g_z"], "gd"), n("Flatten", ["gd"], "flat_float"),
        n("QuantizeLinear", ["flat_float", "g_s", "g_z"], "flat_q"),
        n("DequantizeLinear", ["flat_q", "g_s", "g_z"], "flat"),
        n("Clip", ["w2", "s4_lo", "s4_hi"], "w2c"), n("DequantizeLinear", ["w2c", "w2_s", "w2_z"], "w2d"),
        n("Gemm", ["flat", "w2d"], "fc", transB=1), n("QuantizeLinear", ["fc", "y2_s", "y2_z"], "y2q"),
        n("DequantizeLinear", ["y2q", "y2_s", "y2_z"], "y"),
    ]
    graph = helper.make_graph(nodes, "qcdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_qcdq_sub_8_bit_graph_imports_with_its_bits() -> None:
    proto = qcdq_graph()
    model = from_onnx(proto)
    conv, gap, fc = (model.node(name) for name in ("conv", "gap", "fc"))
    assert (model.input_q.bits, model.input_q.qmin, model.input_q.qmax) == (4, 0, 15)
    assert (conv.output_q.bits, conv.output_q.qmax, conv.w_bits, gap.output_q.bits, fc.w_bits) == (4, 15, 4, 4, 4)
    assert int(model.tensors["conv.weight"].abs().max()) <= 7
    assert_exact(proto, model, torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(4)))


def graph_with(node: onnx.NodeProto, dims: tuple = ("N", 4), domain: str = "", zero_point: int = 0) -> onnx.ModelProto:
    """x -> Q -> DQ -> ``node`` (reading "xd", writing "z") -> Q -> DQ -> y."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(zero_point, np.uint8), "z0")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z0"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z0"], ["xd"]), node,
             helper.make_node("QuantizeLinear", ["z", "s", "z0"], ["zq"]),
             helper.make_node("DequantizeLinear", ["zq", "s", "z0"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)] + (
        [helper.make_opsetid(domain, 1)] if domain else []))


def test_bad_files_are_refused_naming_the_culprit(small_net, tmp_path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    with pytest.raises(PhotosimError, match="not a readable ONNX file"):
        read_onnx(garbage)
    with pytest.raises(PhotosimError, match=r"'soft' \(Softmax\): op Softmax is not supported"):
        from_onnx(graph_with(helper.make_node("Softmax", ["xd"], ["z"], name="soft")))
    custom = helper.make_node("Mystery", ["xd"], ["z"], name="mystery", domain="my.ops")
    with pytest.raises(PhotosimError, match=r"'mystery' \(Mystery\).*custom op library photosim never loads"):
        from_onnx(graph_with(custom, domain="my.ops"))
    with pytest.raises(PhotosimError, match="dynamic or unknown dimensions"):
        from_onnx(graph_with(helper.make_node("Relu", ["xd"], ["z"]), dims=("N", "C")))
    with pytest.raises(PhotosimError, match="float only"):
        from_onnx(read_onnx(small_net))
    external = graph_with(helper.make_node("Relu", ["xd"], ["z"]))
    onnx.external_data_helper.set_external_data(external.graph.initializer[0], location="/etc/passwd")
    external.graph.initializer[0].data_location = TensorProto.EXTERNAL
    (tmp_path / "external.onnx").write_bytes(external.SerializeToString())
    with pytest.raises(PhotosimError, match="external files"):
        read_onnx(tmp_path / "external.onnx")


def test_a_relu_between_dequantize_and_quantize_is_a_clamp() -> None:
    model = from_onnx(graph_with(helper.make_node("Relu", ["xd"], ["z"], name="relu"), zero_point=10))
    assert [(n.op, n.output_q.qmin, n.output_q.qmax) for n in model.nodes] == [("clamp", 10, 255)]
