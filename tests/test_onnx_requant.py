"""The onnxruntime requant mode against ONNX Runtime's own CPU kernels, element by element (hypothesis draws the
scales, zero points, shapes and codes): QLinearConv, QGemm, QLinearAdd, QLinearGlobalAveragePool, QuantizeLinear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from photosim.engine.onnx_requant import OnnxRuntimeRequant, quantize_linear  # noqa: E402
from photosim.engine.requant import REQUANT_MODES, RequantParams  # noqa: E402
from photosim.errors import PhotosimError  # noqa: E402
from photosim.ir.format import QParams  # noqa: E402

MODE = REQUANT_MODES["onnxruntime"]
FAST = settings(max_examples=25, deadline=None)


def q8(scale: float, zero_point: int, signed: bool) -> QParams:
    lo, hi = (-128, 127) if signed else (0, 255)
    return QParams(float(np.float32(scale)), zero_point, 8, signed, lo, hi)


def run_ort(nodes: list, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray]) -> np.ndarray:
    """One ONNX graph (opset 13 + com.microsoft) on ONNX Runtime's CPU provider -> its single output as int64."""
    types = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
             np.dtype(np.float32): TensorProto.FLOAT}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, types[v.dtype], list(v.shape)) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info("y")], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0].astype(np.int64)


def quant_inits(prefix: str, q: QParams) -> dict[str, np.ndarray]:
    return {f"{prefix}_s": np.array(q.scale, np.float32),
            f"{prefix}_z": np.array(q.zero_point, np.int8 if q.signed else np.uint8)}


def codes(generator: np.random.Generator, q: QParams, shape: tuple[int, ...]) -> np.ndarray:
    return generator.integers(q.qmin, q.qmax + 1, shape).astype(np.int8 if q.signed else np.uint8)


scales = st.floats(1e-3, 0.2)
zero_points = st.integers(0, 255)  # an unsigned code; the signed container's zero point is 128 lower


def act(scale: float, zero_point: int, signed: bool) -> QParams:
    return q8(scale, zero_point - 128 if signed else zero_point, signed)


@FAST
@given(seed=st.integers(0, 2**16), signed=st.booleans(), per_channel=st.booleans(), depthwise=st.booleans(),
       kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), sx=scales, sy=scales, zx=zero_points,
       zy=zero_points)
