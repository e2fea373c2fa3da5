"""FBGEMM's int16 saturation of uint8 x int8 pair sums (photosim/engine/fbgemm.py) against PyTorch's quantized ops.

Activation codes in [128, 255] and large same-sign weights make most pairs saturate; each torch test asserts
that the exact accumulators give other codes (so the saturating ones are what matches) and that a wrong pairing
or padding would not pass. Depthwise convs run FBGEMM's AVX2 depthwise kernel on every x86 CPU. The no-VNNI GEMM
is reached on VNNI CPUs by forcing FBGEMM's instruction set (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``: the JIT GEMM
kernels and B packing an AVX2 CPU runs) in a subprocess, since FBGEMM reads the variable once per process.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F

from photosim.engine.fbgemm import can_saturate, depthwise_acc_saturating, gemm_acc_saturating, im2col_codes
from photosim.engine.requant import REQUANT_MODES, RequantParams
from photosim.ir.format import QParams

MODE = REQUANT_MODES["pytorch"]
ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_fbgemm = pytest.mark.skipif(not X86 or "fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="FBGEMM's x86 kernels")
S_IN, Z_OUT = 0.02, 128


@pytest.fixture(autouse=True)
def fbgemm_engine() -> Iterator[None]:
    engine = torch.backends.quantized.engine
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # quantized tensor creation deprecation notices
        yield
    torch.backends.quantized.engine = engine


def _weights(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """int8 codes of magnitude 90..127, 85% positive: most pairs of products of codes >= 128 leave int16."""
    sign = torch.where(torch.rand(shape, generator=g) < 0.85, 1, -1)
    return torch.randint(90, 128, shape, generator=g) * sign


def _quantized_weight(w: torch.Tensor, per_channel: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(qint8 weight, its (O,) float64 scales)."""
    o = w.shape[0]
    if per_channel:
        scales = torch.rand(o, generator=g, dtype=torch.float64) * 0.01 + 0.005
        wq = torch._make_per_channel_quantized_tensor(w.to(torch.int8), scales, torch.zeros(o, dtype=torch.long), 0)
        return wq, wq.q_per_channel_scales().double()
    return torch._make_per_tensor_quantized_tensor(w.to(torch.int8), 0.01, 0), torch.full((o,), 0.01).double()


def _setup(module: torch.nn.Module, w: torch.Tensor, per_channel: bool, span: int, kernel: str,
           g: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Give ``module`` the weight codes ``w`` and an output scale mapping accumulators of +-``span`` to
    +-128 codes; returns the pytorch mode's requantization for it."""
    wq, w_scale = _quantized_weight(w, per_channel, g)
    s_out = S_IN * float(w_scale.max()) * span / 128
    bias = torch.randn(w.shape[0], generator=g)
    module.set_weight_bias(wq, bias)
    module.scale, module.zero_point = s_out, Z_OUT
    out = QParams(s_out, Z_OUT, 8, False, 0, 255)
    p = RequantParams(S_IN, w_scale.float().double(), out, torch.zeros(w.shape[0], dtype=torch.int64), bias,
                      per_channel, kernel, "n")
    return lambda acc: MODE.requantize(acc, p)


def _quint8(codes: torch.Tensor, z_in: int) -> torch.Tensor:
    return torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), S_IN, z_in)


def _exact_conv(x: torch.Tensor, w: torch.Tensor, z_in: int, stride: int, padding: int, groups: int) -> torch.Tensor:
    """``sum((x - z_in) * w)`` in int64 (float64 sums of these integers are exact)."""
    xp = F.pad(x.double() - z_in, (padding,) * 4)
    return F.conv2d(xp, w.double(), None, stride, 0, 1, groups).round().long()


