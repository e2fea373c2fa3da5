"""Integer im2col as one Triton kernel: activation codes -> matmul operands, in a single pass.

torch builds the same operands (photosim.engine.kernels.conv2d_patches) with five passes: an int32
subtraction, a cast to int8, a pad, the unfold copy and the zero padding of K for cuBLASLt. The kernel
reads the codes once, in any layout (NCHW, or channels_last as the fused conv epilogue writes them), and
writes ``x - z_in - offset`` (``-offset`` in padding, 0 in the padding columns and rows a GEMM needs) with
K ordered (kh, kw, C) like photosim.engine.kernels.prepare_weights.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernel on CPU tensors (tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from photosim.engine.kernels import IntPair
from photosim.ir.ops import conv_output_size

BLOCK_M, BLOCK_K = 32, 128


@triton.jit
def _patches_kernel(x_ptr, out_ptr, rows, alloc_rows, k, out_cols, channels, height, width, out_h, out_w,
                    s_n, s_c, s_h, s_w, shift, pad_value,
                    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                    DH: tl.constexpr, DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # index arithmetic in int32 (64-bit division is slow on GPUs); addresses in int64
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ow = r % out_w
    oh = (r // out_w) % out_h
    n = (r // (out_w * out_h)).to(tl.int64)
    c = col % channels
    j = (col // channels) % KW
    i = col // (channels * KW)
    ih = oh[:, None] * SH - PH + i[None, :] * DH
    iw = ow[:, None] * SW - PW + j[None, :] * DW
    real = (r < rows)[:, None] & (col < k)[None, :]
    inside = real & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    x = tl.load(x_ptr + n[:, None] * s_n + c[None, :] * s_c + ih * s_h + iw * s_w, mask=inside, other=0)
    value = tl.where(inside, x.to(tl.int32) - shift, tl.where(real, pad_value, 0))
    store = (r < alloc_rows)[:, None] & (col < out_cols)[None, :]
    tl.store(out_ptr + r.to(tl.int64)[:, None] * out_cols + col[None, :], value.to(out_ptr.dtype.element_ty),
             mask=store)


def patches(x: torch.Tensor, z_in: int, offset: int, kernel: IntPair, stride: IntPair, padding: IntPair,
            dilation: IntPair, dtype: torch.dtype, cols: int, min_rows: int = 0) -> torch.Tensor:
    """Codes (N, C, H, W), any strides -> operands (max(N*OH*OW, min_rows), cols) of ``dtype``, one group.

    ``cols`` >= kh*kw*C pads K with zero columns; rows past N*OH*OW are zero. A linear layer's input is
    the (N, K, 1, 1) case with a 1x1 kernel.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    rows = n * oh * ow
    out = torch.empty((max(rows, min_rows), cols), dtype=dtype, device=x.device)
    grid = (triton.cdiv(out.shape[0], BLOCK_M), triton.cdiv(cols, BLOCK_K))
    if out.numel():
        _patches_kernel[grid](x, out, rows, out.shape[0], kh * kw * c, cols, c, h, w, oh, ow, *x.stride(),
                              z_in + offset, -offset, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                              BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out
