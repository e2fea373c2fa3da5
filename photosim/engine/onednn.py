"""Exact integer convolutions on oneDNN's int8 kernels (x86 CPUs): the integer engine's fast conv.

oneDNN multiplies unsigned 8-bit activations by signed 8-bit weights into int32 accumulators, 2-4x
faster than a float32 convolution. Two things stand between it and exact results, both handled here:

- CPUs without VNNI (AVX2; AVX512 without VNNI) add pairs of u8*s8 products in saturating int16
  (``vpmaddubsw``), which is exact only for activations below 128 (2 * 127 * 128 < 2^15).
- torch returns its accumulators as float32, exact only below 2^24.

So the operands ``x - z_in`` are shifted to be nonnegative and cut into limbs it multiplies exactly:
activation limbs of :func:`limb_bits` bits (8, or 7 where pairs saturate: probed once per process) and
signed 8-bit weight limbs. Each limb pair is one convolution; the weighted limb results add up in
float64 (exact below 2^53). A float32 result that reaches 2^24 may have been rounded: :func:`conv_acc`
then returns None and the caller uses the exact matmul path of ``photosim.engine.kernels``. Strided 1x1 convs
subsample their input here: oneDNN's strided 1x1 int8 kernel was seen to race (tests/test_bench.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from photosim.engine.kernels import IntPair

FLOAT32_EXACT = 1 << 24  # float32 holds every integer below this
MAX_CONVS = 4  # more limb pairs than this and the exact float matmul is faster
_LAST = torch.channels_last


def _qconv(x: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor, stride: IntPair,
           padding: IntPair, dilation: IntPair, groups: int) -> torch.Tensor:
    """One oneDNN conv of uint8 codes (N, C, H, W) with unit scales -> float32 accumulators (N, O, OH, OW)."""
    return torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, ones, zeros, None, list(stride), list(padding),
                                              list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")


def _pack(w: torch.Tensor, stride: IntPair, padding: IntPair, dilation: IntPair, groups: int) -> torch.Tensor:
    """int8 weights (O, C/G, kh, kw) -> oneDNN's packed layout for unit-scale uint8 inputs."""
    ones = torch.ones(w.shape[0])
    return torch.ops.onednn.qconv_prepack(w, ones, 1.0, 0, list(stride), list(padding), list(dilation), groups, None)


