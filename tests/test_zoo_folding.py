"""Constant folding at capture (photosim.frontend.folding) and torchvision's ConvNeXt on integers.

What is computed from parameters, buffers and literals alone (index tables, a position-bias MLP on a coordinate
buffer, views across the leading dimension) is evaluated once in float and becomes one constant node; what reads the
model input is still translated, or refused by name. ConvNeXt adds F.layer_norm after a permute with its own weight
and bias (LayerNorm2d) and a per-channel layer scale (a multiply by a (C, 1, 1) parameter).
"""

from __future__ import annotations

import pytest
import torch
from conftest import w8a8_outputs
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import photosim
from photosim.errors import PhotosimError
from photosim.frontend.capture import capture
from photosim.ir.fakequant import fake_quant_forward


class BiasTables(nn.Module):
    """A conv plus two constant biases built the way Swin builds its own: a gathered table and an MLP's output."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)
        self.table = nn.Parameter(torch.randn(7, 3, generator=g))
        self.register_buffer("index", torch.randint(0, 7, (16,), generator=g))
        self.register_buffer("coords", torch.randn(1, 4, 4, 2, generator=g))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = self.table[self.index].view(4, 4, 3).permute(2, 0, 1)  # (3, 4, 4): no batch dimension
        learned = self.mlp(self.coords).view(-1, 3).t().reshape(3, 4, 4)  # a view across the leading dimension
        return self.conv(x) + gathered + 16 * torch.sigmoid(learned)


def test_parameter_only_subgraphs_become_constants() -> None:
    model, x = BiasTables().eval(), torch.randn(6, 3, 4, 4)
    graph = capture(model, x[:1])
    assert [n.op for n in graph.nodes] == ["conv2d", "constant", "add", "constant", "add"]  # the MLP is folded
    gathered = next(n for n in graph.nodes if n.op == "constant")
    with torch.no_grad():
        assert torch.equal(gathered.weight, model.table[model.index].view(4, 4, 3).permute(2, 0, 1))
        assert torch.equal(graph.run(x), model(x))
    qm = photosim.quantize(model, x, {"w_bits": 8, "a_bits": 8})
    assert torch.equal(photosim.simulate(qm, x), fake_quant_forward(qm, x).float())


def test_refusals_still_name_the_ops_on_the_input_path() -> None:
    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.randn(1, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.p.cumsum(-1) + x.cumsum(-1)  # the first cumsum is a constant, the second is not

    with pytest.raises(PhotosimError, match="1 operation") as refused:
        capture(Cumulative(), torch.randn(1, 4))
    assert "cumsum_1 (call_method cumsum)" in str(refused.value) and "cumsum (" not in str(refused.value)


def test_a_constant_lined_up_with_the_batch_is_refused_by_name() -> None:
    class PerRow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = nn.Parameter(torch.randn(3, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.rows  # (1, 4) + (3, 4): the batch would become 3

    with pytest.raises(PhotosimError, match=r"rows \(a constant read by add: it has shape \(3, 4\): its first "
                                            "dimension 3 lines up with the batch"):
        capture(PerRow(), torch.randn(1, 4))


def small_convnext() -> nn.Module:
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).eval()
    with torch.no_grad():  # torchvision starts the layer scale at 1e-6: the blocks would vanish
        for block in model.modules():
            if hasattr(block, "layer_scale"):
                block.layer_scale.uniform_(0.2, 1.0)
    return model


def test_convnext_captures_exactly() -> None:
    model, x = small_convnext(), torch.randn(4, 3, 32, 32)
    graph = capture(model, x[:1])
    ops = [n.op for n in graph.nodes]
    assert ops.count("layer_norm") == 5 and ops.count("mul") == 2  # 3 LayerNorm2d, 2 blocks' norms; 2 scales
    scale = next(n for n in graph.nodes if n.op == "constant")
    assert scale.attrs == {"shape": [16, 1, 1]}  # the first block's (C, 1, 1) layer scale, one per sample
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-5)


def test_convnext_runs_on_integers_and_on_the_hardware() -> None:
    model, calibration, x = small_convnext(), torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    qm, ideal, reference = w8a8_outputs(model, calibration, x)
    # one-LSB roundings (float mode against the float64 reference) through 2 blocks: a few output steps at most
    assert (ideal - reference).abs().max() <= 3.01 * qm.node(qm.output).output_q.scale
    assert (ideal.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    chip = photosim.simulate(qm, x[:4], {"tile": 16, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.01}}})
    assert chip.shape == (4, 10) and torch.isfinite(chip).all()


def test_a_layer_norm_weight_computed_from_the_input_is_refused_by_name() -> None:
    class InputWeighted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.layer_norm(x, (4,), x[0, 0])

    with pytest.raises(PhotosimError, match="layer_norm at .*: its argument getitem is computed from the model input"):
        capture(InputWeighted(), torch.randn(1, 3, 4))
