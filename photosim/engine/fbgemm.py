"""FBGEMM's int16 saturation of uint8 x int8 pair sums, as integer accumulators.

FBGEMM multiplies uint8 activation codes by int8 weights with ``vpmaddubsw``: it forms
``x_a * w_a + x_b * w_b`` for two adjacent products and saturates the sum to int16 ([-32768, 32767]),
then widens to int32 (``vpmaddwd`` with ones, or ``vpmovsxwd``) and accumulates exactly. The products use
the raw activation codes; the input zero point is removed afterwards, in int32, as ``z_in * sum(w)``
(FBGEMM's column offsets), so a pair can saturate only where codes exceed 127. Which products are paired:

- depthwise convs (src/GenerateI8Depthwise.cc, src/PackDepthwiseConvMatrix.cc; AVX2 code that every x86
  CPU runs): kernel taps in row-major (kh, kw) order, pairs (0, 1), (2, 3), ...; an odd last tap is paired
  with zero. Padded taps hold the input zero point code ``z_in``, not zero.
- GEMMs on CPUs without VNNI (src/GenerateKernelU8S8S32ACC32.cc: ``vpbroadcastd`` of 4 A bytes,
  ``vpmaddubsw``, ``vpmaddwd``; B packed with ROW_INTERLEAVE 4, K blocks a multiple of 4; K padded with
  zeros): reduction indices (0, 1), (2, 3), ... of each row. Convs through im2col reduce over
  (kh, kw, ic) with ic fastest, padded positions holding ``z_in`` (src/PackAWithIm2Col.cc).

Weights are symmetric (zero point 0), as photosim stores them. All functions return int64 accumulators of
``sum((x - z_in) * w)`` as FBGEMM forms them; they equal the exact sums wherever no pair saturates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from photosim.engine.kernels import pair

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
UINT8_MAX = 255
_GEMM_BLOCK_ELEMENTS = 1 << 24  # bound on the (M, O, pairs) int32 temporary of one GEMM step


def can_saturate(weight: torch.Tensor, x_max: int = UINT8_MAX) -> bool:
    """Whether some pair sum ``x_a * w_a + x_b * w_b`` of an output can leave int16 for codes in [0, x_max].

    ``weight`` (O, ...) int8 codes, every weight of output o free to meet every other in a pair (so the
    answer holds for any pairing); ``x_max`` bounds the codes a layer reads, the input zero point included
    (padding). Codes are non-negative, so a pair of opposite-sign weights stays within +-255 * 128 and only
    the two largest positive (or the two most negative) weights of a row can saturate. False: FBGEMM's
    accumulators are the exact sums and the engine can use its exact conv / matmul.
    """
    w = weight.reshape(weight.shape[0], -1).to(torch.int64)  # (O, K)
    k = min(2, w.shape[1])
    if k == 0:
        return False
    high = w.clamp(min=0).topk(k, dim=1).values.sum(1) * x_max  # (O,)
    low = w.clamp(max=0).topk(k, dim=1, largest=False).values.sum(1) * x_max
    return bool((high > INT16_MAX).any() or (low < INT16_MIN).any())


def depthwise_acc_saturating(x: torch.Tensor, weight: torch.Tensor, z_in: int,
                             stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                             dilation: int | tuple[int, int] = 1) -> torch.Tensor:
    """Accumulators of FBGEMM's depthwise conv: ``sum_pairs sat16(x_a * w_a + x_b * w_b) - z_in * sum(w)``.

    x: (N, C, H, W) uint8 activation codes (any integer dtype); weight: (O, 1, KH, KW) int8 codes with
    O = m * C (channel multiplier m: output o reads input channel o // m); returns (N, O, OH, OW) int64.
    Taps pair in row-major (kh, kw) order, (0, 1), (2, 3), ..., an odd last tap alone; padded positions
    read ``z_in``. Works a pair of taps at a time, so memory stays O(N * O * OH * OW).
    """
    n, c, _, _ = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    xp = F.pad(x.to(torch.int64), (pw, pw, ph, ph), value=z_in).repeat_interleave(o // c, dim=1)  # (N, O, H', W')
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    w = weight.reshape(o, kh * kw).to(torch.int64)  # (O, T), taps row-major

    def tap_product(t: int) -> torch.Tensor:  # (N, O, OH, OW)
        r, s = divmod(t, kw)
        window = xp[:, :, r * dh: r * dh + sh * (oh - 1) + 1: sh, s * dw: s * dw + sw * (ow - 1) + 1: sw]
        return window * w[:, t].view(1, o, 1, 1)

    acc = torch.zeros(n, o, oh, ow, dtype=torch.int64, device=x.device)
    for t in range(0, kh * kw, 2):
        pair_sum = tap_product(t) + tap_product(t + 1) if t + 1 < kh * kw else tap_product(t)
        acc += pair_sum.clamp_(INT16_MIN, INT16_MAX)
    return acc - z_in * w.sum(1).view(1, o, 1, 1)


def gemm_acc_saturating(x: torch.Tensor, weight: torch.Tensor, z_in: int) -> torch.Tensor:
    """Accumulators of FBGEMM's u8s8 GEMM without VNNI: ``sum_j sat16(x[2j] w[2j] + x[2j+1] w[2j+1]) - z_in * sum(w)``.

    x: (M, K) uint8 activation codes in the GEMM's reduction order (a linear layer's input features; for a
    conv, ``im2col_codes``); weight: (O, K) int8 codes; returns (M, O) int64. An odd K pairs its last index
    with zero (FBGEMM pads K with zeros). Works in blocks of pairs sized to bound the int32 temporary.
    """
    m, k = x.shape
    o = weight.shape[0]
    if k % 2:
        x, weight = F.pad(x, (0, 1)), F.pad(weight, (0, 1))
    xa, xb = x.to(torch.int32).view(m, -1, 2).unbind(-1)  # (M, K/2) each
    wa, wb = weight.to(torch.int32).view(o, -1, 2).unbind(-1)  # (O, K/2) each
    pairs = xa.shape[1]
    step = max(1, _GEMM_BLOCK_ELEMENTS // max(1, m * o))
    acc = torch.zeros(m, o, dtype=torch.int64, device=x.device)
    for j in range(0, pairs, step):
        block = slice(j, min(j + step, pairs))
        sums = xa[:, None, block] * wa[None, :, block] + xb[:, None, block] * wb[None, :, block]  # (M, O, b)
        acc += sums.clamp_(INT16_MIN, INT16_MAX).sum(-1, dtype=torch.int64)
    return acc - z_in * weight.to(torch.int64).sum(1)[None, :]


def im2col_codes(x: torch.Tensor, kernel: tuple[int, int], z_in: int, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 groups: int = 1) -> torch.Tensor:
    """FBGEMM's im2col of a conv input: (N, C, H, W) codes -> (G, N * OH * OW, KH * KW * C / G).

    Rows run over (n, oh, ow); each group's reduction index runs over (kh, kw, ic) with ic fastest, the
    order of PackAWithIm2Col's NHWC copy, and padded positions hold ``z_in``. Pair with weights
    ``w.view(G, O / G, C / G, KH, KW).permute(0, 1, 3, 4, 2).reshape(G, O / G, -1)`` in
    ``gemm_acc_saturating`` per group.
    """
    n, c, _, _ = x.shape
    kh, kw = kernel
    (ph, pw) = pair(padding)
    xp = F.pad(x.to(torch.int64), (pw, pw, ph, ph), value=z_in)
    cols = F.unfold(xp.double(), (kh, kw), dilation=dilation, stride=stride).round().to(torch.int64)  # (N, C*T, L)
    length = cols.shape[-1]
    cols = cols.view(n, groups, c // groups, kh * kw, length).permute(1, 0, 4, 3, 2)  # (G, N, L, T, C/G)
    return cols.reshape(groups, n * length, kh * kw * (c // groups))
