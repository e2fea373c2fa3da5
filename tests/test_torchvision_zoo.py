"""torchvision's classifiers: the small model of every CNN family quantizes at W8A8 and runs on the engine,
ideal (agreeing with the fake-quant reference) and with a hardware config.

Random weights and synthetic 64x64 inputs (every family but Inception takes them): the point is coverage of
the ops and their integer semantics, not accuracy.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import w8a8_outputs

import photosim

SMALL = ["mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5", "efficientnet_b0",
         "regnet_y_400mf", "googlenet"]  # one per family whose ops this file is about
HARDWARE = {"tile": 64, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.001}}}


def build(name: str) -> torch.nn.Module:
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **extra).eval()


@pytest.mark.parametrize("name", SMALL)
def test_small_cnns_run_on_integers(name: str) -> None:
    torch.manual_seed(0)
    calibration, x = torch.randn(8, 3, 64, 64), torch.randn(16, 3, 64, 64)
    qm, ideal, reference = w8a8_outputs(build(name), calibration, x, batch_size=8)
    # one-LSB roundings (float mode against float64) grow through a deep net: a small fraction of the range
    assert (ideal - reference).abs().max() <= 0.1 * reference.abs().max()
    assert (ideal.argmax(1) == reference.argmax(1)).float().mean() >= 0.9  # random logits have near-ties
    chip = photosim.simulate(qm, x[:4], HARDWARE, batch_size=4)
    assert chip.shape == (4, 1000) and torch.isfinite(chip).all()


def test_vision_transformers_run_on_integers() -> None:
    """torchvision's ViT (class token, position embedding, MultiheadAttention, GELU MLP, LayerNorm), at 64x64."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("vit_b_32", weights=None, image_size=64).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)  # torchvision starts the head at zero
    calibration, x = torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)
    qm, ideal, reference = w8a8_outputs(model, calibration, x)
    assert (ideal.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    assert (ideal - reference).abs().max() <= 0.1 * reference.abs().max()

