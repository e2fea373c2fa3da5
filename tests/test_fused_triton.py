"""The fused Triton tile step against the torch path (AnalogLayer.dot), bit for bit: interpreted on CPU tensors
where there is no GPU (Triton then is imported in interpreter mode), else compiled on CUDA tensors."""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton fixes the mode of every kernel when it is imported
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from conftest import analog_layer, box_muller_edge_words  # noqa: E402

from photosim.engine import analog, backends, fused_triton, kernels, triton_philox  # noqa: E402
from photosim.engine.plan import tile_plan  # noqa: E402
from photosim.hardware import philox  # noqa: E402
from photosim.hardware.config import LayerHardware  # noqa: E402
from photosim.hardware.readout import Readout  # noqa: E402
from photosim.ir.observers import ActivationObserver  # noqa: E402

FUSED_TRITON = backends.BACKENDS["fused-triton"]

# Interpreted kernels run on CPU tensors, compiled ones on CUDA tensors.
DEVICE = "cpu" if triton.knobs.runtime.interpret else "cuda" if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="Triton was imported compiled on a machine without CUDA")


@dataclass(frozen=True)
class Case:
    """One layer: shapes, operands and readout settings."""

    name: str
    groups: int = 1
    ids: tuple[int, ...] = (0, 1)
    rows: int = 3  # P, rows per sample
    k: int = 40
    o: int = 12
    tile: int | None = 16
    operands: Literal["int8", "uint8", "float32"] = "float32"  # the range of x - z_in: X_RANGES
    float64_plan: bool = False  # the float64 plan (float64 tile values under noise), not the CUDA tile_plan's
    output: float = 0.0
    shot: float = 0.0
    adc_bits: int | None = None
    adc_range: float = 1.0  # fraction of FS
    acc_bits: int = 32
    overflow: str = "none"
    bias_at: str | None = "start"  # None: no bias


# x - z_in: signed ones that fit int8; unsigned ones (8-bit activations) that fit int8 with the offset -128; and a
# 9-bit range, which does not, so that the CUDA tile_plan gives float32 operands.
X_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "float32": (-200, 255)}

CASES = [
    Case("one tile, ideal, exact", operands="int8", k=24, tile=None, bias_at=None),
    Case("output noise, adc 8 clips, wrap", groups=2, ids=(7, 2, 40), rows=4, output=0.02, adc_bits=8,
         adc_range=0.1, acc_bits=9, overflow="wrap"),
    Case("shot noise int8, O % 4 != 0, adc 4, saturate, bias end", operands="int8", k=50, o=10, tile=13, shot=0.05,
         adc_bits=4, adc_range=0.05, acc_bits=4, overflow="saturate", bias_at="end"),
    Case("both noises unsigned (offset), 3 groups, K % L != 0, ideal adc, none", operands="uint8", groups=3, ids=(5,),
         rows=7, output=0.01, shot=0.02, acc_bits=14),
    Case("both noises int8, adc 8, wrap, bias end, big ids", operands="int8", ids=(2 ** 32 - 1, 3, 12345),
         output=0.03, shot=0.03, adc_bits=8, adc_range=0.2, acc_bits=8, overflow="wrap", bias_at="end"),
    Case("no noise, adc 4 clips (float64 division), saturate", k=37, tile=8, adc_bits=4, adc_range=0.03,
         acc_bits=5, overflow="saturate"),
    Case("no noise ideal int8, wrap, bias end", operands="int8", groups=2, k=45, tile=10, acc_bits=12,
         overflow="wrap", bias_at="end"),
    Case("output noise, 64-bit wrap", output=0.05, adc_bits=8, adc_range=0.05, acc_bits=64, overflow="wrap"),
    Case("float64 tile values: int8 with L = 1024", operands="int8", float64_plan=True, ids=(4,), rows=5, k=1100,
         o=6, tile=1024, output=0.001, shot=0.001, adc_bits=12, adc_range=0.02, acc_bits=14, overflow="saturate"),
    Case("many blocks: M and O over one block", ids=tuple(range(0, 40, 3)), rows=5, o=70, k=20, tile=9,
         output=0.01, adc_bits=6, adc_range=0.1, acc_bits=7, overflow="wrap"),
    Case("unsigned, one long tile (FS > 2^24), both noises, adc 10 clips, saturate", operands="uint8", ids=(6, 1),
         rows=3, k=603, o=6, tile=None, output=0.002, shot=0.002, adc_bits=10, adc_range=0.01, acc_bits=12,
         overflow="saturate"),
    Case("unsigned, T = 3 long tiles (FS > 2^24), K % L != 0, no noise, ideal, wrap, bias end", operands="uint8",
         ids=(9,), rows=4, k=1100, o=10, tile=520, acc_bits=28, overflow="wrap", bias_at="end"),
]


