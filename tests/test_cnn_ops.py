"""The ops of today's CNNs end to end: captured from PyTorch, quantized, saved, and run on the engine (concat,
mul, mean, permute, slice, table nonlinearities, BatchNorm without a conv before it); the engine against the
fake-quant reference and hand-computed codes; bad tables and unsupported modes refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ModelBuilder, qp
from torch import nn

import photosim
from photosim.engine.executor import Engine
from photosim.errors import PhotosimError
from photosim.frontend.capture import capture
from photosim.ir.fakequant import fake_quant_forward, lookup_table
from photosim.ir.format import Node, QParams, load


class Mobile(nn.Module):
    """Every new pattern once: hardswish, BatchNorm after an activation, squeeze-excite (SiLU, sigmoid, mul),
    chunk, a channel slice, GELU, concat, channel shuffle (view / transpose / reshape), mean, tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.Hardswish()
        self.bn = nn.BatchNorm2d(8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.act(self.c1(x)))
        s = torch.sigmoid(self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        a, b = (x * s).chunk(2, dim=1)
        x = torch.cat([F.gelu(self.c2(a)), b[:, 1:4], b[:, :1]], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.tanh(x.mean([2, 3])))


@pytest.fixture(scope="module")
def mobile() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Mobile().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(48, 1, 8, 8)


def test_capture_maps_each_pattern_to_its_op(mobile: tuple[nn.Module, torch.Tensor]) -> None:
    graph = capture(mobile[0], mobile[1][:1])
    ops = [(n.op, n.attrs) for n in graph.nodes]
    assert ("table", {"function": "hardswish"}) in ops and ("table", {"function": "gelu"}) in ops
    assert [n.attrs["function"] for n in graph.nodes if n.op == "table"] == ["hardswish", "silu", "sigmoid", "gelu",
                                                                             "tanh"]
    bn = next(n for n in graph.nodes if n.name == "bn")
    assert bn.op == "conv2d" and bn.attrs["groups"] == 8 and bn.attrs["kernel"] == [1, 1]
    assert [n.attrs for n in graph.nodes if n.op == "slice"] == [
        {"dim": 1, "start": 0, "stop": 4}, {"dim": 1, "start": 4, "stop": 8},
        {"dim": 1, "start": 1, "stop": 4}, {"dim": 1, "start": 0, "stop": 1}]
    assert next(n.attrs for n in graph.nodes if n.op == "permute") == {"dims": [0, 2, 1, 3, 4]}
    assert next(n.attrs for n in graph.nodes if n.op == "mean") == {"dims": [2, 3], "keepdim": False}
    assert len(next(n for n in graph.nodes if n.op == "concat").inputs) == 3
    x = mobile[1][:4]
    assert torch.allclose(graph.run(x), mobile[0](x), atol=1e-5)  # the captured graph is the model


@pytest.mark.parametrize("bits", [8, 6])
def test_engine_agrees_with_fake_quant_and_the_file_round_trips(mobile: tuple[nn.Module, torch.Tensor], bits: int,
                                                                tmp_path) -> None:
    model, x = mobile
    qm = photosim.quantize(model, x, {"w_bits": bits, "a_bits": bits})
    reference = fake_quant_forward(qm, x)
    lsb = qm.node(qm.output).output_q.scale
    for mode in ("float", "fixedpoint"):
        out = photosim.simulate(qm, x, {"requant": mode})
        assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.97
        assert (out - reference).abs().max() <= 4 * lsb
    path = tmp_path / "mobile.safetensors"
    qm.save(path)
    assert torch.equal(photosim.simulate(load(path), x), photosim.simulate(qm, x))
    noisy = photosim.simulate(qm, x, {"tile": 4, "adc": {"bits": 6}, "noise": {"output": {"sigma": 0.01}}}, seed=1)
    assert noisy.shape == (48, 10) and torch.isfinite(noisy).all()


def test_table_is_the_fake_quantized_function_at_every_code() -> None:
    q_in, q_out = qp(0.05, 7, 4), qp(1 / 15, 0, 4)
    node = Node("sig", "table", ["x"], [q_in], q_out, {"function": "sigmoid"})
    expected = [min(max(round(1 / (1 + math.exp(-(c - 7) * 0.05)) * 15), 0), 15) for c in range(16)]  # s_out 1/15
    assert lookup_table(node).tolist() == expected
    m = ModelBuilder((3,), q_in)
    m.add("sig", "table", ["x"], q_out, function="sigmoid")
    m.tensors["sig.table"] = lookup_table(node)
    codes = torch.tensor([[0, 7, 15]], dtype=torch.int32)
    got = Engine(m.build()).run(codes)["sig"]
    assert got.tolist() == [[expected[0], expected[7], expected[15]]]


def test_mul_and_concat_codes_by_hand() -> None:
    qa, out = qp(0.5, 2, 8), qp(0.1, 10, 8)
    m = ModelBuilder((1, 2, 2), qa)
    m.add("b", "clamp", ["x"], qa)
    m.add("m", "mul", ["x", "b"], out)
    m.add("c", "concat", ["x", "m"], QParams(0.2, 5, 8, False, 0, 255), dim=1)
    codes = torch.tensor([[[[2, 3], [4, 255]]]], dtype=torch.int32)
    values = Engine(m.build()).run(codes, keep_all=True)
    real = ((codes - 2) * 0.5) ** 2  # the product of x with itself
    assert torch.equal(values["m"], (torch.round(real.double() / 0.1) + 10).clamp(0, 255).int())
    assert torch.equal(values["c"][:, 0], (torch.round((codes[:, 0] - 2).double() * (0.5 / 0.2)) + 5).clamp(
        0, 255).int())


def test_mean_codes_by_hand_in_both_modes() -> None:
    q = qp(0.5, 3, 8)
    m = ModelBuilder((2, 1, 3), q)
    m.add("avg", "mean", ["x"], q, dims=[2, 3], keepdim=False)
    codes = torch.tensor([[[[3, 4, 6]], [[9, 9, 10]]]], dtype=torch.int32)
    model = m.build()
    # sums of x - 3: 4 and 19 over 3 elements: 1.333 -> 1 and 6.333 -> 6, plus the zero point
    for mode in ("float", "fixedpoint"):
        assert Engine(model, {"requant": mode}).run(codes)["avg"].tolist() == [[4, 9]]


def test_bad_tables_and_modes_are_refused(mobile: tuple[nn.Module, torch.Tensor], tmp_path) -> None:
    qm = photosim.quantize(mobile[0], mobile[1], {"w_bits": 8, "a_bits": 8})
    with pytest.raises(PhotosimError, match="node 'act' .table. has no rule in the 'pytorch' requant mode"):
        Engine(qm, {"requant": "pytorch"})
    Engine(qm, {"requant": "pytorch", "layers": [{"match": name, "requant": "float"} for name in
                                                  [n.name for n in qm.nodes if n.op in ("table", "mul", "concat",
                                                                                        "mean")]]})
    table = qm.tensors["act.table"]
    for bad, message in ((table[:-1], r"int32 of shape \(256,\)"), (table.to(torch.int64), "int32"),
                         (table + 300, "outside")):
        qm.tensors["act.table"] = bad
        with pytest.raises(PhotosimError, match=message):
            Engine(qm)
    qm.tensors["act.table"] = table


def test_unsupported_indexing_is_refused_by_name() -> None:
    class Strided(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, ::2]

    class BatchCat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], dim=0)

    with pytest.raises(PhotosimError, match=r"getitem \(call_function getitem\) at File"):
        capture(Strided(), torch.randn(1, 4))
    with pytest.raises(PhotosimError, match="cat: dimension 0 is not a fixed non-batch dimension"):
        capture(BatchCat(), torch.randn(1, 4))


