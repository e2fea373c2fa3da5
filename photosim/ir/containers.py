"""8-bit containers of activation codes, as ONNX files and ONNX Runtime's kernels hold them.

ONNX Runtime's quantized kernels take int8 or uint8 tensors, one type per kernel (QLinearConv's input and output
alike). photosim codes of at most 8 bits fit either container: moving codes to the other one adds or subtracts 128
from the codes, their zero point and their clamp range together, which keeps every real value
(``s * (code - zero_point)``) and every centred code (``code - zero_point``) unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from photosim.ir.format import QParams
from photosim.ir.ranges import int_range

CONTAINER_BITS = 8
SHIFT = 1 << (CONTAINER_BITS - 1)  # uint8 code - SHIFT = the int8 code of the same value


def container_range(signed: bool) -> tuple[int, int]:
    """The code range of the 8-bit container: [-128, 127] or [0, 255]."""
    return int_range(CONTAINER_BITS, signed)


def shift_to(q: QParams, signed: bool) -> int:
    """What to add to codes of ``q`` to hold them in the ``signed`` (or unsigned) 8-bit container: 0, +128 or -128."""
    return 0 if q.signed == signed else (SHIFT if q.signed else -SHIFT)


def in_container(q: QParams, signed: bool) -> QParams:
    """The quantization of ``q``'s codes once held in the other 8-bit container (``q`` itself when it is already)."""
    shift = shift_to(q, signed)
    if shift == 0:
        return q
    return replace(q, zero_point=q.zero_point + shift, signed=signed, bits=CONTAINER_BITS, qmin=q.qmin + shift,
                   qmax=q.qmax + shift)


def clamp_needed(q: QParams) -> bool:
    """Whether codes of ``q`` clamp to a range narrower than their container's (sub-8-bit codes, or a ReLU whose
    zero point is not the container's end): ONNX needs an integer Clip there."""
    return (q.qmin, q.qmax) != container_range(q.signed)