def cuda_layout(w: torch.Tensor, plan: kernels.MatmulPlan) -> torch.Tensor:
    """Weights (G, K, O) as kernels.prepare_weights lays them out for ``plan`` on CUDA (which it cannot do without
    a GPU): int_mm ones in int8, K and O zero-padded to multiples of 8, column-major."""
    if plan.path != "int_mm":
        return w.to(plan.dtype)
    padded = torch.nn.functional.pad(w, (0, -w.shape[2] % 8, 0, -w.shape[1] % 8)).to(torch.int8)
    return padded.transpose(1, 2).contiguous().transpose(1, 2)


def make_layer(case: Case, seed: int = 0) -> tuple[analog.AnalogLayer, torch.Tensor, torch.Tensor]:
    """The AnalogLayer of a case, planned and laid out as on a GPU, with random x - z_in (G, M, K) and weights
    (G, K, O)."""
    gen = torch.Generator().manual_seed(seed)
    x_lo, x_hi = X_RANGES[case.operands]
    x_max, w_max = max(-x_lo, x_hi), 128
    g, m = case.groups, len(case.ids) * case.rows
    a = torch.randint(x_lo, x_hi + 1, (g, m, case.k), generator=gen)
    w = torch.randint(-128, 128, (g, case.k, case.o), generator=gen)
    accumulator = {"bits": case.acc_bits, "overflow": case.overflow, "bias_at": case.bias_at or "start"}
    hw = {"tile": case.tile, "adc": {"bits": case.adc_bits, "range": case.adc_range}, "accumulator": accumulator,
          "noise": {"output": {"sigma": case.output}, "shot": {"sigma": case.shot}}}
    readout = Readout.of(LayerHardware.model_validate(hw), case.k, x_max, w_max, layer=3)
    plan = (kernels.MatmulPlan("float64", case.k) if case.float64_plan
            else tile_plan(case.k, readout, (x_lo, x_hi), 8, torch.device("cuda")))
    assert plan.path == {"float32": "float32", "int8": "int_mm", "uint8": "int_mm"}[case.operands] or case.float64_plan
    weights = kernels.IntegerWeights(plan, cuda_layout(w, plan), None, case.k, case.o)
    fs = int(readout.full_scale)
    bias = torch.randint(-fs // 4, fs // 4, (g, case.o), generator=gen) if case.bias_at else None
    layer = analog_layer(hw, weights, bias, x_max=x_max, w_max=w_max, seed=11, repeat=2, index=3)
    return layer, a, w


def with_readout(layer: analog.AnalogLayer, /, **changes: object) -> analog.AnalogLayer:
    """A copy of the layer whose readout has ``changes`` (seed, repeat, layer, ...)."""
    return replace(layer, plan=replace(layer.plan, readout=replace(layer.readout, **changes)))


def operands(layer: analog.AnalogLayer, a: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x - z_in -> the layer's operands x - z_in - offset in ``dtype`` (None: the plan's), as conv2d_patches gives."""
    plan = layer.weights.plan
    return (a - plan.offset).to(dtype or plan.dtype)


def fused(layer: analog.AnalogLayer, a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
          case: Case) -> fused_triton.TileStep:
    """tile_step called as AnalogLayer.dot would call it, on int8 or float32 operands as the case has them."""
    readout = layer.readout
    bias = None if layer.bias is None else torch.round(layer.bias.double() / readout.step).to(torch.int64)
    dtype = torch.float32 if case.operands == "float32" else torch.int8
    return fused_triton.tile_step(operands(layer, a, dtype), w.to(dtype), ids, readout, bias, shift=layer.tile_shift)


def check_against_reference(case: Case) -> tuple[float, fused_triton.TileStep]:
    """Run both paths on one case; assert the diagnostics agree; return the fraction of equal accumulators."""
    layer, a, w = make_layer(case)
    ids = torch.tensor(case.ids)
    expected = layer.dot(operands(layer, a), ids)
    got = fused(layer, a.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), case)
    stats = layer.stats
    exact = torch.matmul(a.double(), w.double())
    assert torch.equal(got.exact.cpu(), exact.to(torch.int64))
    acc = got.acc.cpu()
    if layer.bias is not None:
        exact = exact + layer.bias.unsqueeze(1)
    assert float(exact.pow(2).sum()) == pytest.approx(stats.signal_power, rel=1e-12)
    if torch.equal(acc, expected):
        assert (got.clipped, got.overflowed) == (stats.clipped, stats.overflowed)
        error = float((acc.double() * layer.step - exact).pow(2).sum())
        assert error == pytest.approx(stats.error_power, rel=1e-12, abs=1e-9)
    return float((acc == expected).double().mean()), got


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_equals_torch_path_bit_for_bit(case: Case) -> None:
    equal, got = check_against_reference(case)
    assert equal == 1.0
    if case.adc_bits and case.adc_range < 1:
        assert got.clipped > 0
    if case.acc_bits < 16:
        assert got.overflowed > 0


ON_THE_KERNEL = [c for c in CASES if not c.float64_plan]


@pytest.mark.parametrize("case", ON_THE_KERNEL, ids=[c.name for c in ON_THE_KERNEL])
def test_analog_layer_on_the_kernel_equals_its_cpu_path(case: Case) -> None:
    """AnalogLayer.dot_triton (the engine's CUDA path) gives AnalogLayer.dot's accumulators and diagnostics, int8
    operands from weights padded as on CUDA included."""
    layer, a, _ = make_layer(case)
    reference = copy.deepcopy(layer)
    ids = torch.tensor(case.ids)
    a = operands(layer, a)
    assert FUSED_TRITON.supports(layer.plan, torch.device(DEVICE)) is None
    if DEVICE != "cpu":
        layer.weights = replace(layer.weights, matrix=layer.weights.matrix.to(DEVICE))
        layer.bias = None if layer.bias is None else layer.bias.to(DEVICE)
    got = layer.dot_triton(a.to(DEVICE), ids.to(DEVICE)).cpu()
    assert torch.equal(got, reference.dot(a, ids))
    for name in ("outputs", "overflowed", "tile_values", "clipped", "max_abs_acc"):
        assert getattr(layer.stats, name) == getattr(reference.stats, name), name
    for name in ("signal_power", "error_power"):
        assert getattr(layer.stats, name) == pytest.approx(getattr(reference.stats, name), rel=1e-12, abs=1e-9)


def test_unsigned_long_tiles_run_on_the_kernel_as_int8() -> None:
    """8-bit unsigned activations of a long tile (FS > 2^24, beyond float32-exact sums): the CUDA tile plan gives
    int8 operands with the offset -128, which the kernel takes; float operands of that full scale it does not."""
    case = CASES[-1]
    layer, _, _ = make_layer(case)
    assert layer.weights.plan == kernels.MatmulPlan("int_mm", case.k, 128) and layer.full_scale > 1 << 24
    assert FUSED_TRITON.supports(layer.plan, torch.device(DEVICE)) is None
    assert backends.choose(layer.plan, torch.device("cpu")).backend != "fused-triton"  # on CPUs only on request
    float64, _, _ = make_layer(replace(case, float64_plan=True))
    assert "no exact tile sums" in FUSED_TRITON.supports(float64.plan, torch.device(DEVICE))


def test_repeat_seed_and_layer_change_the_noise() -> None:
    layer, a, w = (t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in make_layer(CASES[1]))
    ids = torch.tensor(CASES[1].ids, device=DEVICE)
    base = fused(layer, a, w, ids, CASES[1]).acc
    for change in ({"seed": 12}, {"repeat": 3}, {"layer": 4}):
        other = with_readout(layer, **change)
        assert not torch.equal(fused(other, a, w, ids, CASES[1]).acc, base)


def test_refuses_inexact_operands_and_bad_shapes() -> None:
    layer, a, w = make_layer(CASES[1])
    readout = layer.readout
    readout = replace(readout, w_max=-(-(1 << 24) // (readout.tile * readout.x_max)))  # FS just over 2^24
    assert readout.full_scale >= 1 << 24
    assert fused_triton.operand_path(torch.float32, torch.float32, readout.full_scale) is None
    assert fused_triton.operand_path(torch.int8, torch.int8, readout.full_scale) == "int8"
    assert fused_triton.operand_path(torch.int8, torch.int8, float(1 << 31)) is None
    assert fused_triton.operand_path(torch.int8, torch.float32, 1.0) is None
    with pytest.raises(ValueError, match="torch path"):
        fused_triton.tile_step(a.float(), w.float(), torch.tensor(CASES[1].ids), readout)
    with pytest.raises(ValueError, match="equal size"):
        fused_triton.tile_step(a.float(), w.float(), torch.tensor([0, 1, 2, 3, 4]), layer.readout)
    with pytest.raises(ValueError, match="shift"):
        fused_triton.tile_step(a.float(), w.float(), torch.tensor(CASES[1].ids), layer.readout,
                               shift=torch.zeros(2, 2, 12, dtype=torch.int64))
    x = torch.zeros(2, 5, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="3x3 conv of 5 channels in 2 groups"):
        fused_triton.conv_tile_step(x, 0, layer.weights.plan, (3, 3), (1, 1), (1, 1), (1, 1), w.float(),
                                    torch.tensor([0, 1]), layer.readout)
    with pytest.raises(ValueError, match="tile values must be"):
        fused_triton.readout_step(torch.zeros(1, 2, 3, 4, dtype=torch.int16), torch.tensor([0]), layer.readout)
    for hw in ({"detector": {"saturation": 0.5}}, {"noise": {"custom": {"function": "math:fabs"}}}):
        assert FUSED_TRITON.supports(analog_layer(hw, layer.weights, None, x_max=255, w_max=128).plan,
                                     torch.device(DEVICE)) is not None, hw


@triton.jit
def _box_muller_parts(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out (3, n) = radius, cos and sin of the words (triton_philox's transform, for the edge test)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + i, mask=i < n, other=0).to(tl.uint32)
    cos, sin = triton_philox.cos_sin(w)
    tl.store(out_ptr + i, triton_philox.radius(w), mask=i < n)
    tl.store(out_ptr + n + i, cos, mask=i < n)
    tl.store(out_ptr + 2 * n + i, sin, mask=i < n)


def test_kernel_box_muller_equals_philox_at_every_edge() -> None:
    """triton_philox's radius and angle equal philox.py's on every edge word (conftest.box_muller_edge_words)."""
    words = box_muller_edge_words()
    out = torch.empty(3, len(words), dtype=torch.float32, device=DEVICE)
    _box_muller_parts[(triton.cdiv(len(words), 1024),)](words.to(DEVICE), out, len(words), BLOCK=1024,
                                                        enable_fp_fusion=False)
    assert torch.equal(out.cpu(), torch.stack([philox.radius(words), *philox.cos_sin(words)]))


def test_available() -> None:
    assert fused_triton.available(DEVICE) and not fused_triton.available("cuda" if DEVICE == "cpu" else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["int8", "uint8", "float32"])
def test_compiled_kernel_equals_cpu_reference(kind: Literal["int8", "uint8", "float32"]) -> None:
    """A 3x3 conv of 64 -> 128 channels on 8 samples of 14 x 14 (K = 576, L = 64: T = 9): the CPU torch path and
    the compiled kernel give the same accumulators (FMA contraction off, every division and square root correctly
    rounded on both: photosim.ir.ieee)."""
    case = Case("conv", ids=tuple(range(100, 108)), rows=196, k=576, o=128, tile=64, operands=kind, output=0.01,
                shot=0.01, adc_bits=8, adc_range=0.05, acc_bits=10, overflow="saturate")
    check_against_reference(case)  # compiles and warms up
    start = time.perf_counter()
    equal, got = check_against_reference(case)
    print(f"{kind}: {equal:.6f} equal, {got.clipped} clipped, "
          f"{time.perf_counter() - start:.2f} s with the CPU reference")
    assert equal == 1.0 and got.clipped > 0 and got.overflowed > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_torch_path_takes_int8_operands() -> None:
    """Where the kernel does not apply on CUDA (an ADC calibration pass), the torch path takes the int8 operands
    and padded weights of the CUDA plan (tile sums by float64 GEMMs) and gives the CPU's accumulators and ranges."""
    layer, a, _ = make_layer(CASES[-1])
    layer.calibration = ActivationObserver()
    reference = copy.deepcopy(layer)
    layer.weights = replace(layer.weights, matrix=layer.weights.matrix.cuda())
    layer.bias = layer.bias.cuda()
    ids = torch.tensor(CASES[-1].ids)
    got = layer.dot(operands(layer, a).cuda(), ids.cuda()).cpu()
    assert torch.equal(got, reference.dot(operands(layer, a), ids))
    assert (layer.calibration.lo, layer.calibration.hi) == (reference.calibration.lo, reference.calibration.hi)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter check; on a GPU the gpu tests compare whole engines")
@pytest.mark.parametrize("int8", [True, False], ids=["int8 tile plan", "float32 tile plan"])
def test_an_engine_on_the_kernel_equals_the_cpu_engine(monkeypatch: pytest.MonkeyPatch, int8: bool) -> None:
    """The whole engine with every analog layer on the kernel (as on CUDA: conv sub-batches, sample ids, bias codes,
    the int8 plan's shift, grouped and depthwise convs) gives the CPU engine's codes at every node."""
    from conftest import make_conv_net

    from photosim.engine.executor import Engine

    launch = fused_triton._launch
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: int8)
    model = make_conv_net(seed=2)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    hw = {"tile": 8, "adc": {"bits": 6}, "noise": {"output": {"sigma": 0.02}, "shot": {"sigma": 0.01}},
          "accumulator": {"bits": 12, "overflow": "saturate"}}
    reference = Engine(model, hw, seed=3).node_outputs(x, first_sample=5)
    convs = []  # per kernel launch: whether it gathered a conv's operands
    monkeypatch.setattr(fused_triton, "_launch", lambda *args: convs.append(args[0].constants["CONV"]) or launch(*args))
    engine = Engine(model, hw, seed=3, backend=["fused-triton"])
    assert {layer.weights.plan.path for layer in engine.analog.values()} == {"int_mm" if int8 else "float32"}
    got = engine.node_outputs(x, first_sample=5)
    assert sum(convs) >= 3 and len(convs) >= len(engine.analog) == 4  # conv1, dw, grouped (implicit), fc
    for name in reference:
        assert torch.equal(got[name], reference[name]), name


@dataclass(frozen=True)
class ConvCase:
    """One conv layer on the kernel's implicit GEMM: geometry, input layout and readout settings."""

    name: str
    channels: int = 5  # C (not a multiple of L: tiles cross taps)
    o: int = 6  # output channels
    size: tuple[int, int] = (6, 5)  # H, W
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    ids: tuple[int, ...] = (3, 8)
    tile: int = 8
    operands: Literal["int8", "uint8", "float32"] = "uint8"
    channels_last: bool = False
    code_dtype: torch.dtype = torch.int32  # of the input codes
    output: float = 0.0
    shot: float = 0.0
    adc_bits: int | None = None
    adc_range: float = 1.0
    acc_bits: int = 32
    overflow: str = "none"
    bias_at: str | None = "start"


# zero point of the input codes: x - z_in spans X_RANGES[operands]
CONV_Z_IN = {"int8": 0, "uint8": 0, "float32": 200}

CONV_CASES = [
    ConvCase("3x3 pad 1, uint8 (offset), output noise, adc clips, saturate", output=0.02, adc_bits=6, adc_range=0.1,
             acc_bits=7, overflow="saturate"),
    ConvCase("1x1 stride 2, int8 codes, channels_last, wrap, bias end", kernel=(1, 1), stride=(2, 2),
             padding=(0, 0), operands="int8", channels_last=True, code_dtype=torch.int8, tile=3, acc_bits=10,
             overflow="wrap", bias_at="end"),
    ConvCase("5x5 pad 2 dilation 2 (mostly padding), float32 plan, both noises", kernel=(5, 5), padding=(2, 2),
             dilation=(2, 2), operands="float32", size=(7, 6), output=0.01, shot=0.02, adc_bits=8, adc_range=0.2),
    ConvCase("3x1 stride (2, 1) pad (1, 0), 2 groups, channels_last, L = 5", channels=6, kernel=(3, 1),
             stride=(2, 1), padding=(1, 0), groups=2, tile=5, channels_last=True, output=0.03, adc_bits=5,
             adc_range=0.1, acc_bits=5, overflow="wrap"),
    ConvCase("depthwise 3x3 stride 2 pad 1, int16 codes, float32 plan, no bias", channels=4, o=4, groups=4, tile=4,
             stride=(2, 2), operands="float32", code_dtype=torch.int16, shot=0.02, bias_at=None),
    ConvCase("3x3 no padding, dilation (1, 2), 3 samples, one tile, ideal readout", kernel=(3, 3), padding=(0, 0),
             dilation=(1, 2), size=(6, 7), ids=(0, 5, 2), tile=45, operands="int8"),
]


def conv_layer(case: ConvCase, tile_step: analog.TileStep, seed: int = 0
               ) -> tuple[analog.AnalogLayer, torch.Tensor]:
    """The AnalogLayer of a conv case, planned and laid out as on a GPU, and its random input codes (N, C, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    x_lo, x_hi = X_RANGES[case.operands]
    x_max, w_max, z_in = max(-x_lo, x_hi), 128, CONV_Z_IN[case.operands]
    cg = case.channels // case.groups
    k = case.kernel[0] * case.kernel[1] * cg
    x = torch.randint(x_lo + z_in, x_hi + z_in + 1, (len(case.ids), case.channels, *case.size), generator=gen)
    x = x.to(case.code_dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-128, 128, (case.o, cg, *case.kernel), generator=gen)
    accumulator = {"bits": case.acc_bits, "overflow": case.overflow, "bias_at": case.bias_at or "start"}
    hw = {"tile": case.tile, "adc": {"bits": case.adc_bits, "range": case.adc_range}, "accumulator": accumulator,
          "noise": {"output": {"sigma": case.output}, "shot": {"sigma": case.shot}}}
    readout = Readout.of(LayerHardware.model_validate(hw), k, x_max, w_max, layer=3)
    plan = tile_plan(k, readout, (x_lo, x_hi), 8, torch.device("cuda"))
    assert plan.path == {"float32": "float32", "int8": "int_mm", "uint8": "int_mm"}[case.operands]
    prepared = kernels.prepare_weights(weight, case.groups, plan)
    weights = replace(prepared, matrix=cuda_layout(prepared.matrix.to(torch.int64), plan))
    fs = int(readout.full_scale)
    og = case.o // case.groups
    bias = torch.randint(-fs // 4, fs // 4, (case.groups, og), generator=gen) if case.bias_at else None
    layer = analog_layer(hw, weights, bias, x_max=x_max, w_max=w_max, seed=11, repeat=2, index=3,
                         tile_step=tile_step)
    attrs = {"kernel": list(case.kernel), "stride": list(case.stride), "padding": list(case.padding),
             "dilation": list(case.dilation), "groups": case.groups}
    node = replace(layer.plan.node, op="conv2d", input_q=[replace(layer.plan.node.input_q[0], zero_point=z_in)],
                   attrs=attrs)
    layer.plan = replace(layer.plan, node=node)
    return layer, x


@pytest.mark.parametrize("case", CONV_CASES, ids=[c.name for c in CONV_CASES])
def test_implicit_conv_equals_im2col_and_torch_path(case: ConvCase) -> None:
    """conv_tile_step (operands gathered from the input) gives tile_step's results on conv2d_patches' im2col
    operands exactly, and AnalogLayer.conv_acc on it gives the torch path's accumulators and stats."""
    reference, x = conv_layer(case, "torch")
    layer, _ = conv_layer(case, "fused-triton")
    ids = torch.tensor(case.ids)
    expected = reference.conv_acc(x, ids)
    geometry = layer.plan.conv_geometry()
    plan, readout, bias = layer.weights.plan, layer.readout, layer._bias_codes(layer.step)
    patches = kernels.conv2d_patches(x, layer.plan.z_in, plan, *geometry, case.groups)
    explicit = fused_triton.tile_step(patches.to(DEVICE), layer.matrix.to(DEVICE), ids.to(DEVICE), readout, bias,
                                      shift=layer.tile_shift)
    implicit = fused_triton.conv_tile_step(x.to(DEVICE), layer.plan.z_in, plan, *geometry, layer.matrix.to(DEVICE),
                                           ids.to(DEVICE), readout, bias, shift=layer.tile_shift)
    assert torch.equal(implicit.acc, explicit.acc) and torch.equal(implicit.exact, explicit.exact)
    assert (implicit.clipped, implicit.overflowed) == (explicit.clipped, explicit.overflowed)
    n, oh, ow = len(case.ids), *expected.shape[2:]
    og = case.o // case.groups
    assert torch.equal(implicit.acc.cpu().view(case.groups, n, oh, ow, og).permute(1, 0, 4, 2, 3).reshape(
        expected.shape), expected)
    calls = []
    launch = fused_triton._launch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "conv2d_patches", lambda *args: pytest.fail("the kernel gathers the operands"))
        patch.setattr(fused_triton, "_launch", lambda *args: calls.append(args[0]) or launch(*args))
        if DEVICE != "cpu":
            layer.weights = replace(layer.weights, matrix=layer.weights.matrix.to(DEVICE))
            layer.bias = None if layer.bias is None else layer.bias.to(DEVICE)
        got = layer.conv_acc(x.to(DEVICE), ids.to(DEVICE)).cpu()
    assert len(calls) == 1 and calls[0].constants["CONV"]
    assert torch.equal(got, expected)
    for name in ("outputs", "overflowed", "tile_values", "clipped", "max_abs_acc"):
        assert getattr(layer.stats, name) == getattr(reference.stats, name), name
    for name in ("signal_power", "error_power"):
        assert getattr(layer.stats, name) == pytest.approx(getattr(reference.stats, name), rel=1e-12, abs=1e-9)
    if case.adc_bits and case.adc_range < 1:
        assert implicit.clipped > 0
    if case.acc_bits < 16:
        assert implicit.overflowed > 0