def _depthwise_reference(x: torch.Tensor, w: torch.Tensor, z_in: int, stride: int, padding: int,
                         pairs: list[list[int]]) -> torch.Tensor:
    """Depthwise accumulators with the given groups of row-major taps saturated to int16 (through unfold)."""
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    oh = (x.shape[2] + 2 * padding - kh) // stride + 1
    cols = F.unfold(F.pad(x.double(), (padding,) * 4, value=z_in), (kh, kw), stride=stride).round().long()
    products = cols.view(n, c, kh * kw, -1).repeat_interleave(o // c, 1) * w.view(1, o, kh * kw, 1)  # (N, O, T, L)
    acc = sum(products[:, :, taps].sum(2).clamp(-32768, 32767) for taps in pairs)
    return (acc - z_in * w.view(1, o, -1, 1).sum(2)).view(n, o, oh, -1)


# -- depthwise vs torch -------------------------------------------------------------------------------------------

@needs_fbgemm
@pytest.mark.parametrize(("channels", "multiplier", "k", "stride"), [
    (16, 1, 3, 1), (16, 2, 3, 2), (24, 1, 5, 1), (16, 2, 5, 2), (40, 1, 3, 2), (24, 2, 5, 1)])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_depthwise_matches_fbgemm_depthwise_conv(channels: int, multiplier: int, k: int, stride: int,
                                                 per_channel: bool) -> None:
    g = torch.Generator().manual_seed(channels * 100 + multiplier * 10 + k + stride + per_channel)
    o, pad = channels * multiplier, (k - 1) // 2
    z_in = int(torch.randint(100, 200, (1,), generator=g))
    x = torch.randint(128, 256, (2, channels, 9, 8), generator=g)
    w = _weights(g, (o, 1, k, k))
    module = nnq.Conv2d(channels, o, k, stride=stride, padding=pad, groups=channels)
    requantize = _setup(module, w, per_channel, 1500 * k * k, "fbgemm-depthwise", g)
    theirs = module(_quint8(x, z_in)).int_repr().int()

    assert can_saturate(w)
    assert torch.equal(requantize(depthwise_acc_saturating(x, w, z_in, stride, pad)), theirs)
    assert not torch.equal(requantize(_exact_conv(x, w, z_in, stride, pad, channels)), theirs), "nothing saturates"
    # pairs starting at the second tap, or padding with code 0, give other codes
    taps = list(range(k * k))
    shifted = _depthwise_reference(x, w, z_in, stride, pad, [[0]] + [taps[t:t + 2] for t in range(1, k * k, 2)])
    assert not torch.equal(requantize(shifted), theirs)
    zero_padded = depthwise_acc_saturating(F.pad(x, (pad,) * 4), w, z_in, stride, 0)
    assert not torch.equal(requantize(zero_padded), theirs)


# -- no-VNNI GEMM vs torch, FBGEMM forced to AVX2 -----------------------------------------------------------------

_RUN_FORCED = """
import sys, warnings, torch
import torch.ao.nn.quantized as nnq
warnings.filterwarnings("ignore")
torch.backends.quantized.engine = "fbgemm"
case = torch.load(sys.argv[1], weights_only=False)
module = nnq.Linear(*case["linear"]) if "linear" in case else nnq.Conv2d(**case["conv"])
module.set_weight_bias(case["weight"], case["bias"])
module.scale, module.zero_point = case["scale"], case["zero_point"]
torch.save(module(case["x"]).int_repr(), sys.argv[2])
"""


def _run_forced_avx2(module: torch.nn.Module, xq: torch.Tensor, spec: dict[str, object],
                     tmp_path: Path) -> torch.Tensor:
    """``module(xq)``'s codes computed by a Python whose FBGEMM runs its AVX2 kernels."""
    case = {**spec, "weight": module.weight(), "bias": module.bias(), "scale": module.scale,
            "zero_point": module.zero_point, "x": xq}
    torch.save(case, tmp_path / "case.pt")
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _RUN_FORCED, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=300)
    return torch.load(tmp_path / "out.pt").int()


def _consecutive_pairs_differ(x: torch.Tensor, w: torch.Tensor, z_in: int, requantize: Callable[..., torch.Tensor],
                              theirs: torch.Tensor) -> bool:
    """Pairing (1, 2), (3, 4), ... instead of (0, 1), (2, 3), ... gives other codes: the shifted GEMM with a
    zero column in front pairs index 0 with zero."""
    shifted = gemm_acc_saturating(F.pad(x, (1, 0)), F.pad(w, (1, 0)), z_in)
    return not torch.equal(requantize(shifted), theirs)