def test_conv_requantization_equals_qlinearconv(seed: int, signed: bool, per_channel: bool, depthwise: bool,
                                                kernel: int, stride: int, sx: float, sy: float, zx: int,
                                                zy: int) -> None:
    g = np.random.default_rng(seed)
    channels = int(g.choice([1, 3, 8, 16]))
    out_channels = channels if depthwise else int(g.choice([1, 4, 24]))
    groups = channels if depthwise else 1
    pad = int(g.integers(0, kernel // 2 + 1))
    qx, qy = act(sx, zx, signed), act(sy * 4, zy, signed)
    x = codes(g, qx, (2, channels, 9, 9))
    w = g.integers(-127, 128, (out_channels, channels // groups, kernel, kernel)).astype(np.int8)
    sw = np.asarray(10 ** g.uniform(-3, -1, out_channels if per_channel else ()), np.float32)
    bias = g.integers(-30000, 30000, out_channels).astype(np.int32)
    node = helper.make_node("QLinearConv", ["x", "x_s", "x_z", "w", "w_s", "w_z", "y_s", "y_z", "b"], ["y"],
                            group=groups, pads=[pad] * 4, strides=[stride] * 2, kernel_shape=[kernel] * 2)
    inits = {**quant_inits("x", qx), **quant_inits("y", qy), "w": w, "w_s": sw, "w_z": np.zeros(sw.shape, np.int8),
             "b": bias}
    theirs = run_ort([node], {"x": x}, inits)
    acc = F.conv2d(torch.from_numpy(x.astype(np.int64) - qx.zero_point).double(), torch.from_numpy(w).double(), None,
                   stride, pad, 1, groups).round().long() + torch.from_numpy(bias).long().view(1, -1, 1, 1)
    params = RequantParams(qx.scale, torch.from_numpy(sw).double().expand(out_channels), qy, torch.zeros(1), None,
                           per_channel, "mlas", "conv")
    assert torch.equal(MODE.requantize(acc, params).long(), torch.from_numpy(theirs))


@FAST
@given(seed=st.integers(0, 2**16), signed=st.booleans(), per_channel=st.booleans(), sx=scales, sy=scales,
       zx=zero_points, zy=zero_points)
def test_linear_requantization_equals_qgemm(seed: int, signed: bool, per_channel: bool, sx: float, sy: float, zx: int,
                                            zy: int) -> None:
    g = np.random.default_rng(seed)
    rows, k, n = int(g.integers(1, 6)), int(g.integers(1, 300)), int(g.integers(1, 40))
    qx, qy = act(sx, zx, signed), act(sy * 4, zy, signed)
    x = codes(g, qx, (rows, k))
    w = g.integers(-127, 128, (n, k)).astype(np.int8)
    sw = np.asarray(10 ** g.uniform(-3, -1, n if per_channel else ()), np.float32)
    bias = g.integers(-30000, 30000, n).astype(np.int32)
    node = helper.make_node("QGemm", ["x", "x_s", "x_z", "w", "w_s", "w_z", "b", "y_s", "y_z"], ["y"],
                            domain="com.microsoft", transB=1)
    inits = {**quant_inits("x", qx), **quant_inits("y", qy), "w": w, "w_s": sw, "w_z": np.zeros(sw.shape, np.int8),
             "b": bias}
    theirs = run_ort([node], {"x": x}, inits)
    acc = torch.from_numpy(x.astype(np.int64) - qx.zero_point) @ torch.from_numpy(w.astype(np.int64)).T
    params = RequantParams(qx.scale, torch.from_numpy(sw).double().expand(n), qy, torch.zeros(1), None, per_channel,
                           "mlas", "fc")
    assert torch.equal(MODE.requantize(acc + torch.from_numpy(bias).long(), params).long(), torch.from_numpy(theirs))


@settings(max_examples=4, deadline=None)
@given(signed=st.booleans(), sa=scales, sb=scales, sc=scales, za=zero_points, zb=zero_points, zc=zero_points)
def test_add_equals_qlinearadd_on_every_pair_of_codes(signed: bool, sa: float, sb: float, sc: float, za: int,
                                                      zb: int, zc: int) -> None:
    """All 65,536 pairs of codes: the FMA order of MLAS's AVX2 kernel decides ties that a plain float sum misses."""
    qa, qb, qc = act(sa, za, signed), act(sb, zb, signed), act(sc, zc, signed)
    lo = -128 if signed else 0
    dtype = np.int8 if signed else np.uint8
    a = (np.arange(256).repeat(256) + lo).astype(dtype)
    b = (np.tile(np.arange(256), 256) + lo).astype(dtype)
    node = helper.make_node("QLinearAdd", ["a", "a_s", "a_z", "b", "b_s", "b_z", "y_s", "y_z"], ["y"],
                            domain="com.microsoft")
    theirs = run_ort([node], {"a": a, "b": b}, {**quant_inits("a", qa), **quant_inits("b", qb),
                                                **quant_inits("y", qc)})
    ours = MODE.add(torch.from_numpy(a.astype(np.int64)), torch.from_numpy(b.astype(np.int64)), qa, qb, qc)
    assert torch.equal(ours.long(), torch.from_numpy(theirs))


@FAST
@given(seed=st.integers(0, 2**16), signed=st.booleans(), sx=scales, sy=scales, zx=zero_points, zy=zero_points,
       h=st.integers(1, 9), w=st.integers(1, 9))
def test_average_equals_qlinearglobalaveragepool(seed: int, signed: bool, sx: float, sy: float, zx: int, zy: int,
                                                 h: int, w: int) -> None:
    g = np.random.default_rng(seed)
    qx, qy = act(sx, zx, signed), act(sy / 4, zy, signed)
    x = codes(g, qx, (2, int(g.integers(1, 40)), h, w))
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "x_s", "x_z", "y_s", "y_z"], ["y"],
                            domain="com.microsoft", channels_last=0)
    theirs = run_ort([node], {"x": x}, {**quant_inits("x", qx), **quant_inits("y", qy)})
    sums = torch.from_numpy(x.astype(np.int64) - qx.zero_point).sum((2, 3), keepdim=True)
    ours = MODE.average(sums, torch.tensor(h * w).view(1, 1, 1, 1), qx, qy)
    assert torch.equal(ours.long(), torch.from_numpy(theirs))


@FAST
@given(seed=st.integers(0, 2**16), signed=st.booleans(), scale=st.floats(1e-4, 1.0), zero_point=zero_points)
def test_quantize_linear_equals_onnxruntime(seed: int, signed: bool, scale: float, zero_point: int) -> None:
    q = act(scale, zero_point, signed)
    x = (np.random.default_rng(seed).standard_normal(4096) * 100 * q.scale).astype(np.float32)
    theirs = run_ort([helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["y"])], {"x": x}, quant_inits("x", q))
    assert torch.equal(quantize_linear(torch.from_numpy(x), q).long(), torch.from_numpy(theirs))


def test_accumulators_outside_int32_are_refused() -> None:
    q = q8(0.1, 0, False)
    params = RequantParams(0.1, torch.ones(1, dtype=torch.float64), q, torch.zeros(1), None, False, "mlas", "big")
    with pytest.raises(PhotosimError, match="'big'.*outside int32"):
        OnnxRuntimeRequant().requantize(torch.tensor([[1 << 31]]), params)


def test_the_mode_is_selected_like_pytorch() -> None:
    """Registered under its name, refusing the ops it has no ONNX Runtime rule for, 8-bit at most."""
    assert isinstance(MODE, OnnxRuntimeRequant) and MODE.max_bits == 8
    assert {"avgpool2d", "softmax", "mul"} <= MODE.unsupported
