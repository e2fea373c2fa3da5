"""ONNX nodes and constants as photosim values: activation quantization from QuantizeLinear parameters, dequantized
weights, conv / pool / linear attributes, and the float op waiting for its QuantizeLinear (photosim.frontend.onnx_import
walks the graph with them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from photosim.ir.format import QParams
from photosim.ir.ranges import MAX_BITS, MIN_BITS, int_range

try:
    from onnx import helper
except ImportError:  # the onnx extra is not installed: the importer's entry points say how to install it
    helper = None


@dataclass(frozen=True)
class Codes:
    """An integer tensor of the photosim graph: its name there and its quantization."""

    name: str
    q: QParams


@dataclass(frozen=True)
class Weight:
    """A constant dequantized by DequantizeLinear: integer codes, scales and zero points (broadcast on axis 0)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


@dataclass
class Pending:
    """A float op on views of codes, waiting for the QuantizeLinear that gives its output quantization; ``low`` and
    ``high`` are the real bounds of a Relu / Clip between them."""

    op: str
    source: Any  # the ONNX node
    inputs: list[Codes]
    attrs: dict[str, Any]
    weight: Weight | None = None
    bias: Any = None  # Weight (integer bias), np.ndarray (float bias) or None
    low: float = -np.inf
    high: float = np.inf
    after: list[tuple[Any, str, dict[str, Any]]] = field(default_factory=list)  # moving ops on the quantized result


def attributes(node: Any) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def bits_for(lo: int, hi: int, signed: bool) -> int:
    """The fewest bits (MIN_BITS ..) whose signed or unsigned range holds [lo, hi]."""
    return next((b for b in range(MIN_BITS, MAX_BITS + 1) if int_range(b, signed)[0] <= lo and hi <= int_range(
        b, signed)[1]), MAX_BITS)


def activation(scale: np.ndarray, zero_point: np.ndarray | None, where: str) -> QParams:
    """8-bit activation quantization from a QuantizeLinear / DequantizeLinear's scale and zero point."""
    if scale.size != 1 or (zero_point is not None and zero_point.size != 1):
        raise Refused(where, "per-axis activation quantization; photosim activations have one scale and zero point")
    signed = bool(zero_point is not None and zero_point.dtype == np.int8)
    if zero_point is not None and zero_point.dtype not in (np.int8, np.uint8):
        raise Refused(where, f"{zero_point.dtype} codes; photosim imports int8 and uint8 activations")
    lo, hi = int_range(8, signed)
    zero = 0 if zero_point is None else int(zero_point.reshape(()))
    return QParams(float(scale.reshape(())), zero, 8, signed, lo, hi)


def code_bound(value: float, q: QParams) -> int:
    """A real clamp bound as a code of ``q`` (rne(v / s) + z, within the storage range)."""
    code = int(np.round(np.float32(value) / np.float32(q.scale))) + q.zero_point if np.isfinite(value) else (
        q.qmin if value < 0 else q.qmax)
    return min(max(code, q.qmin), q.qmax)


class Refused(Exception):
    """A node photosim cannot import, with the reason (collected, then reported together)."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")


def quantize_constant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """QuantizeLinear of a constant (ONNX: saturate(rne(x / s) + z)), per tensor or along ``axis``."""
    dtype = np.uint8 if zero_point is None else zero_point.dtype
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis] = -1
    z = np.zeros(()) if zero_point is None else zero_point.astype(np.int64).reshape(shape)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32).reshape(shape)) + z
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def conv_attrs(node: Any, weight_shape: tuple[int, ...], where: str) -> dict[str, Any]:
    a = attributes(node)
    if len(weight_shape) != 4 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Refused(where, "only 2-D convolutions with explicit pads are supported")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise Refused(where, f"asymmetric pads {pads}; photosim pads both sides alike")
    groups = int(a.get("group", 1))
    return {"in_channels": int(weight_shape[1]) * groups, "out_channels": int(weight_shape[0]),
            "kernel": list(a.get("kernel_shape", weight_shape[2:])), "stride": list(a.get("strides", [1, 1])),
            "padding": pads[:2], "dilation": list(a.get("dilations", [1, 1])), "groups": groups}


def linear_attrs(weight: Weight) -> dict[str, Any]:
    return {"in_features": int(weight.codes.shape[1]), "out_features": int(weight.codes.shape[0])}


def maxpool_attrs(node: Any, where: str) -> dict[str, Any]:
    a = attributes(node)
    kernel = list(a["kernel_shape"])
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if len(kernel) != 2 or pads[:2] != pads[2:] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Refused(where, "only 2-D max pools with equal explicit pads on both sides are supported")
    return {"kernel": kernel, "stride": list(a.get("strides", [1, 1])), "padding": pads[:2],
            "dilation": list(a.get("dilations", [1, 1])), "ceil_mode": bool(a.get("ceil_mode", 0))}
