"""SmoothQuant (photosim/frontend/algorithms/smoothing.py): the float function is kept, activation and weight
ranges meet at their geometric mean, an outlier channel costs a per-tensor quantizer less, `auto` tries it only
where a LayerNorm feeds linear layers only."""

from __future__ import annotations

import copy

import torch
from torch import nn

from photosim.frontend.algorithms.selection import SMOOTHING_CANDIDATES, candidates
from photosim.frontend.algorithms.smoothing import channel_ranges, smooth, smoothable
from photosim.frontend.capture import capture
from photosim.frontend.data import load_dataset
from photosim.frontend.models import load_model
from photosim.frontend.ptq import quantize
from photosim.ir.fakequant import fake_quant_forward


class NormThenLinear(nn.Module):
    """A pre-norm projection whose LayerNorm output has one outlier channel (gamma 40 where the others are 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 8)
        with torch.no_grad():
            self.norm.weight[3] = 40.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def _calibration() -> torch.Tensor:
    return torch.randn(64, 5, 16, generator=torch.Generator().manual_seed(1))


def test_the_float_function_is_kept_and_the_ranges_meet_at_their_geometric_mean() -> None:
    x = _calibration()
    graph = capture(NormThenLinear().eval(), x[:1])
    (norm_name, linears), = smoothable(graph).items()
    before_x = channel_ranges(graph, [norm_name], [x])[norm_name]
    before_w = linears[0].weight.double().abs().amax(dim=0)
    expected = graph.run(x)
    smooth(graph, [x])
    assert torch.allclose(graph.run(x), expected, rtol=1e-5, atol=1e-5)
    after_x = channel_ranges(graph, [norm_name], [x])[norm_name]
    after_w = linears[0].weight.double().abs().amax(dim=0)
    geometric = (before_x * before_w).sqrt()  # alpha = 0.5: both ranges become sqrt(max|X_j| max|W_j|)
    assert torch.allclose(after_x, geometric, rtol=1e-5) and torch.allclose(after_w, geometric, rtol=1e-5)
    assert before_x[3] > 20 * before_x.median() and after_x[3] < 8 * after_x.median()


def test_an_outlier_channel_costs_a_per_tensor_activation_less_after_smoothing() -> None:
    model, x = NormThenLinear().eval(), _calibration()
    reference = model(x)
    errors = {}
    for ptq in ([], ["smoothquant"]):
        qmodel = quantize(copy.deepcopy(model), x, {"w_bits": 8, "a_bits": 6, "ptq": ptq})
        errors[bool(ptq)] = float((fake_quant_forward(qmodel, x) - reference).pow(2).mean())
    assert errors[True] < 0.5 * errors[False]  # measured: 3.0x less


def test_auto_tries_smoothquant_where_a_layer_norm_feeds_linear_layers_only() -> None:
    calibration = torch.stack([x for x, _ in load_dataset("digits", "calibration")])[:32]
    spec = {"w_bits": 8, "a_bits": 8}
    vit = quantize(load_model("digits-vit").module, calibration, spec)
    cnn = quantize(load_model("digits-cnn").module, calibration, spec)
    assert candidates(vit)[-len(SMOOTHING_CANDIDATES):] == SMOOTHING_CANDIDATES
    assert not any("smoothquant" in c for c in candidates(cnn))
