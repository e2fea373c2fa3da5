"""The Triton kernel of one analog layer's tile step (imported by photosim.engine.fused_triton only when Triton
is there): per output block, the T tile sums by tl.dot and, in the same loop, each tile value's output / shot
noise, ADC and accumulator step, so the noise costs registers instead of (G, T, M, O) tensors in memory.

The operands come from a (G, M, K) tensor, or (CONV) straight from a conv's input codes: an implicit GEMM, which
spares the im2col buffer of kernels.conv2d_patches (kh*kw times the input, written then read back). A tile is any
run of L consecutive K indices and may cross taps, so every k of a K chunk is mapped to its (i, j, c) on its own.
Or (VALUES) the tile values come formed already, (G, T, M, O): torch's, with weight error, modulated inputs or the
signal-dependent noise drawn; the kernel reads them out the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl

from photosim.engine.triton_philox import normal, normal_rows


@triton.jit
def _divide(x, y, F64: tl.constexpr):
    """x / y correctly rounded (float32 division is approximate unless asked for div_rn)."""
    if F64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    """sqrt(x) correctly rounded."""
    if F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _round_half_even(x, F64: tl.constexpr):
    """torch.round (nearest integer, ties to even): |x| + 2^(p-1) - 2^(p-1) rounds |x| < 2^(p-1) to an integer
    under round-to-nearest-even (p the significand bits); a larger |x| is an integer already."""
    c = 4503599627370496.0 if F64 else 8388608.0  # 2^52, 2^23
    size = tl.abs(x)
    size = tl.where(size < c, (size + c) - c, size)
    return tl.where(x < 0, -size, size)


@triton.jit
def _noise(k0, k1, j, first_block, sample, ALIGNED: tl.constexpr, BLOCK_O: tl.constexpr):
    """Standard normals of the block's elements j (float32): by 4-element Philox blocks where every row starts on
    one (ALIGNED), else one Philox per element."""
    if ALIGNED:
        return normal_rows(k0.to(tl.uint32), k1.to(tl.uint32), first_block, sample, BLOCK_O)
    else:
        return normal(k0.to(tl.uint32), k1.to(tl.uint32), j, sample)


@triton.jit
def _add_term(total, sat, over, term, acc_lo, acc_hi, OVERFLOW: tl.constexpr):
    """One accumulator addition: exact running sum, the saturating one, and whether the exact one left range."""
    total = total + term
    over = over | (total < acc_lo) | (total > acc_hi)
    if OVERFLOW == "saturate":
        sat = tl.minimum(tl.maximum(sat + term, acc_lo), acc_hi)
    return total, sat, over


@triton.jit
def _gathered(x_rows, ih0, iw0, row_ok, kk, k_ok, channels, height, width, stride_xc, stride_xh, stride_xw, centre,
              pad_value, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, INT8: tl.constexpr):
    """The (rows, K chunk kk) operands of a conv gathered from its input, as kernels.conv2d_patches lays them out:
    k = ((i * KW) + j) * C/G + c, the input code minus ``centre`` (z_in + offset) cast to the operand dtype, and
    ``pad_value`` (-offset) where the tap falls on the padding. x_rows: each row's pixel (n, group's channel 0);
    ih0, iw0: its window's top-left corner (padding included)."""
    tap = kk // channels
    c = kk % channels
    ih = ih0[:, None] + ((tap // KW) * DH)[None, :]
    iw = iw0[:, None] + ((tap % KW) * DW)[None, :]
    inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    x = tl.load(x_rows[:, None] + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw,
                mask=row_ok[:, None] & k_ok[None, :] & inside, other=0)
    # rows past m and k past K get any operand: their outputs are not stored, their weights load as 0
    a = tl.where(inside, x.to(tl.int32) - centre, pad_value)
    if INT8:
        return a.to(tl.int8)
    else:
        return a.to(tl.float32)


@triton.jit
def tile_step_kernel(
    a_ptr, w_ptr, ids_ptr, params_ptr, bias_ptr, shift_ptr, acc_ptr, exact_ptr, counts_ptr,
    m, k, o, tiles, tile, per_sample,
    stride_wg, stride_wk, stride_wo, stride_ag, stride_am, stride_ak, stride_at,
    channels, height, width, out_w, stride_xn, stride_xc, stride_xh, stride_xw, centre, pad_value,
    out_k0, out_k1, shot_k0, shot_k1, adc_hi, acc_lo, acc_hi,
    OUTPUT: tl.constexpr, SHOT: tl.constexpr, DIVIDE: tl.constexpr, CLIP: tl.constexpr,
    BIAS_AT: tl.constexpr, OVERFLOW: tl.constexpr, F64: tl.constexpr, EXACT: tl.constexpr, INT8: tl.constexpr,
    SHIFT: tl.constexpr, ALIGNED: tl.constexpr, CONV: tl.constexpr, VALUES: tl.constexpr,
    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
    DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (output block, group g) of the tile step of a (G, m, k) by w (G, k, o) (see fused_triton): the
    accumulators (G, m, o) int64, optionally the exact sums, and the clip and overflow counts (atomic adds). SHIFT:
    each tile sum gets shift (G, tiles, o) int64 added, in int64 (it need not fit the int32 GEMM sum).

    CONV: a_ptr is a conv input (N, C, H, W) of any strides (stride_x*), row r of the GEMM its output pixel (n, oh,
    ow) = (r // per_sample, r % per_sample // out_w, r % out_w) and group g its channels g*channels.. (channels =
    C/G); stride (SH, SW), padding (PH, PW), dilation (DH, DW) and the kernel's width KW say where its taps are.

    VALUES: a_ptr is the tile values (G, T, M, O) (int32, int64, float32 or float64; strides stride_ag, stride_at,
    stride_am, stride_ak), read out as they are (w is not read; no EXACT sums: the caller has them). A float value
    gets the shift in float64, as fused_cpu's ``p + shift`` (numpy's promotion) does, then the readout's dtype."""
    g = tl.program_id(1).to(tl.int64)
    blocks_o = tl.cdiv(o, BLOCK_O)
    rows = (tl.program_id(0) // blocks_o) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    col0 = (tl.program_id(0) % blocks_o).to(tl.int64) * BLOCK_O
    cols = col0 + tl.arange(0, BLOCK_O)
    row_ok = rows < m
    valid = row_ok[:, None] & (cols[None, :] < o)
    sample = tl.load(ids_ptr + rows // per_sample, mask=row_ok, other=0).to(tl.uint32)[:, None]
    pos = (rows % per_sample)[:, None]
    dtype = tl.float64 if F64 else tl.float32
    coef_out = tl.load(params_ptr).to(dtype)
    sigma_shot = tl.load(params_ptr + 1).to(dtype)
    full_scale = tl.load(params_ptr + 2).to(dtype)
    step = tl.load(params_ptr + 3).to(dtype)
    ks = tl.arange(0, BLOCK_K)
    if CONV:
        # offsets inside one sample in int32 (fused_triton checks they fit; 64-bit division is slow on GPUs)
        x_rows = a_ptr + (rows // per_sample) * stride_xn + g * channels * stride_xc
        pixel = (rows % per_sample).to(tl.int32)
        ih0 = pixel // out_w * SH - PH
        iw0 = pixel % out_w * SW - PW
    else:
        a_rows = a_ptr + g * stride_ag + rows[:, None] * stride_am
    w_cols = w_ptr + g * stride_wg + cols[None, :] * stride_wo

    total = tl.zeros((BLOCK_M, BLOCK_O), tl.int64)
    sat = tl.zeros((BLOCK_M, BLOCK_O), tl.int64)
    over = tl.zeros((BLOCK_M, BLOCK_O), tl.int1)
    exact = tl.zeros((BLOCK_M, BLOCK_O), tl.int64)
    clipped = tl.zeros((BLOCK_M, BLOCK_O), tl.int32)
    if BIAS_AT != "none":
        bias = tl.load(bias_ptr + g * o + cols, mask=cols < o, other=0)[None, :]
    if BIAS_AT == "start":
        total, sat, over = _add_term(total, sat, over, bias, acc_lo, acc_hi, OVERFLOW)
    for t in range(tiles):
        if VALUES:
            p = tl.load(a_ptr + g * stride_ag + t * stride_at + rows[:, None] * stride_am + cols[None, :] * stride_ak,
                        mask=valid, other=0)
        else:
            p = tl.zeros((BLOCK_M, BLOCK_O), tl.int32 if INT8 else tl.float32)
            for start in range(0, tile, BLOCK_K):
                kk = t * tile + start + ks
                k_ok = (start + ks < tile) & (kk < k)
                if CONV:
                    a = _gathered(x_rows, ih0, iw0, row_ok, kk, k_ok, channels, height, width, stride_xc, stride_xh,
                                  stride_xw, centre, pad_value, KW, DH, DW, INT8)
                else:
                    a = tl.load(a_rows + kk[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0)
                w = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None] & (cols[None, :] < o), other=0)
                p = tl.dot(a, w, p, out_dtype=tl.int32) if INT8 else tl.dot(a, w, p, input_precision="ieee")
        if SHIFT:
            shift = tl.load(shift_ptr + (g * tiles + t) * o + cols, mask=cols < o, other=0)[None, :]
            wide = tl.float64 if p.dtype.is_floating() else tl.int64  # float: exact sums, or VALUES' float values
            p = p.to(wide) + shift.to(wide)
        if EXACT:
            exact = exact + p.to(tl.int64)
        v = p.to(dtype)
        row_start = ((g * tiles + t) * per_sample + pos) * o  # of the row in the sample's stream, (BLOCK_M, 1)
        j = row_start + cols[None, :]
        first_block = (row_start + col0) // 4
        if OUTPUT:
            v = v + coef_out * _noise(out_k0, out_k1, j, first_block, sample, ALIGNED, BLOCK_O).to(dtype)
        if SHOT:
            e = _noise(shot_k0, shot_k1, j, first_block, sample, ALIGNED, BLOCK_O).to(dtype)
            v = v + (sigma_shot * _sqrt(tl.abs(v) * full_scale, F64)) * e
        if DIVIDE:
            v = _divide(v, step, F64)
        code = _round_half_even(v, F64)
        if CLIP:
            out_of_range = tl.abs(code) > adc_hi
            clipped = clipped + (out_of_range & valid).to(tl.int32)
            code = tl.minimum(tl.maximum(code, -adc_hi), adc_hi)
        total, sat, over = _add_term(total, sat, over, code.to(tl.int64), acc_lo, acc_hi, OVERFLOW)
    if BIAS_AT == "end":
        total, sat, over = _add_term(total, sat, over, bias, acc_lo, acc_hi, OVERFLOW)
    if OVERFLOW == "wrap":  # two's complement: wrapping once at the end equals wrapping at every step
        total = ((total - acc_lo) & (acc_hi - acc_lo)) + acc_lo
    if OVERFLOW == "saturate":
        total = sat
    offsets = g * m * o + rows[:, None] * o + cols[None, :]
    tl.store(acc_ptr + offsets, total, mask=valid)
    if EXACT:
        tl.store(exact_ptr + offsets, exact, mask=valid)
    if CLIP:
        tl.atomic_add(counts_ptr, tl.sum(clipped.to(tl.int64)))
    tl.atomic_add(counts_ptr + 1, tl.sum((over & valid).to(tl.int64)))
