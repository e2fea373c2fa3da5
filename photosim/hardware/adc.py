"""Per-tile analog-to-digital conversion: round to the nearest step, clip at the range, count clips."""

from __future__ import annotations

import torch

from photosim.ir import ieee
from photosim.ir.ranges import max_int, narrow_range


def adc_step(full_range: float, bits: int) -> float:
    """Step (LSB) in units of one integer product for a symmetric ``bits``-bit ADC spanning +-range.

    Codes are ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` so +-range maps to the end codes. A step finer than one
    product resolves nothing more on integer tile sums, so it is capped at 1: an ADC with enough bits is
    exactly the ideal readout.
    """
    return max(1.0, full_range / max_int(bits, signed=True))


def digitize(p: torch.Tensor, step: float, bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Analog tile values -> int64 ADC codes (round half to even, clip); also the mask of clipped values.

    ``bits=None`` is the ideal readout: round to the integer grid, never clip.
    """
    codes = torch.round(ieee.divide(p, step)) if step != 1.0 else torch.round(p)
    if bits is None:
        return codes.to(torch.int64), torch.zeros_like(codes, dtype=torch.bool)
    lo, hi = narrow_range(bits)
    clipped = codes.abs() > hi
    return codes.clamp(lo, hi).to(torch.int64), clipped
