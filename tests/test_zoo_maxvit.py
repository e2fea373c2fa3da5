"""torch.einsum as a batched matmul, torch.swapaxes as a permute, and torchvision's MaxViT on integers.

MaxViT keeps the batch first throughout (its windows and grids are dimensions of their own) and writes attention
with einsum; its relative position bias (a table gathered by an index buffer) is folded into a constant.
"""

from __future__ import annotations

import pytest
import torch
from conftest import w8a8_outputs
from torch import nn
from torchvision.models.maxvit import MaxVit

from photosim.errors import PhotosimError
from photosim.frontend.capture import capture


class Einsum(nn.Module):
    def __init__(self, equation: str) -> None:
        super().__init__()
        self.equation = equation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum(self.equation, x, x.swapaxes(-1, -2) * 0.5)


@pytest.mark.parametrize(("equation", "permuted"), [
    ("b g i d, b g d j -> b g i j", 0),  # a plain matmul (the second operand is swapped by the model)
    ("bgij,bgjd->bgid", 0),
    ("bgid,bgjd->bgij", 1),  # MaxViT's q k^T: the second operand transposed
    ("bgdi,bgdj->bgij", 1),  # A^T B: the first operand transposed
    ("bgdi,bgjd->bgij", 2),  # both operands hold the contracted letter the other way round
])
def test_einsum_of_a_batched_matmul_is_a_matmul(equation: str, permuted: int) -> None:
    x = torch.randn(3, 4, 5, 5)
    model = Einsum(equation)
    graph = capture(model, x[:1])
    ops = [n.op for n in graph.nodes]
    assert ops == ["permute", "scale", *["permute"] * permuted, "matmul"]  # swapaxes, * 0.5, operands, matmul
    assert torch.allclose(graph.run(x), model(x), atol=1e-6)


@pytest.mark.parametrize("equation", ["bgij,bgjk->bgk", "bgij,bgij->bgij", "bgij,bhjk->bghik"])
def test_other_einsums_are_refused_by_name(equation: str) -> None:
    with pytest.raises(PhotosimError, match=r"einsum \(call_function einsum\)"):
        capture(Einsum(equation), torch.randn(1, 4, 5, 5))


def small_maxvit() -> nn.Module:
    torch.manual_seed(0)
    return MaxVit((16, 16), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1], head_dim=8,
                  stochastic_depth_prob=0.0, num_classes=10).eval()


def test_maxvit_captures_and_runs_on_integers() -> None:
    model, calibration, x = small_maxvit(), torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
    graph = capture(model, x[:1])
    assert [n.op for n in graph.nodes].count("matmul") == 4  # window and grid attention: q k^T and A v each
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-5)
    qm, ideal, reference = w8a8_outputs(model, calibration, x)
    assert (ideal - reference).abs().max() <= 0.1 * reference.abs().max()
    assert (ideal.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
