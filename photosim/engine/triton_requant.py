"""The ``float`` and ``fixedpoint`` requant modes as Triton kernels: one pass from accumulators (or two code
tensors) to codes.

:func:`requantize_rows` is the epilogue of a GEMM whose rows are output pixels (NHWC order): it reads the
raw matmul result (int32 from ``torch._int_mm``, or float32 / float64 holding integers), adds the per-channel
integer shift (int_mm offset correction plus bias) in int64, and applies FloatRequant's float64 chain
``clamp(rne(acc * M) + z_out)`` before writing int32 codes, where torch would make eight passes over int64 and
float64 temporaries. :func:`add_codes` does the same for FloatRequant.add. Bit-exact with FloatRequant:
the same float64 operations in the same order, round half to even by the 2^52 trick (exact for every
float64; libdevice's rint has no interpreter version), and FMA contraction switched off at launch.

:func:`requantize_rows_fixedpoint` and :func:`add_codes_fixedpoint` are the same passes for FixedPointRequant
(gemmlowp / TFLite's int32 pipeline): the shifts, SRDHM and RoundingDivideByPOT of
photosim.engine.requant.multiply_by_quantized_multiplier in int64, op for op, no float.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors (tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from photosim.engine.kernels import device_constant
from photosim.engine.requant import INT32_MAX, INT32_MIN, fixedpoint_add_constants
from photosim.ir.format import QParams

NO_FMA = {"enable_fp_fusion": False}  # a fused multiply-add would round acc * M + 2^52 once, not twice
BLOCK_ROWS, BLOCK_ELEMENTS = 64, 1024
INT32_LO: tl.constexpr = tl.constexpr(INT32_MIN)  # jit functions read module globals only as constexprs
INT32_HI: tl.constexpr = tl.constexpr(INT32_MAX)


@triton.jit
def _rne(y):
    """Round float64 ``y`` half to even: adding and removing 2^52 leaves no fraction bits (|y| < 2^52)."""
    big = 4503599627370496.0  # 2^52: from there on every float64 is an integer
    c = tl.where(y >= 0, big, -big).to(tl.float64)
    return tl.where(tl.abs(y) < big, (y + c) - c, y)


@triton.jit
def _to_codes(y, z_out, qmin, qmax):
    """FloatRequant's tail: rne, + z_out, clamp (all float64), int32."""
    q = _rne(y) + tl.cast(z_out, tl.float64)  # tl.cast: an argument equal to 1 reaches the kernel as a constexpr
    return tl.minimum(tl.maximum(q, tl.cast(qmin, tl.float64)), tl.cast(qmax, tl.float64)).to(tl.int32)


@triton.jit
def accumulator_codes(acc, shift, mult, z_out, qmin, qmax):
    """A (rows, O) block of raw accumulators -> int32 codes: + shift (O,) in int64, * multiplier (O,) in float64,
    FloatRequant's tail (the epilogue of every ideal CUDA kernel)."""
    return _to_codes((acc.to(tl.int64) + shift[None, :]).to(tl.float64) * mult[None, :], z_out, qmin, qmax)


@triton.jit
def _saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp fixedpoint.h's SaturatingRoundingDoublingHighMul on int64 holding int32 values: ``(a*b + nudge)
    / 2^31`` truncated toward zero (shifts of the magnitude: no integer division, whose interpreter version
    goes through float), nudge ``2^30`` or ``1 - 2^30``; ``INT32_MIN * INT32_MIN`` saturates to INT32_MAX."""
    ab = a * b  # |ab| <= 2^62: exact in int64
    total = ab + tl.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = tl.where(total >= 0, total >> 31, -((-total) >> 31))
    return tl.where((a == INT32_LO) & (b == INT32_LO), INT32_HI, high)


@triton.jit
def _rounding_divide_by_pot(x, exponent):
    """gemmlowp fixedpoint.h's RoundingDivideByPOT: ``x / 2^exponent`` (0..31) rounded half away from zero."""
    mask = (tl.cast(1, tl.int64) << exponent) - 1
    threshold = (mask >> 1) + (x < 0).to(tl.int64)
    return (x >> exponent) + ((x & mask) > threshold).to(tl.int64)


@triton.jit
def _multiply_by_quantized_multiplier(x, q, exponent):
    """TFLite's MultiplyByQuantizedMultiplier on int64: left shift by ``max(exponent, 0)`` saturated to int32,
    SRDHM by ``q``, RoundingDivideByPOT by ``max(-exponent, 0)`` (photosim.engine.requant's, op for op)."""
    left = tl.minimum(tl.maximum(exponent, 0), 31)
    shifted = tl.minimum(tl.maximum(x << left, INT32_LO), INT32_HI)
    return _rounding_divide_by_pot(_saturating_rounding_doubling_high_mul(shifted, q), tl.maximum(-exponent, 0))


