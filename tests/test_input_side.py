"""The input side of an optical core (hw.dac: DAC effective bits, the modulator's transfer) and detector saturation
(hw.detector): off they give today's codes bit for bit; on, each law matches its closed form on crafted tiles; the
noise is drawn per sample and per operand use; the fused backends decline what they do not model, by name."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import ModelBuilder, analog_layer, make_conv_net, qp

from photosim.engine import kernels
from photosim.engine.analog import AnalogLayer
from photosim.engine.backends import BACKENDS
from photosim.engine.executor import Engine
from photosim.engine.plan import plan_layer
from photosim.hardware.config import HardwareConfig, LayerHardware
from photosim.hardware.noise import MODULATOR_TRANSFERS

X_MAX, W_MAX, TILE = 12, 7, 4
FS = TILE * X_MAX * W_MAX  # 336
W = torch.tensor([[7, -7, 2, 1, -3, 5, 1, -1],  # O = 3 outputs, K = 8: two tiles of 4, none of them empty
                  [-1, 4, -6, 7, 7, 7, -7, 2],
                  [3, 0, 0, 0, 0, 0, 0, -5]])
X = torch.tensor([4, -4, 12, 0, -12, 6, 2, 7])  # signed operands x - z_in (z_in = 0)
SAMPLES = 20_000


def _layer(hw: dict, tile_step: str = "torch", plan: kernels.MatmulPlan | None = None) -> AnalogLayer:
    weights = kernels.prepare_weights(W, 1, plan or kernels.MatmulPlan("float64", chunk=8))
    return analog_layer({"tile": TILE, **hw}, weights, None, x_max=X_MAX, w_max=W_MAX, tile_step=tile_step)


def _per_tile(x: list[float]) -> torch.Tensor:
    """(O, T) tile values sum_k w_k x_k of the operands x over the two tiles, float64."""
    return (W.double() * torch.tensor(x, dtype=torch.float64)).view(3, 2, TILE).sum(dim=2)


def test_sections_off_give_todays_codes_and_dumps() -> None:
    model = make_conv_net(seed=4)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    noisy = {"tile": 8, "adc": {"bits": 6}, "noise": {"output": {"sigma": 0.01}}}

    def codes(hw: dict) -> dict[str, torch.Tensor]:
        return Engine(model, hw, seed=7).node_outputs(x, first_sample=3)

    ideal, today = codes({}), codes(noisy)
    assert LayerHardware.model_validate({"dac": {"transfer": "linear"}}).is_ideal
    for off in ({"dac": {}}, {"dac": {"transfer": "linear", "enob": None}}):
        assert codes(off).keys() == ideal.keys() and all(torch.equal(codes(off)[n], ideal[n]) for n in ideal)
        with_off = codes({**noisy, **off})
        assert all(torch.equal(with_off[n], today[n]) for n in today)
    # a detector that never saturates (no noise: |p| <= FS) runs the tile step (not ideal) and still gives the ideal
    # codes; so does an ideal readout of 32-bit DACs (std 24 / (2^32 sqrt 12) codes rounds away)
    for hw in ({"detector": {"saturation": 1.0}}, {"dac": {"enob": 32}, "tile": 8}):
        assert not LayerHardware.model_validate(hw).is_ideal
        got = codes(hw)
        assert all(torch.equal(got[n], ideal[n]) for n in ideal), hw
    dump = HardwareConfig().model_dump()
    assert "dac" not in dump and "detector" not in dump
    on = HardwareConfig.model_validate({"dac": {"enob": 6, "transfer": "sin2"}, "detector": {"saturation": 0.5},
                                        "layers": [{"match": "fc", "dac": {"enob": None}}]})
    assert HardwareConfig.model_validate(on.model_dump()) == on
    assert on.for_layer("fc").dac.transfer == "sin2" and on.for_layer("fc").dac.enob is None


def test_dac_noise_adds_the_variance_of_its_effective_bits() -> None:
    """Every operand gets noise of std R / (2^ENOB sqrt 12) (R = 2 Xmax here: the helper's clamp is symmetric), so
    an output's variance is sum_k w_k^2 sigma^2 plus the ideal readout's rounding, 1/12 per tile; its mean is the
    exact dot product, which the diagnostics keep as the signal."""
    enob = 3.0
    sigma = 2 * X_MAX / (2 ** enob * math.sqrt(12))  # 0.87 codes
    layer = _layer({"dac": {"enob": enob}})
    assert layer.readout.x_span == 2 * X_MAX and layer.plan.matmul.path == "float64"
    acc = layer.linear_acc(X.repeat(SAMPLES, 1), torch.arange(SAMPLES)).double()
    exact = (W * X).sum(dim=1).double()
    expected = sigma ** 2 * W.double().square().sum(dim=1) + 2 / 12
    assert torch.allclose(acc.var(dim=0), expected, rtol=0.04)
    assert torch.allclose(acc.mean(dim=0), exact, atol=4 * (expected / SAMPLES).sqrt().max())
    assert layer.stats.signal_power == float(exact.square().sum()) * SAMPLES


def test_a_conv_input_is_converted_anew_for_every_patch() -> None:
    """A 1x2 kernel of ones over a row of 3 pixels: both outputs read the middle pixel. Drawn per operand element,
    their noises are independent (shared, the covariance would be sigma^2 = 21); the DAC's range is the input
    clamp's span, 255 codes of a uint8 input."""
    m = ModelBuilder((1, 1, 3), qp(1.0, 0, 8))
    m.conv("conv", "x", qp(1.0, 0, 16, signed=True), torch.ones(1, 1, 1, 2, dtype=torch.int8),
           torch.zeros(1, dtype=torch.int32), 1.0)
    plan = plan_layer(m.build(), 0, LayerHardware.model_validate({"dac": {"enob": 4}}), torch.device("cpu"),
                      analog=True)
    layer = AnalogLayer.prepare(plan, torch.device("cpu"), "torch")
    assert layer.conv is None and plan.readout.x_span == 255
    sigma = 255 / (2 ** 4 * math.sqrt(12))
    x = torch.tensor([[[[40, 100, 200]]]], dtype=torch.uint8).repeat(SAMPLES, 1, 1, 1)
    acc = layer.conv_acc(x, torch.arange(SAMPLES)).double().view(SAMPLES, 2)
    assert torch.allclose(acc.mean(dim=0), torch.tensor([140.0, 300.0], dtype=torch.float64), atol=0.2)
    assert torch.allclose(acc.var(dim=0), torch.full((2,), 2 * sigma ** 2 + 1 / 12, dtype=torch.float64), rtol=0.04)
    covariance = float(((acc - acc.mean(dim=0)).prod(dim=1)).mean())
    assert abs(covariance) < 1.0


def test_the_transfers_are_the_mzm_laws() -> None:
    x = torch.linspace(-X_MAX, X_MAX, 97, dtype=torch.float64)
    u = x.abs() / X_MAX
    laws = {"linear": x, "sin2": x.sign() * X_MAX * torch.sin(math.pi * u / 2) ** 2,
            "sin": x.sign() * X_MAX * torch.sin(math.pi * u / 2)}
    for name, law in laws.items():
        assert torch.allclose(MODULATOR_TRANSFERS[name](x, float(X_MAX)), law, rtol=0, atol=1e-12), name
    half, third = torch.tensor([X_MAX / 2, -X_MAX / 2, X_MAX]), torch.tensor([X_MAX / 3, -X_MAX / 3])
    assert torch.allclose(MODULATOR_TRANSFERS["sin2"](half, X_MAX), half, atol=1e-12)  # sin^2(pi/4) = 1/2
    assert torch.allclose(MODULATOR_TRANSFERS["sin"](third, X_MAX), half[:2], atol=1e-12)  # sin(pi/6) = 1/2


@pytest.mark.parametrize("transfer", ["linear", "sin2", "sin"])
def test_tile_values_follow_the_transfer(transfer: str) -> None:
    """Noise off, the ideal readout rounds each tile value sum_k w_k T(x_k) once; T from math.sin, per element."""
    law = {"linear": lambda u: u, "sin2": lambda u: math.sin(math.pi * u / 2) ** 2,
           "sin": lambda u: math.sin(math.pi * u / 2)}[transfer]
    modulated = [math.copysign(X_MAX * law(abs(v) / X_MAX), v) for v in X.tolist()]
    tiles = _per_tile(modulated)
    assert ((tiles - tiles.floor() - 0.5).abs() > 1e-6).all()  # no tile value near a rounding tie
    expected = torch.round(tiles).sum(dim=1).to(torch.int64)
    layer = _layer({"dac": {"transfer": transfer}})
    assert torch.equal(layer.linear_acc(X.unsqueeze(0), torch.tensor([0]))[0], expected)
    matmul = AnalogLayer.for_matmul(layer.plan)  # a matmul of two activations modulates its first operand
    assert torch.equal(matmul.matmul_acc(X.view(1, 1, 8), W.T.unsqueeze(0), torch.tensor([0])).view(3), expected)
    if transfer != "linear":
        assert not torch.equal(expected, (W * X).sum(dim=1))  # the crafted inputs tell the laws apart


def test_the_detector_clamps_and_counts_saturated_tile_values() -> None:
    saturation = 0.25  # +-84 product units
    layer = _layer({"detector": {"saturation": saturation}})
    tiles = _per_tile(X.tolist())
    limit = saturation * FS
    acc = layer.linear_acc(X.repeat(5, 1), torch.arange(5))
    expected = tiles.clamp(-limit, limit).round().sum(dim=1).to(torch.int64)
    assert torch.equal(acc, expected.expand(5, 3))
    assert layer.stats.saturated == 5 * int((tiles.abs() > limit).sum()) > 0
    assert layer.stats.clipped == 0  # no ADC: the clip count is the ADC's alone
    noisy = _layer({"detector": {"saturation": saturation}, "noise": {"output": {"sigma": 0.5}}})
    assert int(noisy.linear_acc(X.repeat(50, 1), torch.arange(50)).abs().max()) <= 2 * round(limit)


def test_input_noise_depends_on_the_sample_not_the_batch() -> None:
    hw = {"dac": {"enob": 4, "transfer": "sin"}, "noise": {"output": {"sigma": 0.002}}, "adc": {"bits": 10}}
    x = torch.randint(-X_MAX, X_MAX + 1, (6, 8), generator=torch.Generator().manual_seed(1))
    ids = torch.arange(10, 16)
    whole = _layer(hw).linear_acc(x, ids)
    layer = _layer(hw)
    split = torch.cat([layer.linear_acc(x[:2], ids[:2]), layer.linear_acc(x[2:], ids[2:])])
    assert torch.equal(whole, split)
    assert torch.equal(_layer(hw).linear_acc(x[3:4], ids[3:4]), whole[3:4])
    assert not torch.equal(_layer(hw).linear_acc(x[3:4].repeat(8, 1), torch.arange(8)), whole[3:4].repeat(8, 1))
    shifted = _layer(hw, plan=kernels.MatmulPlan("int_mm", chunk=8, offset=12))  # operands - offset: undone first
    assert torch.equal(shifted.linear_acc(x, ids), whole)


def test_backends_serve_or_decline_the_input_side_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # supports() reads it; nothing here imports Triton
    dac = _layer({"dac": {"enob": 5}})
    assert BACKENDS["fused-triton"].supports(dac.plan, cpu) is None  # torch forms the tile values, the kernel reads
    assert BACKENDS["fused-cpu"].supports(dac.plan, cpu) is None  # torch forms the tile sums, numba reads them out
    saturating = _layer({"detector": {"saturation": 0.5}})
    for name in ("fused-cpu", "fused-triton"):
        assert "saturation" in BACKENDS[name].supports(saturating.plan, cpu), name
    hw = {"dac": {"enob": 5, "transfer": "sin2"}, "noise": {"output": {"sigma": 0.01}}, "adc": {"bits": 8}}
    x = torch.randint(-X_MAX, X_MAX + 1, (64, 8), generator=torch.Generator().manual_seed(2))
    fused, reference = _layer(hw, "fused-cpu"), _layer(hw)
    assert torch.equal(fused.linear_acc(x, torch.arange(64)), reference.linear_acc(x, torch.arange(64)))
    assert fused.stats.clipped == reference.stats.clipped
    assert fused.stats.error_power == pytest.approx(reference.stats.error_power, rel=1e-12)  # summed in other orders


def test_tile_plan_takes_float64_for_inexact_inputs() -> None:
    m = ModelBuilder((8,), qp(1.0, 0, 8))
    m.linear("fc", "x", qp(1.0, 0, 16, signed=True), W.to(torch.int8), torch.zeros(3, dtype=torch.int32), 1.0)
    qmodel = m.build()
    for hw, path in (({"tile": 4, "adc": {"bits": 8}}, {"int_mm", "float32"}), ({"tile": 4, "dac": {"enob": 8}},
                                                                               {"float64"})):
        plan = plan_layer(qmodel, 0, LayerHardware.model_validate(hw), torch.device("cpu"), analog=True)
        assert plan.matmul.path in path, hw
    assert replace(plan.readout, dac_enob=None).exact_inputs and not plan.readout.exact_inputs
