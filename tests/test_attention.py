"""Attention written out (q @ k, a constant scale, softmax, A @ v) on integers: each op against its documented
formula computed independently, the whole block against the fake-quant reference, and bad files refused."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ModelBuilder, qp
from torch import nn

import photosim
from photosim.engine.executor import Engine
from photosim.errors import PhotosimError
from photosim.frontend.capture import capture
from photosim.ir.fakequant import exp_table, fake_quant_forward


class Attention(nn.Module):
    """Pre-norm multi-head self-attention on tokens, a residual and a token-mean head."""

    def __init__(self, channels: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.dim = heads, channels // heads
        self.ln, self.q, self.k, self.v = nn.LayerNorm(channels), *(nn.Linear(channels, channels) for _ in "qkv")
        self.out, self.head = nn.Linear(channels, channels), nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        y = self.ln(x)
        q = self.q(y).reshape(n, t, self.heads, self.dim).transpose(1, 2)
        k = self.k(y).reshape(n, t, self.heads, self.dim).permute(0, 2, 3, 1)
        v = self.v(y).reshape(n, t, self.heads, self.dim).transpose(1, 2)
        a = torch.softmax(q @ k / math.sqrt(self.dim), dim=-1)
        return self.head((x + self.out((a @ v).transpose(1, 2).reshape(n, t, c))).mean(1))


@pytest.fixture(scope="module")
def attention() -> tuple[photosim.QuantizedModel, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(64, 5, 8)
    return photosim.quantize(model, x, {"w_bits": 8, "a_bits": 8}), x, model


def test_capture_writes_attention_as_matmul_scale_softmax(attention) -> None:
    _, x, model = attention
    ops = [n.op for n in capture(model, x[:1]).nodes]
    assert ops.count("matmul") == 2 and ops.count("softmax") == 1 and ops.count("scale") == 1
    assert next(n.attrs for n in capture(model, x[:1]).nodes if n.op == "scale") == {"factor": 0.5}


def test_the_block_agrees_with_fake_quant_and_the_float_model(attention, tmp_path) -> None:
    qm, x, model = attention
    out = photosim.simulate(qm, x)
    assert torch.equal(out, fake_quant_forward(qm, x).float()) or (
        (out - fake_quant_forward(qm, x)).abs().max() <= 1.01 * qm.node(qm.output).output_q.scale)
    assert (out.argmax(1) == model(x).argmax(1)).float().mean() >= 0.95
    assert (photosim.simulate(qm, x, {"requant": "fixedpoint"}).argmax(1) == out.argmax(1)).float().mean() >= 0.95
    qm.save(tmp_path / "attention.safetensors")
    assert torch.equal(photosim.simulate(photosim.load(tmp_path / "attention.safetensors"), x), out)


def test_softmax_codes_are_the_documented_formula() -> None:
    q_in, q_out = qp(0.1, 3, 6), qp(1 / 255, 0, 8)
    m = ModelBuilder((2, 4), q_in)
    m.add("p", "softmax", ["x"], q_out)
    m.tensors["p.exp"] = exp_table(m.nodes[-1])
    codes = torch.tensor([[[3, 10, 0, 63], [7, 7, 7, 7]]], dtype=torch.int32)
    got = Engine(m.build()).run(codes)["p"].tolist()
    table = [round(2**30 * math.exp(-k * 0.1)) for k in range(64)]
    assert m.tensors["p.exp"].tolist() == table
    expected = []
    for row in codes[0].tolist():
        e = [table[max(row) - v] for v in row]
        expected.append([min(max(round(v / sum(e) / (1 / 255)), 0), 255) for v in e])
    assert got == [expected]


def test_matmul_and_scale_codes_by_hand() -> None:
    qa, qb, out = qp(0.5, 2, 8), qp(0.25, 0, 8, signed=True), qp(0.2, 10, 8)
    m = ModelBuilder((2, 3), qa)
    m.add("t", "permute", ["x"], dims=[0, 2, 1])  # (3, 2): x transposed
    m.add("signed", "scale", ["t"], qb, factor=2.0)
    m.add("mm", "matmul", ["x", "signed"], out)
    codes = torch.tensor([[[2, 5, 9], [0, 4, 255]]], dtype=torch.int32)
    values = Engine(m.build()).run(codes, keep_all=True)
    a = (codes[0].double() - 2) * 0.5
    signed = (torch.round(a.T * 2 / 0.25)).clamp(-128, 127)
    assert values["signed"][0].tolist() == signed.int().tolist()
    product = (codes[0].long() - 2) @ signed.long()  # exact integer sums of products
    assert values["mm"][0].tolist() == (torch.round(product.double() * (0.5 * 0.25 / 0.2)) + 10).clamp(
        0, 255).int().tolist()


def test_bad_exp_tables_and_shapes_are_refused(attention) -> None:
    qm, _, _ = attention
    name = next(n.name for n in qm.nodes if n.op == "softmax")
    table = qm.tensors[f"{name}.exp"]
    for bad, message in ((table[:-1], "int32 of shape"), (table.flip(0), "never increase")):
        qm.tensors[f"{name}.exp"] = bad
        with pytest.raises(PhotosimError, match=message):
            Engine(qm)
    qm.tensors[f"{name}.exp"] = table
    m = ModelBuilder((2, 3), qp())
    m.add("mm", "matmul", ["x", "x"], qp())
    with pytest.raises(PhotosimError, match=r"not \(\.\.\., M, K\) and \(\.\.\., K, P\)"):
        Engine(m.build())


def test_noise_free_optical_matmuls_give_the_ideal_codes(attention) -> None:
    """Non-ideal settings that change no value (a saturating accumulator that never saturates, a 24-bit ADC) put the
    two matmuls on the tile step, with each sample's second operand as its weights: the codes stay the ideal ones."""
    qm, x, _ = attention
    ideal = Engine(qm).node_outputs(x)
    for hw in ({"tile": 2, "accumulator": {"bits": 32, "overflow": "saturate"}}, {"tile": 3, "adc": {"bits": 24}}):
        engine = Engine(qm, hw)
        assert {"matmul", "matmul_1"} <= set(engine.analog) and engine.backends["matmul"].backend == "torch"
        got = engine.node_outputs(x)
        assert [name for name in ideal if not torch.equal(ideal[name], got[name])] == []


