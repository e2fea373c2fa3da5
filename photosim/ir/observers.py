"""Observers: clipping ranges for weights and activations, chosen from the tensors or calibration data.

``minmax`` keeps the full observed range, ``percentile`` clips |x| at a percentile, ``mse`` picks the
clip that minimises the quantize-dequantize mean squared error over a grid of fractions of the range.
"""

from __future__ import annotations

import torch

from photosim.ir.ranges import int_range, max_int, narrow_range

MSE_GRID = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)  # clip fractions tried by `mse`
SAMPLES_PER_BATCH = 1 << 16  # activation values kept per calibration batch for percentile / mse
MAX_SAMPLES = 1 << 20
MSE_SAMPLES = 1 << 14  # the MSE search runs on a random subset: 96 fake-quant passes over it


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.round(x / scale + zero_point).clamp(qmin, qmax) - zero_point) * scale


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [lo, hi] (float64): symmetric (zero point 0) when signed."""
    qmin, qmax = int_range(bits, signed)
    if signed:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / max_int(bits, signed=True)
        zero_point = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # the range always holds 0 exactly
        scale = (hi - lo) / (qmax - qmin)
        zero_point = torch.round(qmin - lo / scale.clamp(min=torch.finfo(torch.float64).tiny)).clamp(qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tensor: any scale works
    return scale, zero_point


def mse_clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Fraction of [lo, hi] (per row of x) whose quantization has the least MSE. x: (rows, n)."""
    qmin, qmax = narrow_range(bits) if signed else int_range(bits, signed)  # symmetric weights: narrow range
    errors = []
    for frac in MSE_GRID:
        scale, zp = affine_params(lo * frac, hi * frac, bits, signed)
        err = (_fake_quant(x, scale[:, None], zp[:, None], qmin, qmax) - x).pow(2).mean(dim=1)
        errors.append(err)
    return MSE_GRID[torch.stack(errors).argmin(dim=0)]  # (rows,)


def weight_scale(w: torch.Tensor, bits: int, per_channel: bool, method: str) -> torch.Tensor:
    """Symmetric weight scales as float32: shape (O,) per channel, () per tensor."""
    rows = w.detach().double().reshape(w.shape[0] if per_channel else 1, -1)
    amax = rows.abs().amax(dim=1)
    if method == "mse":
        amax = amax * mse_clip(rows, -amax, amax, bits, signed=True)
    scale, _ = affine_params(-amax, amax, bits, signed=True)
    scale = scale.float()
    return scale if per_channel else scale.reshape(())


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed symmetric codes in the narrow range [-(2^(b-1)-1), 2^(b-1)-1], rounded half to even."""
    qmin, qmax = narrow_range(bits)
    s = scale.double().reshape(-1, *([1] * (w.dim() - 1))) if scale.dim() else scale.double()
    return torch.round(w.detach().double() / s).clamp(qmin, qmax).to(torch.int64)


class ActivationObserver:
    """Running min/max of one activation tensor plus a seeded random sample for percentile / mse."""

    def __init__(self, seed: int = 0) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).double()
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        if flat.numel() > SAMPLES_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (SAMPLES_PER_BATCH,), generator=self.generator)]
        self.samples.append(flat)

    def clip_range(self, method: str, percentile: float, bits: int, signed: bool) -> tuple[float, float]:
        """The (lo, hi) float range to quantize, per the observer method."""
        if method == "minmax":
            return self.lo, self.hi
        sample = torch.cat(self.samples)[:MAX_SAMPLES]
        lo, hi = torch.tensor([self.lo], dtype=torch.float64), torch.tensor([self.hi], dtype=torch.float64)
        if method == "percentile":
            q = percentile / 100.0
            if signed:
                amax = torch.quantile(sample.abs(), q)
                return -float(amax), float(amax)
            return float(torch.quantile(sample, 1.0 - q).clamp(max=0.0)), float(torch.quantile(sample, q))
        if sample.numel() > MSE_SAMPLES:
            sample = sample[torch.randperm(sample.numel(), generator=self.generator)[:MSE_SAMPLES]]
        frac = float(mse_clip(sample[None, :], lo, hi, bits, signed)[0])
        return self.lo * frac, self.hi * frac

