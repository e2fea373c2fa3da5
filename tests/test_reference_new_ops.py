"""concat, mul, mean, permute, slice and table: the engine against tests/reference_executor.py (written from
docs/format.md and docs/integer-semantics.md alone) on hand-built models, every node's codes equal, in the
``float`` and ``fixedpoint`` modes; and the ``pytorch`` mode's refusal of the ops it has no rule for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference_executor as ref
import torch
from conftest import ModelBuilder, qp

from photosim.engine.executor import Engine
from photosim.errors import PhotosimError
from photosim.ir.format import QParams, QuantizedModel

MODES = ["float", "fixedpoint"]


def compare(qm: QuantizedModel, x: torch.Tensor, mode: str, path) -> dict[str, np.ndarray]:
    """Every tensor's codes of the engine and the reference, torch.equal; returns the reference's."""
    qm.save(path)
    expected = ref.run(ref.read(path), x.numpy(), mode)
    got = Engine(qm, {"requant": mode}).node_outputs(x)
    assert set(got) == set(expected)
    for name, codes in expected.items():
        engine = got[name].to(torch.int64)
        want = torch.from_numpy(codes)
        assert engine.shape == want.shape, (name, engine.shape, want.shape)
        assert torch.equal(engine, want), (
            f"{mode}: node {name!r} differs in {int((engine != want).sum())} of {want.numel()} codes; first at "
            f"{torch.nonzero(engine != want)[0].tolist()}: engine {engine[engine != want][:5].tolist()}, "
            f"reference {want[engine != want][:5].tolist()}")
    return expected


def inputs(qm: QuantizedModel, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Random inputs covering the input's clamp range and a little beyond it."""
    g = torch.Generator().manual_seed(seed)
    q = qm.input_q
    lo, hi = q.scale * (q.qmin - q.zero_point - 2), q.scale * (q.qmax - q.zero_point + 2)
    return (torch.rand((n, *qm.input_shape), generator=g, dtype=torch.float64) * (hi - lo) + lo).float()


def copy(m: ModelBuilder, name: str, src: str, channels: int, out: QParams, scale: float = 1.0) -> str:
    """A 1x1 conv copying every channel of ``src`` (weight 1, per-tensor weight scale ``scale``) requantized to
    ``out``: a tensor of the same values in another quantization."""
    weight = torch.eye(channels, dtype=torch.int8).view(channels, channels, 1, 1)
    return m.conv(name, src, out, weight, torch.zeros(channels), scale)


# -- concat ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_concat_channels_different_quantization(mode, tmp_path):
    m = ModelBuilder((3, 4, 5), qp(0.03, 20, 8))
    copy(m, "a", "x", 3, qp(0.05, 10, 8))
    copy(m, "b", "x", 3, qp(0.11, -3, 8, signed=True))
    copy(m, "c", "x", 3, qp(0.004, 700, 12, qmin=700))  # a ReLU clamp, 12 bits, finer than the output
    m.add("cat", "concat", ["a", "b", "c", "x"], qp(0.07, 100, 8), dim=1)
    m.add("cat_s", "concat", ["a", "b", "x"], qp(0.02, -5, 10, signed=True, qmin=-20, qmax=300), dim=1)
    qm = m.build()
    out = compare(qm, inputs(qm), mode, tmp_path / "m.safetensors")
    assert out["cat"].shape == (3, 12, 4, 5) and out["cat_s"].shape == (3, 9, 4, 5)
    assert (out["cat_s"] == -20).any() and (out["cat_s"] == 300).any()  # both ends of the clamp reached


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [2, 3])
def test_concat_other_dims(mode, dim, tmp_path):
    m = ModelBuilder((2, 3, 4), qp(0.5, -8, 6, signed=True))
    copy(m, "a", "x", 2, qp(0.25, 3, 8))
    m.add("cut", "slice", ["x"], dim=dim, start=1, stop=3)  # other sizes along dim
    m.add("cat", "concat", ["a", "cut", "x"], qp(0.3, 30, 8), dim=dim)
    qm = m.build()
    out = compare(qm, inputs(qm), mode, tmp_path / "m.safetensors")
    size = {2: 3 + 2 + 3, 3: 4 + 2 + 4}[dim]
    assert out["cat"].shape[dim] == size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("in_q", "out_q"), [
    (qp(0.1, 7, 8), qp(0.2, 0, 8)),  # multiplier 0.5: exact ties, rne vs SRDHM's toward +inf
    (qp(0.1, 7, 8), qp(0.05, 2, 8, qmin=2, qmax=200)),  # multiplier 2 (a left shift), clamped
    (qp(0.1, 7, 8), qp(0.1, 7, 8)),  # the identity
    (qp(0.1, 7, 8), qp(0.1, 7, 8, qmin=7, qmax=100)),  # the same scale and zero point, a narrower clamp
    (qp(0.013, -100, 16, signed=True), qp(0.0071, 5, 16, signed=True)),  # 16 bits, multiplier > 1
    (qp(1 / 64, 0, 4, signed=True), qp(1 / 16, 0, 4, signed=True)),  # multiplier 1/4: ties at .5
])
def test_concat_one_input(mode, in_q, out_q, tmp_path):
    m = ModelBuilder((2, 3, 3), in_q)
    m.add("cat", "concat", ["x"], out_q, dim=1)
    qm = m.build()
    compare(qm, inputs(qm, n=4), mode, tmp_path / "m.safetensors")


