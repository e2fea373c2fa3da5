"""Signal-dependent noise (noise.photocurrent, noise.rin): the variance of every tile value follows the tile's real
light and signal power, checked against closed forms on crafted tiles; the int8 and float tile sums draw the same
numbers; the compiled CPU readout and the Triton kernel continue from them bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import analog_layer

from photosim.engine import kernels
from photosim.engine.backends import BACKENDS
from photosim.hardware.config import HardwareConfig

X_MAX, W_MAX, TILE = 15, 7, 4
X = torch.tensor([3, 0, 15, 7, 1, 2, 0, 9])  # K = 8: two tiles of 4
W = torch.tensor([[7, -7, 2, 0, -3, 5, 1, -1],  # O = 3 outputs
                  [-1, 4, -6, 7, 7, 7, -7, 2],
                  [0, 0, 0, 0, 1, 0, 0, 0]])
SAMPLES = 40_000
FS = TILE * X_MAX * W_MAX


def _accumulators(hw: dict, plan: kernels.MatmulPlan | None = None, samples: int = SAMPLES) -> torch.Tensor:
    """The accumulators (samples, O) of the same input under ``samples`` sample ids (independent noise draws)."""
    plan = plan or kernels.MatmulPlan("float64", chunk=8)
    layer = analog_layer({"tile": TILE, **hw}, kernels.prepare_weights(W, 1, plan), None, x_max=X_MAX, w_max=W_MAX)
    return layer.linear_acc(X.repeat(samples, 1), torch.arange(samples)).double()


def _per_tile(values: torch.Tensor) -> torch.Tensor:
    """(T, O) per-tile sums of products-like terms (K = 8 split into the two tiles)."""
    return values.view(3, 2, TILE).sum(dim=2).T


def _check_variance(acc: torch.Tensor, tile_variance: torch.Tensor) -> None:
    """Each output's variance is the sum over its tiles of the law's variance plus the ideal readout's rounding,
    1/12 per noisy tile (a tile without light stays an exact integer); its mean is the exact dot product."""
    expected = tile_variance.sum(dim=0) + (tile_variance > 0).sum(dim=0) / 12
    assert torch.allclose(acc.var(dim=0), expected, rtol=0.03)
    assert torch.allclose(acc.mean(dim=0), (W * X).sum(dim=1).double(), atol=4 * (expected / SAMPLES).sqrt().max())


@pytest.mark.parametrize("light", ["inputs", "products"])
def test_photocurrent_variance_follows_the_tile_light(light: str) -> None:
    sigma = 0.05
    acc = _accumulators({"noise": {"photocurrent": {"sigma": sigma, "light": light}}})
    if light == "inputs":  # sum |x| Wmax per tile: the same for every output (weights only split the light)
        tile_light = _per_tile((X.abs() * W_MAX).expand(3, 8).double())
    else:
        tile_light = _per_tile((X * W).abs().double())
    _check_variance(acc, sigma ** 2 * FS * tile_light)


@pytest.mark.parametrize("lasers", ["independent", "common"])
def test_intensity_noise_follows_the_signal(lasers: str) -> None:
    sigma = 1.0  # every tile's std at least 1: the rounding error is then uniform (1/12)
    acc = _accumulators({"noise": {"rin": {"sigma": sigma, "lasers": lasers}}})
    products = (X * W).double()
    power = _per_tile(products ** 2) if lasers == "independent" else _per_tile(products) ** 2
    _check_variance(acc, sigma ** 2 * power)


def test_int8_tile_sums_draw_the_same_numbers() -> None:
    """The int8 GEMM plan shifts its operands by an offset; the signals it computes undo the shift."""
    hw = {"noise": {"photocurrent": {"sigma": 0.05}, "rin": {"sigma": 0.1}, "output": {"sigma": 0.01}}}
    reference = _accumulators(hw, samples=64)
    shifted = _accumulators(hw, kernels.MatmulPlan("int_mm", chunk=8, offset=128), samples=64)
    assert torch.equal(reference, shifted)


@pytest.mark.parametrize("plan, noise", [
    ("float32", {"photocurrent": {"sigma": 0.05}, "rin": {"sigma": 0.1}, "output": {"sigma": 0.01}}),
    ("int_mm", {"photocurrent": {"sigma": 0.05}, "rin": {"sigma": 0.1}, "output": {"sigma": 0.01}}),
    ("int_mm", {"rin": {"sigma": 0.1, "lasers": "common"}, "output": {"sigma": 0.01}}),  # no per-tile sums needed
])
def test_the_compiled_readout_continues_from_torchs_signal_noise_bit_for_bit(plan: str, noise: dict) -> None:
    """fused-cpu serves the layer: torch draws photocurrent and RIN first (as the reference path does), the compiled
    readout adds the output noise, ADC and accumulator; codes, clips and the predicted noise power agree."""
    hw = {"tile": TILE, "adc": {"bits": 6, "range": 0.1}, "noise": noise}
    matmul = kernels.MatmulPlan(plan, chunk=8, offset=128 if plan == "int_mm" else 0)
    layers = [analog_layer(hw, kernels.prepare_weights(W, 1, matmul), torch.tensor([[5, -3, 0]]), x_max=X_MAX,
                           w_max=W_MAX, tile_step=step) for step in ("torch", "fused-cpu")]
    assert BACKENDS["fused-cpu"].supports(layers[1].plan, torch.device("cpu")) is None
    x = torch.randint(0, X_MAX + 1, (64, 8), generator=torch.Generator().manual_seed(5))
    torch_codes, fused_codes = (layer.linear_acc(x, torch.arange(64)) for layer in layers)
    assert torch.equal(torch_codes, fused_codes)
    assert layers[0].stats.clipped == layers[1].stats.clipped > 0
    assert layers[0].stats.signal_noise_power == layers[1].stats.signal_noise_power > 0


def test_the_triton_kernel_reads_out_after_torchs_signal_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # supports() reads it; nothing here imports Triton
    layer = analog_layer({"tile": TILE, "noise": {"rin": {"sigma": 0.1}}},
                         kernels.prepare_weights(W, 1, kernels.MatmulPlan("float32", chunk=8)), None,
                         x_max=X_MAX, w_max=W_MAX)
    assert BACKENDS["fused-triton"].supports(layer.plan, torch.device("cpu")) is None


def test_configs_without_the_effects_dump_as_before() -> None:
    """Sweep points hash the dump: effects that are off and at their defaults are left out of it."""
    assert set(HardwareConfig().model_dump()["noise"]) == {"output", "shot", "weight_static", "weight_read", "custom"}
    on = HardwareConfig.model_validate({"noise": {"photocurrent": {"sigma": 0.1}}})
    assert HardwareConfig.model_validate(on.model_dump()) == on
    assert HardwareConfig.model_validate({"noise": {"rin": {"lasers": "common"}}}).model_dump()["noise"]["rin"] == \
        {"sigma": 0.0, "lasers": "common"}