def test_implicit_conv_sub_batches_only_beyond_the_accumulator_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """conv_acc on the kernel launches once per sub-batch of samples whose int64 accumulators and exact sums fit
    kernels.PATCH_BYTES (here one sample's: 3 launches for 3 samples), with the sample ids of each, and gives the
    torch path's accumulators."""
    case = replace(CONV_CASES[3], ids=(4, 0, 9))
    reference, x = conv_layer(case, "torch")
    layer, _ = conv_layer(case, "fused-triton")
    ids = torch.tensor(case.ids)
    expected = reference.conv_acc(x, ids)
    one_sample = expected[0].numel() * 16  # (O, OH, OW) accumulators and exact sums, int64
    launches = []
    launch = fused_triton._launch
    monkeypatch.setattr(fused_triton, "_launch", lambda *args: launches.append(args[3].tolist()) or launch(*args))
    monkeypatch.setattr(kernels, "PATCH_BYTES", 2 * one_sample - 1)
    assert torch.equal(layer.conv_acc(x.to(DEVICE), ids.to(DEVICE)).cpu(), expected)
    assert launches == [[4], [0], [9]]
    monkeypatch.setattr(kernels, "PATCH_BYTES", 3 * one_sample)
    assert torch.equal(layer.conv_acc(x.to(DEVICE), ids.to(DEVICE)).cpu(), expected)
    assert launches[3:] == [[4, 0, 9]]


