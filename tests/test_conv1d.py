"""1-D layers (keyword spotting, audio): Conv1d, BatchNorm1d, MaxPool1d, AvgPool1d and AdaptiveAvgPool1d run as
their 2-D ops on (N, C, 1, L) between reshapes, so every engine backend and hardware setting applies to them."""

from __future__ import annotations

import torch
from torch import nn

import photosim
from photosim.engine.executor import Engine
from photosim.frontend.capture import capture
from photosim.ir.fakequant import fake_quant_forward


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.pool = nn.Conv1d(4, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.MaxPool1d(2)
        self.c2 = nn.Conv1d(8, 8, 3, padding="same", groups=2, dilation=2)
        self.bn2 = nn.BatchNorm1d(8)
        self.avg, self.gap, self.fc = nn.AvgPool1d(3, stride=1, padding=1), nn.AdaptiveAvgPool1d(1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.c1(x))))
        x = torch.relu(self.bn2(self.c2(x)))
        return self.fc(torch.flatten(self.gap(self.avg(x)), 1))


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = KeywordNet().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(32, 4, 40)


def test_one_d_layers_are_their_two_d_ops_with_bn_and_relu_folded() -> None:
    model, x = _model()
    graph = capture(model, x[:1])
    ops = {n.name: (n.op, n.attrs, n.act) for n in graph.nodes}
    assert ops["c1"][0] == "conv2d" and ops["c1"][1]["kernel"] == [1, 5] and ops["c1"][1]["stride"] == [1, 2]
    assert ops["c1"][2] == (0.0, float("inf"))  # the ReLU after the BN, through the reshape back
    assert ops["c2"][1]["padding"] == [0, 2] and ops["c2"][1]["dilation"] == [1, 2] and ops["c2"][1]["groups"] == 2
    assert ops["pool"][1]["kernel"] == [1, 2] and ops["gap"][1]["output_size"] == [1, 1]
    assert not any(n.op == "clamp" for n in graph.nodes) and "bn1" not in ops  # both folded
    assert torch.allclose(graph.run(x), model(x), atol=1e-5)


def test_one_d_model_runs_exactly_and_on_the_hardware() -> None:
    model, x = _model()
    qm = photosim.quantize(model, x, {"w_bits": 8, "a_bits": 8})
    out = photosim.simulate(qm, x)
    assert (out - fake_quant_forward(qm, x)).abs().max() <= 1.01 * qm.node(qm.output).output_q.scale  # <= 1 LSB
    assert (out.argmax(1) == model(x).argmax(1)).float().mean() >= 0.9
    hw = {"tile": 8, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.01}}}
    fused, reference = (Engine(qm, hw, seed=2, backend=[b]).codes(x) for b in ("fused-cpu", "torch"))
    assert torch.equal(fused, reference)
