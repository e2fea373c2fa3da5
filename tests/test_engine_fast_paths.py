"""The engine with its fast paths (oneDNN convs, float32 tiles, float64 accumulators) against the exact paths."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ModelBuilder, analog_layer, make_conv_net, qp

from photosim.engine import executor as engine_module
from photosim.engine import kernels, onednn
from photosim.engine import plan as engine_plan
from photosim.engine.executor import Engine
from photosim.engine.requant import REQUANT_MODES, RequantParams
from photosim.experiments.bench import CONFIGS
from photosim.hardware import readout
from photosim.hardware.accumulator import accumulate
from photosim.ir.format import QParams

TILED = CONFIGS[2].hw


# -- the engine with its fast paths against the engine without them -------------------------------------


REFERENCE = ["torch", "fbgemm"]  # the reference backend, and the one that computes FBGEMM's saturating pair sums


def _without_fast_paths(monkeypatch: pytest.MonkeyPatch, float64_tiles: bool) -> None:
    """Engines built after this (on the REFERENCE backends) use the im2col matmul paths only, in one sub-batch,
    float64 tile sums if asked."""
    monkeypatch.setattr(onednn, "prepare_conv", lambda *args, **kwargs: None)  # the one-tile shortcut too
    monkeypatch.setattr(engine_module, "SUB_BATCH_ELEMENTS", 1 << 40)
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: False)
    if float64_tiles:
        monkeypatch.setattr(readout, "FLOAT32_EXACT", 0)
        monkeypatch.setattr(engine_plan, "FLOAT32_EXACT", 0)


@pytest.mark.parametrize(("bits", "requant", "hw"), [
    (8, "float", None), (8, "fixedpoint", None), (8, "pytorch", None), (4, "float", None), (12, "float", None),
    (8, "float", {"adc": {"bits": 8}, "tile": 16, "accumulator": {"bits": 16, "overflow": "saturate"}}),
    (8, "float", {"adc": {"bits": 6}, "accumulator": {"bits": 12, "overflow": "wrap"}}),
    (8, "float", {"noise": {"output": {"sigma": 0.01}, "shot": {"sigma": 0.003}}}),
    (8, "fixedpoint", {"noise": {"output": {"sigma": 0.02}}, "adc": {"bits": 8}}),
])
def test_engine_fast_paths_give_the_exact_paths_codes(monkeypatch: pytest.MonkeyPatch, bits: int, requant: str,
                                                      hw: dict | None) -> None:
    """Every node's codes: the fastest backends (oneDNN convs, the compiled readout), sub-batches, in-place float
    requant, float32 tile sums against the reference backend's im2col matmul paths in one batch. Noisy tile values
    are float32 either way (the noise draws are per sample, so the same); without noise the float32 tile sums are
    checked against float64 ones."""
    model = make_conv_net(seed=bits, w_bits=bits, a_bits=bits)
    x = torch.rand(9, 3, 12, 12, generator=torch.Generator().manual_seed(bits))
    config = {**(hw or {}), "requant": requant}
    monkeypatch.setattr(engine_module, "SUB_BATCH_ELEMENTS", 2 * 8 * 12 * 12)  # sub-batches of 2 samples
    fast = Engine(model, config, seed=5).node_outputs(x)
    _without_fast_paths(monkeypatch, float64_tiles="noise" not in config)
    exact = Engine(model, config, seed=5, backend=REFERENCE).node_outputs(x)
    assert fast.keys() == exact.keys()
    for name in fast:
        assert torch.equal(fast[name], exact[name]), name


def test_int8_tile_sums_give_the_float_tile_sums_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tile sums by int8 GEMMs (with the offset shift, a one-term last tile in the depthwise conv) through the
    compiled readout and through the torch readout equal float32 tile sums, noise, ADC and accumulator included."""
    model = make_conv_net(seed=3)
    x = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    hw = {"tile": 4, "adc": {"bits": 6}, "noise": {"output": {"sigma": 0.02}, "shot": {"sigma": 0.01}},
          "accumulator": {"bits": 12, "overflow": "saturate"}}
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: True)
    int8 = Engine(model, hw, seed=4)
    assert {layer.weights.plan.path for layer in int8.analog.values()} == {"int_mm"}
    assert any(layer.tile_shift is not None for layer in int8.analog.values())
    codes = int8.node_outputs(x)
    assert {choice.backend for choice in int8.backends.values()} == {"fused-cpu"}
    torch_readout = Engine(model, hw, seed=4, backend=["torch"]).node_outputs(x)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type: False)
    float32 = Engine(model, hw, seed=4)
    assert {layer.weights.plan.path for layer in float32.analog.values()} == {"float32"}
    reference = float32.node_outputs(x)
    for name in codes:
        assert torch.equal(codes[name], reference[name]), name
        assert torch.equal(torch_readout[name], reference[name]), name