def test_matmul_output_noise_has_the_tile_statistics() -> None:
    """One matmul of constant operands on tiles of 4 over K = 16: the accumulator error has std sigma * FS *
    sqrt(T) (T = 4 tiles, FS = L * max|a - z_a| * max|b - z_b|), and the draws do not depend on the batch."""
    m = ModelBuilder((2, 16), qp(1.0, 0, 8))
    m.add("t", "permute", ["x"], dims=[0, 2, 1])  # (16, 2)
    m.add("mm", "matmul", ["x", "t"], qp(64.0, 0, 16, signed=True))
    model = m.build()
    engine = Engine(model, {"tile": 4, "noise": {"output": {"sigma": 0.001}}}, seed=3)
    layer = engine.analog["mm"]
    a = torch.full((400, 2, 16), 100, dtype=torch.int64)
    acc = layer.matmul_acc(a, a.transpose(1, 2), torch.arange(400))  # (400, 2, 2)
    error = acc.double() * layer.step - 16 * 100 * 100
    assert layer.full_scale == 4 * 255 * 255
    assert error.std().item() == pytest.approx(0.001 * layer.full_scale * 2, rel=0.1)
    first = layer.matmul_acc(a[:7], a[:7].transpose(1, 2), torch.arange(7))
    assert torch.equal(first, acc[:7])


def test_weight_error_on_a_matmul_of_activations_is_refused(attention) -> None:
    qm, _, _ = attention
    with pytest.raises(PhotosimError, match="node 'matmul' .matmul.: weight error is a property of programmed"):
        Engine(qm, {"tile": 2, "noise": {"weight_read": {"sigma": 0.01}}})
