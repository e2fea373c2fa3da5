"""AdaRound and QDrop (issue 20 item 5): the paper's formulas, codes on the observer's grid, lower output error."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from photosim.cli import app
from photosim.frontend.algorithms import ALGORITHMS
from photosim.frontend.algorithms.adaround import (
    beta_at,
    dropped_input,
    initial_v,
    reconstruct,
    rectified_sigmoid,
    rounding_regulariser,
)
from photosim.frontend.algorithms.layer import LayerData
from photosim.frontend.algorithms.selection import CANDIDATES, RECONSTRUCTION_CANDIDATES, candidates
from photosim.frontend.data import load_dataset
from photosim.frontend.graph import FloatNode
from photosim.frontend.models import load_model
from photosim.frontend.ptq import quantize
from photosim.ir.fakequant import fake_quant_forward
from photosim.ir.observers import quantize_weight, weight_scale


def linear_layer(seed: int, rows: int = 16, features: int = 32, samples: int = 256) -> LayerData:
    """A random linear layer scaled as trained layers are (outputs of order one) on correlated inputs (8 factors
    plus a little noise, as neighbouring pixels); the quantized input is the float one plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, features, generator=gen) / features ** 0.5
    x_float = torch.randn(samples, 8, generator=gen) @ torch.randn(8, features, generator=gen) / 8 ** 0.5 + 0.1 * (
        torch.randn(samples, features, generator=gen))
    x_quant = x_float + 0.02 * torch.randn(samples, features, generator=gen)
    node = FloatNode("fc", "linear", ["input"], {"in_features": features, "out_features": rows}, w,
                     torch.randn(rows, generator=gen))
    return LayerData(node, x_float, x_quant)


def output_mse(layer: LayerData, codes: torch.Tensor, scale: torch.Tensor) -> float:
    """Mean squared error of ``codes * scale`` on the quantized inputs against the float layer on the float ones."""
    weight = codes.double() * scale.double().reshape(-1, 1)
    return float((layer.outputs(layer.node.weight, layer.node.bias, False) - layer.outputs(
        weight, layer.node.bias.double(), True)).pow(2).mean())


def test_rectified_sigmoid_and_its_inverse_follow_the_paper() -> None:
    v = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 10.0, -10.0])
    # sigmoid: 1/2, 3/4, 1/4, ~1, ~0; times zeta - gamma = 1.2, plus gamma = -0.1, clipped to [0, 1]
    expected = torch.tensor([0.5, 0.8, 0.2, 1.0, 0.0])
    assert torch.allclose(rectified_sigmoid(v), expected, atol=1e-6)
    rest = torch.tensor([0.01, 0.25, 0.5, 0.9, 0.99])
    assert torch.allclose(rectified_sigmoid(initial_v(rest)), rest, atol=1e-6)


def test_regulariser_and_beta_schedule_follow_the_paper() -> None:
    h = torch.tensor([0.0, 1.0, 0.5, 0.75])
    # 1 - |2h - 1|^beta per weight: 0, 0, 1, 1 - 0.5^beta
    assert float(rounding_regulariser(h, 2.0)) == pytest.approx(1.75)
    assert float(rounding_regulariser(h, 20.0)) == pytest.approx(2.0 - 0.5 ** 20)
    # 100 iterations: 20 of warm-up without the regulariser, then beta from 20 down to 2 over the 80 left
    assert [beta_at(step, 100) for step in (0, 19)] == [None, None]
    assert [beta_at(step, 100) for step in (20, 60, 99)] == pytest.approx([20.0, 11.0, 2.0 + 18.0 / 80])