@triton.jit
def _clamp_codes(y, z_out, qmin, qmax):
    """int64 ``y + z_out`` clamped to qmin..qmax, int32 (FixedPointRequant's tail)."""
    q = y + tl.cast(z_out, tl.int64)
    return tl.minimum(tl.maximum(q, tl.cast(qmin, tl.int64)), tl.cast(qmax, tl.int64)).to(tl.int32)


@triton.jit
def fixedpoint_codes(acc, shift, q, exponent, z_out, qmin, qmax):
    """A (rows, O) block of raw accumulators -> int32 codes as FixedPointRequant.requantize: + shift (O,) in
    int64, MultiplyByQuantizedMultiplier with the per-channel (q, exponent) (O,) int64 of
    requant.quantize_multiplier, + z_out, clamp. Integer arithmetic only."""
    x = acc.to(tl.int64) + shift[None, :]
    return _clamp_codes(_multiply_by_quantized_multiplier(x, q[None, :], exponent[None, :]), z_out, qmin, qmax)


@triton.jit
def layer_codes(acc, channel, col_ok, shift_ptr, mult_ptr, exponent_ptr, z_out, qmin, qmax,
                FIXEDPOINT: tl.constexpr):
    """The epilogue of every ideal CUDA kernel: a (rows, O) block of raw accumulators of output channels
    ``channel`` (O,) -> int32 codes, their per-channel constants loaded here: float mode (``mult_ptr`` float64
    multipliers; ``exponent_ptr`` unread) or fixedpoint (``mult_ptr`` / ``exponent_ptr`` int64 q and exponent)."""
    shift = tl.load(shift_ptr + channel, mask=col_ok, other=0)
    if FIXEDPOINT:
        q = tl.load(mult_ptr + channel, mask=col_ok, other=0)
        exponent = tl.load(exponent_ptr + channel, mask=col_ok, other=0)
        codes = fixedpoint_codes(acc, shift, q, exponent, z_out, qmin, qmax)
    else:
        mult = tl.load(mult_ptr + channel, mask=col_ok, other=0.0)
        codes = accumulator_codes(acc, shift, mult, z_out, qmin, qmax)
    return codes


@triton.jit
def _requant_kernel(acc_ptr, acc_stride, shift_ptr, mult_ptr, exponent_ptr, out_ptr, out_stride, rows, cols, z_out,
                    qmin, qmax, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, FIXEDPOINT: tl.constexpr):
    """One (BLOCK_M, BLOCK_O) tile of the epilogue (layer_codes) over a matmul's results."""
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask = (r < rows)[:, None] & (o < cols)[None, :]
    acc = tl.load(acc_ptr + r[:, None] * acc_stride + o[None, :], mask=mask, other=0)
    codes = layer_codes(acc, o, o < cols, shift_ptr, mult_ptr, exponent_ptr, z_out, qmin, qmax, FIXEDPOINT)
    tl.store(out_ptr + r[:, None] * out_stride + o[None, :], codes, mask=mask)


def _launch_rows(acc: torch.Tensor, shift: torch.Tensor, multiplier: torch.Tensor, exponent: torch.Tensor | None,
                 out_q: QParams, out: torch.Tensor) -> torch.Tensor:
    """Both modes' epilogue launch: ``exponent`` None for float, the int64 exponents for fixedpoint."""
    rows, cols = out.shape
    block_o = min(128, triton.next_power_of_2(max(cols, 1)))
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, block_o))
    if rows and cols:
        fixedpoint = exponent is not None
        _requant_kernel[grid](acc, acc.stride(0), shift, multiplier, exponent if fixedpoint else multiplier, out,
                              out.stride(0), rows, cols, out_q.zero_point, out_q.qmin, out_q.qmax,
                              BLOCK_M=BLOCK_ROWS, BLOCK_O=block_o, FIXEDPOINT=fixedpoint, **NO_FMA)
    return out


def requantize_rows(acc: torch.Tensor, shift: torch.Tensor, multiplier: torch.Tensor, out_q: QParams,
                    out: torch.Tensor) -> torch.Tensor:
    """Matmul results (rows, >= O) -> ``out`` (rows, O) int32 codes: ``clamp(rne((acc + shift) * M) + z_out)``.

    ``acc`` may have padding columns beyond O (ignored); ``shift`` (O,) int64, ``multiplier`` (O,) float64.
    Float accumulators must hold integers (they are converted to int64 exactly).
    """
    return _launch_rows(acc, shift, multiplier, None, out_q, out)


