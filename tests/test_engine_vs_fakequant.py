"""The integer engine (float requant) against the fake-quantized float64 reference, node by node."""

from __future__ import annotations

import pytest
import torch

from photosim.engine.executor import Engine
from photosim.frontend.data import load_dataset
from photosim.frontend.models import list_models, load_model
from photosim.frontend.ptq import quantize
from photosim.ir.fakequant import run_node


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    calibration = torch.stack([x for x, _ in load_dataset("digits", "calibration")])
    test = torch.stack([x for x, _ in load_dataset("digits", "test")])
    return calibration, test


@pytest.mark.parametrize("name", [m.name for m in list_models()])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12])
def test_float_mode_within_one_lsb_of_fake_quant(digits, name: str, bits: int) -> None:
    calibration, test = digits
    qm = quantize(load_model(name).module, calibration, {"w_bits": bits, "a_bits": bits})
    codes = Engine(qm, {"requant": "float"}).node_outputs(test)
    equal = total = 0
    for node in qm.nodes:
        # Feed the engine's own inputs to the reference so a difference cannot propagate.
        inputs = [qm.qparams(i).dequantize(codes[i]).double() for i in node.inputs]
        reference = torch.round(run_node(qm, node, *inputs) / node.output_q.scale) + node.output_q.zero_point
        diff = (reference - codes[node.name].double()).abs()
        assert diff.max() <= 1, node.name
        equal += int((diff == 0).sum())
        total += diff.numel()
    assert equal / total >= 0.999
