"""torch.roll, F.pad, F.normalize and torchvision's Swin Transformer (v1 and v2) on integers.

``roll`` and ``pad`` move codes, ``l2_normalize`` is exact integer sums and one float64 formula
(docs/integer-semantics.md): the engine equals tests/reference_executor.py (written from the docs). Swin's
shifted-window attention is decomposed with the batch kept first (windows as a dimension of their own): the float
graph equals torchvision's model, and the engine agrees with fake-quant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ModelBuilder, qp, w8a8_outputs
from test_reference_new_ops import compare, inputs
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import photosim
from photosim.errors import PhotosimError
from photosim.frontend.capture import capture
from photosim.frontend.windows import shift_mask


@pytest.mark.parametrize("mode", ["float", "fixedpoint", "pytorch"])
@pytest.mark.parametrize(("dim", "shift"), [(1, 1), (2, 3), (3, 0), (3, 9)])  # 9 > the size 4: modulo
def test_roll_moves_codes_as_the_reference(mode, dim, shift, tmp_path):
    m = ModelBuilder((3, 5, 4), qp(0.1, 7, 8))
    m.add("r", "roll", ["x"], dim=dim, shift=shift)
    m.add("flat", "flatten", ["r"], start_dim=1)
    qm = m.build()
    x = inputs(qm)
    out = compare(qm, x, mode, tmp_path / "m.safetensors")
    assert np.array_equal(out["r"], np.roll(out["x"], shift, axis=dim))


def test_torch_roll_is_one_roll_node_per_dimension() -> None:
    class Shifted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(x, shifts=(-1, 2), dims=(1, 2)) + x.roll(1, -1)

    x = torch.randn(4, 3, 5, 6)
    graph = capture(Shifted(), x[:1])
    assert [(n.op, n.attrs) for n in graph.nodes[:3]] == [
        ("roll", {"dim": 1, "shift": 2}), ("roll", {"dim": 2, "shift": 2}), ("roll", {"dim": 3, "shift": 1})]
    assert torch.equal(graph.run(x), Shifted()(x))
    with pytest.raises(PhotosimError, match="roll: torch.roll needs fixed integer shifts"):
        capture(type("Flat", (nn.Module,), {"forward": lambda self, x: x.roll(1)})(), x[:1])


def test_shift_mask_separates_the_regions_of_the_shifted_map() -> None:
    mask = shift_mask(4, 4, [2, 2], [1, 1])  # 4 windows of 4 tokens
    assert mask.shape == (4, 4, 4) and torch.equal(mask[0], torch.zeros(4, 4))  # the top-left window: one region
    # the bottom-right window holds 4 regions, one token each: every pair of distinct tokens is masked
    assert torch.equal(mask[3], -100.0 * (1 - torch.eye(4)))


def small_swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10).eval()  # 8x8 then 4x4 at 32x32


def test_swin_captures_exactly_with_the_batch_first() -> None:
    model, x = small_swin(), torch.randn(4, 3, 32, 32)
    graph = capture(model, x[:1])
    ops = [n.op for n in graph.nodes]
    assert ops.count("roll") == 4  # the one shifted block (window 4 on 8x8, shift 2): 2 dims, there and back
    assert ops.count("softmax") == 4 and ops.count("matmul") == 8
    bias = next(n for n in graph.nodes if n.name.endswith(".position_bias"))
    assert bias.attrs == {"shape": [4, 2, 16, 16]}  # (windows, heads, tokens, tokens) per sample
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-5)


def test_swin_runs_on_integers_and_on_the_hardware() -> None:
    model, calibration, x = small_swin(), torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    qm, ideal, reference = w8a8_outputs(model, calibration, x)
    # one-LSB roundings (float mode against float64) grow through the blocks: a small fraction of the range
    assert (ideal - reference).abs().max() <= 0.1 * reference.abs().max()
    assert (ideal.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    chip = photosim.simulate(qm, x[:4], {"tile": 16, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.01}}})
    assert chip.shape == (4, 10) and torch.isfinite(chip).all()


def small_swin_v2() -> nn.Module:
    """At 20x20: a 5x5 map padded to 8x8 for windows of 4 (shifted), merged after padding to 6x6, then 3x3 padded
    to 4x4 (one window, no shift)."""
    torch.manual_seed(0)
    return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10, block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2).eval()


def test_swin_v2_captures_exactly_with_padding_and_cosine_attention() -> None:
    model, x = small_swin_v2(), torch.randn(4, 3, 20, 20)
    graph = capture(model, x[:1])
    ops = [n.op for n in graph.nodes]
    assert ops.count("l2_normalize") == 8 and ops.count("pad") == 4 + 2 + 4  # q, k; attention 2 + 2, merging 2
    assert not any(n.op == "linear" and n.attrs["in_features"] == 2 for n in graph.nodes)  # the bias MLP is folded
    with torch.no_grad():
        assert torch.allclose(graph.run(x), model(x), atol=1e-5)


def test_swin_v2_runs_on_integers() -> None:
    model, calibration, x = small_swin_v2(), torch.randn(16, 3, 20, 20), torch.randn(16, 3, 20, 20)
    qm, ideal, reference = w8a8_outputs(model, calibration, x)
    assert (ideal - reference).abs().max() <= 0.1 * reference.abs().max()
    assert (ideal.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("mode", ["float", "fixedpoint"])
@pytest.mark.parametrize(("in_q", "eps"), [(qp(0.1, 7, 8), 1e-12), (qp(0.02, 0, 6, signed=True), 0.5),
                                           (qp(0.01, 300, 12, qmin=300), 1e-12)])  # a ReLU clamp above z
def test_pad_and_l2_normalize_as_the_reference(mode, in_q, eps, tmp_path):
    m = ModelBuilder((3, 5, 4), in_q)
    m.add("p", "pad", ["x"], dim=2, before=1, after=2)
    m.add("n", "l2_normalize", ["p"], qp(1 / 127, 0, 8, signed=True), eps=eps)
    qm = m.build()
    x = inputs(qm)
    out = compare(qm, x, mode, tmp_path / "m.safetensors")
    fill = min(max(in_q.zero_point, in_q.qmin), in_q.qmax)
    assert (out["p"][:, :, [0, 6, 7]] == fill).all() and np.array_equal(out["p"][:, :, 1:6], out["x"])
    d = (out["p"] - in_q.zero_point) * in_q.scale  # the dequantized input: F.normalize's float64 answer, requantized
    expected = torch.nn.functional.normalize(torch.from_numpy(d.astype(np.float64)), dim=-1, eps=eps)
    assert (torch.from_numpy(out["n"]) - torch.round(expected * 127)).abs().max() <= 1


def test_functional_pad_is_one_pad_node_per_dimension() -> None:
    class Padded(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (1, 2, 0, 0, 3, 0))

    x = torch.randn(2, 3, 4, 5)
    graph = capture(Padded(), x[:1])
    assert [(n.op, n.attrs) for n in graph.nodes] == [("pad", {"dim": 3, "before": 1, "after": 2}),
                                                      ("pad", {"dim": 1, "before": 3, "after": 0})]
    assert torch.equal(graph.run(x), Padded()(x))
    class Reflected(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (1, 1, 1, 1), "reflect")

    with pytest.raises(PhotosimError, match=r"pad \(call_function pad\)"):
        capture(Reflected(), x[:1])


def test_functional_normalize_over_the_last_dimension_is_one_node() -> None:
    class Cosines(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x, dim=-1, eps=1e-6)

    x = torch.randn(3, 4, 5)
    graph = capture(Cosines(), x[:1])
    assert [(n.op, n.attrs) for n in graph.nodes] == [("l2_normalize", {"eps": 1e-6})]
    assert torch.equal(graph.run(x), Cosines()(x))
    with pytest.raises(PhotosimError, match=r"normalize \(call_function normalize\)"):
        capture(type("Channels", (nn.Module,), {"forward": lambda self, x: torch.nn.functional.normalize(x)})(), x[:1])