def requantize_rows_fixedpoint(acc: torch.Tensor, shift: torch.Tensor, q: torch.Tensor, exponent: torch.Tensor,
                               out_q: QParams, out: torch.Tensor) -> torch.Tensor:
    """Matmul results (rows, >= O) -> ``out`` (rows, O) int32 codes as FixedPointRequant.requantize on
    ``acc + shift``: ``clamp(MultiplyByQuantizedMultiplier(acc + shift, q, exponent) + z_out)``.

    ``q``, ``exponent``: (O,) int64 from requant.quantize_multiplier (per channel; a per-tensor layer repeats
    them). A kernel cannot raise FixedPointRequant's error for accumulators outside int32: the caller proves they
    fit (photosim.engine.backends' cuda-ideal bounds them when it plans the layer).
    """
    return _launch_rows(acc, shift, q, exponent, out_q, out)


@triton.jit
def _add_kernel(a_ptr, b_ptr, const_ptr, out_ptr, n, za, zb, z_out, qmin, qmax, left_shift, BLOCK: tl.constexpr,
                FIXEDPOINT: tl.constexpr):
    """One block of a residual add: float mode (``const_ptr``: the two float64 multipliers), or fixedpoint
    (``const_ptr``: int64 q and exponent of a, b and the output; ``left_shift``: TFLite's headroom shift)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    a = tl.load(a_ptr + i, mask=mask, other=0)
    b = tl.load(b_ptr + i, mask=mask, other=0)
    if FIXEDPOINT:
        shift = tl.cast(left_shift, tl.int64)
        ya = _multiply_by_quantized_multiplier((a.to(tl.int64) - tl.cast(za, tl.int64)) << shift,
                                               tl.load(const_ptr), tl.load(const_ptr + 1))
        yb = _multiply_by_quantized_multiplier((b.to(tl.int64) - tl.cast(zb, tl.int64)) << shift,
                                               tl.load(const_ptr + 2), tl.load(const_ptr + 3))
        y = _multiply_by_quantized_multiplier(ya + yb, tl.load(const_ptr + 4), tl.load(const_ptr + 5))
        codes = _clamp_codes(y, z_out, qmin, qmax)
    else:
        ya = (a.to(tl.float64) - tl.cast(za, tl.float64)) * tl.load(const_ptr)
        yb = (b.to(tl.float64) - tl.cast(zb, tl.float64)) * tl.load(const_ptr + 1)
        codes = _to_codes(ya + yb, z_out, qmin, qmax)
    tl.store(out_ptr + i, codes, mask=mask)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _launch_add(a: torch.Tensor, b: torch.Tensor, constants: torch.Tensor, qa: QParams, qb: QParams, out_q: QParams,
                left_shift: int) -> torch.Tensor | None:
    """Both modes' add launch (fixedpoint when ``constants`` are int64), or None when the layouts differ."""
    if a.shape != b.shape or a.stride() != b.stride() or not _dense(a):
        return None
    out = torch.empty_like(a, dtype=torch.int32)
    if a.numel():
        _add_kernel[(triton.cdiv(a.numel(), BLOCK_ELEMENTS),)](
            a, b, constants, out, a.numel(), qa.zero_point, qb.zero_point, out_q.zero_point, out_q.qmin, out_q.qmax,
            left_shift, BLOCK=BLOCK_ELEMENTS, FIXEDPOINT=constants.dtype == torch.int64, **NO_FMA)
    return out


def add_codes(a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out_q: QParams) -> torch.Tensor | None:
    """FloatRequant.add in one pass over two code tensors laid out alike (contiguous or channels_last; the
    result is laid out as they are), or None when their layouts differ."""
    # float64 on the host, as FloatRequant computes them (a Python float would reach the kernel as float32)
    mult = device_constant((qa.scale / out_q.scale, qb.scale / out_q.scale), torch.float64, a.device)
    return _launch_add(a, b, mult, qa, qb, out_q, 0)


def add_codes_fixedpoint(a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams,
                         out_q: QParams) -> torch.Tensor | None:
    """FixedPointRequant.add (TFLite's int8 add: both inputs shifted left, rescaled to twice the larger input
    scale, summed, rescaled to the output) in one pass, with add_codes' layout rules."""
    left_shift, q, exponent = fixedpoint_add_constants(qa, qb, out_q)  # (3,) each: a, b, output
    constants = device_constant(tuple(torch.stack((q, exponent), 1).flatten().tolist()), torch.int64, a.device)
    return _launch_add(a, b, constants, qa, qb, out_q, left_shift)
