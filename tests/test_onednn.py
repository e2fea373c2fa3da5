"""oneDNN int8 convolutions (exact limb decomposition) against the int64 reference."""

from __future__ import annotations

import pytest
import torch
from test_kernels import conv_inputs, random_case, reference_conv_acc

from photosim.engine import onednn
from photosim.ir.format import QParams

needs_onednn = pytest.mark.skipif(not onednn.limb_bits(), reason="oneDNN int8 convolutions are unavailable")


# -- oneDNN convolutions against the int64 reference ------------------------------------------------


def _onednn_acc(x: torch.Tensor, w: torch.Tensor, case: dict) -> torch.Tensor | None:
    p = (case["stride"],) * 2, (case["padding"],) * 2, (case["dilation"],) * 2
    conv = onednn.prepare_conv(w, (case["qmin"] - case["z"], case["qmax"] - case["z"]), *p, case["groups"])
    return None if conv is None else onednn.conv_acc(x, case["z"], conv)


@needs_onednn
@pytest.mark.parametrize("limb", [7, 8])
def test_onednn_convs_match_the_int64_reference(monkeypatch: pytest.MonkeyPatch, limb: int) -> None:
    """Random convs (2-16 bits, zero points, groups, stride, dilation, padding), 7-bit limbs forced too."""
    if limb == 8 and onednn.limb_bits() != 8:
        pytest.skip("this CPU adds u8*s8 pairs in saturating int16: 8-bit limbs are not exact here")
    monkeypatch.setattr(onednn, "limb_bits", lambda: limb)
    used = 0
    for seed in range(80):
        case = random_case(seed)
        x, w = conv_inputs(case, seed)
        acc = _onednn_acc(x, w, case)
        if acc is not None:
            used += 1
            expected = reference_conv_acc(x, case["z"], w, case["stride"], case["padding"], case["dilation"],
                                          case["groups"])
            assert torch.equal(acc.to(torch.int64), expected), case
    assert used > 40


@needs_onednn
@pytest.mark.parametrize(("a_bits", "w_bits", "signed"), [(8, 8, False), (8, 8, True), (12, 8, False),
                                                          (8, 12, False), (4, 4, False)])
@pytest.mark.parametrize("w_code", ["min", "max"])
def test_onednn_worst_case_operands(a_bits: int, w_bits: int, signed: bool, w_code: str) -> None:
    """Every input at the far end of its range times every weight at an extreme: int16 pairs would saturate."""
    lo, hi = QParams.storage_range(a_bits, signed)
    wlo, whi = QParams.storage_range(w_bits, True)
    case = dict(z=0, qmin=lo, qmax=hi, stride=1, padding=1, dilation=1, groups=1)
    x = torch.full((2, 16, 5, 5), lo if signed else hi, dtype=torch.int32)
    w = torch.full((3, 16, 3, 3), wlo if w_code == "min" else whi, dtype=torch.int16)
    acc = _onednn_acc(x, w, case)
    assert acc is not None
    assert torch.equal(acc.to(torch.int64), reference_conv_acc(x, 0, w, 1, 1, 1, 1))


@needs_onednn
def test_onednn_results_at_2_to_24_fall_back_to_the_exact_path() -> None:
    """12-bit inputs at 4095 times -128 over K = 1152: a 7-bit limb's float32 results pass 2^24."""
    case = dict(z=0, qmin=0, qmax=4095, stride=1, padding=0, dilation=1, groups=1)
    x = torch.full((1, 128, 3, 3), 4095, dtype=torch.int32)
    w = torch.full((2, 128, 3, 3), -128, dtype=torch.int8)
    assert _onednn_acc(x, w, case) is None
    m_x = torch.full((1, 128, 3, 3), 1, dtype=torch.int32)  # small values: the same layer stays on oneDNN
    assert torch.equal(_onednn_acc(m_x, w, case).to(torch.int64), reference_conv_acc(m_x, 0, w, 1, 0, 1, 1))


@needs_onednn
def test_strided_pointwise_convs_avoid_the_racy_kernel() -> None:
    """oneDNN's strided 1x1 int8 kernel sums wrongly with 2 threads for 8 or 24 input channels (about one run
    in three of this case); photosim subsamples the input and runs a stride-1 conv instead."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    case = dict(z=0, qmin=0, qmax=255, stride=2, padding=0, dilation=1, groups=1)
    w = torch.randint(-128, 128, (16, 8, 1, 1), generator=g, dtype=torch.int8)
    for _ in range(20):
        x = torch.randint(0, 256, (16, 8, 12, 12), generator=g, dtype=torch.int32)
        assert torch.equal(_onednn_acc(x, w, case).to(torch.int64), reference_conv_acc(x, 0, w, 2, 0, 1, 1))


def test_weight_limbs_rebuild_the_weights() -> None:
    w = torch.tensor([-32768, -32767, -129, -128, -1, 0, 1, 127, 128, 255, 32639, 32640, 32767])
    limbs = onednn.weight_limbs(w)
    assert all(limb.dtype == torch.int8 for limb, _ in limbs)
    assert torch.equal(sum(limb.to(torch.int64) << shift for limb, shift in limbs), w)
