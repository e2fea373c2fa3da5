"""photosim export: ONNX Runtime runs the exported file as photosim's onnxruntime requant mode computes the integer
model, code for code, from the float input on (built-in digits models at 8 and 4 bits, hypothesis graphs of every
exported op, both forms); what cannot be exported is refused by node name."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import ModelBuilder, make_cnn_ops_net, make_conv_net, qp, random_weights  # noqa: E402

from photosim.engine.executor import Engine  # noqa: E402
from photosim.engine.onnx_requant import onnxruntime_codes  # noqa: E402
from photosim.errors import PhotosimError  # noqa: E402
from photosim.experiments.workflow import DataSpec, quantize_loaded  # noqa: E402
from photosim.frontend.models import load_model  # noqa: E402
from photosim.frontend.qconfig import QuantSpec  # noqa: E402
from photosim.ir.format import QuantizedModel  # noqa: E402
from photosim.ir.onnx_export import FORMS, to_onnx  # noqa: E402

FLOAT_OPS = {"Conv", "Gemm", "Add", "GlobalAveragePool"}  # in an optimized QDQ graph: a kernel ORT did not fuse


@cache
def builtin(name: str, bits: int) -> QuantizedModel:
    loaded = load_model(name, None, None, False)
    return quantize_loaded(loaded, DataSpec("digits"), QuantSpec(w_bits=bits, a_bits=bits, calibration_samples=32),
                           num_classes=None,
                           cifar_stem=False)


@pytest.fixture(scope="module")
def digits_test() -> torch.Tensor:
    test = DataSpec("digits").split("test", (1, 8, 8))
    return torch.stack([test[i][0] for i in range(len(test))])


def exported_codes(model: QuantizedModel, form: str, x: torch.Tensor, tensor: str | None = None) -> torch.Tensor:
    """ONNX Runtime's codes of a photosim tensor (default: the output) in the exported file, as photosim codes."""
    proto = to_onnx(model, form)
    meta = {p.key: p.value for p in proto.metadata_props}
    tensor = tensor or model.output
    offset = json.loads(meta["photosim.code_offsets"]).get(tensor, 0)
    return onnxruntime_codes(proto, json.loads(meta["photosim.codes"])[tensor], x) - offset


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["digits-cnn", "digits-resnet", "digits-mobilenet"])
def test_builtin_models_run_in_onnxruntime_as_the_onnxruntime_mode(name: str, bits: int,
                                                                   digits_test: torch.Tensor) -> None:
    """Every output code of the test split equal to the onnxruntime mode's; top-1 as the float mode's on >= 99.5%."""
    model = builtin(name, bits)
    x = digits_test if bits == 8 else digits_test[:120]  # the 4-bit models on a third of the split, for time
    ours = Engine(model, {"requant": "onnxruntime"}, backend=["torch"]).codes(x).long()  # no kernel packing
    float_mode = Engine(model, backend=["torch"]).codes(x)
    for form in FORMS:
        theirs = exported_codes(model, form, x)
        assert torch.equal(theirs, ours), form
        assert (theirs.argmax(1) == float_mode.argmax(1)).float().mean() >= 0.995, form


