"""Linear layers on token inputs (N, T, features): each position alone, exactly as on flat inputs, on every
backend and with the hardware's noise keyed by sample (a transformer's MLP, a token mean, a classifier)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import photosim
from photosim.engine.executor import Engine
from photosim.ir.fakequant import fake_quant_forward
from photosim.ir.summary import layer_table

NOISY = {"tile": 4, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.01}}}


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.head = nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(x))).mean(1))


@pytest.fixture(scope="module")
def tokens() -> tuple[photosim.QuantizedModel, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(24, 5, 6)
    return photosim.quantize(TokenMLP().eval(), x, {"w_bits": 8, "a_bits": 8}), x


def test_a_token_linear_is_the_flat_linear_of_each_position(tokens) -> None:
    qm, x = tokens
    codes = Engine(qm).node_outputs(x)
    assert codes["fc1"].shape == (24, 5, 8) and codes["head"].shape == (24, 3)
    flat = Engine(qm).layers["fc1"].linear(codes["input"].reshape(-1, 6), torch.arange(24))  # positions as rows
    assert torch.equal(codes["fc1"], flat.reshape(24, 5, 8))
    assert torch.equal(photosim.simulate(qm, x), fake_quant_forward(qm, x).float())
    assert layer_table(qm).set_index("layer").loc["fc1", "macs"] == 5 * 6 * 8  # per sample: T positions


@pytest.mark.parametrize("backend", ["fused-cpu", "torch"])
def test_noisy_token_layers_do_not_depend_on_batching(tokens, backend: str) -> None:
    qm, x = tokens
    engine = Engine(qm, NOISY, seed=3, backend=[backend])
    whole = engine.codes(x)
    assert torch.equal(torch.cat([engine.codes(x[:7]), engine.codes(x[7:], first_sample=7)]), whole)
    assert {choice.backend for choice in engine.backends.values()} == {backend}
    reference = Engine(qm, NOISY, seed=3, backend=["torch"]).codes(x)
    assert torch.equal(whole, reference)


def test_the_link_budget_counts_every_position(tokens) -> None:
    from photosim.experiments.budget import budget_table
    from photosim.hardware.plan import HardwarePlan

    qm, _ = tokens
    table = budget_table(qm, HardwarePlan.resolve(qm, "microring-weight-bank")).set_index("layer")
    assert table.loc["fc1", "macs"] == 5 * 6 * 8 and table.loc["head", "macs"] == 4 * 3
