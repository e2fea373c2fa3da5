"""An ideal conv/linear layer as one Triton kernel: implicit-GEMM int8 convolution with the requantization fused.

photosim.engine.cuda_ideal runs a layer as three kernels (im2col operands written out, ``torch._int_mm``, the
requantization epilogue), so every input code travels to memory kh*kw times as an operand and every accumulator
once as int32. Here each program computes a (BLOCK_M output pixels) x (BLOCK_O channels) block: it walks K =
kh*kw*C tap by tap (the order of photosim.engine.kernels.prepare_weights), loads the codes of that tap straight
from the input (NCHW or channels_last, any strides), centres and shifts them into int8 as the int_mm plan does
(``x - z_in - offset``; padding is the zero point, so its operand is ``-offset`` as in kernels.conv2d_patches),
sums int8 x int8 products in int32 with tl.dot, then adds the shift (offset correction plus integer bias) in int64
and applies FloatRequant's float64 chain and clamp (photosim.engine.triton_requant's helpers, FMA contraction off)
before writing int32 codes into an NHWC buffer, returned as a channels_last (N, O, OH, OW) view. A linear layer is
the 1x1 convolution of (N, K, 1, 1). Codes equal FloatRequant's on kernels.conv2d_acc bit for bit
(tests/test_triton_conv.py); one group only (photosim.engine.backends' cuda-implicit backend says when).

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernel on CPU tensors (tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from photosim.engine.cuda_ideal import FusedLayer
from photosim.engine.kernels import IntPair
from photosim.engine.triton_requant import NO_FMA, accumulator_codes
from photosim.ir.ops import conv_output_size

# Untuned starting points (to be timed on a GPU): 64 x 64 int32 accumulators, then the float64 epilogue, stay in
# registers with 4 warps; a K step of 64 channels matches ResNet widths, 32 is tl.dot's smallest int8 step.
BLOCK_M, MAX_BLOCK_O, MAX_BLOCK_K = 64, 64, 64
MIN_BLOCK_O, MIN_BLOCK_K = 16, 32


@triton.jit
def _conv_kernel(x_ptr, w_ptr, shift_ptr, mult_ptr, out_ptr, rows, channels, height, width, out_h, out_w, o,
                 s_n, s_c, s_h, s_w, s_wk, s_wo, centre, pad_value, z_out, qmin, qmax,
                 KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                 PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # index arithmetic in int32 (64-bit division is slow on GPUs); the sample and output offsets in int64
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel rows (n, oh, ow)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # output channels
    ks = tl.arange(0, BLOCK_K)
    ow = r % out_w
    oh = (r // out_w) % out_h
    sample = x_ptr + (r // (out_w * out_h)).to(tl.int64) * s_n  # (BLOCK_M,) pointers
    row_ok = r < rows
    col_ok = cols < o
    acc = tl.full((BLOCK_M, BLOCK_O), 0, tl.int32)  # not tl.zeros: a jit function, compiled if Triton came first
    for i in tl.static_range(KH):
        ih = oh * SH - PH + i * DH
        for j in tl.static_range(KW):
            iw = ow * SW - PW + j * DW
            inside = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)  # (BLOCK_M,): not padding
            pixel = sample + ih * s_h + iw * s_w
            tap = (i * KW + j) * channels  # K index of channel 0 of this tap
            for c0 in range(0, channels, BLOCK_K):
                c = c0 + ks
                c_ok = c < channels
                x = tl.load(pixel[:, None] + c[None, :] * s_c, mask=inside[:, None] & c_ok[None, :], other=0)
                # channels past C get any operand: their weights load as 0
                a = tl.where(inside[:, None], x.to(tl.int32) - centre, pad_value).to(tl.int8)  # (BLOCK_M, BLOCK_K)
                w = tl.load(w_ptr + (tap + c)[:, None] * s_wk + cols[None, :] * s_wo,
                            mask=c_ok[:, None] & col_ok[None, :], other=0)  # (BLOCK_K, BLOCK_O) int8
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0)
    mult = tl.load(mult_ptr + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * o + cols[None, :],
             accumulator_codes(acc, shift, mult, z_out, qmin, qmax), mask=row_ok[:, None] & col_ok[None, :])


def _block(size: int, smallest: int, largest: int) -> int:
    """A power-of-2 block covering ``size`` where it can, between tl.dot's ``smallest`` and ``largest``."""
    return min(largest, max(smallest, triton.next_power_of_2(size)))


class ImplicitLayer(FusedLayer):
    """A conv/linear with cuda_ideal.FusedLayer's int8 weights and epilogue constants, run as one kernel.

    Prepared as FusedLayer is (``ImplicitLayer.prepare(weights, params)``, weights of an ``int_mm`` plan).
    """

    def _launch(self, x: torch.Tensor, z_in: int, kernel: IntPair, stride: IntPair, padding: IntPair,
                dilation: IntPair, out: torch.Tensor) -> None:
        """Codes (N, C, H, W), any strides -> their output codes written into ``out`` (N*OH*OW, O), contiguous."""
        n, c, h, w = x.shape
        rows, o = out.shape
        if not rows or not o:
            return
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
        oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
        matrix, offset = self.weights.matrix[0], self.weights.plan.offset  # (K', O') int8, K ordered (kh, kw, C)
        block_o, block_k = _block(o, MIN_BLOCK_O, MAX_BLOCK_O), _block(c, MIN_BLOCK_K, MAX_BLOCK_K)
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(o, block_o))
        _conv_kernel[grid](x, matrix, self.shift, self.multiplier, out, rows, c, h, w, oh, ow, o, *x.stride(),
                           *matrix.stride(), z_in + offset, -offset, self.output.zero_point, self.output.qmin,
                           self.output.qmax, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                           BLOCK_M=BLOCK_M, BLOCK_O=block_o, BLOCK_K=block_k, **NO_FMA)

    def conv(self, x: torch.Tensor, z_in: int, kernel: IntPair, stride: IntPair, padding: IntPair,
             dilation: IntPair) -> torch.Tensor:
        """Codes (N, C, H, W), any layout -> int32 output codes (N, O, OH, OW), channels_last."""
        n, _, h, w = x.shape
        oh, ow = (conv_output_size(*args) for args in zip((h, w), kernel, stride, padding, dilation))
        o = self.shift.numel()
        out = torch.empty((n * oh * ow, o), dtype=torch.int32, device=x.device)
        self._launch(x, z_in, kernel, stride, padding, dilation, out)
        return out.view(n, oh, ow, o).permute(0, 3, 1, 2)

    def linear(self, x: torch.Tensor, z_in: int) -> torch.Tensor:
        """Codes (N, K) -> int32 output codes (N, O): the 1x1 convolution of (N, K, 1, 1)."""
        out = torch.empty((x.shape[0], self.shift.numel()), dtype=torch.int32, device=x.device)
        self._launch(x[:, :, None, None], z_in, (1, 1), (1, 1), (0, 0), (1, 1), out)
        return out
