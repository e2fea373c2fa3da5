"""Requantization modes: integer accumulators -> output activation codes.

Each mode is a registered object with three integer kernels (pure functions of tensors):
``requantize`` for conv/linear accumulators, ``add`` for residual adds and ``average`` for the
window sums of average pooling. ``float`` is the default; ``fixedpoint`` is gemmlowp / TFLite's
int32 pipeline. See docs/format.md for the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from photosim.errors import PhotosimError
from photosim.ir.format import QParams
from photosim.ir.ranges import int_range

INT32_MIN, INT32_MAX = int_range(32)


@dataclass(frozen=True)
class RequantParams:
    """What a conv/linear layer needs to turn its accumulator into output codes."""

    input_scale: float
    weight_scale: torch.Tensor  # (O,) float64 holding the file's float32 scales
    output: QParams
    bias: torch.Tensor  # (O,) int64, units of input_scale * weight_scale
    bias_float: torch.Tensor | None  # (O,) float32 real-valued bias, only for models imported from PyTorch
    per_channel: bool  # weight scales are per output channel in the file
    kernel: str  # PyTorch library this layer runs in under `pytorch` requant: "fbgemm" or "onednn"
    node: str = ""  # the layer's name, for error messages


class RequantMode(Protocol):
    """Interface of a requantization mode."""

    name: str
    integer_bias: bool  # True: the engine adds the integer bias into the accumulator before requantize
    float_accumulators: bool  # True: requantize also takes float64 tensors holding the integer accumulators
    unsupported: frozenset[str]  # ops of photosim.ir.ops this mode has no rule for (refused when the engine is built)
    max_bits: int | None  # widest codes (activations and weights) the mode has a rule for; None: any

    def requantize(self, acc: torch.Tensor, p: RequantParams) -> torch.Tensor:
        """int64 accumulators (N, O, *spatial) -> int32 output codes clamped to p.output.qmin..qmax."""
        ...

    def add(self, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out: QParams) -> torch.Tensor:
        """Residual add of two code tensors -> int32 output codes."""
        ...

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        """Average pooling: window sums of (code - z_in) (N, C, OH, OW) and divisors broadcastable to them
        (int64, (1, 1, OH, OW)) -> int32 output codes."""
        ...

    def rescale(self, x: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        """Codes of ``qin`` -> the same values as codes of ``out`` (concat's inputs)."""
        ...

    def requantize_products(self, products: torch.Tensor, qa: QParams, qb: QParams, out: QParams,
                            node: str = "") -> torch.Tensor:
        """Exact int64 products (or sums of products) of ``a - z_a`` and ``b - z_b`` (mul, matmul of two
        activations) -> int32 output codes (``node``: for errors)."""
        ...


REQUANT_MODES: dict[str, RequantMode] = {}


def register_requant(mode: RequantMode) -> RequantMode:
    """Add a mode to the registry; refuses duplicate names."""
    if mode.name in REQUANT_MODES:
        raise ValueError(f"requant mode {mode.name!r} is already registered")
    REQUANT_MODES[mode.name] = mode
    return mode


def _clamp_codes(q: torch.Tensor, out: QParams) -> torch.Tensor:
    return q.clamp(out.qmin, out.qmax).to(torch.int32)


def channel_view(t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Reshape a per-output-channel vector (O,) to broadcast against (N, O, *spatial)."""
    return t.view(1, -1, *([1] * (acc.dim() - 2)))


def real_bias(p: RequantParams) -> torch.Tensor:
    """The bias as a real value, float32 (O,): the file's ``bias_float``, else the integer bias times
    ``input_scale * weight_scale`` (what a mode without an integer bias adds after the accumulator)."""
    if p.bias_float is not None:
        return p.bias_float.float()
    return (p.bias.double() * p.input_scale * p.weight_scale.double()).float()


def float_multiplier(p: RequantParams) -> torch.Tensor:
    """The float mode's per-channel multiplier ``M = s_in * s_w / s_out``: (O,) float64, on the scales' device."""
    return p.input_scale * p.weight_scale / p.output.scale


class FloatRequant:
    """``q = clamp(rne(acc * M) + z_out)`` with ``M = s_in * s_w / s_out`` in float64; integer bias."""

    name = "float"
    integer_bias = True
    float_accumulators = True
    unsupported: frozenset[str] = frozenset()
    max_bits: int | None = None

    def requantize(self, acc: torch.Tensor, p: RequantParams) -> torch.Tensor:
        """In place when ``acc`` is already a float64 tensor holding integers (less memory traffic)."""
        y = acc.double().mul_(channel_view(float_multiplier(p), acc)).round_().add_(p.output.zero_point)
        return y.clamp_(p.output.qmin, p.output.qmax).to(torch.int32)

    def add(self, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out: QParams) -> torch.Tensor:
        y = a.double().sub_(qa.zero_point).mul_(qa.scale / out.scale)
        y.add_(b.double().sub_(qb.zero_point).mul_(qb.scale / out.scale))
        return y.round_().add_(out.zero_point).clamp_(out.qmin, out.qmax).to(torch.int32)

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        y = torch.round(sums.double() * (qin.scale / out.scale) / counts.double())
        return _clamp_codes(y.to(torch.int64) + out.zero_point, out)

    def rescale(self, x: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        y = x.double().sub_(qin.zero_point).mul_(qin.scale / out.scale)
        return y.round_().add_(out.zero_point).clamp_(out.qmin, out.qmax).to(torch.int32)

    def requantize_products(self, products: torch.Tensor, qa: QParams, qb: QParams, out: QParams,
                            node: str = "") -> torch.Tensor:
        y = products.double().mul_(qa.scale * qb.scale / out.scale)
        return y.round_().add_(out.zero_point).clamp_(out.qmin, out.qmax).to(torch.int32)


register_requant(FloatRequant())


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 ``a * b + c`` rounded once, like a hardware FMA (the compiler fuses FBGEMM's mul + add).

    The product of two float32 values is exact in float64. The float64 sum is rounded to odd
    (TwoSum gives its exact error), which makes the final rounding to float32 correct: plain
    float64 rounding could land on a float32 tie and round twice.
    """
    prod = a.double() * b.double()
    c = c.double()
    s = prod + c
    t = s - prod
    err = (prod - (s - t)) + (c - t)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, math.inf, -math.inf)
    return torch.where((err != 0) & even, torch.nextafter(s, toward), s).float()


def quantize_multiplier(multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TFLite's ``QuantizeMultiplier``, elementwise: real multipliers -> int64 (q, exponent) with
    ``multiplier ~= q * 2^(exponent - 31)``, q in [2^30, 2^31) (0 for multipliers below 2^-32)."""
    mantissa, exponent = torch.frexp(multiplier.double())  # mantissa in [0.5, 1)
    scaled = mantissa * 2.0**31  # exact: a power-of-two scaling
    q = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.int64)  # round half away from zero
    exponent = exponent.to(torch.int64)
    rounded_up = q == 1 << 31
    q = torch.where(rounded_up, q // 2, q)
    exponent = exponent + rounded_up
    flushed = exponent < -31  # every bit would be shifted out
    return torch.where(flushed, 0, q), torch.where(flushed, 0, exponent)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp's SRDHM on int64 tensors holding int32 values: ``(a*b + nudge) / 2^31`` truncated,
    nudge ``2^30`` or ``1 - 2^30`` (ties toward +inf); ``INT32_MIN * INT32_MIN`` saturates."""
    ab = a * b
    nudge = torch.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    return torch.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp's RoundingDivideByPOT: ``x / 2^exponent`` rounded half away from zero (int64)."""
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + ((x & mask) > threshold)


def multiply_by_quantized_multiplier(x: torch.Tensor, q: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """TFLite's MultiplyByQuantizedMultiplier: ``x * q * 2^(exponent - 31)`` with gemmlowp rounding.

    A positive exponent is a left shift before SRDHM; it saturates to int32 (C would overflow).
    """
    left = exponent.clamp(0, 31)
    shifted = (x << left).clamp(INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, q), (-exponent).clamp(min=0))


def _scalar_multiplier(real: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    q, exponent = quantize_multiplier(torch.tensor(real, dtype=torch.float64))
    return q.to(device), exponent.to(device)


def fixedpoint_add_constants(qa: QParams, qb: QParams, out: QParams) -> tuple[int, torch.Tensor, torch.Tensor]:
    """FixedPointRequant.add's left shift and quantized multipliers (q, exponent: (3,) int64 each, for input a,
    input b and their sum), as TFLite's int8 add: left_shift 20 for int8 and 15 for int16, as much headroom as
    int32 leaves; both inputs rescaled to twice the larger input scale."""
    widest = max(abs(v - q.zero_point) for q in (qa, qb) for v in (q.qmin, q.qmax))
    left_shift = min(20, 31 - widest.bit_length())
    twice_max_scale = 2 * max(qa.scale, qb.scale)
    reals = (qa.scale / twice_max_scale, qb.scale / twice_max_scale, twice_max_scale / ((1 << left_shift) * out.scale))
    return (left_shift, *quantize_multiplier(torch.tensor(reals, dtype=torch.float64)))


def _round_half_away_div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """TFLite average pool's ``(x +- d/2) / d`` with C truncation: round half away from zero."""
    half = d // 2
    return torch.div(torch.where(x > 0, x + half, x - half), d, rounding_mode="trunc")


def _check_int32(acc: torch.Tensor, node: str) -> None:
    if acc.numel() and (int(acc.min()) < INT32_MIN or int(acc.max()) > INT32_MAX):
        raise PhotosimError(
            f"node {node!r}: accumulator values span [{int(acc.min())}, {int(acc.max())}], outside int32; the "
            "fixedpoint requant mode models gemmlowp's int32 pipeline. Simulate with `--requant float` "
            "(hardware config `requant: float`), or quantize this layer with fewer bits."
        )


class FixedPointRequant:
    """gemmlowp / TFLite integer requantization: int32 multipliers with shifts, integer bias.

    Conv/linear: ``MultiplyByQuantizedMultiplier(acc + bias, QuantizeMultiplier(s_in*s_w/s_out))``.
    add: TFLite's int8 add (inputs scaled to twice the larger input scale after a left shift).
    average: the window sum rescaled by ``s_in/s_out`` (when they differ), then divided by the window
    size rounding half away from zero, as TFLite's average pool (bit-exact when s_in == s_out, z_in == z_out).
    """

    name = "fixedpoint"
    integer_bias = True
    float_accumulators = False  # int32 bit arithmetic
    unsupported: frozenset[str] = frozenset()
    max_bits: int | None = None

    def requantize(self, acc: torch.Tensor, p: RequantParams) -> torch.Tensor:
        _check_int32(acc, p.node)
        q, exponent = quantize_multiplier(p.input_scale * p.weight_scale / p.output.scale)  # (O,) each
        y = multiply_by_quantized_multiplier(acc, channel_view(q, acc), channel_view(exponent, acc))
        return _clamp_codes(y + p.output.zero_point, p.output)

    def add(self, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out: QParams) -> torch.Tensor:
        left_shift, q, exponent = fixedpoint_add_constants(qa, qb, out)
        q, exponent = q.to(a.device), exponent.to(a.device)
        scaled_a, scaled_b = (
            multiply_by_quantized_multiplier((codes.to(torch.int64) - qc.zero_point) << left_shift, q[i], exponent[i])
            for i, (codes, qc) in enumerate(((a, qa), (b, qb)))
        )
        y = multiply_by_quantized_multiplier(scaled_a + scaled_b, q[2], exponent[2])
        return _clamp_codes(y + out.zero_point, out)

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        sums = sums.to(torch.int64)
        if qin.scale != out.scale:
            multiplier, exponent = _scalar_multiplier(qin.scale / out.scale, sums.device)
            sums = multiply_by_quantized_multiplier(sums, multiplier, exponent)
        counts = counts.to(device=sums.device, dtype=torch.int64)
        # Round the mean in the output code domain, as TFLite (which averages raw codes) does.
        return _clamp_codes(_round_half_away_div(sums + counts * out.zero_point, counts), out)

    def rescale(self, x: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        """TFLite's requantize: MultiplyByQuantizedMultiplier(x - z_in, QuantizeMultiplier(s_in / s_out)) + z_out."""
        multiplier, exponent = _scalar_multiplier(qin.scale / out.scale, x.device)
        y = multiply_by_quantized_multiplier(x.to(torch.int64) - qin.zero_point, multiplier, exponent)
        return _clamp_codes(y + out.zero_point, out)

    def requantize_products(self, products: torch.Tensor, qa: QParams, qb: QParams, out: QParams,
                            node: str = "") -> torch.Tensor:
        """TFLite's int8 mul (and batch matmul): MultiplyByQuantizedMultiplier(P, QuantizeMultiplier(s_a s_b /
        s_out)) + z_out, the products P in int32."""
        _check_int32(products, node)
        multiplier, exponent = _scalar_multiplier(qa.scale * qb.scale / out.scale, products.device)
        return _clamp_codes(multiply_by_quantized_multiplier(products, multiplier, exponent) + out.zero_point, out)


register_requant(FixedPointRequant())

# The modes that reproduce other runtimes' kernels live in their own modules; importing them here fills the
# registry wherever it is read.
from photosim.engine import (  # noqa: E402,F401
    onnx_requant,  # registers "onnxruntime" (ONNX Runtime's CPU kernels)
    torch_requant,  # registers "pytorch" (PyTorch's x86 quantized kernels)
)
