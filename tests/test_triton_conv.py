"""The implicit-GEMM conv kernel and the direct kernel of narrow groups (photosim.engine.triton_conv, backends
cuda-implicit, and cuda-ideal for grouped layers) against the torch kernels, bit for bit.

Without a GPU the kernel runs under the Triton interpreter on CPU tensors (the ``fused`` fixture of
tests/test_gpu_engine.py sets TRITON_INTERPRET=1 and re-imports the Triton modules); with one it runs compiled on
CUDA tensors, and the ``gpu`` test compares a whole ResNet-18 engine with the CPU's and times it.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import statistics
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from photosim.engine import kernels
from photosim.engine.executor import Engine, execution_plan
from photosim.engine.requant import FloatRequant, RequantParams
from photosim.ir.ranges import int_range
from tests.conftest import make_conv_net, qp
from tests.test_gpu_engine import CUDA, DEVICE, _bench_model, fused  # noqa: F401  (fused: the fixture)

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def conv(fused: ModuleType) -> Iterator[ModuleType]:  # noqa: F811
    """photosim.engine.triton_conv imported with ``fused``'s Triton modules (interpreted without a GPU)."""
    name = "photosim.engine.triton_conv"
    sys.modules.pop(name, None)
    yield importlib.import_module(name)
    sys.modules.pop(name, None)  # a later import compiles afresh


