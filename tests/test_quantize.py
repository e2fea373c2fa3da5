"""PTQ of the built-ins: integer ranges, bias scale, BN folding, overrides, observers, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from photosim.errors import PhotosimError
from photosim.frontend.capture import capture
from photosim.frontend.data import load_dataset
from photosim.frontend.models import list_models, load_model
from photosim.frontend.ptq import quantize
from photosim.frontend.qconfig import QuantSpec
from photosim.ir.fakequant import fake_quant_forward
from photosim.ir.format import WEIGHTED_OPS, QParams, load, weights_scale
from photosim.ir.observers import ActivationObserver, affine_params

BUILTINS = [m.name for m in list_models()]


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    test = load_dataset("digits", "test")
    calibration = load_dataset("digits", "calibration")
    return {
        "calibration": torch.stack([x for x, _ in calibration]),
        "test": torch.stack([x for x, _ in test]),
    }


@pytest.fixture(scope="module")
def quantized(digits: dict[str, torch.Tensor]) -> dict[tuple[str, int], object]:
    return {
        (name, bits): quantize(load_model(name).module, digits["calibration"], {"w_bits": bits, "a_bits": bits})
        for name in BUILTINS
        for bits in (8, 4, 2)
    }


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_integer_tensors_inside_their_bit_range(quantized: dict, name: str, bits: int) -> None:
    qm = quantized[(name, bits)]
    qmax = (1 << (bits - 1)) - 1
    for node in qm.nodes:
        a_bits = max(bits, 8) if node.name == qm.output else bits  # output_bits: 8
        assert node.output_q.bits == a_bits
        lo, hi = QParams.storage_range(a_bits, node.output_q.signed)
        assert lo <= node.output_q.qmin <= node.output_q.qmax <= hi
        if node.op in WEIGHTED_OPS:
            w = qm.tensors[f"{node.name}.weight"]
            assert node.w_bits == bits
            assert not w.dtype.is_floating_point and w.element_size() == (1 if bits <= 8 else 2)
            assert int(w.min()) >= -qmax and int(w.max()) <= qmax  # symmetric narrow range
            assert int(w.abs().max()) == qmax  # minmax: the largest weight lands on the largest code
            assert qm.tensors[f"{node.name}.bias"].dtype == torch.int32


@pytest.mark.parametrize("name", BUILTINS)
def test_save_load_round_trip_is_identical(quantized: dict, name: str, tmp_path) -> None:
    qm = quantized[(name, 4)]
    path = tmp_path / "m.safetensors"
    qm.save(path)
    back = load(path)
    assert back.nodes == qm.nodes
    assert back.input_q == qm.input_q and back.input_shape == qm.input_shape and back.output == qm.output
    assert back.provenance == qm.provenance
    assert back.tensors.keys() == qm.tensors.keys()
    for key, tensor in qm.tensors.items():
        assert back.tensors[key].dtype == tensor.dtype
        assert torch.equal(back.tensors[key], tensor)


@pytest.mark.parametrize("name", BUILTINS)
def test_bias_is_integer_at_input_times_weight_scale(quantized: dict, digits: dict, name: str) -> None:
    qm = quantized[(name, 8)]
    graph = capture(load_model(name).module, digits["test"][:1])
    for fnode in graph.nodes:
        if fnode.op not in WEIGHTED_OPS:
            continue
        node = qm.node(fnode.name)
        bias_scale = node.input_q[0].scale * weights_scale(qm, node)  # (O,) float64
        expected = torch.round(fnode.bias.double() / bias_scale)  # round half to even, independent of quantize()
        assert torch.equal(qm.tensors[f"{node.name}.bias"].long(), expected.long())
        assert torch.all((qm.tensors[f"{node.name}.bias"].double() * bias_scale - fnode.bias.double()).abs()
                         <= bias_scale / 2 + 1e-12)


@pytest.mark.parametrize("name", BUILTINS)
def test_batchnorm_folding_keeps_float_outputs(digits: dict, name: str) -> None:
    model = load_model(name).module
    x = digits["test"]
    graph = capture(model, x[:1])
    assert all(n.op != "batchnorm" for n in graph.nodes)
    with torch.no_grad():  # float32 rounding of the folded weights, relative to logits of up to ~10
        torch.testing.assert_close(graph.run(x), model(x), rtol=1e-5, atol=1e-5)


def test_bn_relu_are_folded_and_fused_into_conv() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3), nn.ReLU6())
    graph = capture(model.eval(), torch.zeros(1, 1, 8, 8))
    assert [(n.op, n.act) for n in graph.nodes] == [
        ("conv2d", (0.0, float("inf"))), ("flatten", None), ("linear", (0.0, 6.0))
    ]


def test_relu_is_not_fused_into_a_shared_producer() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.relu(y) + y  # relu must not clamp the conv output that the add also reads

    graph = capture(Branch().eval(), torch.zeros(1, 1, 4, 4))
    assert [n.op for n in graph.nodes] == ["conv2d", "clamp", "add"]
    assert graph.nodes[0].act is None


def test_activations_unsigned_after_relu_affine_otherwise(quantized: dict) -> None:
    qm = quantized[("digits-resnet", 8)]
    conv1, shortcut, fc = qm.node("conv1"), qm.node("layer2.0.downsample.0"), qm.node("fc")
    assert not conv1.output_q.signed and conv1.output_q.qmin == conv1.output_q.zero_point == 0
    for q in (shortcut.output_q, fc.output_q):  # affine: unsigned codes, zero point inside the range
        assert not q.signed and 0 < q.zero_point < 255 and (q.qmin, q.qmax) == (0, 255)
    assert not qm.input_q.signed  # digits pixels are >= 0


def test_symmetric_activation_range_is_signed_around_zero(digits: dict) -> None:
    qm = quantize(load_model("digits-resnet").module, digits["calibration"], {"activation_range": "symmetric"})
    conv1, shortcut, fc = qm.node("conv1"), qm.node("layer2.0.downsample.0"), qm.node("fc")
    assert not conv1.output_q.signed and conv1.output_q.qmin == conv1.output_q.zero_point == 0
    assert shortcut.output_q.signed and shortcut.output_q.zero_point == 0
    assert fc.output_q.signed and (fc.output_q.qmin, fc.output_q.qmax) == (-128, 127)


def test_per_layer_overrides_by_glob(digits: dict) -> None:
    spec = {"w_bits": 4, "a_bits": 4,
            "layers": [{"match": "conv1", "w_bits": 8, "a_bits": 8}, {"match": "fc*", "w_bits": 6}]}
    qm = quantize(load_model("digits-cnn").module, digits["calibration"], spec)
    bits = {n.name: (n.w_bits, n.output_q.bits) for n in qm.nodes if n.op in WEIGHTED_OPS}
    assert bits == {"conv1": (8, 8), "conv2": (4, 4), "fc1": (6, 4), "fc2": (6, 8)}  # fc2: output_bits 8
    assert qm.node("pool1").output_q.bits == 8  # pooling passes conv1's 8-bit codes through
    assert qm.node("conv2").input_q[0].bits == 8


def test_per_tensor_weights_have_one_scale(digits: dict) -> None:
    qm = quantize(load_model("digits-cnn").module, digits["calibration"], {"weight_granularity": "per_tensor"})
    assert qm.tensors["conv1.weight_scale"].shape == ()
    assert qm.tensors["fc1.weight_scale"].dtype == torch.float32


def test_bias_saturation_is_counted_and_warned(digits: dict) -> None:
    with pytest.warns(UserWarning, match="saturated"):
        qm = quantize(load_model("digits-cnn").module, digits["calibration"], {"bias_bits": 8})
    assert qm.provenance["bias_saturated"]
    for node in qm.nodes:
        if node.op in WEIGHTED_OPS:
            b = qm.tensors[f"{node.name}.bias"]
            assert int(b.min()) >= -128 and int(b.max()) <= 127


def test_observers_choose_documented_ranges() -> None:
    x = torch.cat([torch.linspace(0, 1, 10_000), torch.tensor([100.0])])
    obs = ActivationObserver()
    obs.update(x)
    assert obs.clip_range("minmax", 99.99, 8, signed=False) == (0.0, 100.0)
    lo, hi = obs.clip_range("percentile", 99.0, 8, signed=False)
    assert lo == 0.0 and hi == pytest.approx(float(torch.quantile(x, 0.99)))
    assert obs.clip_range("mse", 99.99, 8, signed=False)[1] > 90  # at 8 bits the outlier is worth keeping
    many = ActivationObserver()
    many.update(torch.cat([torch.rand(60_000), torch.tensor([100.0])]))
    assert many.clip_range("mse", 99.99, 4, signed=False)[1] < 50  # at 4 bits clipping it costs less
    scale, zp = affine_params(torch.tensor([-1.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64),
                              8, signed=False)
    assert float(scale) == pytest.approx(4 / 255) and int(zp) == round(1 / (4 / 255))


def test_mse_observer_beats_minmax_on_outliers(digits: dict) -> None:
    """On 4-bit signed-symmetric logits (the setting before issue 14, which the defaults now avoid) clipping
    their outliers pays; with 8-bit affine logits min/max is already the better range for them."""
    model = load_model("digits-resnet").module
    x = digits["test"]
    ref = model(x).detach()
    errors = {}
    for observer in ("minmax", "mse"):
        qm = quantize(model, digits["calibration"], {"w_bits": 4, "a_bits": 4, "observer": observer,
                                                     "w_observer": "mse" if observer == "mse" else "minmax",
                                                     "activation_range": "symmetric", "output_bits": None})
        errors[observer] = float((fake_quant_forward(qm, x) - ref).pow(2).mean())
    assert errors["mse"] < errors["minmax"]


def test_unsupported_ops_are_all_listed() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.act = nn.Softplus()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(self.act(self.conv(x))) * 2

    with pytest.raises(PhotosimError) as err:
        quantize(Odd().eval(), torch.rand(4, 1, 8, 8))
    message = str(err.value)
    for culprit in ("act (call_module Softplus)", "sqrt", "mul", "Supported:"):
        assert culprit in message
    assert "test_quantize.py" in message  # the source line of each node


def test_untraceable_model_names_module_and_reason() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(PhotosimError, match="cannot trace Branchy"):
        quantize(Branchy(), torch.rand(2, 1, 4, 4))


@pytest.mark.parametrize(
    ("config", "culprit"),
    [({"w_bits": 17}, "w_bits"), ({"wbits": 4}, "unknown key 'wbits'"), ({"observer": "max"}, "observer"),
     ({"layers": [{"match": "nope", "w_bits": 4}]}, "match no layer")],
)
def test_bad_config_names_the_key(digits: dict, config: dict, culprit: str) -> None:
    with pytest.raises(PhotosimError, match=culprit):
        quantize(load_model("digits-cnn").module, digits["calibration"], config)


def test_yaml_config(tmp_path, digits: dict) -> None:
    path = tmp_path / "q.yaml"
    path.write_text("w_bits: 5\na_bits: 6\nlayers:\n  - {match: fc2, w_bits: 8}\n")
    spec = QuantSpec.model_validate({"w_bits": 5, "a_bits": 6, "layers": [{"match": "fc2", "w_bits": 8}]})
    qm = quantize(load_model("digits-cnn").module, digits["calibration"], path)
    assert qm.provenance["quant_spec"] == spec.model_dump()
    assert qm.node("fc2").w_bits == 8 and qm.node("fc1").w_bits == 5 and qm.node("fc1").output_q.bits == 6