@pytest.mark.parametrize(("bits", "allowed_drop"), [(8, 0.005), (6, 0.015)])
def test_digits_mbconv_keeps_its_float_accuracy(bits: int, allowed_drop: float) -> None:
    """The built-in model of these ops (concat stem, hardswish, squeeze-excite, mean) at W8A8 / W6A6 on the
    integer engine: within 0.5 / 1.5 points of float on the digits test split."""
    from photosim.experiments.accuracy import evaluate
    from photosim.experiments.workflow import DataSpec, quantize_loaded
    from photosim.frontend.models import list_models, load_model

    loaded, data = load_model("digits-mbconv"), DataSpec("digits")
    qm = quantize_loaded(loaded, data, photosim.QuantSpec(w_bits=bits, a_bits=bits))
    float_top1 = next(m.float_accuracy for m in list_models() if m.name == "digits-mbconv")
    assert evaluate(qm, data.split("test", loaded.input_shape)).top1 >= float_top1 - allowed_drop


def test_a_curve_of_points_is_a_table_node_written_with_its_points(tmp_path) -> None:
    """A measured nonlinearity (photosim.Curve): captured as one table node whose points travel in the file; the
    table holds the piecewise-linear curve at every input code, and the engine equals the fake-quant reference."""
    curve = photosim.Curve([-1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.75, 1.0])
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), curve, nn.Flatten(), nn.Linear(128, 3)).eval()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    qm = photosim.quantize(model, x, {"w_bits": 8, "a_bits": 8})
    node = qm.node("1")
    assert node.op == "table" and node.attrs == {"function": "curve", "x": [-1.0, 0.0, 0.5, 2.0],
                                                 "y": [0.0, 0.0, 0.75, 1.0]}
    q_in, q_out, table = node.input_q[0], node.output_q, qm.tensors["1.table"]
    for code in (q_in.zero_point, q_in.qmax, q_in.zero_point + 3):
        v = (code - q_in.zero_point) * q_in.scale
        y = 0.0 if v <= 0 else 1.5 * v if v <= 0.5 else 0.75 + (min(v, 2.0) - 0.5) / 1.5 * 0.25  # by hand
        assert table[code - q_in.qmin] == min(max(round(y / q_out.scale) + q_out.zero_point, q_out.qmin), q_out.qmax)
    path = tmp_path / "curve.safetensors"
    qm.save(path)
    loaded = load(path)
    assert loaded.node("1").attrs == node.attrs
    assert torch.equal(photosim.simulate(loaded, x), fake_quant_forward(qm, x).float())


@pytest.mark.parametrize(("x", "y", "message"), [([0.0, 0.0], [1.0, 2.0], "strictly increasing"),
                                                 ([0.0], [1.0], "2 to 65536"), ([0.0, 1.0], [1.0], "same length"),
                                                 ([0.0, float("nan")], [0.0, 1.0], "finite")])
def test_bad_curves_are_refused(x: list[float], y: list[float], message: str) -> None:
    with pytest.raises(PhotosimError, match=message):
        photosim.Curve(x, y)
