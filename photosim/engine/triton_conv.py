"""An ideal conv/linear layer as one Triton kernel: implicit-GEMM int8 convolution with the requantization fused.

photosim.engine.cuda_ideal runs a layer as three kernels (im2col operands written out, ``torch._int_mm``, the
requantization epilogue), so every input code travels to memory kh*kw times as an operand and every accumulator
once as int32. Here each program computes a (BLOCK_M output pixels) x (BLOCK_O channels) block of one group: it
walks that group's K = kh*kw*C/G tap by tap (the order of photosim.engine.kernels.prepare_weights), loads the codes
of that tap straight from the input (NCHW or channels_last, any strides), centres and shifts them into int8 as the
int_mm plan does (``x - z_in - offset``; padding is the zero point, so its operand is ``-offset`` as in
kernels.conv2d_patches), sums int8 x int8 products in int32 with tl.dot, then adds the shift (offset correction
plus integer bias) in int64 and applies the layer's requantization, FloatRequant's float64 chain or
FixedPointRequant's integer one (photosim.engine.triton_requant.layer_codes, FMA contraction off) and the clamp,
before writing int32 codes into an NHWC buffer, returned as a channels_last
(N, O, OH, OW) view. A linear layer is the 1x1 convolution of (N, K, 1, 1).

Grouped layers run on a group grid axis, each group reading its C/G input channels and its weight slice and writing
its O/G output channels. Where a group has at most DIRECT_MAX_GROUP_CHANNELS input channels (depthwise layers with
any channel multiplier, ResNeXt's narrow groups) tl.dot's K block of at least 32 would be mostly padding, so a
direct kernel sums the kh*kw*C/G products per output on the CUDA cores, in int32 as well: the int8 plan's operands
and weights are at most 128 in magnitude and the backend admits only K * 128^2 < 2^31. Codes equal FloatRequant's
on kernels.conv2d_acc bit for bit (tests/test_triton_conv.py).

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernel on CPU tensors (tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from photosim.engine.cuda_ideal import FusedLayer
from photosim.engine.kernels import IntPair
from photosim.engine.triton_requant import NO_FMA, layer_codes
from photosim.ir.ops import conv_output_size

# Untuned starting points (to be timed on a GPU): 64 x 64 int32 accumulators, then the float64 epilogue, stay in
# registers with 4 warps; a K step of 64 channels matches ResNet widths, 32 is tl.dot's smallest int8 step.
BLOCK_M, MAX_BLOCK_O, MAX_BLOCK_K = 64, 64, 64
MIN_BLOCK_O, MIN_BLOCK_K = 16, 32
# Groups of up to 4 input channels would fill at most 1/8 of tl.dot's K block: they sum directly (untuned). The
# direct kernel's 32-channel blocks are 128 contiguous bytes of an NHWC row of codes.
DIRECT_MAX_GROUP_CHANNELS, DIRECT_BLOCK_M, DIRECT_BLOCK_O = 4, 64, 32


@triton.jit
def _tap(sample, oh, ow, row_ok, i, j, height, width, s_h, s_w, SH: tl.constexpr, SW: tl.constexpr,
         PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """Tap (i, j) of each output pixel's window: the pointer to its input pixel (channel 0 of ``sample``) and
    whether it lies inside the input (else it is padding), for output pixels (oh, ow)."""
    ih = oh * SH - PH + i * DH
    iw = ow * SW - PW + j * DW
    inside = row_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    return sample + ih * s_h + iw * s_w, inside


@triton.jit
def _conv_kernel(x_ptr, w_ptr, shift_ptr, mult_ptr, exponent_ptr, out_ptr, rows, group_channels, height, width,
                 out_h, out_w, o, out_per_group, s_n, s_c, s_h, s_w, s_wg, s_wk, s_wo, centre, pad_value, z_out, qmin,
                 qmax, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                 PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, FIXEDPOINT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # index arithmetic in int32 (64-bit division is slow on GPUs); the sample and output offsets in int64
    group = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel rows (n, oh, ow)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # output channels within the group
    ks = tl.arange(0, BLOCK_K)
    ow = r % out_w
    oh = (r // out_w) % out_h
    first_channel = x_ptr + (group * group_channels).to(tl.int64) * s_c
    sample = first_channel + (r // (out_w * out_h)).to(tl.int64) * s_n  # (BLOCK_M,) pointers
    w_group = w_ptr + group.to(tl.int64) * s_wg
    row_ok = r < rows
    col_ok = cols < out_per_group
    acc = tl.full((BLOCK_M, BLOCK_O), 0, tl.int32)  # not tl.zeros: a jit function, compiled if Triton came first
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            pixel, inside = _tap(sample, oh, ow, row_ok, i, j, height, width, s_h, s_w, SH, SW, PH, PW, DH, DW)
            tap = (i * KW + j) * group_channels  # K index of the group's channel 0 at this tap
            for c0 in range(0, group_channels, BLOCK_K):
                c = c0 + ks
                c_ok = c < group_channels
                x = tl.load(pixel[:, None] + c[None, :] * s_c, mask=inside[:, None] & c_ok[None, :], other=0)
                # channels past C/G get any operand: their weights load as 0
                a = tl.where(inside[:, None], x.to(tl.int32) - centre, pad_value).to(tl.int8)  # (BLOCK_M, BLOCK_K)
                w = tl.load(w_group + (tap + c)[:, None] * s_wk + cols[None, :] * s_wo,
                            mask=c_ok[:, None] & col_ok[None, :], other=0)  # (BLOCK_K, BLOCK_O) int8
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    channel = group * out_per_group + cols
    codes = layer_codes(acc, channel, col_ok, shift_ptr, mult_ptr, exponent_ptr, z_out, qmin, qmax, FIXEDPOINT)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * o + channel[None, :], codes, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _direct_kernel(x_ptr, w_ptr, shift_ptr, mult_ptr, exponent_ptr, out_ptr, rows, group_channels, height, width,
                   out_h, out_w, o, out_per_group, s_n, s_c, s_h, s_w, s_wg, s_wk, s_wo, centre, pad_value, z_out,
                   qmin, qmax, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                   PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, FIXEDPOINT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr):
    # a (BLOCK_M, BLOCK_O) block of output channels of any groups: each column reads its group's input channels
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel rows (n, oh, ow)
    channel = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # output channels
    ow = r % out_w
    oh = (r // out_w) % out_h
    sample = x_ptr + (r // (out_w * out_h)).to(tl.int64) * s_n  # (BLOCK_M,) pointers
    row_ok = r < rows
    col_ok = channel < o
    group = channel // out_per_group
    first_channel = (group * group_channels)[None, :] * s_c  # (1, BLOCK_O) offsets of the group's channel 0
    w_column = w_ptr + group.to(tl.int64) * s_wg + (channel % out_per_group) * s_wo  # (BLOCK_O,) pointers
    acc = tl.full((BLOCK_M, BLOCK_O), 0, tl.int32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            pixel, inside = _tap(sample, oh, ow, row_ok, i, j, height, width, s_h, s_w, SH, SW, PH, PW, DH, DW)
            tap = (i * KW + j) * group_channels
            for c in range(0, group_channels):
                x = tl.load(pixel[:, None] + first_channel + c * s_c, mask=inside[:, None] & col_ok[None, :],
                            other=0)
                a = tl.where(inside[:, None], x.to(tl.int32) - centre, pad_value)  # (BLOCK_M, BLOCK_O) int8 values
                w = tl.load(w_column + (tap + c) * s_wk, mask=col_ok, other=0).to(tl.int32)  # (BLOCK_O,)
                acc += a * w[None, :]
    codes = layer_codes(acc, channel, col_ok, shift_ptr, mult_ptr, exponent_ptr, z_out, qmin, qmax, FIXEDPOINT)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * o + channel[None, :], codes, mask=row_ok[:, None] & col_ok[None, :])


def _block(size: int, smallest: int, largest: int) -> int:
    """A power-of-2 block covering ``size`` where it can, between tl.dot's ``smallest`` and ``largest``."""
    return min(largest, max(smallest, triton.next_power_of_2(size)))