def test_concat_ties_round_differently_per_mode(tmp_path):
    """(x - z) * 0.5 on odd codes: float rounds half to even, fixedpoint (SRDHM) toward +infinity."""
    m = ModelBuilder((1, 1, 4), qp(1.0, 0, 8, signed=True))
    m.add("cat", "concat", ["x"], qp(2.0, 0, 8, signed=True), dim=3)
    qm = m.build()
    x = torch.tensor([-3.0, -1.0, 1.0, 3.0]).view(1, 1, 1, 4)
    assert compare(qm, x, "float", tmp_path / "a.safetensors")["cat"].ravel().tolist() == [-2, 0, 0, 2]
    assert compare(qm, x, "fixedpoint", tmp_path / "b.safetensors")["cat"].ravel().tolist() == [-1, 0, 1, 2]


# -- mul ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("signed", [False, True])
def test_mul_broadcast_channels(mode, signed, tmp_path):
    """(N, C, H, W) * (N, C, 1, 1) (a squeeze-excite gate), different zero points."""
    m = ModelBuilder((4, 3, 5), qp(0.02, 9 if not signed else -9, 8, signed=signed))
    copy(m, "a", "x", 4, qp(0.03, 17 if not signed else -20, 8, signed=signed))
    copy(m, "b", "x", 4, qp(0.01, 40, 8))
    m.add("gate", "mean", ["b"], dims=[2, 3], keepdim=True)
    m.add("prod", "mul", ["a", "gate"], qp(0.002, 5 if not signed else -3, 8, signed=signed), )
    m.add("prod2", "mul", ["gate", "a"], qp(0.0005, 128, 10, qmin=128))  # the broadcast operand first
    m.add("sq", "mul", ["x", "a"], qp(0.001, 0, 12, signed=True))  # same shapes
    qm = m.build()
    out = compare(qm, inputs(qm), mode, tmp_path / "m.safetensors")
    assert out["prod"].shape == out["prod2"].shape == (3, 4, 3, 5)


@pytest.mark.parametrize("mode", MODES)
def test_mul_self_and_ties(mode, tmp_path):
    """x * x with power-of-two scales: multipliers with exact ties."""
    m = ModelBuilder((2, 2, 3), qp(0.5, 3, 5, signed=True))
    m.add("sq", "mul", ["x", "x"], qp(0.5, 0, 8, signed=True))
    m.add("cube", "mul", ["sq", "x"], qp(2.0, -7, 8, signed=True))
    qm = m.build()
    compare(qm, inputs(qm, n=4), mode, tmp_path / "m.safetensors")


