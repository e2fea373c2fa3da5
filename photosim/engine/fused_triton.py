"""One analog layer's whole tile step as one Triton kernel: tile sums, output / shot noise, ADC and accumulator.

``tile_step`` gives what AnalogLayer.dot gives for exact weights (no weight error, no custom noise, no ADC
calibration), without the (G, T, M, O) tile, noise and code tensors of the torch path: each program forms the T
tile sums of an output block with tl.dot and reads each one out in registers, drawing its noise from the same
Philox key and counter as photosim.hardware.rng (the semantics: AnalogLayer._readout, docs/hardware.md).

``conv_tile_step`` is the same for a conv, its operands gathered by the kernel from the conv's input (an implicit
GEMM): kernels.conv2d_patches' im2col buffer is kh*kw times the input, and writing then reading it back was most of
a conv's time on an H200.

``readout_step`` reads out tile values torch formed already (G, T, M, O): weight error, modulated inputs (DAC noise,
a nonlinear modulator) or the signal-dependent noise drawn in them, as photosim.engine.fused_cpu does on the CPU;
the same kernel then skips its tl.dot and loads each tile value instead.

It runs compiled on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before the first call: Triton reads it when the kernel module is imported), which is how the tests check it
against the torch path on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, replace
from typing import Literal

import torch

from photosim.engine.kernels import IntPair, MatmulPlan, conv_output_size, device_constant
from photosim.hardware import philox, rng
from photosim.hardware.readout import FLOAT32_EXACT, Readout
from photosim.ir.ranges import int_range, max_int

INT32_EXACT = 1 << 31  # int32 ones below this
STREAM_VALUES = 4 << 32  # values one sample's Philox stream holds (2^32 counters of 4)
# Output block of one program (BLOCK_O shrinks to O's next power of 2, at least 16): 32 x 32 was the fastest of
# 32..128 on an H200 (a 3x3 conv, 64 -> 128 channels, 32 samples of 14 x 14, L = 64).
BLOCK_M, BLOCK_O = 32, 32
OperandPath = Literal["int8", "float32"]
VALUE_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)  # of the tile values readout_step reads


@dataclass(frozen=True)
class TileStep:
    """The result of one tile step."""

    acc: torch.Tensor  # (G, M, O) int64 accumulators in ADC steps, bias included
    exact: torch.Tensor | None  # (G, M, O) int64 sum of the noiseless tile sums, no bias (None: not asked for)
    counts: torch.Tensor  # (2,) int64 on the device: tile values the ADC clipped (0 for the ideal readout), outputs
    # whose running accumulator sum left the accumulator's range; left there, as reading it makes the host wait

    @property
    def clipped(self) -> int:
        return int(self.counts[0])

    @property
    def overflowed(self) -> int:
        return int(self.counts[1])


def available(device: torch.device | str) -> bool:
    """Whether tile_step runs on tensors of ``device``: Triton is importable and the device is CUDA (compiled
    kernel) or, under TRITON_INTERPRET=1, the CPU (interpreter)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return importlib.util.find_spec("triton") is not None and torch.device(device).type == (
        "cpu" if interpret else "cuda")


def operand_path(a_dtype: torch.dtype, w_dtype: torch.dtype, full_scale: float) -> OperandPath | None:
    """How the kernel forms exact tile sums of operands of these dtypes: ``int8`` (both int8, int32 sums below
    2^31), ``float32`` (float operands, sums below 2^24: exact in float32), or None (not exactly: use the torch
    path)."""
    if a_dtype == w_dtype == torch.int8 and full_scale < INT32_EXACT:
        return "int8"
    if a_dtype.is_floating_point and w_dtype.is_floating_point and full_scale < FLOAT32_EXACT:
        return "float32"
    return None


def tile_step(a: torch.Tensor, w: torch.Tensor, sample_ids: torch.Tensor, readout: Readout,
              bias_codes: torch.Tensor | None = None, exact: bool = True,
              shift: torch.Tensor | None = None) -> TileStep:
    """Operands a (G, M, K) = x - z_in - offset (rows sample-major, M = N * P for the N = len(sample_ids) samples)
    and integer weights w (G, K, O) -> the layer's accumulators, as AnalogLayer.dot computes them.

    ``bias_codes`` (G, O) int64: the bias in ADC steps (round(bias / step)), None: no bias term. ``exact``: also
    return the exact accumulators for the diagnostics. ``shift`` (G, T, O) int64 is added to every tile sum before
    the noise, and is in the exact sums: offset * the tile's weight sums (AnalogLayer.tile_shift) puts back the
    offset that moved unsigned operands into int8 (kernels.MatmulPlan's int_mm). Every tile value (shift
    included) must be at most readout.full_scale in magnitude; ValueError where operand_path gives None.
    """
    g, m, k = a.shape
    if w.shape[:2] != (g, k):
        raise ValueError(f"weights {tuple(w.shape)} do not match operands {tuple(a.shape)}")
    operands = a.float() if a.is_floating_point() else a
    return _tile_step(_Operands(operands, a.dtype, m, (*operands.stride(), 0, *_NO_CONV), _MATRIX), w, sample_ids,
                      readout, bias_codes, exact, shift)