def test_long_tiles_compute_the_same_on_every_matmul_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A noisy single tile of K = 1024 unsigned 8-bit codes (FS > 2^24): int8 GEMMs (VNNI CPUs) and float64 ones
    give the same codes, because the noise arithmetic's dtype follows the settings, not the matmul path."""
    g = torch.Generator().manual_seed(0)
    m = ModelBuilder((1024,), qp(1 / 255, 0, 8))
    weights = torch.randint(100, 128, (16, 1024), generator=g, dtype=torch.int8)  # sums near FS, above 2^24
    m.linear("fc", "x", qp(0.5, 0, 16, signed=True), weights, torch.zeros(16, dtype=torch.int64), 0.01)
    model, x = m.build(), 0.9 + 0.1 * torch.rand(6, 1024, generator=g)
    hw = {"noise": {"output": {"sigma": 0.001}}}
    codes = {}
    for int8 in (True, False):
        monkeypatch.setattr(kernels, "int_mm_is_faster", lambda device_type, int8=int8: int8)
        engine = Engine(model, hw, seed=1)
        assert engine.analog["fc"].weights.plan.path == ("int_mm" if int8 else "float64")
        assert engine.analog["fc"].full_scale > 2 ** 24
        codes[int8] = engine.analog["fc"].linear_acc(model.input_q.quantize(x), torch.arange(len(x)))
    assert torch.equal(codes[True], codes[False])  # the accumulators, before requantization could hide a step


def test_tiled_noisy_layers_do_not_depend_on_batching() -> None:
    model = make_conv_net(seed=1)
    x = torch.rand(7, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    whole = Engine(model, TILED, seed=2).codes(x)
    parts = Engine(model, TILED, seed=2)
    assert torch.equal(torch.cat([parts.codes(x[:3]), parts.codes(x[3:], first_sample=3)]), whole)
    assert torch.equal(parts.codes(x[3:], first_sample=3), whole[3:])  # a reused engine keeps no counter
    assert torch.equal(parts.codes(x[5:], first_sample=5), whole[5:])  # any order
    assert not torch.equal(parts.codes(x[3:]), whole[3:])  # samples 0.. draw other noise than samples 3..


@pytest.mark.parametrize("hw", [TILED, CONFIGS[1].hw])
def test_empty_batch_on_the_photonic_path(hw: dict) -> None:
    assert Engine(make_conv_net(), hw).codes(torch.zeros(0, 3, 12, 12)).shape == (0, 10)


# -- in-place float requant, accumulator sum ---------------------------------------------------------


def test_float_requant_on_float64_accumulators_matches_the_integer_formula() -> None:
    g = torch.Generator().manual_seed(0)
    mode = REQUANT_MODES["float"]
    out = QParams(0.5, 3, 8, False, 3, 255)
    scales = torch.tensor([0.25, 0.125, 0.1, 1 / 3], dtype=torch.float64)
    params = RequantParams(1.0, scales, out, torch.zeros(4, dtype=torch.int64), None, True, "fbgemm")
    acc = torch.randint(-2000, 2000, (5, 4, 6, 6), generator=g)
    acc[0, :, 0, 0] = torch.tensor([2, 4, 10, 6])  # ties after the multiplier
    expected = (torch.round(acc.double() * (scales / 0.5).view(1, -1, 1, 1)) + 3).clamp(3, 255).to(torch.int32)
    assert torch.equal(mode.requantize(acc.double(), params), expected)
    assert torch.equal(mode.requantize(acc, params), expected)
    qa, qb = QParams(0.3, 10, 8, False, 0, 255), QParams(0.7, 0, 8, True, -128, 127)
    a = torch.randint(0, 256, (5, 4, 6, 6), generator=g, dtype=torch.int32)
    b = torch.randint(-128, 128, (5, 4, 6, 6), generator=g, dtype=torch.int32)
    real = (a.double() - 10) * 0.3 + b.double() * 0.7
    assert torch.equal(mode.add(a, b, qa, qb, out), (torch.round(real / 0.5) + 3).clamp(3, 255).to(torch.int32))


@pytest.mark.parametrize("seed", range(5))
def test_accumulator_sum_matches_the_running_accumulator(seed: int) -> None:
    r = random.Random(seed)
    bits, overflow = r.randint(6, 16), r.choice(["wrap", "saturate", "none"])
    hw = {"accumulator": {"bits": bits, "overflow": overflow, "bias_at": r.choice(["start", "end"])}}
    weights = kernels.prepare_weights(torch.ones(3, 1), 1, kernels.MatmulPlan("float64", 1))
    layer = analog_layer(hw, weights, None, x_max=1, w_max=1)
    top = r.choice([3, 1 << (bits - 3), 1 << bits])  # safe for the plain sum, or not
    codes = torch.randint(-top, top + 1, (1, 5, 40, 3), generator=torch.Generator().manual_seed(seed))
    bias = torch.randint(-top, top + 1, (1, 1, 3), generator=torch.Generator().manual_seed(seed + 1))
    acc, overflowed = layer._accumulate(codes, bias)
    expected, flags = accumulate(codes.permute(0, 2, 3, 1), bias, bits, overflow, hw["accumulator"]["bias_at"])
    assert torch.equal(acc, expected) and overflowed == int(flags.sum())