def _exact_at(bits: int) -> bool:
    """Whether oneDNN gets extreme ``bits``-bit activations times extreme weights right (dense and depthwise)."""
    top = (1 << bits) - 1
    for groups in (1, 16):
        x = torch.full((1, 16, 3, 3), top, dtype=torch.uint8).contiguous(memory_format=_LAST)
        for v in (-128, 127):
            w = torch.full((16, 16 // groups, 3, 3), v, dtype=torch.int8)
            got = _qconv(x, _pack(w, (1, 1), (0, 0), (1, 1), groups), torch.ones(16), torch.zeros(16, dtype=torch.long),
                         (1, 1), (0, 0), (1, 1), groups)
            if not torch.equal(got, torch.full_like(got, 9 * (16 // groups) * top * v)):
                return False
    return True


@functools.cache
def limb_bits() -> int:
    """Widest activation limb oneDNN multiplies exactly here: 8, 7 (pairs saturate in int16), 0 (unusable)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    try:
        return next((bits for bits in (8, 7) if _exact_at(bits)), 0)
    except (AttributeError, RuntimeError):  # torch without the onednn ops, or a CPU oneDNN cannot run int8 on
        return 0


def weight_limbs(w: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Integer weights -> signed 8-bit limbs and their shifts: ``w = sum limb * 2^shift`` (all-zero limbs dropped)."""
    limbs, rest, shift = [], w.to(torch.int64), 0
    while True:
        limb = torch.remainder(rest + 128, 256) - 128  # (rest - limb) is a multiple of 256
        if limb.any() or not limbs and not rest.any():
            limbs.append((limb.to(torch.int8), shift))
        rest = (rest - limb) // 256
        shift += 8
        if not rest.any():
            return limbs


@dataclass(frozen=True)
class OneDNNConv:
    """A conv2d prepared as oneDNN int8 convolutions of activation and weight limbs (see the module doc).

    Operands ``x - z_in = u + shift`` with ``u`` in ``[0, 2^(x_bits * x_limbs))``; when ``shift`` is not 0
    the input is padded here with the value of a zero operand (``pre_pad``) and ``correction`` adds
    ``shift * sum(w)`` per output channel.
    """

    packed: tuple[torch.Tensor, ...]  # one per weight limb
    weight_shifts: tuple[int, ...]  # limb j counts 2^weight_shifts[j]
    x_bits: int
    x_limbs: int
    x_max: int  # largest u
    shift: int
    correction: torch.Tensor | None  # (1, O, 1, 1) float64
    pre_pad: IntPair | None
    subsample: IntPair | None  # a strided 1x1 conv: take every stride-th input here, then convolve with stride 1
    checked: tuple[bool, ...]  # per activation limb: its float32 results may reach 2^24, check them
    stride: IntPair
    padding: IntPair
    dilation: IntPair
    groups: int
    ones: torch.Tensor  # (O,) unit weight scales
    zeros: torch.Tensor  # (O,) zero weight zero points


def unsupported(weight: torch.Tensor, x_range: IntPair) -> str | None:
    """Why prepare_conv cannot run a conv of these integer weights and ``x - z_in`` range (None: it can)."""
    bits = limb_bits()
    lo, hi = min(x_range[0], 0), max(x_range[1], 0)
    if not bits:
        return "oneDNN's int8 convolution is not available in this PyTorch build"
    if hi - lo >= 1 << 16:
        return "activations of 16 bits or more"
    pairs = max(1, -(-(hi - lo).bit_length() // bits)) * len(weight_limbs(weight))
    if pairs > MAX_CONVS:
        return f"{pairs} limb convolutions would be needed (more than {MAX_CONVS} are slower than the exact matmul)"
    return None


def prepare_conv(weight: torch.Tensor, x_range: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair,
                 groups: int) -> OneDNNConv | None:
    """Integer conv weights (O, C/G, kh, kw) and the range of ``x - z_in`` -> a OneDNNConv, or None where
    :func:`unsupported` gives a reason."""
    if unsupported(weight, x_range) is not None:
        return None
    bits = limb_bits()
    lo, hi = min(x_range[0], 0), max(x_range[1], 0)
    x_limbs = max(1, -(-(hi - lo).bit_length() // bits))
    limbs = weight_limbs(weight)
    # oneDNN's strided 1x1 int8 kernel races with 2 threads (wrong sums for 8 or 24 input channels): subsample
    # the input here instead and run a stride-1 conv.
    subsample = stride if tuple(weight.shape[2:]) == (1, 1) and stride != (1, 1) else None
    pre_pad = padding if any(padding) and (lo or subsample) else None
    conv_padding = (0, 0) if pre_pad else padding
    # |limb result| <= largest limb value * largest L1 norm of a weight limb's output channel
    l1 = max(int(limb.to(torch.int64).abs().sum(dim=(1, 2, 3)).max()) for limb, _ in limbs)
    widest = [min((hi - lo) >> (bits * i), (1 << bits) - 1) for i in range(x_limbs)]
    correction = None
    if lo:
        correction = (lo * weight.to(torch.float64).sum(dim=(1, 2, 3))).view(1, -1, 1, 1)
    conv_stride = (1, 1) if subsample else stride
    return OneDNNConv(
        packed=tuple(_pack(limb, conv_stride, conv_padding, dilation, groups) for limb, _ in limbs),
        weight_shifts=tuple(shift for _, shift in limbs), x_bits=bits, x_limbs=x_limbs, x_max=hi - lo, shift=lo,
        correction=correction, pre_pad=pre_pad, subsample=subsample,
        checked=tuple(top * l1 >= FLOAT32_EXACT for top in widest), stride=conv_stride, padding=conv_padding,
        dilation=dilation, groups=groups, ones=torch.ones(weight.shape[0]),
        zeros=torch.zeros(weight.shape[0], dtype=torch.long),
    )


def _activation_limbs(x: torch.Tensor, z_in: int, conv: OneDNNConv) -> list[torch.Tensor]:
    """int32 codes -> channels_last uint8 limbs of ``u = x - z_in - shift`` (padded with ``-shift`` if pre_pad,
    subsampled if subsample)."""
    offset = z_in + conv.shift
    u = x - offset if offset else x  # (N, C, H, W) int32, >= 0
    if conv.pre_pad:
        ph, pw = conv.pre_pad
        u = F.pad(u, (pw, pw, ph, ph), value=-conv.shift)
    if conv.subsample:
        u = u[:, :, :: conv.subsample[0], :: conv.subsample[1]]
    mask = (1 << conv.x_bits) - 1
    if conv.x_max < 256:  # u fits in uint8: cut the limbs there (4x less memory traffic)
        u8 = u.to(torch.uint8, memory_format=_LAST)
        return [u8] if conv.x_limbs == 1 else [u8 & mask, u8 >> conv.x_bits]
    return [((u >> (conv.x_bits * i)) & mask).to(torch.uint8, memory_format=_LAST) for i in range(conv.x_limbs)]


def _largest_abs(y: torch.Tensor) -> float:
    """max |y| of a channels_last (N, O, OH, OW) tensor, read in memory order (no copy)."""
    lo, hi = torch.aminmax(y.permute(0, 2, 3, 1))
    return max(-float(lo), float(hi))


def conv_acc(x: torch.Tensor, z_in: int, conv: OneDNNConv) -> torch.Tensor | None:
    """Exact conv accumulators ``sum (x - z_in) * w``: int32 codes (N, C, H, W) -> float64 (N, O, OH, OW)
    holding integers (channels_last), or None if a float32 result reached 2^24 (or the batch is empty)."""
    if not len(x):
        return None
    acc = None
    for i, limb in enumerate(_activation_limbs(x, z_in, conv)):
        for packed, w_shift in zip(conv.packed, conv.weight_shifts):
            y = _qconv(limb, packed, conv.ones, conv.zeros, conv.stride, conv.padding, conv.dilation,
                       conv.groups)  # (N, O, OH, OW) float32, channels_last
            if conv.checked[i] and _largest_abs(y) >= FLOAT32_EXACT:
                return None
            scale = float(1 << (conv.x_bits * i + w_shift))
            if acc is None:
                acc = y.double() if scale == 1 else y.double().mul_(scale)
            else:
                acc.add_(y, alpha=scale)
    if conv.correction is not None:
        acc.add_(conv.correction)
    return acc