@needs_fbgemm
@pytest.mark.parametrize("k", [7, 40, 1030])  # odd K; K over FBGEMM's K blocks (512 on AVX2)
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_gemm_matches_fbgemm_linear_on_avx2(k: int, per_channel: bool, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(k + per_channel)
    z_in = int(torch.randint(100, 200, (1,), generator=g))
    x = torch.randint(128, 256, (50, k), generator=g)
    w = _weights(g, (24, k))
    module = nnq.Linear(k, 24)
    requantize = _setup(module, w, per_channel, 4000 * k, "fbgemm", g)
    theirs = _run_forced_avx2(module, _quint8(x, z_in), {"linear": (k, 24)}, tmp_path)

    assert torch.equal(requantize(gemm_acc_saturating(x, w, z_in)), theirs)
    assert not torch.equal(requantize((x - z_in) @ w.t()), theirs), "nothing saturates"
    assert _consecutive_pairs_differ(x, w, z_in, requantize, theirs)


@needs_fbgemm
@pytest.mark.parametrize(("c", "o", "k", "stride", "padding", "groups"), [
    (5, 12, 3, 1, 1, 1), (8, 12, 3, 2, 1, 1), (6, 9, 3, 1, 1, 3), (8, 16, 5, 1, 2, 2), (7, 10, 1, 1, 0, 1)])
def test_im2col_gemm_matches_fbgemm_conv_on_avx2(c: int, o: int, k: int, stride: int, padding: int, groups: int,
                                                 tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(c * o + k)
    z_in = int(torch.randint(100, 200, (1,), generator=g))
    x = torch.randint(128, 256, (2, c, 9, 8), generator=g)
    w = _weights(g, (o, c // groups, k, k))
    conv = {"in_channels": c, "out_channels": o, "kernel_size": k, "stride": stride, "padding": padding,
            "groups": groups}
    module = nnq.Conv2d(**conv)
    requantize = _setup(module, w, True, 4000 * k * k * c // groups, "fbgemm", g)
    theirs = _run_forced_avx2(module, _quint8(x, z_in), {"conv": conv}, tmp_path)

    cols = im2col_codes(x, (k, k), z_in, stride, padding, 1, groups)  # (G, N * OH * OW, K)
    wg = w.view(groups, o // groups, c // groups, k, k).permute(0, 1, 3, 4, 2).reshape(groups, o // groups, -1)
    acc = torch.cat([gemm_acc_saturating(cols[i], wg[i], z_in) for i in range(groups)], 1)  # (N * OH * OW, O)
    acc = acc.view(2, theirs.shape[2], theirs.shape[3], o).permute(0, 3, 1, 2)
    assert torch.equal(requantize(acc), theirs)
    assert not torch.equal(requantize(_exact_conv(x, w, z_in, stride, padding, groups)), theirs), "nothing saturates"


# -- hand-computed accumulators -----------------------------------------------------------------------------------

def test_gemm_saturates_each_pair_then_removes_the_zero_point() -> None:
    x = torch.tensor([[200, 250, 255, 10, 255]])  # K = 5: pairs (0, 1), (2, 3), (4, zero)
    w = torch.tensor([[100, 90, -128, -127, 127]])
    # 20000 + 22500 = 42500 -> 32767; -32640 - 1270 = -33910 -> -32768; 32385 alone; z_in * sum(w) = 3 * 62
    assert gemm_acc_saturating(x, w, 3).tolist() == [[32767 - 32768 + 32385 - 3 * 62]]
    assert ((x - 3) @ w.t()).tolist() == [[197 * 100 + 247 * 90 - 252 * 128 - 7 * 127 + 252 * 127]]


def test_depthwise_pairs_row_major_taps_and_pads_with_the_zero_point() -> None:
    # one channel, 2x2 input, 3x3 kernel, padding 1: the output at (0, 0) reads taps 4, 5, 7, 8 of the
    # input and the zero point (code 10) at the five padded taps
    x = torch.tensor([[[[200, 250], [255, 255]]]])
    w = torch.tensor([[[[1, 2, 3], [4, 100, 90], [5, 127, 127]]]])
    raw = [10, 10, 10, 10, 200, 250, 10, 255, 255]  # taps of output (0, 0), row-major
    taps = [int(v) for v in w.flatten()]
    products = [a * b for a, b in zip(raw, taps, strict=True)]
    pairs = [products[i] + (products[i + 1] if i + 1 < 9 else 0) for i in range(0, 9, 2)]
    expected = sum(min(max(p, -32768), 32767) for p in pairs) - 10 * sum(taps)
    assert pairs[2] == 200 * 100 + 250 * 90 and pairs[3] == 10 * 5 + 255 * 127  # 42500 saturates, 32435 fits
    acc = depthwise_acc_saturating(x, w, 10, 1, 1)
    assert acc[0, 0, 0, 0].item() == expected
    assert acc[0, 0, 0, 0].item() == _exact_conv(x, w, 10, 1, 1, 1)[0, 0, 0, 0].item() - (42500 - 32767)


# -- when saturation cannot happen --------------------------------------------------------------------------------

def test_can_saturate_bounds_same_sign_pairs() -> None:
    assert not can_saturate(torch.tensor([[127, 127, -128, -128]]), x_max=127)  # reduce_range codes never do
    assert can_saturate(torch.tensor([[64, 65, 0]]))  # 255 * 129 = 32895
    assert not can_saturate(torch.tensor([[64, 64, -128]]))  # 32640; opposite signs cancel
    assert can_saturate(torch.tensor([[-64, -65]]))  # -32895
    assert not can_saturate(torch.tensor([[-64, -64], [127, -128]]))  # -32640 fits int16
    assert not can_saturate(torch.tensor([[-128]]))


def test_without_saturation_the_accumulators_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 16, 7, 7), generator=g)
    w = torch.randint(-64, 64, (32, 1, 3, 3), generator=g)
    assert not can_saturate(w, x_max=255)
    assert torch.equal(depthwise_acc_saturating(x, w, 37, 2, 1), _exact_conv(x, w, 37, 2, 1, 16))
    xm, wm = x.flatten(1)[:, :95], w.flatten()[:95 * 3].view(3, 95)  # odd K
    assert torch.equal(gemm_acc_saturating(xm, wm, 37), (xm - 37) @ wm.t())