def test_mul_of_inputs_of_different_ranks_is_refused() -> None:
    """format.md, mul: the inputs have one rank; (C, H, W) * (W,) would broadcast the batch of the (N, W)
    operand against H in a whole-tensor product, so the file is refused, naming the node."""
    m = ModelBuilder((3, 2, 4), qp(0.1, 8, 8))
    m.add("row", "mean", ["x"], dims=[1, 2], keepdim=False)  # (N, W)
    m.add("prod", "mul", ["x", "row"], qp(0.5, 0, 16, signed=True))
    with pytest.raises(PhotosimError, match="node 'prod' .mul.: inputs of shapes .* differ in rank"):
        Engine(m.build())


def test_mul_fixedpoint_refuses_products_outside_int32(tmp_path):
    m = ModelBuilder((1, 1, 2), qp(1.0, -32768, 16, signed=True))
    m.add("sq", "mul", ["x", "x"], qp(1.0, 0, 16, signed=True))
    qm = m.build()
    qm.save(tmp_path / "m.safetensors")
    x = torch.tensor([65535.0, 0.0]).view(1, 1, 1, 2)  # codes 32767, -32768: (32767 + 32768)^2 > 2^31
    with pytest.raises(OverflowError):
        ref.run(ref.read(tmp_path / "m.safetensors"), x.numpy(), "fixedpoint")
    with pytest.raises(PhotosimError, match="outside int32"):
        Engine(qm, {"requant": "fixedpoint"}).node_outputs(x)
    compare(qm, x, "float", tmp_path / "f.safetensors")  # float takes any product


def test_mul_fixedpoint_refusal_names_the_node():
    """integer-semantics.md, mul: 'A product outside int32 ... is refused with the node's name'."""
    m = ModelBuilder((1, 1, 2), qp(1.0, -32768, 16, signed=True))
    m.add("sq", "mul", ["x", "x"], qp(1.0, 0, 16, signed=True))
    with pytest.raises(PhotosimError, match="'sq'"):
        Engine(m.build(), {"requant": "fixedpoint"}).node_outputs(torch.tensor([65535.0, 0.0]).view(1, 1, 1, 2))


# -- mean --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("dims", "keepdim"), [([2, 3], True), ([2, 3], False), ([1], False), ([3], True),
                                                ([1, 2, 3], False), ([2], False)])
def test_mean(mode, dims, keepdim, tmp_path):
    m = ModelBuilder((3, 5, 6), qp(0.04, 11, 8))
    m.add("same", "mean", ["x"], dims=dims, keepdim=keepdim)  # quantization unchanged (photosim's PTQ)
    m.add("other", "mean", ["x"], qp(0.015, -20, 8, signed=True), dims=dims, keepdim=keepdim)
    if keepdim or len(dims) < 3:  # a mean of the signed result over its first non-batch dimension
        m.add("signed", "mean", ["other"], qp(0.015, 4, 8, signed=True, qmin=4), dims=[1], keepdim=False)
    qm = m.build()
    out = compare(qm, inputs(qm), mode, tmp_path / "m.safetensors")
    shape = [3, 3, 5, 6]
    expected = [1 if i in dims else n for i, n in enumerate(shape)] if keepdim else \
        [n for i, n in enumerate(shape) if i not in dims]
    assert list(out["same"].shape) == expected


def test_mean_ties_round_differently_per_mode(tmp_path):
    """A mean exactly half a code above the zero point: float rounds half to even, fixedpoint away from zero."""
    m = ModelBuilder((1, 2, 2), qp(0.5, 3, 4))
    m.add("avg", "mean", ["x"], dims=[2, 3], keepdim=False)
    qm = m.build()
    x = torch.tensor([[[[0.0, 0.5], [0.0, 0.5]]]])  # codes 3, 4, 3, 4: S = 2, D = 4
    assert compare(qm, x, "float", tmp_path / "a.safetensors")["avg"].tolist() == [[3]]
    assert compare(qm, x, "fixedpoint", tmp_path / "b.safetensors")["avg"].tolist() == [[4]]


