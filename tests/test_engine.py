"""The executor on hand-built models: hand-computed integers, chunking, configs, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ModelBuilder, make_conv_net, qp

from photosim.engine.executor import Engine, node_outputs, simulate, simulate_codes
from photosim.errors import PhotosimError
from photosim.experiments.accuracy import evaluate
from photosim.hardware.config import HardwareConfig
from photosim.ir.format import QuantizedModel


def hand_model() -> QuantizedModel:
    """conv(1->2, 2x2, per-channel scales) -> relu clamp -> maxpool(2, ceil) -> flatten -> linear(8->2)."""
    m = ModelBuilder((1, 4, 4), qp(0.5, 2))
    m.conv("conv", "x", qp(1.0, 0, signed=True),
           torch.tensor([[[[1, 0], [0, -1]]], [[[2, 1], [-1, 3]]]], dtype=torch.int8), torch.tensor([1, -4]),
           torch.tensor([0.5, 0.25]))
    m.add("relu", "clamp", ["conv"], qp(1.0, 0, signed=True, qmin=0))
    m.add("pool", "maxpool2d", ["relu"], kernel=[2, 2], stride=[2, 2], padding=[0, 0], dilation=[1, 1],
          ceil_mode=True)
    m.add("flat", "flatten", ["pool"], start_dim=1)
    m.linear("fc", "flat", qp(1.0, 3, signed=True),
             torch.tensor([[1] * 8, [1, -1, 2, 0, 0, 1, -1, 3]], dtype=torch.int8), torch.tensor([0, 5]), 0.5)
    return m.build()


HAND_CODES = torch.tensor([[2, 4, 0, 7], [9, 1, 3, 2], [5, 8, 6, 0], [2, 2, 10, 4]])
HAND_X = ((HAND_CODES - 2) * 0.5).float().view(1, 1, 4, 4)

# Worked by hand (see the comments): the conv multipliers are 0.25 and 0.125, so ties abound. float rounds
# them to even; fixedpoint rounds SRDHM ties up and RoundingDivideByPOT ties away from zero.
HAND_EXPECTED = {
    "float": {
        # acc0 = [[2, 2, -1], [2, -4, 4], [4, -1, 3]] * 0.25; acc1 = [[-12, 2, -4], [24, 1, -12], [8, 36, 0]] * 0.125
        "conv": [[[0, 0, 0], [0, -1, 1], [1, 0, 1]], [[-2, 0, 0], [3, 0, -2], [1, 4, 0]]],
        "pool": [[[0, 1], [1, 1]], [[3, 0], [4, 0]]],
        "fc": [8, 4],  # (10 + 0) * 0.5 + 3, (-3 + 5) * 0.5 + 3
    },
    "fixedpoint": {
        "conv": [[[1, 1, 0], [1, -1, 1], [1, 0, 1]], [[-2, 0, -1], [3, 0, -2], [1, 5, 0]]],
        "pool": [[[1, 1], [1, 1]], [[3, 0], [5, 0]]],
        "fc": [9, 4],  # (12 + 0) * 0.5 + 3, (-3 + 5) * 0.5 + 3
    },
}


@pytest.mark.parametrize("requant", ["float", "fixedpoint"])
def test_hand_computed_model(requant: str) -> None:
    outs = node_outputs(hand_model(), HAND_X, {"requant": requant})
    expected = HAND_EXPECTED[requant]
    assert torch.equal(outs["x"], HAND_CODES.view(1, 1, 4, 4).int())
    assert outs["conv"][0].tolist() == expected["conv"]
    assert torch.equal(outs["relu"], outs["conv"].clamp(min=0))
    assert outs["pool"][0].tolist() == expected["pool"]
    assert outs["flat"][0].tolist() == sum((sum(c, []) for c in expected["pool"]), [])
    assert outs["fc"][0].tolist() == expected["fc"]
    assert all(t.dtype == torch.int32 for t in outs.values())
    assert simulate_codes(hand_model(), HAND_X, {"requant": requant})[0].tolist() == expected["fc"]
    assert simulate(hand_model(), HAND_X, {"requant": requant})[0].tolist() == [v - 3.0 for v in expected["fc"]]


@pytest.mark.parametrize(("requant", "expected"), [("float", [3, 5, 7, 11]), ("fixedpoint", [4, 5, 8, 12])])
def test_hand_computed_residual_add(requant: str, expected: list[int]) -> None:
    # conv: 3 * code * 0.5 -> [1.5, 3, 4.5, 7.5]; add: conv + code * 0.5 + 1 -> ties at every .5
    m = ModelBuilder((1, 2, 2), qp(0.5, 0))
    m.conv("c", "x", qp(1.0, 0, signed=True), torch.tensor([[[[3]]]], dtype=torch.int8), torch.tensor([0]), 1.0)
    m.add("sum", "add", ["c", "x"], qp(1.0, 1, signed=True))
    x = torch.tensor([0.5, 1.0, 1.5, 2.5]).view(1, 1, 2, 2)
    assert simulate_codes(m.build(), x, {"requant": requant}).flatten().tolist() == expected


def test_pool_nodes_follow_torch_pooling() -> None:
    q = qp(0.1, 20, 8)
    m = ModelBuilder((2, 9, 7), q)
    m.add("avg", "avgpool2d", ["x"], kernel=[3, 2], stride=[2, 2], padding=[1, 1], ceil_mode=True,
          count_include_pad=False, divisor_override=None)
    m.add("max", "maxpool2d", ["avg"], kernel=[2, 2], stride=[1, 1], padding=[1, 0], dilation=[2, 1],
          ceil_mode=False)
    m.add("gap", "adaptive_avgpool2d", ["max"], output_size=[2, 3])
    x = torch.rand(3, 2, 9, 7) * 20
    outs = node_outputs(m.build(), x)
    centred = outs["x"].double() - 20
    avg = F.avg_pool2d(centred, [3, 2], [2, 2], [1, 1], True, False)
    assert torch.equal(outs["avg"].double(), torch.round(avg) + 20)
    assert torch.equal(outs["max"].double(), F.max_pool2d(outs["avg"].double(), 2, 1, [1, 0], [2, 1]))
    gap = F.adaptive_avg_pool2d(outs["max"].double() - 20, [2, 3])
    assert torch.equal(outs["gap"].double(), torch.round(gap) + 20)


@pytest.mark.parametrize(("requant", "bits"), [("float", 8), ("fixedpoint", 8), ("float", 4), ("float", 16)])
def test_results_do_not_depend_on_batch_size(requant: str, bits: int) -> None:
    model = make_conv_net(seed=bits, w_bits=bits, a_bits=bits)
    x = torch.rand(64, 3, 12, 12)
    runs = [simulate_codes(model, x, {"requant": requant}, batch_size=b) for b in (64, 7, 1)]
    assert runs[0].shape == (64, 10)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert torch.equal(simulate(model, x, {"requant": requant}),
                       model.qparams("fc").dequantize(runs[0]))


def test_hardware_config_from_object_dict_or_yaml(tmp_path) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump({"requant": "fixedpoint"}))
    outs = [simulate_codes(hand_model(), HAND_X, hw) for hw in (HardwareConfig(requant="fixedpoint"),
                                                                 {"requant": "fixedpoint"}, path, str(path))]
    assert all(o[0].tolist() == HAND_EXPECTED["fixedpoint"]["fc"] for o in outs)
    assert simulate_codes(hand_model(), HAND_X)[0].tolist() == HAND_EXPECTED["float"]["fc"]


@pytest.mark.parametrize(("hw", "message"), [
    ({"requant": "nope"}, "requant: Input should be 'float', 'fixedpoint', 'pytorch' or 'onnxruntime'"),
    ({"requantize": "float"}, "unknown key 'requantize'")])
def test_bad_hardware_config_is_rejected(hw: dict, message: str) -> None:
    with pytest.raises(PhotosimError, match=message):
        simulate(hand_model(), HAND_X, hw)


def test_seventeen_bit_weights_are_rejected() -> None:
    m = ModelBuilder((4,), qp())
    m.linear("fc", "x", qp(), torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2), 1.0, w_bits=17)
    with pytest.raises(PhotosimError, match=r"'fc'.*17 bits"):
        Engine(m.build())


def test_fixedpoint_overflow_names_the_layer() -> None:
    m = ModelBuilder((512,), qp(1.0, 0, 16))
    m.linear("big", "x", qp(), torch.full((1, 512), -32768, dtype=torch.int16), torch.zeros(1), 1e-6, w_bits=16)
    x = torch.full((1, 512), 65535.0)
    assert simulate_codes(m.build(), x).tolist() == [[0]]  # float mode handles 41-bit accumulators
    with pytest.raises(PhotosimError, match=r"'big'.*outside int32.*--requant float"):
        simulate(m.build(), x, {"requant": "fixedpoint"})


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(PhotosimError, match=r"\(1, 4, 4\).*expects batches of shape"):
        simulate(hand_model(), HAND_X[0])
    with pytest.raises(PhotosimError, match="batch_size"):
        simulate(hand_model(), HAND_X, batch_size=0)


def test_evaluate_scores_the_engine_predictions() -> None:
    model = make_conv_net()
    x = torch.rand(40, 3, 12, 12)
    labels = simulate(model, x).argmax(dim=1)
    result = evaluate(model, (x, labels), batch_size=16)
    assert (result.top1, result.top5, result.n) == (1.0, 1.0, 40)
    assert evaluate(model, (x, (labels + 1) % 10)).top1 < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("requant", ["float", "fixedpoint"])
def test_cuda_matches_cpu(requant: str) -> None:
    model = make_conv_net()
    x = torch.rand(50, 3, 12, 12)
    cpu = simulate_codes(model, x, {"requant": requant})
    assert torch.equal(simulate_codes(model, x, {"requant": requant}, device="cuda", batch_size=17), cpu)


def test_empty_batch_gives_empty_output() -> None:
    assert simulate(make_conv_net(), torch.zeros(0, 3, 12, 12)).shape == (0, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(PhotosimError, match="no CUDA GPU"):
        Engine(hand_model(), device="cuda")


def test_per_layer_requant_override() -> None:
    hw = {"requant": "fixedpoint", "layers": [{"match": "conv", "requant": "float"}]}
    outs = node_outputs(hand_model(), HAND_X, hw)
    assert outs["conv"][0].tolist() == HAND_EXPECTED["float"]["conv"]
