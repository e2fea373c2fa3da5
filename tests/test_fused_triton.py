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
    noisy_weights = analog_layer({"noise": {"weight_read": {"sigma": 0.1}}}, layer.weights, None, x_max=255, w_max=128)
    assert "weight error" in FUSED_TRITON.supports(noisy_weights.plan, torch.device(DEVICE))


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

    tile_step = fused_triton.tile_step
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: int8)
    model = make_conv_net(seed=2)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    hw = {"tile": 8, "adc": {"bits": 6}, "noise": {"output": {"sigma": 0.02}, "shot": {"sigma": 0.01}},
          "accumulator": {"bits": 12, "overflow": "saturate"}}
    reference = Engine(model, hw, seed=3).node_outputs(x, first_sample=5)
    calls = []
    monkeypatch.setattr(fused_triton, "tile_step", lambda *args, **kw: calls.append(1) or tile_step(*args, **kw))
    engine = Engine(model, hw, seed=3, backend=["fused-triton"])
    assert {layer.weights.plan.path for layer in engine.analog.values()} == {"int_mm" if int8 else "float32"}
    got = engine.node_outputs(x, first_sample=5)
    assert len(calls) >= len(engine.analog)
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
