"""The ideal integer conv/linear path on CUDA: three kernels per layer, codes kept channels_last.

Per layer: photosim.engine.triton_patches builds the int8 (or float) operands in one pass, ``torch._int_mm``
(or one float matmul, when the plan covers K in a single exact chunk) forms the accumulators, and the epilogue
of photosim.engine.triton_requant turns them into int32 codes. The epilogue writes (N*OH*OW, O) rows, an
NHWC buffer returned as a channels_last (N, O, OH, OW) view: no permute, and the next layer's patch kernel
reads it as it is. torch's version (photosim.engine.kernels.conv2d_acc, then FloatRequant) moves about
140 bytes per output element through int64 and float64 temporaries; this one about 35, most of them the
GEMM's. Applies to the ``float`` requant mode and one group (photosim.engine.backends' cuda-ideal backend says
when; it runs grouped and depthwise layers on photosim.engine.triton_conv's kernels, whose ImplicitLayer subclasses
FusedLayer); the results are the same codes bit for bit.

Imports Triton: the engine imports this module only for CUDA devices where Triton is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from photosim.engine import triton_patches, triton_requant
from photosim.engine.kernels import CUDA_INT_MM_MIN_ROWS, PATCH_BYTES, IntegerWeights, IntPair
from photosim.engine.requant import RequantParams, float_multiplier, quantize_multiplier
from photosim.ir.format import QParams
from photosim.ir.ops import conv_output_size

# FloatRequant.add and FixedPointRequant.add in one pass each, for the engine's add nodes (by requant mode)
ADDS = {"float": triton_requant.add_codes, "fixedpoint": triton_requant.add_codes_fixedpoint}


@dataclass(frozen=True)
class FusedLayer:
    """A conv/linear prepared for this path: matmul weights and the epilogue's per-channel constants."""

    weights: IntegerWeights
    shift: torch.Tensor  # (O,) int64: the int_mm offset correction plus the integer bias
    multiplier: torch.Tensor  # (O,) float64, FloatRequant's
    output: QParams
    fixedpoint: tuple[torch.Tensor, torch.Tensor] | None = None  # (O,) int64 q and exponent: FixedPointRequant's

    @classmethod
    def prepare(cls, weights: IntegerWeights, params: RequantParams, mode: str = "float") -> FusedLayer:
        """Fold the offset correction into the bias; take the float mode's multiplier, and for the ``fixedpoint``
        mode its quantized multipliers (requant.quantize_multiplier of the same real multiplier)."""
        shift = params.bias.to(torch.int64)
        if weights.correction is not None:
            shift = shift + weights.correction.view(-1)
        multiplier = float_multiplier(params).contiguous()
        fixedpoint = None
        if mode == "fixedpoint":
            q, exponent = quantize_multiplier(multiplier)
            fixedpoint = (q.contiguous(), exponent.contiguous())
        return cls(weights, shift.contiguous(), multiplier, params.output, fixedpoint)

    def _matmul(self, patches: torch.Tensor) -> torch.Tensor:
        """Operands (rows, K') -> raw accumulators (rows, O'): int32 from int_mm, exact integers otherwise."""
        matrix = self.weights.matrix[0]
        return torch._int_mm(patches, matrix) if self.weights.plan.path == "int_mm" else patches @ matrix

    def _rows(self, x: torch.Tensor, z_in: int, kernel: IntPair, stride: IntPair, padding: IntPair,
              dilation: IntPair, out: torch.Tensor) -> None:
        """Codes (n, C, H, W) -> their output codes written into ``out`` (n*OH*OW, O)."""
        plan = self.weights.plan
        min_rows = CUDA_INT_MM_MIN_ROWS if plan.path == "int_mm" else 0
        patches = triton_patches.patches(x, z_in, plan.offset, kernel, stride, padding, dilation, plan.dtype,
                                         self.weights.matrix.shape[1], min_rows)
        acc = self._matmul(patches)
        if self.fixedpoint is None:
            triton_requant.requantize_rows(acc, self.shift, self.multiplier, self.output, out)
        else:  # the backend proved acc + shift within int32 (FixedPointRequant's check)
            triton_requant.requantize_rows_fixedpoint(acc, self.shift, *self.fixedpoint, self.output, out)

    def conv(self, x: torch.Tensor, z_in: int, kernel: IntPair, stride: IntPair, padding: IntPair,
             dilation: IntPair) -> torch.Tensor:
        """Codes (N, C, H, W), any layout -> int32 output codes (N, O, OH, OW), channels_last.

        Large batches go in sub-batches whose operands stay under PATCH_BYTES, as in kernels.conv2d_acc.
        """
        n, _, h, w = x.shape
        oh, ow = (conv_output_size(*args) for args in zip((h, w), kernel, stride, padding, dilation))
        o = self.shift.numel()
        out = torch.empty((n * oh * ow, o), dtype=torch.int32, device=x.device)
        per_sample = oh * ow * self.weights.matrix.shape[1] * self.weights.matrix.element_size()
        step = max(1, PATCH_BYTES // max(per_sample, 1))
        for start in range(0, n, step):
            stop = min(n, start + step)
            self._rows(x[start:stop], z_in, kernel, stride, padding, dilation, out[start * oh * ow : stop * oh * ow])
        return out.view(n, oh, ow, o).permute(0, 3, 1, 2)

    def linear(self, x: torch.Tensor, z_in: int) -> torch.Tensor:
        """Codes (N, K) -> int32 output codes (N, O)."""
        out = torch.empty((x.shape[0], self.shift.numel()), dtype=torch.int32, device=x.device)
        if len(x):
            self._rows(x[:, :, None, None], z_in, (1, 1), (1, 1), (0, 0), (1, 1), out)
        return out
