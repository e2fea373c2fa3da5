"""Philox4x32-10 and the float32 polynomial Box-Muller of :mod:`photosim.hardware.philox` as Triton device
functions, so a kernel draws the noise of a tile value where it forms it (same key, counter and lane, same bits).

Every float32 operation below is one of philox.py's, in the same order, each correctly rounded (``div_rn``,
``sqrt_rn``; the caller compiles with ``enable_fp_fusion=False`` so no multiply-add is contracted); the constants
are philox.py's, rounded to float32 as torch rounds a Python float against a float32 tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from photosim.hardware import philox

M0: tl.constexpr = tl.constexpr(philox.PHILOX_M[0])
M1: tl.constexpr = tl.constexpr(philox.PHILOX_M[1])
W0: tl.constexpr = tl.constexpr(philox.PHILOX_W[0])
W1: tl.constexpr = tl.constexpr(philox.PHILOX_W[1])
LN2: tl.constexpr = tl.constexpr(philox.LN2)
SQRT_HALF: tl.constexpr = tl.constexpr(philox.SQRT_HALF)
HALF_PI: tl.constexpr = tl.constexpr(philox.HALF_PI)
LOG_SERIES: tl.constexpr = tl.constexpr(philox.LOG_SERIES)
SIN_SERIES: tl.constexpr = tl.constexpr(philox.SIN_SERIES)
COS_SERIES: tl.constexpr = tl.constexpr(philox.COS_SERIES)
assert len(philox.LOG_SERIES) == len(philox.SIN_SERIES) == len(philox.COS_SERIES)
TERMS: tl.constexpr = tl.constexpr(len(philox.LOG_SERIES))  # a constexpr tuple has no len() in the kernel


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counter words under uint32 key words (philox.philox4x32)."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + W0
            k1 = k1 + W1
        hi0 = tl.umulhi(c0, M0)
        lo0 = c0 * M0
        hi1 = tl.umulhi(c2, M1)
        lo1 = c2 * M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _horner(coefficients: tl.constexpr, z):
    """c0 z^n + ... + cn in float32, one rounded multiply and one rounded add per step (philox._horner)."""
    acc = tl.full(z.shape, coefficients[0], tl.float32)
    for i in tl.static_range(1, TERMS):
        acc = acc * z + coefficients[i]
    return acc


@triton.jit
def radius(w):
    """sqrt(-2 ln u), u = ((w >> 8) + 1) 2^-24, for uint32 words w (philox.radius); frexp read off the bits."""
    bits = ((w >> 8) + 1).to(tl.float32).to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 126
    m = ((bits & 0x807FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)  # k = m 2^e, m in [1/2, 1)
    low = m < SQRT_HALF
    m = tl.where(low, m * 2.0, m)
    e = tl.where(low, e - 1, e)
    s = tl.div_rn(m - 1.0, m + 1.0)
    ln_u = s * _horner(LOG_SERIES, s * s) + (e - 24).to(tl.float32) * LN2
    return tl.sqrt_rn(ln_u * -2.0)


@triton.jit
def cos_sin(w):
    """cos and sin of theta = 2 pi w 2^-32 for uint32 words w (philox.cos_sin)."""
    phi = ((w & 0x3FFFFFFF).to(tl.float32) * 9.313225746154785e-10 - 0.5) * HALF_PI  # 2^-30
    phi2 = phi * phi
    sin_phi = phi * _horner(SIN_SERIES, phi2)
    cos_phi = _horner(COS_SERIES, phi2)
    c = (cos_phi - sin_phi) * SQRT_HALF
    s = (cos_phi + sin_phi) * SQRT_HALF
    q = w >> 30
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    return cos, sin


@triton.jit
def normal(k0, k1, j, sample):
    """Element j (int64) of sample ``sample``'s stream under key (k0, k1) (uint32): lane j % 4 of the Box-Muller
    of Philox counter (j // 4, 0, sample, 0), float32 (philox.normal with the per-sample domain). One Philox
    per element: for any layout of j."""
    block = (j // 4).to(tl.uint32)
    lane = j % 4
    zero = tl.zeros_like(block)
    w0, w1, w2, w3 = philox4x32_10(block, zero, sample + zero, zero, k0, k1)
    first = lane < 2
    cos, sin = cos_sin(tl.where(first, w1, w3))
    return tl.where((lane % 2) == 1, sin, cos) * radius(tl.where(first, w0, w2))


@triton.jit
def normal_rows(k0, k1, first_block, sample, WIDTH: tl.constexpr):
    """Elements 4 b .. 4 b + WIDTH - 1 (b = first_block, int64 (R, 1)) of each row's sample stream, (R, WIDTH)
    float32: one Philox per 4 elements, its 4 normals interleaved (for rows that start on a block)."""
    block = (first_block + tl.arange(0, WIDTH // 4)[None, :]).to(tl.uint32)
    zero = tl.zeros_like(block)
    w0, w1, w2, w3 = philox4x32_10(block, zero, sample + zero, zero, k0, k1)
    r0 = radius(w0)
    r2 = radius(w2)
    cos1, sin1 = cos_sin(w1)
    cos3, sin3 = cos_sin(w3)
    # join adds a last axis: [b, i, k] = lane 2 i + k, in row-major order lanes 0, 1, 2, 3 of block b
    lanes = tl.join(tl.join(cos1 * r0, cos3 * r2), tl.join(sin1 * r0, sin3 * r2))  # (R, WIDTH / 4, 2, 2)
    return tl.reshape(lanes, (block.shape[0], WIDTH))