def conv_tile_step(x: torch.Tensor, z_in: int, plan: MatmulPlan, kernel: IntPair, stride: IntPair,
                   padding: IntPair, dilation: IntPair, w: torch.Tensor, sample_ids: torch.Tensor,
                   readout: Readout, bias_codes: torch.Tensor | None = None, exact: bool = True,
                   shift: torch.Tensor | None = None) -> TileStep:
    """A conv's codes x (N, C, H, W), any strides (NCHW, channels_last), and its weights w (G, kh*kw*C/G, O) ->
    tile_step of its operands kernels.conv2d_patches(x, z_in, plan, ...) (rows (n, oh, ow), K ordered (kh, kw,
    C/G)), without forming them: the kernel gathers each operand from x (centred ``x - z_in - plan.offset`` and
    cast to the plan's dtype; the padding's is ``-plan.offset``), so the im2col buffer, kh*kw times the input and
    written then read back, is never made. The groups are w's first dimension."""
    n, c, h, width = x.shape
    g = w.shape[0]
    if c % g or kernel[0] * kernel[1] * (c // g) != w.shape[1]:
        raise ValueError(f"weights {tuple(w.shape)} do not match a {kernel[0]}x{kernel[1]} conv of {c} channels in "
                         f"{g} groups")
    if sum((size - 1) * step for size, step in zip(x.shape[1:], x.stride()[1:])) >= INT32_EXACT:
        raise ValueError(f"one sample of {tuple(x.shape[1:])} spans 2^31 elements or more: the kernel's offsets "
                         "inside a sample are int32")
    oh, ow = (conv_output_size(*args) for args in zip((h, width), kernel, stride, padding, dilation))
    geometry = (c // g, h, width, ow, *x.stride(), z_in + plan.offset, -plan.offset)
    conv = {"CONV": True, "VALUES": False, "KW": kernel[1], "SH": stride[0], "SW": stride[1], "PH": padding[0],
            "PW": padding[1], "DH": dilation[0], "DW": dilation[1]}
    return _tile_step(_Operands(x, plan.dtype, n * oh * ow, (0, 0, 0, 0, *geometry), conv), w, sample_ids, readout,
                      bias_codes, exact, shift)


def readout_step(p: torch.Tensor, sample_ids: torch.Tensor, readout: Readout, bias_codes: torch.Tensor | None = None,
                 exact: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> TileStep:
    """Tile values p (G, T, M, O) that torch formed (VALUE_DTYPES, any strides; rows sample-major) -> the layer's
    accumulators, as AnalogLayer._readout reads them out: p + shift in the readout's dtype, output / shot noise, ADC
    and accumulator in the kernel, no (G, T, M, O) temporaries.

    ``exact`` (G, M, O): the exact accumulators for the diagnostics (the tile values need not sum to them: weight
    error, noise drawn), returned as they are; ``bias_codes`` and ``shift`` as for tile_step."""
    if p.dim() != 4 or p.dtype not in VALUE_DTYPES:
        raise ValueError(f"tile values must be (G, T, M, O) of {', '.join(map(str, VALUE_DTYPES))} (got "
                         f"{tuple(p.shape)} {p.dtype})")
    values = _Operands(p, p.dtype, p.shape[2], (p.stride(0), p.stride(2), p.stride(3), p.stride(1), *_NO_CONV),
                       _VALUES)
    return replace(_tile_step(values, None, sample_ids, readout, bias_codes, False, shift), exact=exact)


# The kernel's conv arguments where it reads a (G, M, K) tensor: channels .. pad_value, and the constexprs.
_NO_CONV = (0,) * 10
_MATRIX = {"CONV": False, "VALUES": False, "KW": 1, "SH": 1, "SW": 1, "PH": 0, "PW": 0, "DH": 1, "DW": 1}
_VALUES = {**_MATRIX, "VALUES": True}


@dataclass(frozen=True)
class _Operands:
    """Where the kernel takes its operands: a (G, M, K) tensor, a conv input it gathers them from, or the tile
    values themselves (G, T, M, O)."""

    tensor: torch.Tensor
    dtype: torch.dtype  # of the operands the kernel forms (a conv input: the plan's, whatever the codes' dtype)
    rows: int  # M
    args: tuple[int, ...]  # stride_ag, stride_am, stride_ak, stride_at, then the conv's channels .. pad_value
    constants: dict[str, int | bool]  # the kernel's CONV, VALUES and the conv's geometry (_MATRIX)


def _tile_step(operands: _Operands, w: torch.Tensor | None, sample_ids: torch.Tensor, readout: Readout,
               bias_codes: torch.Tensor | None, exact: bool, shift: torch.Tensor | None) -> TileStep:
    """tile_step, conv_tile_step and readout_step (w None: the operands are the tile values) once their operands
    are located: the checks they share, then the kernel."""
    m = operands.rows
    int8 = False
    if w is None:
        g, tiles, _, o = operands.tensor.shape
    else:
        g, k, o = w.shape
        path = operand_path(operands.dtype, w.dtype, readout.full_scale)
        if path is None:
            raise ValueError(f"no exact tile sums for {operands.dtype} x {w.dtype} operands at full scale "
                             f"{readout.full_scale:g}; use the torch path")
        tiles, int8 = math.ceil(k / readout.tile), path == "int8"
        w = w if int8 else w.float()
    samples = len(sample_ids)
    per_sample = m // samples if samples else 0
    if per_sample * samples != m:
        raise ValueError(f"{m} rows are not {samples} samples of equal size")
    if shift is not None and shift.shape != (g, tiles, o):
        raise ValueError(f"shift {tuple(shift.shape)} is not (groups, tiles, outputs) = {(g, tiles, o)}")
    if g * tiles * per_sample * o > STREAM_VALUES:
        raise ValueError(f"{g * tiles * per_sample * o} noise values per sample exceed one Philox stream")
    device = operands.tensor.device
    acc = torch.empty(g, m, o, dtype=torch.int64, device=device)
    sums = torch.empty_like(acc) if exact else None
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    if acc.numel():
        _launch(operands, w, int8, sample_ids, readout, bias_codes, shift, acc, sums, counts)
    return TileStep(acc, sums, counts)


def _launch(operands: _Operands, w: torch.Tensor | None, int8: bool, sample_ids: torch.Tensor, readout: Readout,
            bias_codes: torch.Tensor | None, shift: torch.Tensor | None, acc: torch.Tensor,
            sums: torch.Tensor | None, counts: torch.Tensor) -> None:
    """Run the kernel over (output blocks, groups); w None: the operands are the tile values (G, T, M, O)."""
    import triton  # imported with the kernel, only when one runs
    from triton.runtime.interpreter import InterpretedFunction

    from photosim.engine import triton_tile

    device = operands.tensor.device
    interpreted = isinstance(triton_tile.tile_step_kernel, InterpretedFunction)
    if interpreted != (device.type == "cpu"):
        raise ValueError(f"the Triton kernel was imported {'interpreted' if interpreted else 'compiled'} and cannot "
                         f"take {device.type} tensors: TRITON_INTERPRET=1 before the first call is for CPU tensors")

    g, m, o = acc.shape
    if w is None:  # the kernel reads no weights: any pointer, no K
        k, tiles, w_args = 0, operands.tensor.shape[1], (operands.tensor, 0, 0, 0)
    else:
        k, tiles, w_args = w.shape[1], math.ceil(w.shape[1] / readout.tile), (w, *w.stride())
    philox.check_samples(sample_ids)
    ids = sample_ids.to(device=device, dtype=torch.int64)
    fs, step = readout.full_scale, readout.step
    sigma_output, sigma_shot = readout.tile_noise.get("output", 0.0), readout.tile_noise.get("shot", 0.0)
    params = device_constant((sigma_output * fs, sigma_shot, fs, step), torch.float64, device)
    out_key = rng.key(readout.seed, readout.repeat, "output", readout.layer)
    shot_key = rng.key(readout.seed, readout.repeat, "shot", readout.layer)
    acc_lo, acc_hi = int_range(readout.acc_bits, signed=True)
    # 64 bits: the int64 sum is the accumulator itself, its wrap-around is the hardware's
    overflow = "none" if readout.overflow == "wrap" and readout.acc_bits >= 64 else readout.overflow
    bias = None if bias_codes is None else bias_codes.to(device=device, dtype=torch.int64).contiguous()
    shift = None if shift is None else shift.to(device=device, dtype=torch.int64).contiguous()
    block_m, block_o = BLOCK_M, min(BLOCK_O, max(16, triton.next_power_of_2(o)))
    block_k = max(32 if int8 else 16, min(64, triton.next_power_of_2(readout.tile)))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(o, block_o), g)
    triton_tile.tile_step_kernel[grid](
        operands.tensor, w_args[0], ids, params, acc if bias is None else bias, acc if shift is None else shift, acc,
        acc if sums is None else sums, counts,
        m, k, o, tiles, readout.tile, m // len(ids),
        *w_args[1:], *operands.args, *out_key, *shot_key, max_int(readout.adc_bits or 2, signed=True), acc_lo,
        acc_hi,
        OUTPUT=bool(sigma_output), SHOT=bool(sigma_shot), DIVIDE=step != 1.0,
        CLIP=readout.adc_bits is not None, BIAS_AT="none" if bias is None else readout.bias_at, OVERFLOW=overflow,
        F64=readout.dtype == torch.float64, EXACT=sums is not None, INT8=int8, SHIFT=shift is not None,
        ALIGNED=o % 4 == 0, **operands.constants,
        BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_K=block_k, enable_fp_fusion=False,
    )