def sums_directly(group_channels: int, groups: int) -> bool:
    """Whether a layer of ``groups`` groups of ``group_channels`` input channels runs on the direct kernel."""
    return groups > 1 and group_channels <= DIRECT_MAX_GROUP_CHANNELS


class ImplicitLayer(FusedLayer):
    """A conv/linear with cuda_ideal.FusedLayer's int8 weights and epilogue constants, run as one kernel.

    Prepared as FusedLayer is (``ImplicitLayer.prepare(weights, params)``, weights of an ``int_mm`` plan laid out
    for the layer's groups by kernels.prepare_weights).
    """

    def _launch(self, x: torch.Tensor, z_in: int, kernel: IntPair, stride: IntPair, padding: IntPair,
                dilation: IntPair, out: torch.Tensor) -> None:
        """Codes (N, C, H, W), any strides -> their output codes written into ``out`` (N*OH*OW, O), contiguous."""
        _, c, h, w = x.shape
        rows, o = out.shape
        if not rows or not o:
            return
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
        oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
        matrix, offset = self.weights.matrix, self.weights.plan.offset  # (G, K', O'/G) int8, K ordered (kh, kw, C/G)
        groups, og = matrix.shape[0], self.weights.out_per_group
        multiplier, exponent = self.fixedpoint or (self.multiplier, self.multiplier)  # float: exponents unread
        args = (x, matrix, self.shift, multiplier, exponent, out, rows, c // groups, h, w, oh, ow, o, og, *x.stride(),
                *matrix.stride(), z_in + offset, -offset, self.output.zero_point, self.output.qmin, self.output.qmax)
        geometry = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, FIXEDPOINT=self.fixedpoint is not None,
                        **NO_FMA)
        if sums_directly(c // groups, groups):
            grid = (triton.cdiv(rows, DIRECT_BLOCK_M), triton.cdiv(o, DIRECT_BLOCK_O))
            _direct_kernel[grid](*args, BLOCK_M=DIRECT_BLOCK_M, BLOCK_O=DIRECT_BLOCK_O, **geometry)
            return
        block_o, block_k = _block(og, MIN_BLOCK_O, MAX_BLOCK_O), _block(c // groups, MIN_BLOCK_K, MAX_BLOCK_K)
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(og, block_o), groups)
        _conv_kernel[grid](*args, BLOCK_M=BLOCK_M, BLOCK_O=block_o, BLOCK_K=block_k, **geometry)

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
