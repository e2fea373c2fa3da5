"""The fused CUDA path (photosim.engine.cuda_ideal and its Triton kernels) against the torch kernels, bit for bit.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before their modules
are imported) on CPU tensors; with one they run compiled on CUDA tensors. The ``gpu`` tests run whole
engines on CUDA and compare every node's codes with the CPU engine.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from photosim.engine import backends, kernels
from photosim.engine.executor import Engine
from photosim.engine.requant import INT32_MAX, INT32_MIN, FloatRequant, RequantParams
from photosim.ir.format import QuantizedModel
from tests.conftest import make_conv_net, qp

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FUSED_MODULES = ("triton_requant", "triton_patches", "cuda_ideal")


@pytest.fixture(scope="module")
def fused() -> Iterator[ModuleType]:
    """photosim.engine.cuda_ideal with kernels that run on DEVICE: interpreted copies when there is no GPU."""
    if CUDA:
        yield importlib.import_module("photosim.engine.cuda_ideal")
        return
    names = [f"photosim.engine.{m}" for m in FUSED_MODULES]
    for name in names:
        sys.modules.pop(name, None)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs, at import
    try:
        yield importlib.import_module("photosim.engine.cuda_ideal")
    finally:
        for name in names:  # a later import compiles afresh
            sys.modules.pop(name, None)
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _params(weight_scale: torch.Tensor, s_in: float, out_q, bias: torch.Tensor) -> RequantParams:
    return RequantParams(s_in, weight_scale, out_q, bias, None, True, "fbgemm")


def _check_rows(fused: ModuleType, acc: torch.Tensor, shift: torch.Tensor, params: RequantParams) -> None:
    """The epilogue on (rows, O + padding) raw accumulators == FloatRequant on the int64 sums."""
    o = shift.numel()
    expected = FloatRequant().requantize(acc[:, :o].to(torch.int64) + shift, params)
    multiplier = (params.input_scale * params.weight_scale / params.output.scale).to(DEVICE)
    out = torch.empty(acc.shape[0], o, dtype=torch.int32, device=DEVICE)
    fused.triton_requant.requantize_rows(acc.to(DEVICE), shift.to(DEVICE), multiplier, params.output, out)
    assert torch.equal(out.cpu(), expected)


def test_epilogue_rounds_ties_to_even_and_clamps(fused: ModuleType) -> None:
    acc = torch.arange(-40, 40, dtype=torch.int32).view(10, 8)  # padding column: O = 7
    for s_w, z_out, lo, hi in [(0.5, 0, 0, 255), (0.25, 3, 0, 255), (0.125, -5, -128, 127), (2.0, 10, 10, 60)]:
        ws = torch.full((7,), s_w, dtype=torch.float64)
        out_q = qp(1.0, z_out, 8, signed=lo < 0, qmin=lo, qmax=hi)
        _check_rows(fused, acc, torch.zeros(7, dtype=torch.int64), _params(ws, 1.0, out_q, torch.zeros(7)))
    extremes = torch.tensor([[INT32_MIN + 1, INT32_MAX, -1, 1, 0, 12345, -12345, 7]] * 20, dtype=torch.int32)
    ws = torch.tensor([1e-9, 1e-6, 0.5, 0.5, 1.0, 3e-4, 3e-4], dtype=torch.float64)
    shift = torch.tensor([2**33, -(2**33), 0, 0, 5, 1, -1])
    _check_rows(fused, extremes, shift, _params(ws, 0.7, qp(0.9, 0, 16, signed=True), shift))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), per_channel=st.booleans(), z_out=st.integers(-20, 20), acc_bits=st.integers(4, 31),
       relu=st.booleans(), float_acc=st.booleans())
def test_epilogue_matches_float_requant(fused: ModuleType, seed: int, per_channel: bool, z_out: int, acc_bits: int,
                                        relu: bool, float_acc: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, o = int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
    acc = torch.randint(-(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1), (rows, o + 3), generator=g, dtype=torch.int32)
    shift = torch.randint(-(2**20), 2**20, (o,), generator=g)
    ws = torch.rand(o if per_channel else 1, generator=g, dtype=torch.float64).float().double().expand(o) * 0.01
    out_q = qp(0.05, z_out, 8, signed=True, qmin=z_out if relu else -128)
    params = _params(ws.contiguous(), 2.0 ** -int(torch.randint(2, 9, (1,), generator=g)), out_q, shift)
    _check_rows(fused, acc.double() if float_acc and acc_bits < 31 else acc, shift, params)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), sa=st.floats(0.001, 1), sb=st.floats(0.001, 1), so=st.floats(0.001, 2),
       channels_last=st.booleans())
def test_add_matches_float_requant(fused: ModuleType, seed: int, sa: float, sb: float, so: float,
                                   channels_last: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, 256, (2, 5, 3, 4), generator=g, dtype=torch.int32) for _ in range(2))
    qa, qb, out_q = qp(sa, 7), qp(sb, 130), qp(so, 3, qmin=3)
    expected = FloatRequant().add(a, b, qa, qb, out_q)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    a_dev, b_dev = (t.to(DEVICE).contiguous(memory_format=layout) for t in (a, b))
    out = fused.ADDS["float"](a_dev, b_dev, qa, qb, out_q)
    assert torch.equal(out.cpu(), expected) and out.is_contiguous(memory_format=layout)
    other = torch.contiguous_format if channels_last else torch.channels_last
    assert fused.ADDS["float"](a_dev, b_dev.contiguous(memory_format=other), qa, qb, out_q) is None


@pytest.mark.parametrize("geometry", [
    # n, c, h, w, kernel, stride, padding, dilation
    (2, 3, 7, 6, 3, 1, 1, 1), (3, 5, 9, 9, 3, 2, 1, 1), (2, 4, 8, 8, 2, 1, 0, 2), (1, 16, 5, 5, 1, 1, 0, 1),
])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_patches_match_the_torch_im2col(fused: ModuleType, geometry: tuple[int, ...], dtype: torch.dtype) -> None:
    n, c, h, w, k, s, p, d = geometry
    x = torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(n * h), dtype=torch.int32)
    plan = kernels.MatmulPlan("int_mm", 1, 128) if dtype == torch.int8 else kernels.MatmulPlan("float32", 99)
    expected = kernels.conv2d_patches(x, 3, plan, (k, k), (s, s), (p, p), (d, d), 1)[0]
    rows, cols = expected.shape
    for layout in (torch.contiguous_format, torch.channels_last):
        out = fused.triton_patches.patches(x.to(DEVICE).contiguous(memory_format=layout), 3, plan.offset, (k, k),
                                           (s, s), (p, p), (d, d), dtype, cols + 5, 40).cpu()
        assert torch.equal(out[:rows, :cols], expected)
        assert not out[rows:].any() and not out[:, cols:].any()


def _with_fused_layers(engine: Engine, fused: ModuleType) -> Engine:
    """A CPU engine whose layers the cuda-ideal backend supports run as it prepares them on CUDA (grouped ones on
    photosim.engine.triton_conv's kernels) and adds take the fused path (under the interpreter)."""
    engine._cuda_adds = fused.ADDS
    cuda_ideal = backends.BACKENDS["cuda-ideal"]
    for name, plan in engine.layer_plans.items():
        if cuda_ideal.supports(plan, torch.device("cuda")) is None:
            engine.layers[name] = cuda_ideal.prepare(plan, torch.device("cpu"))
    return engine


@pytest.mark.skipif(CUDA, reason="interpreter run on CPU tensors; the gpu tests cover CUDA")
@pytest.mark.parametrize("int_mm", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("requant", ["float", "fixedpoint"])
def test_fused_layers_give_the_engines_codes(fused: ModuleType, monkeypatch: pytest.MonkeyPatch, int_mm: bool,
                                             bits: int, requant: str) -> None:
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: int_mm)
    model = make_conv_net(seed=bits, w_bits=bits, a_bits=bits)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    hw = {"requant": requant}
    expected = Engine(model, hw).node_outputs(x)
    engine = _with_fused_layers(Engine(model, hw), fused)
    kernels_used = {name: type(getattr(layer, "fused", None)).__name__ for name, layer in engine.layers.items()}
    assert kernels_used == {"conv1": "FusedLayer", "dw": "ImplicitLayer", "grouped": "ImplicitLayer",
                            "fc": "FusedLayer"}
    got = engine.node_outputs(x)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_cuda_ideal_says_why_it_declines_a_grouped_layer() -> None:
    plans = Engine(make_conv_net(w_bits=12, a_bits=12)).layer_plans
    assert backends.BACKENDS["cuda-ideal"].supports(plans["dw"], torch.device("cuda")) == \
        "grouped layers: needs int8 weights (this layer: 12-bit)"
    assert backends.BACKENDS["cuda-ideal"].supports(plans["conv1"], torch.device("cuda")) is None  # float64 GEMM
    plans = Engine(make_conv_net(w_bits=16, a_bits=16), {"requant": "fixedpoint"}).layer_plans
    assert "could leave int32" in backends.BACKENDS["cuda-ideal"].supports(plans["conv1"], torch.device("cuda"))


# -- whole engines on CUDA ----------------------------------------------------------------------------------

def _digits_model(name: str, bits: int) -> QuantizedModel:
    from photosim.frontend.data import load_dataset
    from photosim.frontend.models import load_model
    from photosim.frontend.ptq import quantize

    calibration = torch.stack([x for x, _ in load_dataset("digits", "calibration")])[:64]
    return quantize(load_model(name).module, calibration, {"w_bits": bits, "a_bits": bits})


def _bench_model(bits: int) -> QuantizedModel:
    from photosim.experiments.bench import build_model, synthetic
    from photosim.frontend.ptq import quantize

    model, shape = build_model("torchvision:resnet18")
    return quantize(model, synthetic(shape, 32, 2), {"w_bits": bits, "a_bits": bits})


def _assert_cuda_matches_cpu(model: QuantizedModel, x: torch.Tensor, hw: dict | None = None) -> None:
    expected = Engine(model, hw).node_outputs(x)
    engine = Engine(model, hw, device="cuda")
    got = engine.node_outputs(x)
    assert any(choice.backend == "cuda-ideal" for choice in engine.backends.values())
    mismatched = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not mismatched


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["digits-cnn", "digits-resnet", "digits-mobilenet"])
@pytest.mark.parametrize("bits", [4, 8, 12])
def test_cuda_engine_matches_cpu_on_shipped_models(name: str, bits: int) -> None:
    model = _digits_model(name, bits)
    x = torch.randn(300, *model.input_shape, generator=torch.Generator().manual_seed(bits))
    _assert_cuda_matches_cpu(model, x)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_engine_runs_mobilenets_depthwise_layers_on_cuda_ideal() -> None:
    model = _digits_model("digits-mobilenet", 8)
    x = torch.randn(300, *model.input_shape, generator=torch.Generator().manual_seed(4))
    engine = Engine(model, device="cuda")
    depthwise = {name: choice.backend for name, choice in engine.backends.items() if "depthwise" in name}
    assert depthwise == dict.fromkeys(("block1.depthwise", "block2.depthwise", "block3.depthwise"), "cuda-ideal")
    expected = Engine(model).node_outputs(x)
    got = engine.node_outputs(x)
    assert [name for name in expected if not torch.equal(got[name].cpu(), expected[name])] == []


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_engine_matches_cpu_on_resnet18(bits: int) -> None:
    model = _bench_model(bits)
    _assert_cuda_matches_cpu(model, torch.randn(24, *model.input_shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 8, 12])
