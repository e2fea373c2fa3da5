"""Integer code ranges: the one place where ``2^(b-1)`` and friends are derived.

Signed codes are two's complement ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``; the narrow
range drops the most negative signed code so that the range is symmetric (photosim's weights).
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 16  # activation and weight codes of the file format
MAX_BIAS_BITS = 64  # integer bias (stored as int64 above 32 bits)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def min_int(bits: int, signed: bool = True) -> int:
    """The smallest ``bits``-bit code: ``-2^(b-1)`` signed, 0 unsigned."""
    return -(1 << (bits - 1)) if signed else 0


def max_int(bits: int, signed: bool = True) -> int:
    """The largest ``bits``-bit code: ``2^(b-1) - 1`` signed, ``2^b - 1`` unsigned."""
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(min_int, max_int)`` of ``bits``-bit codes."""
    return min_int(bits, signed), max_int(bits, signed)


def narrow_range(bits: int) -> tuple[int, int]:
    """The symmetric signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric weights, ADC codes)."""
    top = max_int(bits, signed=True)
    return -top, top


def max_magnitude(bits: int) -> int:
    """``2^(b-1)``: the largest absolute value of a signed ``bits``-bit code (that of ``min_int``)."""
    return -min_int(bits, signed=True)


def smallest_int_dtype(lo: int, hi: int) -> torch.dtype:
    """The narrowest signed torch integer dtype holding every value of ``[lo, hi]``."""
    for dtype in _INT_DTYPES:
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise ValueError(f"range [{lo}, {hi}] does not fit int64")