# -- readout of torch's tile values (weight error, modulated inputs, signal-dependent noise) -----------------------


@dataclass(frozen=True)
class ValuesCase:
    """A layer whose tile values torch forms (the kernel reads them out): settings, plan, groups, outputs."""

    name: str
    hw: dict
    plan: Literal["float64", "float32", "int_mm"] = "float64"
    groups: int = 1
    o: int = 12  # outputs per group
    bias: bool = True


VALUES_CASES = [
    ValuesCase("static weight error, output noise, adc 8 clips, saturate",
               {"noise": {"weight_static": {"sigma": 0.02}, "output": {"sigma": 0.02}},
                "adc": {"bits": 8, "range": 0.1}, "accumulator": {"bits": 10, "overflow": "saturate"}}),
    ValuesCase("per-inference weight error, shot noise, 2 groups, O % 4 != 0, wrap, bias end",
               {"noise": {"weight_read": {"sigma": 0.03}, "shot": {"sigma": 0.03}}, "adc": {"bits": 6, "range": 0.2},
                "accumulator": {"bits": 6, "overflow": "wrap", "bias_at": "end"}}, groups=2, o=5),
    ValuesCase("DAC noise, sin2 modulator, both noises, adc 8 clips, no overflow check",
               {"dac": {"enob": 5, "transfer": "sin2"}, "noise": {"output": {"sigma": 0.01}, "shot": {"sigma": 0.01}},
                "adc": {"bits": 8, "range": 0.2}}),
    ValuesCase("photocurrent and rin, output noise, int8 plan (offset), adc 6 clips, saturate",
               {"noise": {"photocurrent": {"sigma": 0.05}, "rin": {"sigma": 0.1}, "output": {"sigma": 0.01}},
                "adc": {"bits": 6, "range": 0.1}, "accumulator": {"bits": 7, "overflow": "saturate"}}, plan="int_mm"),
    ValuesCase("common-laser rin, shot noise, float32 plan, ideal adc, wrap, no bias",
               {"noise": {"rin": {"sigma": 0.1, "lasers": "common"}, "shot": {"sigma": 0.02}},
                "accumulator": {"bits": 12, "overflow": "wrap"}}, plan="float32", bias=False),
    ValuesCase("weight error and DAC noise, photocurrent on products, no noise after, adc 4 clips, saturate",
               {"dac": {"enob": 6}, "noise": {"weight_static": {"sigma": 0.01}, "weight_read": {"sigma": 0.01},
                                              "photocurrent": {"sigma": 0.05, "light": "products"}},
                "adc": {"bits": 4, "range": 0.05}, "accumulator": {"bits": 6, "overflow": "saturate"}}),
]