def test_cuda_engine_matches_cpu_on_the_conv_net(bits: int) -> None:
    model = make_conv_net(seed=bits, w_bits=bits, a_bits=bits)
    _assert_cuda_matches_cpu(model, torch.rand(50, 3, 12, 12, generator=torch.Generator().manual_seed(2)))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_and_cpu_draw_the_same_noisy_tile_run() -> None:
    """The bench's tile configuration (tile 64, 8-bit ADC, output noise, saturating accumulator) on ResNet-18: every
    node's codes equal the CPU's (the issue's target was >= 99.9% of the outputs; the noise and every float step are
    correctly rounded on both devices, and one changed code would spread, so anything less is a bug: the first
    differing node names it)."""
    from photosim.experiments.bench import CONFIGS

    hw = CONFIGS[2].hw
    model = _bench_model(8)
    x = torch.randn(64, *model.input_shape, generator=torch.Generator().manual_seed(5))
    expected = Engine(model, hw, seed=3).node_outputs(x, first_sample=100)
    engine = Engine(model, hw, seed=3, device="cuda")
    got = engine.node_outputs(x, first_sample=100)
    assert {choice.backend for choice in engine.backends.values()} == {"fused-triton"}
    assert [node.name for node in model.nodes if not torch.equal(got[node.name], expected[node.name])] == []