def test_onnxruntime_fuses_the_qdq_form_into_its_integer_kernels(tmp_path) -> None:
    """No float Conv / Gemm / Add / GlobalAveragePool is left after ONNX Runtime's optimizer (a 4-bit ResNet with
    signed, symmetric activations: uint8 containers, integer Clips)."""
    model = quantize_loaded(load_model("digits-resnet", None, None, False), DataSpec("digits"),
                            QuantSpec(w_bits=4, a_bits=4, activation_range="symmetric", calibration_samples=32),
                            num_classes=None,
                            cifar_stem=False)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(to_onnx(model, "qdq").SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {"QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool"} <= ops
    assert not ops & FLOAT_OPS


def test_metadata_states_what_onnx_cannot() -> None:
    model = builtin("digits-cnn", 4)
    proto = to_onnx(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    activations = json.loads(meta["photosim.activations"])
    assert activations["conv1"]["bits"] == 4 and activations["conv1"]["qmax"] == 15
    assert json.loads(meta["photosim.weights"])["fc1"]["w_bits"] == 4
    assert "accumulators" in meta["photosim.not_expressed"] and "hardware model" in meta["photosim.not_expressed"]
    assert meta["photosim.opset"] == "13" and proto.opset_import[0].version == 13
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    bounds = {tuple(int(onnx.numpy_helper.to_array(i)) for i in proto.graph.initializer if i.name in c.input[1:])
              for c in clips}
    assert (0, 15) in bounds  # 4-bit codes carried in uint8 with their range


def random_graph(draw: st.DrawFn) -> tuple[QuantizedModel, set[str]]:
    """A random graph of every exported op with random quantization (signed or not, 2..8 bits, narrowed clamps);
    also the tensors whose QDQ export is exact (all but a signed add and what follows it: ONNX Runtime runs QDQ
    adds on uint8 containers, docs/onnx.md)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def q(signed: bool | None = None, relu: bool = False):
        bits = draw(st.integers(2, 8))
        signed = draw(st.booleans()) if signed is None else signed
        lo, hi = qp(bits=bits, signed=signed).qmin, qp(bits=bits, signed=signed).qmax
        zero_point = draw(st.integers(lo, hi))
        scale = draw(st.floats(0.01, 0.3))
        return qp(scale, zero_point, bits, signed, qmin=zero_point if relu else None)

    channels = draw(st.sampled_from([3, 4, 8]))
    m = ModelBuilder((channels, 9, 9), q(signed=False))
    kernel = draw(st.sampled_from([1, 3]))
    groups = draw(st.sampled_from([1, channels]))
    scale_w = torch.rand(channels, generator=g) * 0.05 + 0.005 if draw(st.booleans()) else 0.02
    m.conv("conv1", "x", q(relu=draw(st.booleans())), random_weights((channels, channels // groups, kernel, kernel),
           draw(st.integers(2, 8)), g), torch.randint(-300, 300, (channels,), generator=g), scale_w,
           stride=draw(st.sampled_from([1, 2])), padding=draw(st.integers(0, kernel // 2)), groups=groups)
    c1 = m.qparams("conv1")
    m.add("clamp1", "clamp", ["conv1"], qp(c1.scale, c1.zero_point, c1.bits, c1.signed,
                                           qmin=max(c1.qmin, c1.zero_point - 3), qmax=c1.qmax))
    pool_k = draw(st.sampled_from([2, 3]))
    m.add("pool", "maxpool2d", ["clamp1"], kernel=[pool_k] * 2, stride=[draw(st.sampled_from([1, 2]))] * 2,
          padding=[draw(st.integers(0, pool_k // 2))] * 2, dilation=[1, 1], ceil_mode=draw(st.booleans()))
    m.conv("conv2", "pool", q(), random_weights((channels, channels, 3, 3), 8, g),
           torch.randint(-300, 300, (channels,), generator=g), 0.01, padding=1)
    add_q = q()
    m.add("add", "add", ["conv2", "pool"], add_q)
    m.add("gap", "adaptive_avgpool2d", ["add"], q(), output_size=[1, 1])
    m.add("flat", "flatten", ["gap"], start_dim=1)
    m.linear("fc", "flat", q(), random_weights((5, channels), 8, g), torch.randint(-300, 300, (5,), generator=g),
             0.02)
    model = m.build()
    names = {"x", *(n.name for n in model.nodes)}
    return model, names if not add_q.signed else {"x", "conv1", "clamp1", "pool", "conv2"}


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_hypothesis_graphs_export_code_for_code(data: st.DataObject) -> None:
    model, exact_in_qdq = random_graph(data.draw)
    x = torch.rand(16, *model.input_shape, generator=torch.Generator().manual_seed(1)) * 6 - 1
    ours = Engine(model, {"requant": "onnxruntime"}).node_outputs(x)
    for form in FORMS:
        for tensor in exact_in_qdq if form == "qdq" else ours:
            assert torch.equal(exported_codes(model, form, x, tensor), ours[tensor].long()), (form, tensor)


def test_ops_without_an_exact_kernel_are_refused_by_name() -> None:
    with pytest.raises(PhotosimError, match=r"node 'avg' \(avgpool2d"):
        to_onnx(make_conv_net())
    with pytest.raises(PhotosimError, match=r"'gate' \(table.*'gated' \(mul.*'both' \(concat"):
        to_onnx(make_cnn_ops_net())
    wide = make_conv_net(a_bits=12)
    with pytest.raises(PhotosimError, match="12-bit codes"):
        to_onnx(wide)
    with pytest.raises(PhotosimError, match="unknown ONNX form"):
        to_onnx(builtin("digits-cnn", 8), "qcdq")


def test_the_exported_input_quantizes_as_photosim() -> None:
    """Pixels of value 0.5 at scale 1/255 land on 127.5 in photosim (float32 reciprocal) and on 127.49999 in a plain
    QuantizeLinear (division): the export multiplies by the reciprocal, so ONNX Runtime's input codes are photosim's."""
    model = builtin("digits-cnn", 8)
    x = torch.full((1, 1, 8, 8), 0.5)
    theirs = exported_codes(model, "qoperator", x, model.input_name)
    assert int(theirs.flatten()[0]) == int(model.input_q.quantize(x).flatten()[0]) == 128
    assert np.float32(0.5) / np.float32(model.input_q.scale) < 127.5  # what a division would round down