GEOMETRIES = [
    # n, c, h, w, o, kernel, stride, padding, dilation
    (2, 5, 7, 6, 7, (3, 3), (1, 1), (1, 1), (1, 1)),  # 3x3 pad 1, odd sizes, 84 rows: two row blocks
    (2, 6, 9, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2
    (1, 4, 9, 8, 5, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilation 2
    (3, 16, 5, 5, 20, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1
    (1, 3, 13, 11, 8, (7, 7), (2, 2), (3, 3), (1, 1)),  # the ResNet stem: 7x7 stride 2 pad 3
    (1, 70, 5, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1)),  # C = 70: a K step of 64 and a remainder of 6 per tap
    (1, 4, 6, 7, 70, (3, 3), (1, 1), (0, 0), (1, 1)),  # O = 70: a second channel block of 6
    (2, 5, 8, 9, 11, (1, 3), (2, 1), (0, 2), (1, 2)),  # rectangular kernel, stride, padding and dilation
]


# Input (zero point, signed, int8 offset by hand): unsigned codes at 0 and mid-range, signed codes off centre. 8-bit
# codes 0..255 at z = 0 centre to 0..255, shifted by -128 into int8; signed -128..127 at z = -5 centre to -123..132,
# shifted by -5. Every 4-bit operand fits int8 unshifted.
ZERO_POINTS = {8: [(0, False, 128), (128, False, 0), (-5, True, 5)], 4: [(0, False, 0), (8, False, 0), (-1, True, 0)]}


def _on_device(params: RequantParams) -> RequantParams:
    """The requant parameters' tensors on DEVICE, beside the weights."""
    return dataclasses.replace(params, weight_scale=params.weight_scale.to(DEVICE), bias=params.bias.to(DEVICE))


def _layer_case(geometry: tuple, bits: int, signed: bool, seed: int, groups: int = 1) -> tuple[
        torch.Tensor, torch.Tensor, RequantParams]:
    """Random input codes, weights (O, C/groups, kh, kw), bias and per-channel requant parameters whose outputs
    spread over the code range."""
    n, c, h, w, o, kernel = geometry[:6]
    g = torch.Generator().manual_seed(seed)
    lo, hi = int_range(bits, signed)
    x = torch.randint(lo, hi + 1, (n, c, h, w), generator=g, dtype=torch.int32)
    w_lo, w_hi = int_range(bits, True)
    weight = torch.randint(w_lo, w_hi + 1, (o, c // groups, *kernel), generator=g)
    k = c // groups * math.prod(kernel)
    typical = math.sqrt(k) * (hi - lo) * w_hi / 4  # a typical |accumulator|
    bias = torch.randint(-int(typical), int(typical) + 1, (o,), generator=g)
    weight_scale = (torch.rand(o, generator=g, dtype=torch.float64) + 0.5) * 150 / typical
    params = RequantParams(1.0, weight_scale, qp(1.0, 128, 8, qmin=3), bias, None, True, "fbgemm")
    return x, weight, params


def _check_against_torch(conv: ModuleType, geometry: tuple, bits: int, groups: int = 1) -> None:
    """The layer's codes on the kernel == FloatRequant on kernels.conv2d_acc, for each input zero point of ``bits``
    (ZERO_POINTS), NCHW and channels_last input in turn."""
    *_, kernel, stride, padding, dilation = geometry
    layouts = itertools.cycle((torch.contiguous_format, torch.channels_last))  # NCHW and the fused path's NHWC
    for (z_in, signed, offset), layout in zip(ZERO_POINTS[bits], layouts):
        x, weight, params = _layer_case(geometry, bits, signed, bits * 100 + z_in, groups)
        k = weight[0].numel()
        reference_weights = kernels.prepare_weights(weight, groups, kernels.MatmulPlan("int64", k))
        acc = kernels.conv2d_acc(x, z_in, reference_weights, kernel, stride, padding, dilation, groups)
        expected = FloatRequant().requantize(acc + params.bias.view(1, -1, 1, 1), params)
        assert len(expected.unique()) > 20 and ((expected == 3) | (expected == 255)).any()  # spread, clamped
        lo, hi = int_range(bits, signed)
        matmul = kernels.plan_matmul(k, (lo - z_in, hi - z_in), bits, force="int_mm")
        assert matmul.offset == offset
        weights = kernels.prepare_weights(weight, groups, matmul, DEVICE)
        layer = conv.ImplicitLayer.prepare(weights, _on_device(params))
        got = layer.conv(x.to(DEVICE).contiguous(memory_format=layout), z_in, kernel, stride, padding, dilation)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.cpu(), expected), (z_in, signed, layout)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_gives_float_requant_of_the_exact_accumulators(conv: ModuleType, geometry: tuple, bits: int) -> None:
    _check_against_torch(conv, geometry, bits)


GROUPED_GEOMETRIES = [
    # n, c, h, w, o, kernel, stride, padding, dilation, groups; C/G <= 4 runs on the direct kernel
    (2, 8, 7, 6, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8),  # depthwise 3x3, multiplier 1, 84 rows: two row blocks
    (2, 6, 9, 9, 12, (3, 3), (2, 2), (1, 1), (1, 1), 6),  # depthwise, multiplier 2, stride 2
    (1, 5, 9, 8, 5, (5, 5), (1, 1), (2, 2), (1, 1), 5),  # depthwise 5x5 (EfficientNet's)
    (1, 4, 9, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), 4),  # depthwise, multiplier 2, dilation 2
    (2, 40, 5, 5, 40, (5, 5), (2, 2), (2, 2), (1, 1), 40),  # depthwise, C = 40: a second block of 8 channels
    (2, 8, 7, 7, 12, (3, 3), (1, 1), (1, 1), (1, 1), 4),  # groups 4: C/G = 2, O/G = 3 (direct)
    (1, 8, 6, 6, 16, (1, 1), (1, 1), (0, 0), (1, 1), 2),  # pointwise, groups 2: C/G = 4 (direct)
    (2, 12, 6, 7, 10, (3, 3), (2, 1), (1, 0), (1, 1), 2),  # groups 2: C/G = 6, O/G = 5 (grouped GEMM)
    (1, 20, 7, 6, 8, (1, 3), (1, 2), (0, 2), (1, 2), 4),  # groups 4: C/G = 5, rectangular geometry (grouped GEMM)
    (1, 140, 3, 3, 140, (3, 3), (1, 1), (1, 1), (1, 1), 2),  # C/G = O/G = 70: K and O remainders of 6 (GEMM)
]


@pytest.mark.parametrize("geometry", GROUPED_GEOMETRIES)
@pytest.mark.parametrize("bits", [4, 8])
def test_grouped_and_depthwise_kernels_give_float_requant(conv: ModuleType, geometry: tuple, bits: int) -> None:
    *_, groups = geometry
    _check_against_torch(conv, geometry[:-1], bits, groups)


def test_narrow_groups_sum_directly(conv: ModuleType) -> None:
    assert conv.sums_directly(1, 32) and conv.sums_directly(4, 2)  # depthwise, ResNeXt's 32x4d
    assert not conv.sums_directly(5, 4) and not conv.sums_directly(3, 1)  # wide groups; the ungrouped stem


def test_linear_is_the_one_by_one_conv(conv: ModuleType) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (33, 40), generator=g, dtype=torch.int32)
    weight = torch.randint(-128, 128, (70, 40), generator=g)
    params = RequantParams(0.01, torch.rand(70, generator=g, dtype=torch.float64) * 0.05, qp(0.5, 0, 8, signed=True),
                           torch.randint(-3000, 3000, (70,), generator=g), None, True, "fbgemm")
    acc = kernels.linear_acc(x, 0, kernels.prepare_weights(weight, 1, kernels.MatmulPlan("int64", 40)))
    expected = FloatRequant().requantize(acc + params.bias, params)
    matmul = kernels.plan_matmul(40, (0, 255), 8, force="int_mm")
    layer = conv.ImplicitLayer.prepare(kernels.prepare_weights(weight, 1, matmul, DEVICE), _on_device(params))
    assert torch.equal(layer.linear(x.to(DEVICE), 0).cpu(), expected)
    assert layer.linear(x[:0].to(DEVICE), 0).shape == (0, 70)


@pytest.mark.skipif(CUDA, reason="interpreter run on CPU tensors; the gpu test covers CUDA")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("requant", ["float", "fixedpoint"])
def test_engine_on_the_backend_gives_the_torch_engines_codes(conv: ModuleType, bits: int, requant: str) -> None:
    model = make_conv_net(seed=bits, w_bits=bits, a_bits=bits)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    hw = {"requant": requant}
    expected = Engine(model, hw).node_outputs(x)
    engine = Engine(model, hw, backend=["cuda-implicit", "torch"])
    assert {name: choice.backend for name, choice in engine.backends.items()} == dict.fromkeys(
        ("conv1", "dw", "grouped", "fc"), "cuda-implicit")  # dw: depthwise 3x3, grouped: pointwise in 2 groups
    got = engine.node_outputs(x)
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []


@pytest.mark.skipif(CUDA, reason="the interpreter's CPU case")
def test_backend_runs_only_when_required_and_says_why_it_declines(conv: ModuleType,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def reasons(bits: int, hw: dict | None = None, required: tuple[str, ...] = ("cuda-implicit", "torch"),
                a_bits: int | None = None) -> dict:
        rows = execution_plan(make_conv_net(w_bits=bits, a_bits=a_bits or bits), hw, backend=list(required))
        return {row["layer"]: row["declined"] for row in rows}

    assert "cuda-implicit: runs on cpu only when required by name" in reasons(8, required=())["conv1"]
    assert reasons(12)["conv1"] == "cuda-implicit: needs int8 weights (this layer: 12-bit)"
    assert reasons(8, a_bits=12)["conv1"] == \
        "cuda-implicit: input codes x - z_in in [-2047, 2048] span more than the 256 values of int8"
    assert reasons(8, {"requant": "pytorch"})["fc"] == \
        "cuda-implicit: computes the float and fixedpoint requant modes only (this layer: pytorch)"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert reasons(8)["fc"] == "cuda-implicit: needs Triton and a CUDA device (on the CPU: TRITON_INTERPRET=1)"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_compiled_kernel_matches_cpu_on_resnet18_and_its_time() -> None:
    """Every node of the bench's ResNet-18 (W8A8) on cuda-implicit equals the CPU engine's; prints images/s against
    cuda-ideal at batch 1024 (the bench's size)."""
    from photosim.experiments.bench import synthetic, time_interleaved

    model = _bench_model(8)
    x = torch.randn(24, *model.input_shape, generator=torch.Generator().manual_seed(0))
    expected = Engine(model).node_outputs(x)
    engine = Engine(model, device="cuda", backend=["cuda-implicit", "cuda-ideal"])
    assert {choice.backend for choice in engine.backends.values()} == {"cuda-implicit"}
    got = engine.node_outputs(x)
    assert [name for name in expected if not torch.equal(got[name].cpu(), expected[name])] == []

    engines = {"cuda-implicit": engine, "cuda-ideal": Engine(model, device="cuda", backend=["cuda-ideal", "torch"])}
    batch = synthetic(tuple(model.input_shape), 1024, 1).pin_memory()
    times = time_interleaved(engines, batch, runs=5, warmup=2, device=torch.device("cuda"))
    rates = {name: len(batch) / statistics.median(seconds) for name, seconds in times.items()}
    print(", ".join(f"{name}: {rate:.0f} images/s" for name, rate in rates.items()))