@pytest.mark.parametrize(("out", "codes"), [(qp(1.0, -32768, 16, signed=True), {"float": 32767, "fixedpoint": 32767}),
                                            (qp(0.5, 0, 16, signed=True), {"float": 32767, "fixedpoint": 16384}),
                                            (qp(3.0, 100, 16, signed=True), {"float": 21945, "fixedpoint": 11023})])
def test_mean_sum_beyond_int32(out, codes, tmp_path):
    """65536 centred codes of 65535: S = 2^32 - 2^16. fixedpoint saturates S to int32 in the multiplier's
    left-shift step where s_in != s_out (integer-semantics.md, Average pools); float is exact."""
    m = ModelBuilder((1, 256, 256), qp(1.0, -32768, 16, signed=True))
    m.add("avg", "mean", ["x"], out, dims=[2, 3], keepdim=False)
    qm = m.build()
    x = torch.full((1, 1, 256, 256), 65535.0)
    for mode in MODES:
        assert compare(qm, x, mode, tmp_path / f"{mode}.safetensors")["avg"].tolist() == [[codes[mode]]]


# -- permute, slice ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [[0, 2, 3, 1], [0, 3, 1, 2], [0, 1, 3, 2], [0, 3, 2, 1]])
def test_permute(mode, dims, tmp_path):
    m = ModelBuilder((2, 3, 4), qp(0.1, -2, 6, signed=True))
    m.add("p", "permute", ["x"], dims=dims)
    m.add("back", "concat", ["p"], qp(0.07, 0, 8, signed=True), dim=1)  # a requantizing consumer
    m.add("flat", "flatten", ["back"], start_dim=1)
    qm = m.build()
    x = inputs(qm)
    out = compare(qm, x, mode, tmp_path / "m.safetensors")
    assert torch.equal(torch.from_numpy(out["p"]), torch.from_numpy(out["x"]).permute(*dims))


@pytest.mark.parametrize("mode", MODES)
def test_slice_and_channel_shuffle(mode, tmp_path):
    m = ModelBuilder((6, 3, 3), qp(0.05, 100, 8))
    m.add("lo", "slice", ["x"], dim=1, start=0, stop=3)
    m.add("hi", "slice", ["x"], dim=1, start=3, stop=6)
    m.add("mid", "slice", ["x"], dim=1, start=2, stop=5)
    m.add("row", "slice", ["x"], dim=2, start=1, stop=2)
    m.add("col", "slice", ["x"], dim=3, start=2, stop=3)
    m.add("swap", "concat", ["hi", "lo"], qp(0.05, 100, 8), dim=1)
    m.add("r", "reshape", ["swap"], shape=[2, 3, 3, 3])  # channel shuffle: (2, 3) groups -> (3, 2)
    m.add("t", "permute", ["r"], dims=[0, 2, 1, 3, 4])
    m.add("shuffled", "reshape", ["t"], shape=[6, 3, 3])
    qm = m.build()
    out = compare(qm, inputs(qm), mode, tmp_path / "m.safetensors")
    x = out["x"]
    assert np.array_equal(out["mid"], x[:, 2:5]) and np.array_equal(out["col"], x[:, :, :, 2:3])
    assert np.array_equal(out["shuffled"][:, 0], x[:, 3]) and np.array_equal(out["shuffled"][:, 1], x[:, 0])


# -- table -------------------------------------------------------------------------------------------

