"""layer_norm: the engine's codes equal the documented formula computed independently in Python (exact integer
sums, then binary64), the fake-quant reference within one LSB, and bad files are refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import photosim
from photosim.engine.executor import Engine
from photosim.errors import PhotosimError
from photosim.ir.fakequant import fake_quant_forward


class Block(nn.Module):
    """A pre-norm MLP block on tokens and a head: LayerNorm with and without its affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.fc1, self.act, self.fc2 = nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)
        self.ln2, self.head = nn.LayerNorm(6, elementwise_affine=False), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(self.act(self.fc1(self.ln1(x))))
        return self.head(self.ln2(x).mean(1))


@pytest.fixture(scope="module")
def block() -> tuple[photosim.QuantizedModel, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.ln1.weight.uniform_(0.5, 1.5)
        model.ln1.bias.uniform_(-0.2, 0.2)
    x = torch.randn(48, 7, 6) * 2 + 0.5
    return photosim.quantize(model, x, {"w_bits": 8, "a_bits": 8}), x, model


def _by_the_docs(codes: torch.Tensor, qm: photosim.QuantizedModel, name: str) -> list[int]:
    """integer-semantics.md, layer_norm, in Python integers and floats (binary64)."""
    node = qm.node(name)
    q, out, eps = node.input_q[0], node.output_q, node.attrs["eps"]
    gamma, beta = (qm.tensors[f"{name}.{k}"].tolist() for k in ("gamma", "beta"))
    result = []
    for row in codes.reshape(-1, codes.shape[-1]).tolist():
        d = [v - q.zero_point for v in row]
        c, s = len(d), sum(d)
        u = [c * v - s for v in d]
        den = math.sqrt(sum(w * w for w in u) / c + eps * c * c / (q.scale * q.scale))
        result += [min(max(round((w / den * g + b) / out.scale) + out.zero_point, out.qmin), out.qmax)
                   for w, g, b in zip(u, gamma, beta)]
    return result


def test_codes_are_the_documented_formula(block) -> None:
    qm, x, _ = block
    values = Engine(qm).node_outputs(x[:6])
    for name in ("ln1", "ln2"):
        source = qm.node(name).inputs[0]
        assert values[name].reshape(-1).tolist() == _by_the_docs(values[source], qm, name), name


def test_engine_agrees_with_fake_quant_and_the_float_model(block, tmp_path) -> None:
    qm, x, model = block
    out = photosim.simulate(qm, x)
    assert (out - fake_quant_forward(qm, x)).abs().max() <= 1.01 * qm.node(qm.output).output_q.scale
    assert (out.argmax(1) == model(x).argmax(1)).float().mean() >= 0.95
    qm.save(tmp_path / "ln.safetensors")
    assert torch.equal(photosim.simulate(photosim.load(tmp_path / "ln.safetensors"), x), out)


def test_bad_norm_files_are_refused(block) -> None:
    qm, _, _ = block
    gamma = qm.tensors.pop("ln1.gamma")
    with pytest.raises(PhotosimError, match="'ln1.gamma' is missing"):
        Engine(qm)
    qm.tensors["ln1.gamma"] = gamma[:4]
    with pytest.raises(PhotosimError, match=r"shape \(6,\)"):
        Engine(qm)
    qm.tensors["ln1.gamma"] = gamma
    with pytest.raises(PhotosimError, match="no rule in the 'pytorch' requant mode"):
        Engine(qm, {"requant": "pytorch"})
