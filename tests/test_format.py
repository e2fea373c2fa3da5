"""The integer model file: every op round-trips, foreign readers can read it, bad files are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from photosim.errors import PhotosimError
from photosim.frontend.ptq import quantize
from photosim.ir.format import FORMAT_VERSION, METADATA_KEY, QuantizedModel, load
from photosim.ir.ops import OPS


class EveryOp(nn.Module):
    """Uses every op of the file format once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d((2, 2))
        self.ln = nn.LayerNorm(4)
        self.position = nn.Parameter(torch.randn(1, 6, 4) * 0.1)  # a constant added to every sample
        self.fc = nn.Linear(28, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.pool(self.conv(x)))  # relu after a pool: a standalone clamp
        y = self.avg(y) + self.dw(y)
        y = torch.cat([torch.sigmoid(y[:, :2]) * y[:, 2:], y], dim=1)  # slice, table, mul, concat: 6 channels
        y = y.permute(0, 1, 3, 2).mean(3, keepdim=True)  # (N, 6, 4, 1)
        y = self.ln(self.gap(y).reshape(y.shape[0], 6, 4))
        y = torch.softmax(y @ y.transpose(1, 2) * 0.5, dim=-1) @ y + self.position  # matmul, scale, softmax
        y = nn.functional.normalize(torch.roll(y, 1, 1), dim=-1)  # roll, l2_normalize
        return self.fc(torch.flatten(nn.functional.pad(y, (0, 0, 1, 0)), 1))  # pad: 7 tokens of 4


@pytest.fixture(scope="module")
def every_op() -> QuantizedModel:
    torch.manual_seed(0)
    return quantize(EveryOp().eval(), torch.randn(64, 2, 8, 8), {"w_bits": 6, "a_bits": 7})


def test_every_op_type_saves_and_loads_identically(every_op: QuantizedModel, tmp_path) -> None:
    assert {n.op for n in every_op.nodes} == set(OPS)
    path = tmp_path / "m.safetensors"
    every_op.save(path)
    back = load(path)
    assert back.nodes == every_op.nodes
    assert all(torch.equal(back.tensors[k], t) and back.tensors[k].dtype == t.dtype
               for k, t in every_op.tensors.items())


def test_plain_safetensors_reader_sees_tensors_and_graph(every_op: QuantizedModel, tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    every_op.save(path)
    with safe_open(str(path), framework="numpy") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])
        assert str(f.get_tensor("conv.weight").dtype) == "int8"
        assert str(f.get_tensor("conv.bias").dtype) == "int32"
        assert str(f.get_tensor("conv.weight_scale").dtype) == "float32"
    assert doc["format_version"] == FORMAT_VERSION
    conv = doc["nodes"][0]
    assert conv["name"] == "conv" and conv["op"] == "conv2d" and conv["inputs"] == ["input"]
    for key in ("kernel", "stride", "padding", "dilation", "groups", "w_bits", "a_bits", "bias_bits",
                "input_scale", "input_zero_point", "output_scale", "output_zero_point", "outputs"):
        assert key in conv
    assert doc["input"]["shape"] == [2, 8, 8]


def _rewrite(path, tmp_path, edit) -> str:
    """Copy a saved model with its JSON document edited by ``edit(doc)``."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        doc = json.loads(f.metadata()[METADATA_KEY])
    edit(doc, tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(doc)})
    return str(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d, t: d.update(format_version=99), "format_version 99"),
        (lambda d, t: d["nodes"][0].update(op="einsum"), "op 'einsum'"),
        (lambda d, t: d["nodes"][0].update(w_bits=17), "17 bits cannot be represented"),
        (lambda d, t: t.update({"conv.weight": t["conv.weight"] * 0 + 40}), r"outside \[-32, 31\]"),
        (lambda d, t: t.update({"conv.bias": t["conv.bias"].float()}), "integer"),
        (lambda d, t: t.pop("fc.weight_scale"), "fc.weight_scale' is missing"),
        (lambda d, t: d["nodes"][0].pop("kernel"), "kernel"),
        (lambda d, t: d["nodes"][1].update(inputs=["ghost"]), "not all produced"),
        (lambda d, t: d["nodes"][0].update(output_qmax=1000), "outside the 7-bit"),
        (lambda d, t: d["nodes"][1].update(input_scale=[123.0]), "differs from that of 'conv'"),
        (lambda d, t: d["nodes"][0].update(groups=3), "must divide"),
    ],
)
def test_bad_contents_are_refused_with_the_culprit(every_op, tmp_path, edit, message) -> None:
    path = tmp_path / "m.safetensors"
    every_op.save(path)
    with pytest.raises(PhotosimError, match=message):
        load(_rewrite(path, tmp_path, edit))


def test_truncated_corrupt_and_foreign_files(every_op: QuantizedModel, tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    every_op.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a model" * 10)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for bad, message in [(truncated, "truncated or corrupt"), (garbage, "truncated or corrupt"),
                         (foreign, "not a photosim integer model"), (tmp_path / "missing.safetensors", "no such")]:
        with pytest.raises(PhotosimError, match=message):
            load(bad)
