"""A nonlinearity of your own as a model layer: a measured or designed curve (an electro-optic modulator's or
a saturable absorber's transfer function) that PTQ turns into a lookup table of the integer file.

Example:
    >>> act = photosim.Curve([-1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.6, 0.8])  # measured points, linear between
    >>> act = photosim.Curve.of(lambda v: torch.sin(v) ** 2, -3.0, 3.0)   # a formula, sampled on 1025 points
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from photosim.errors import PhotosimError
from photosim.ir.ops import AttrError, check_curve, interpolate


class Curve(nn.Module):
    """y = f(x) through the points (x, y), linear between them and constant beyond the ends; captured as one
    ``table`` node whose points are written in the file."""

    def __init__(self, x: Sequence[float], y: Sequence[float]) -> None:
        super().__init__()
        points = [float(v) for v in x], [float(v) for v in y]
        try:
            check_curve(*points)
        except AttrError as exc:
            raise PhotosimError(f"photosim.Curve: {exc}.") from None
        self.x, self.y = points

    @classmethod
    def of(cls, function: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float, points: int = 1025) -> Curve:
        """``function`` (float64 tensor -> tensor) sampled at ``points`` evenly spaced inputs over [lo, hi]."""
        x = torch.linspace(lo, hi, points, dtype=torch.float64)
        return cls(x.tolist(), function(x).double().tolist())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return interpolate(x, self.x, self.y)
