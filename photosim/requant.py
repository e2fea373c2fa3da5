"""Requantization modes: integer accumulators -> output activation codes.

Each mode is a registered object with three integer kernels (pure functions of tensors):
``requantize`` for conv/linear accumulators, ``add`` for residual adds and ``average`` for the
window sums of average pooling. ``float`` is the default; see docs/format.md for the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from photosim.format import QParams


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


class RequantMode(Protocol):
    """Interface of a requantization mode."""

    name: str
    integer_bias: bool  # True: the engine adds the integer bias into the accumulator before requantize

    def requantize(self, acc: torch.Tensor, p: RequantParams) -> torch.Tensor:
        """int64 accumulators (N, O, *spatial) -> int32 output codes clamped to p.output.qmin..qmax."""
        ...

    def add(self, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out: QParams) -> torch.Tensor:
        """Residual add of two code tensors -> int32 output codes."""
        ...

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        """Average pooling: window sums of (code - z_in) and window sizes -> int32 output codes."""
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


def _channel_view(t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Reshape a per-output-channel vector (O,) to broadcast against (N, O, *spatial)."""
    return t.view(1, -1, *([1] * (acc.dim() - 2)))


class FloatRequant:
    """``q = clamp(rne(acc * M) + z_out)`` with ``M = s_in * s_w / s_out`` in float64; integer bias."""

    name = "float"
    integer_bias = True

    def requantize(self, acc: torch.Tensor, p: RequantParams) -> torch.Tensor:
        multiplier = p.input_scale * p.weight_scale / p.output.scale  # (O,) float64
        y = torch.round(acc.double() * _channel_view(multiplier, acc))
        return _clamp_codes(y.to(torch.int64) + p.output.zero_point, p.output)

    def add(self, a: torch.Tensor, b: torch.Tensor, qa: QParams, qb: QParams, out: QParams) -> torch.Tensor:
        y = (a.double() - qa.zero_point) * (qa.scale / out.scale) + (b.double() - qb.zero_point) * (
            qb.scale / out.scale
        )
        return _clamp_codes(torch.round(y).to(torch.int64) + out.zero_point, out)

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qin: QParams, out: QParams) -> torch.Tensor:
        y = torch.round(sums.double() * (qin.scale / out.scale) / counts.double())
        return _clamp_codes(y.to(torch.int64) + out.zero_point, out)


register_requant(FloatRequant())
