"""One analog layer's whole tile step as one Triton kernel: tile sums, output / shot noise, ADC and accumulator.

``tile_step`` gives what AnalogLayer.dot gives for exact weights (no weight error, no custom noise, no ADC
calibration), without the (G, T, M, O) tile, noise and code tensors of the torch path: each program forms the T
tile sums of an output block with tl.dot and reads each one out in registers, drawing its noise from the same
Philox key and counter as photosim.hardware.rng (the semantics: AnalogLayer._readout, docs/hardware.md).

It runs compiled on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before the first call: Triton reads it when the kernel module is imported), which is how the tests check it
against the torch path on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from photosim.engine.kernels import device_constant
from photosim.hardware import philox, rng
from photosim.hardware.readout import FLOAT32_EXACT, Readout
from photosim.ir.ranges import int_range, max_int

INT32_EXACT = 1 << 31  # int32 ones below this
STREAM_VALUES = 4 << 32  # values one sample's Philox stream holds (2^32 counters of 4)
# Output block of one program (BLOCK_O shrinks to O's next power of 2, at least 16): 32 x 32 was the fastest of
# 32..128 on an H200 (a 3x3 conv, 64 -> 128 channels, 32 samples of 14 x 14, L = 64).
BLOCK_M, BLOCK_O = 32, 32
OperandPath = Literal["int8", "float32"]


@dataclass(frozen=True)
class TileStep:
    """The result of one tile step."""

    acc: torch.Tensor  # (G, M, O) int64 accumulators in ADC steps, bias included
    exact: torch.Tensor | None  # (G, M, O) int64 sum of the noiseless tile sums, no bias (None: not asked for)
    clipped: int  # tile values the ADC clipped (0 for the ideal readout)
    overflowed: int  # outputs whose running accumulator sum left the accumulator's range


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
    o = w.shape[2]
    path = operand_path(a.dtype, w.dtype, readout.full_scale)
    if path is None:
        raise ValueError(f"no exact tile sums for {a.dtype} x {w.dtype} operands at full scale "
                         f"{readout.full_scale:g}; use the torch path")
    if w.shape[:2] != (g, k):
        raise ValueError(f"weights {tuple(w.shape)} do not match operands {tuple(a.shape)}")
    samples = len(sample_ids)
    per_sample = m // samples if samples else 0
    if per_sample * samples != m:
        raise ValueError(f"{m} rows are not {samples} samples of equal size")
    tiles = math.ceil(k / readout.tile)
    if shift is not None and shift.shape != (g, tiles, o):
        raise ValueError(f"shift {tuple(shift.shape)} is not (groups, tiles, outputs) = {(g, tiles, o)}")
    if g * tiles * per_sample * o > STREAM_VALUES:
        raise ValueError(f"{g * tiles * per_sample * o} noise values per sample exceed one Philox stream")
    acc = torch.empty(g, m, o, dtype=torch.int64, device=a.device)
    sums = torch.empty_like(acc) if exact else None
    counts = torch.zeros(2, dtype=torch.int64, device=a.device)
    if acc.numel():
        _launch(a if path == "int8" else a.float(), w if path == "int8" else w.float(), sample_ids, readout,
                bias_codes, shift, acc, sums, counts)
    clipped, overflowed = counts.tolist()
    return TileStep(acc, sums, clipped, overflowed)


def _launch(a: torch.Tensor, w: torch.Tensor, sample_ids: torch.Tensor, readout: Readout,
            bias_codes: torch.Tensor | None, shift: torch.Tensor | None, acc: torch.Tensor,
            sums: torch.Tensor | None, counts: torch.Tensor) -> None:
    """Run the kernel over (output blocks, groups)."""
    import triton  # imported with the kernel, only when one runs
    from triton.runtime.interpreter import InterpretedFunction

    from photosim.engine import triton_tile

    interpreted = isinstance(triton_tile.tile_step_kernel, InterpretedFunction)
    if interpreted != (a.device.type == "cpu"):
        raise ValueError(f"the Triton kernel was imported {'interpreted' if interpreted else 'compiled'} and cannot "
                         f"take {a.device.type} tensors: TRITON_INTERPRET=1 before the first call is for CPU tensors")

    g, m, k = a.shape
    o = w.shape[2]
    philox.check_samples(sample_ids)
    ids = sample_ids.to(device=a.device, dtype=torch.int64)
    fs, step = readout.full_scale, readout.step
    sigma_output, sigma_shot = readout.tile_noise.get("output", 0.0), readout.tile_noise.get("shot", 0.0)
    params = device_constant((sigma_output * fs, sigma_shot, fs, step), torch.float64, a.device)
    out_key = rng.key(readout.seed, readout.repeat, "output", readout.layer)
    shot_key = rng.key(readout.seed, readout.repeat, "shot", readout.layer)
    acc_lo, acc_hi = int_range(readout.acc_bits, signed=True)
    # 64 bits: the int64 sum is the accumulator itself, its wrap-around is the hardware's
    overflow = "none" if readout.overflow == "wrap" and readout.acc_bits >= 64 else readout.overflow
    bias = None if bias_codes is None else bias_codes.to(device=a.device, dtype=torch.int64).contiguous()
    shift = None if shift is None else shift.to(device=a.device, dtype=torch.int64).contiguous()
    int8 = a.dtype == torch.int8
    block_m, block_o = BLOCK_M, min(BLOCK_O, max(16, triton.next_power_of_2(o)))
    block_k = max(32 if int8 else 16, min(64, triton.next_power_of_2(readout.tile)))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(o, block_o), g)
    triton_tile.tile_step_kernel[grid](
        a, w, ids, params, acc if bias is None else bias, acc if shift is None else shift, acc,
        acc if sums is None else sums, counts,
        m, k, o, math.ceil(k / readout.tile), readout.tile, m // len(ids),
        *a.stride(), *w.stride(), *out_key, *shot_key, max_int(readout.adc_bits or 2, signed=True), acc_lo, acc_hi,
        OUTPUT=bool(sigma_output), SHOT=bool(sigma_shot), DIVIDE=step != 1.0,
        CLIP=readout.adc_bits is not None, BIAS_AT="none" if bias is None else readout.bias_at, OVERFLOW=overflow,
        F64=readout.dtype == torch.float64, EXACT=sums is not None, INT8=int8, SHIFT=shift is not None,
        ALIGNED=o % 4 == 0,
        BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_K=block_k, enable_fp_fusion=False,
    )