@pytest.mark.parametrize("per_channel", [True, False])
def test_codes_lie_on_the_grid_within_one_step_of_nearest(per_channel: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 2, 3, 3, generator=gen)  # a grouped conv: 4 input channels in 2 groups
    attrs = {"in_channels": 4, "out_channels": 8, "kernel": (3, 3), "stride": (1, 1), "padding": (1, 1),
             "dilation": (1, 1), "groups": 2}
    x = torch.rand(16, 4, 6, 6, generator=gen)
    layer = LayerData(FloatNode("conv", "conv2d", ["input"], attrs, weight, torch.zeros(8)), x, x + 0.01)
    scale = weight_scale(weight, 3, per_channel, "minmax")
    s = scale.double().expand(8).reshape(-1, 1, 1, 1)
    for drop_probability in (0.0, 0.5):  # adaround, qdrop
        codes = reconstruct(layer, weight, scale, 3, drop_probability=drop_probability, iterations=200)
        assert codes.dtype == torch.int64 and codes.shape == weight.shape
        assert codes.min() >= -3 and codes.max() <= 3  # 3-bit narrow range
        floor = torch.floor(weight.double() / s).clamp(-3, 3)
        ceil = torch.ceil(weight.double() / s).clamp(-3, 3)
        assert torch.all((codes == floor) | (codes == ceil))
        nearest = quantize_weight(weight, scale, 3)
        assert 0 < int((codes != nearest).sum()) < codes.numel() // 2  # it moves some codes, not most


@pytest.mark.parametrize("name", ["adaround", "qdrop"])
def test_lower_output_error_than_round_to_nearest_on_a_linear_layer(name: str) -> None:
    layer = linear_layer(0)
    scale = weight_scale(layer.node.weight, 3, True, "minmax")
    nearest = output_mse(layer, quantize_weight(layer.node.weight, scale, 3), scale)
    fitted = output_mse(layer, ALGORITHMS[name].codes(layer, layer.node.weight, scale, 3), scale)
    assert fitted < 0.6 * nearest, (fitted, nearest)  # measured: 0.3 to 0.4


def test_deterministic_with_a_seed() -> None:
    layer = linear_layer(2)
    scale = weight_scale(layer.node.weight, 3, True, "minmax")
    first, second = (reconstruct(layer, layer.node.weight, scale, 3, drop_probability=0.5, iterations=200, seed=7)
                     for _ in range(2))
    assert torch.equal(first, second)


def test_qdrop_takes_the_float_input_half_of_the_time() -> None:
    shape = (40, 50, 50)  # 100,000 elements: the float count is binomial(n, 0.5), standard deviation 158
    mixed = dropped_input(torch.zeros(shape), torch.ones(shape), torch.Generator().manual_seed(0))
    assert torch.all((mixed == 0) | (mixed == 1))
    assert abs(int(mixed.sum()) - 50_000) < 4 * 158
    assert not torch.equal(mixed, dropped_input(torch.zeros(shape), torch.ones(shape),
                                                torch.Generator().manual_seed(1)))


def test_quantize_with_qdrop_follows_the_float_model_more_closely() -> None:
    calibration = torch.stack([x for x, _ in load_dataset("digits", "calibration")])
    model = load_model("digits-cnn").module
    reference = model(calibration).detach()
    spec = {"w_bits": 3, "a_bits": 3}
    error = {ptq: float((fake_quant_forward(quantize(model, calibration, {**spec, "ptq": ptq}), calibration)
                         - reference).pow(2).mean()) for ptq in ("none", "qdrop")}
    assert error["qdrop"] < 0.7 * error["none"], error


def test_auto_tries_a_reconstruction_at_4_bits_and_below_only() -> None:
    model, images = load_model("digits-cnn").module, torch.rand(8, 1, 8, 8)
    assert candidates(quantize(model, images, {"w_bits": 5, "a_bits": 4})) == CANDIDATES
    low = {"w_bits": 8, "a_bits": 8, "layers": [{"match": "fc2", "w_bits": 4}]}  # one 4-bit layer is enough
    assert candidates(quantize(model, images, low)) == CANDIDATES + RECONSTRUCTION_CANDIDATES


@pytest.mark.parametrize(("ptq", "words"), [("adarund", "unknown PTQ algorithm"),
                                            ("adaround,gptq", "pick one of them"),
                                            ("qdrop,adaround", "pick one of them")])
def test_bad_ptq_options_exit_2(tmp_path, ptq: str, words: str) -> None:
    output = tmp_path / "m.safetensors"
    result = CliRunner().invoke(app, ["quantize", "--model", "digits-cnn", "--ptq", ptq, "-o", str(output)])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert "adaround" in result.output or words == "pick one of them"
    assert not output.exists()
