"""The ``float`` requant mode as Triton kernels: one pass from accumulators (or two code tensors) to codes.

:func:`requantize_rows` is the epilogue of a GEMM whose rows are output pixels (NHWC order): it reads the
raw matmul result (int32 from ``torch._int_mm``, or float32 / float64 holding integers), adds the per-channel
integer shift (int_mm offset correction plus bias) in int64, and applies FloatRequant's float64 chain
``clamp(rne(acc * M) + z_out)`` before writing int32 codes, where torch would make eight passes over int64 and
float64 temporaries. :func:`add_codes` does the same for FloatRequant.add. Bit-exact with FloatRequant:
the same float64 operations in the same order, round half to even by the 2^52 trick (exact for every
float64; libdevice's rint has no interpreter version), and FMA contraction switched off at launch.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors (tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from photosim.engine.kernels import device_constant
from photosim.ir.format import QParams

NO_FMA = {"enable_fp_fusion": False}  # a fused multiply-add would round acc * M + 2^52 once, not twice
BLOCK_ROWS, BLOCK_ELEMENTS = 64, 1024


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
def _requant_kernel(acc_ptr, acc_stride, shift_ptr, mult_ptr, out_ptr, out_stride, rows, cols, z_out, qmin, qmax,
                    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask = (r < rows)[:, None] & (o < cols)[None, :]
    acc = tl.load(acc_ptr + r[:, None] * acc_stride + o[None, :], mask=mask, other=0)
    shift = tl.load(shift_ptr + o, mask=o < cols, other=0)
    mult = tl.load(mult_ptr + o, mask=o < cols, other=0.0)
    tl.store(out_ptr + r[:, None] * out_stride + o[None, :], accumulator_codes(acc, shift, mult, z_out, qmin, qmax),
             mask=mask)


def requantize_rows(acc: torch.Tensor, shift: torch.Tensor, multiplier: torch.Tensor, out_q: QParams,
                    out: torch.Tensor) -> torch.Tensor:
    """Matmul results (rows, >= O) -> ``out`` (rows, O) int32 codes: ``clamp(rne((acc + shift) * M) + z_out)``.

    ``acc`` may have padding columns beyond O (ignored); ``shift`` (O,) int64, ``multiplier`` (O,) float64.
    Float accumulators must hold integers (they are converted to int64 exactly).
    """
    rows, cols = out.shape
    block_o = min(128, triton.next_power_of_2(max(cols, 1)))
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, block_o))
    if rows and cols:
        _requant_kernel[grid](acc, acc.stride(0), shift, multiplier, out, out.stride(0), rows, cols,
                              out_q.zero_point, out_q.qmin, out_q.qmax, BLOCK_M=BLOCK_ROWS, BLOCK_O=block_o, **NO_FMA)
    return out


@triton.jit
def _add_kernel(a_ptr, b_ptr, mult_ptr, out_ptr, n, za, zb, z_out, qmin, qmax, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    ma = tl.load(mult_ptr)
    mb = tl.load(mult_ptr + 1)
    ya = (tl.load(a_ptr + i, mask=mask, other=0).to(tl.float64) - tl.cast(za, tl.float64)) * ma
    yb = (tl.load(b_ptr + i, mask=mask, other=0).to(tl.float64) - tl.cast(zb, tl.float64)) * mb
    tl.store(out_ptr + i, _to_codes(ya + yb, z_out, qmin, qmax), mask=mask)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def add_codes(a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out_q: QParams) -> torch.Tensor | None:
    """FloatRequant.add in one pass over two code tensors laid out alike (contiguous or channels_last; the
    result is laid out as they are), or None when their layouts differ."""
    if a.shape != b.shape or a.stride() != b.stride() or not _dense(a):
        return None
    out = torch.empty_like(a, dtype=torch.int32)
    # float64 on the host, as FloatRequant computes them (a Python float would reach the kernel as float32)
    mult = device_constant((qa.scale / out_q.scale, qb.scale / out_q.scale), torch.float64, a.device)
    if a.numel():
        _add_kernel[(triton.cdiv(a.numel(), BLOCK_ELEMENTS),)](
            a, b, mult, out, a.numel(), qa.zero_point, qb.zero_point, out_q.zero_point, out_q.qmin, out_q.qmax,
            BLOCK=BLOCK_ELEMENTS, **NO_FMA)
    return out