def values_layers(case: ValuesCase, k: int = 40, tile: int = 16, seed: int = 0
                  ) -> tuple[analog.AnalogLayer, analog.AnalogLayer, torch.Tensor]:
    """The torch and fused-triton layers of a case (8-bit unsigned operands x - z_in, int8 weights; K = 40 in tiles
    of 16: the last one short) and the operands (G, M, K) in the plan's dtype, for samples 7, 2 and 40 of 3 rows."""
    gen = torch.Generator().manual_seed(seed)
    g, o = case.groups, case.groups * case.o
    weight = torch.randint(-128, 128, (o, k), generator=gen)
    matmul = kernels.MatmulPlan(case.plan, chunk=k, offset=128 if case.plan == "int_mm" else 0)
    weights = kernels.prepare_weights(weight, g, matmul)
    fs = tile * 255 * 128
    bias = torch.randint(-fs // 4, fs // 4, (g, case.o), generator=gen) if case.bias else None
    layers = tuple(analog_layer({"tile": tile, **case.hw}, weights, bias, x_max=255, w_max=128, seed=11, repeat=2,
                                index=3, tile_step=step) for step in ("torch", "fused-triton"))
    a = torch.randint(0, 256, (g, 9, k), generator=gen)
    return *layers, (a - matmul.offset).to(matmul.dtype)


@pytest.mark.parametrize("case", VALUES_CASES, ids=[c.name for c in VALUES_CASES])
def test_readout_of_torchs_tile_values_equals_torch_path(monkeypatch: pytest.MonkeyPatch, case: ValuesCase) -> None:
    """Weight error, DAC noise and a modulator transfer, photocurrent and RIN: torch forms (and draws) the tile
    values, the kernel reads them out (VALUES mode); accumulators and counts equal the torch path's, the powers to
    1e-12."""
    reference, layer, a = values_layers(case)
    ids = torch.tensor([7, 2, 40])
    expected = reference.dot(a, ids)
    launches = []
    launch = fused_triton._launch
    monkeypatch.setattr(fused_triton, "_launch", lambda *args: launches.append(args[0].constants) or launch(*args))
    if DEVICE != "cpu":
        layer.weights = replace(layer.weights, matrix=layer.weights.matrix.to(DEVICE))
        layer.bias = None if layer.bias is None else layer.bias.to(DEVICE)
    got = layer.dot(a.to(DEVICE), ids.to(DEVICE)).cpu()
    assert [c["VALUES"] for c in launches] == [True] and not layer.kernel_forms_sums
    assert FUSED_TRITON.supports(layer.plan, torch.device(DEVICE)) is None
    assert torch.equal(got, expected)
    stats, ref = layer.stats, reference.stats
    for name in ("outputs", "overflowed", "tile_values", "clipped", "max_abs_acc"):
        assert getattr(stats, name) == getattr(ref, name), name
    for name in ("signal_power", "error_power", "signal_noise_power"):
        assert getattr(stats, name) == pytest.approx(getattr(ref, name), rel=1e-12, abs=1e-9), name
    assert stats.error_power > 0
    if "range" in case.hw.get("adc", {}):
        assert stats.clipped > 0
    if case.hw.get("accumulator", {}).get("bits", 32) < 16:
        assert stats.overflowed > 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("work", [torch.float32, torch.float64])
def test_readout_step_equals_the_compiled_cpu_readout(dtype: torch.dtype, work: torch.dtype) -> None:
    """readout_step on (G, T, M, O) values of each dtype, a transposed view with a shift, in either working dtype:
    accumulators and counts equal photosim.engine.fused_cpu.readout's (numba's p + shift, then the work dtype)."""
    from photosim.engine import fused_cpu

    layer, _, _ = make_layer(CASES[1])
    readout = layer.readout
    gen = torch.Generator().manual_seed(3)
    g, t, m, o = 2, readout.tiles, 9, 12
    scale = readout.full_scale / 3
    p = (torch.rand(g, t, o, m, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    p = (p.round() if dtype == torch.int32 else p).to(dtype).transpose(2, 3)  # (G, T, M, O), not contiguous
    shift = torch.randint(-int(scale), int(scale), (g, t, o), generator=gen)
    bias_codes = torch.randint(-50, 50, (g, o), generator=gen)
    ids = torch.tensor([7, 2, 40])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Readout, "dtype", property(lambda self: work))
        got = fused_triton.readout_step(p.to(DEVICE), ids.to(DEVICE), readout, bias_codes, None, shift)
        acc, counts = fused_cpu.readout(p, ids, readout, None, bias_codes, None, False, shift)
    assert got.exact is None
    assert torch.equal(got.acc.cpu(), acc)
    assert (got.clipped, got.overflowed) == (counts.clipped, counts.overflowed) and counts.clipped > 0


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter check; on a GPU the gpu tests compare whole engines")
def test_an_engine_with_weight_error_on_the_kernel_equals_the_cpu_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight error (static and per inference) on every analog layer: the engine on fused-triton (torch forms the
    tile values, the kernel reads them out) gives the CPU engine's codes at every node."""
    from conftest import make_conv_net

    from photosim.engine.executor import Engine

    model = make_conv_net(seed=2)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    hw = {"tile": 8, "adc": {"bits": 6}, "accumulator": {"bits": 12, "overflow": "saturate"},
          "noise": {"weight_static": {"sigma": 0.02}, "weight_read": {"sigma": 0.01}, "output": {"sigma": 0.02}}}
    reference = Engine(model, hw, seed=3).node_outputs(x, first_sample=5)
    launches = []
    launch = fused_triton._launch
    monkeypatch.setattr(fused_triton, "_launch", lambda *args: launches.append(args[0].constants) or launch(*args))
    engine = Engine(model, hw, seed=3, backend=["fused-triton"])
    assert set(engine.backends[name].backend for name in engine.analog) == {"fused-triton"}
    got = engine.node_outputs(x, first_sample=5)
    assert len(launches) >= len(engine.analog) == 4 and all(c["VALUES"] for c in launches)
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