def _random_table(bits: int, out: QParams, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(out.qmin, out.qmax + 1, (1 << bits,), generator=g, dtype=torch.int32)


def _sigmoid_table(in_q: QParams, out: QParams) -> torch.Tensor:
    lo, hi = QParams.storage_range(in_q.bits, in_q.signed)
    codes = torch.arange(lo, hi + 1, dtype=torch.float64)
    y = torch.sigmoid((codes - in_q.zero_point) * in_q.scale) / out.scale
    return (torch.round(y) + out.zero_point).clamp(out.qmin, out.qmax).to(torch.int32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_table(mode, signed, bits, tmp_path):
    in_q = qp(4.0 / (1 << bits), (1 << (bits - 2)) * (-1 if signed else 1), bits, signed=signed)
    out_r = qp(0.01, -7, 8, signed=True, qmin=-100, qmax=90)
    out_s = qp(1 / 255, 0, 8)
    m = ModelBuilder((2, 3, 4), in_q)
    m.add("rand", "table", ["x"], out_r, function="tanh")  # any table: the stored one is the semantics
    m.tensors["rand.table"] = _random_table(bits, out_r, bits)
    m.add("sig", "table", ["x"], out_s, function="sigmoid")
    m.tensors["sig.table"] = _sigmoid_table(in_q, out_s)
    m.add("again", "table", ["rand"], out_s, function="sigmoid")  # a table of a signed 8-bit table output
    m.tensors["again.table"] = _random_table(8, out_s, 99)
    qm = m.build()
    x = inputs(qm, n=4, seed=bits)
    out = compare(qm, x, mode, tmp_path / "m.safetensors")
    lo = QParams.storage_range(bits, signed)[0]
    assert np.array_equal(out["rand"], m.tensors["rand.table"].numpy()[out["x"] - lo])


def test_table_every_code(tmp_path):
    """Every input code of a signed 8-bit input once: the whole table comes out, in order."""
    in_q = qp(0.05, -3, 8, signed=True)
    out_q = qp(0.02, 10, 8, qmin=10)
    m = ModelBuilder((1, 16, 16), in_q)
    m.add("t", "table", ["x"], out_q, function="silu")
    m.tensors["t.table"] = _random_table(8, out_q, 5)
    qm = m.build()
    x = ((torch.arange(-128, 128, dtype=torch.float64) + 3) * 0.05).float().view(1, 1, 16, 16)
    for mode in MODES:
        out = compare(qm, x, mode, tmp_path / f"{mode}.safetensors")
        assert out["x"].ravel().tolist() == list(range(-128, 128))
        assert out["t"].ravel().tolist() == m.tensors["t.table"].tolist()


# -- pytorch mode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["mean", "table"])
def test_pytorch_mode_refuses_ops_without_a_rule(op, tmp_path):
    m = ModelBuilder((2, 3, 3), qp(0.1, 5, 8))
    attrs = {"mean": {"dims": [2, 3], "keepdim": True}, "table": {"function": "sigmoid"}}[op]
    m.add("n", op, ["x"], qp(0.1, 5, 8), **attrs)
    if op == "table":
        m.tensors["n.table"] = _random_table(8, qp(0.1, 5, 8), 0)
    qm = m.build()
    qm.save(tmp_path / "m.safetensors")
    with pytest.raises(ref.Unsupported):
        ref.run(ref.read(tmp_path / "m.safetensors"), inputs(qm).numpy(), "pytorch")
    with pytest.raises(PhotosimError, match="'n'"):
        Engine(qm, {"requant": "pytorch"})


def test_pytorch_mode_permute_and_slice(tmp_path):
    """Codes moved, never recomputed: the pytorch mode runs them as the others do."""
    m = ModelBuilder((4, 3, 5), qp(0.1, 5, 8))
    m.add("p", "permute", ["x"], dims=[0, 3, 1, 2])
    m.add("s", "slice", ["p"], dim=2, start=1, stop=3)
    qm = m.build()
    x = inputs(qm)
    qm.save(tmp_path / "m.safetensors")
    expected = ref.run(ref.read(tmp_path / "m.safetensors"), x.numpy(), "pytorch")
    got = Engine(qm, {"requant": "pytorch"}).node_outputs(x)
    for name, codes in expected.items():
        assert torch.equal(got[name].to(torch.int64), torch.from_numpy(codes)), name
    assert math.prod(expected["s"].shape) == 3 * 5 * 2 * 3
