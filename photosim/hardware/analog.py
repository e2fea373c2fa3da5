"""The photonic dot product of one layer: tiles of length L, weight error, analog noise, per-tile ADC,
finite accumulator. The engine sends a conv/linear here instead of the exact integer matmul when the
layer's hardware settings are not ideal (model: docs/hardware.md; sources:
../shared/reference/hardware-models.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from photosim import kernels
from photosim._imports import load_object
from photosim.hardware import rng
from photosim.hardware.accumulator import accumulate
from photosim.hardware.adc import adc_step, digitize
from photosim.hardware.config import LayerHardware
from photosim.hardware.noise import TILE_NOISE, WEIGHT_NOISE
from photosim.observers import ActivationObserver

# Upper bound on the bytes of the per-tile tensors of one sub-batch (tile values, noise, codes).
TILE_BYTES = 1 << 27


@dataclass
class LayerStats:
    """Diagnostics of one layer, summed over the batches of one pass."""

    outputs: int = 0
    overflowed: int = 0
    tile_values: int = 0
    clipped: int = 0
    signal_power: float = 0.0  # sum of exact accumulator^2 (product units)
    error_power: float = 0.0  # sum of (hardware - exact)^2
    max_abs_acc: int = 0  # largest |accumulator| seen, in accumulator units

    def add(self, other: LayerStats) -> None:
        """Accumulate another batch's counts into this one."""
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, max(mine, theirs) if name == "max_abs_acc" else mine + theirs)


@dataclass
class AnalogLayer:
    """One conv/linear on the photonic engine: its settings, weights, random streams and diagnostics."""

    name: str
    index: int  # position in the graph: keys this layer's random streams
    hw: LayerHardware
    weights: kernels.IntegerWeights  # float64 plan, (G, K, O/G)
    bias: torch.Tensor | None  # (G, O/G) int64 in product units; None when the requant mode adds a float bias
    x_max: int  # largest |x - z_in| the input clamp range allows
    w_max: int  # largest |weight code|: 2^(w_bits-1)
    seed: int = 0
    repeat: int = 0
    adc_range: float | None = None  # +-range in product units (None: full scale)
    calibration: ActivationObserver | None = None  # set: record |tile values| for a calibrated ADC range
    diagnostics: bool = True  # also compute the SNR against the exact accumulator (one more matmul)
    stats: LayerStats = field(default_factory=LayerStats)

    @property
    def tile(self) -> int:
        """L, the dot-product length of one optical core (at most K)."""
        return min(self.hw.tile or self.weights.k, self.weights.k)

    @property
    def tiles(self) -> int:
        """T = ceil(K / L)."""
        return math.ceil(self.weights.k / self.tile)

    @property
    def full_scale(self) -> float:
        """FS = L * Xmax * Wmax: the largest |tile value| the codes allow."""
        return float(self.tile * self.x_max * self.w_max)

    @property
    def adc_bits(self) -> int | None:
        """ADC bits in use (None: ideal readout, also while calibrating)."""
        return None if self.calibration is not None else self.hw.adc.bits

    @property
    def step(self) -> float:
        """ADC step in product units (1 for the ideal readout)."""
        if self.adc_bits is None:
            return 1.0
        return adc_step(self.full_scale if self.adc_range is None else self.adc_range, self.adc_bits)

    def conv_acc(self, x: torch.Tensor, z_in: int, attrs: dict, sample_ids: torch.Tensor) -> torch.Tensor:
        """Codes (N, C, H, W) -> accumulators (N, O, OH, OW) int64 in ADC steps, bias included."""
        kernel, stride, padding, dilation = (kernels.pair(attrs[k]) for k in ("kernel", "stride", "padding",
                                                                               "dilation"))
        groups = attrs["groups"]
        n, _, h, w = x.shape
        oh, ow = (kernels.conv_output_size(*args) for args in zip((h, w), kernel, stride, padding, dilation))
        per_sample = oh * ow * self.tiles * self.weights.out_per_group * groups * 8 * 3
        step = max(1, TILE_BYTES // max(per_sample, 1))
        outs = []
        for start in range(0, n, step):
            patches = kernels.conv2d_patches(x[start:start + step], z_in, self.weights.plan, kernel, stride, padding,
                                             dilation, groups)  # (G, n*OH*OW, K) float64
            acc = self.dot(patches, sample_ids[start:start + step])  # (G, n*OH*OW, O/G)
            acc = acc.view(groups, -1, oh, ow, acc.shape[-1]).permute(1, 0, 4, 2, 3)  # (n, G, O/G, OH, OW)
            outs.append(acc.reshape(acc.shape[0], -1, oh, ow))
        return torch.cat(outs)

    def linear_acc(self, x: torch.Tensor, z_in: int, sample_ids: torch.Tensor) -> torch.Tensor:
        """Codes (N, K) -> accumulators (N, O) int64 in ADC steps, bias included."""
        return self.dot(kernels.centred(x, z_in, self.weights.plan).unsqueeze(0), sample_ids)[0]

    def dot(self, a: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Operands a (G, M, K) = x - z_in, rows sample-major -> accumulators (G, M, O/G) in ADC steps."""
        noise = self.hw.noise
        weights = self._perturbed_weights(sample_ids)
        p = _tile_sums(a, weights, self.tile, len(sample_ids))  # (G, T, M, O) analog tile values
        if self.calibration is not None:
            self.calibration.update(p.abs())
        fs = self.full_scale
        for name, sigma in (("output", noise.output.resolved_sigma), ("shot", noise.shot.sigma)):
            if sigma:
                p = TILE_NOISE[name](p, sigma, fs, self._normal_like(p, sample_ids, name))
        if noise.custom.function:
            context = {"layer": self.name, "full_scale": fs, "tile": self.tile, "sample_ids": sample_ids,
                       "normal": lambda: self._normal_like(p, sample_ids, "custom")}
            p = load_object(noise.custom.function, "custom noise")(p, context)
        step = self.step
        codes, clipped = digitize(p, step, self.adc_bits)
        bias = None if self.bias is None else torch.round(self.bias.double() / step).to(torch.int64).unsqueeze(1)
        acc, overflowed = accumulate(codes.permute(0, 2, 3, 1), bias, self.hw.accumulator.bits,
                                     self.hw.accumulator.overflow, self.hw.accumulator.bias_at)  # (G, M, O)
        self._record(a, acc, step, overflowed, clipped)
        return acc

    def _perturbed_weights(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """Weights (G, K, O) float64 with chip error; with read noise one copy per sample (N, G, K, O)."""
        noise, w = self.hw.noise, self.weights.matrix
        if noise.weight_static.sigma:
            e = rng.normal(tuple(w.shape), self.seed, self.repeat, "weight_static", self.index, w.device)
            w = WEIGHT_NOISE[noise.weight_static.kind](w, noise.weight_static.sigma, self.w_max, e)
        if noise.weight_read.sigma:
            e = rng.normal_per_sample(tuple(w.shape), sample_ids, self.seed, self.repeat, "weight_read", self.index,
                                      w.device)
            w = WEIGHT_NOISE[noise.weight_read.kind](w.unsqueeze(0), noise.weight_read.sigma, self.w_max, e)
        return w

    def _normal_like(self, p: torch.Tensor, sample_ids: torch.Tensor, stream: str) -> torch.Tensor:
        """Standard normals shaped like p (G, T, N*P, O), drawn per sample so batching does not matter."""
        g, t, m, o = p.shape
        n = len(sample_ids)
        e = rng.normal_per_sample((g, t, m // n, o), sample_ids, self.seed, self.repeat, stream, self.index,
                                  p.device)  # (N, G, T, P, O)
        return e.permute(1, 2, 0, 3, 4).reshape(g, t, m, o)

    def _record(self, a: torch.Tensor, acc: torch.Tensor, step: float, overflowed: torch.Tensor,
                clipped: torch.Tensor) -> None:
        """Add this batch's overflow, clip and (with diagnostics) SNR counts to the stats."""
        batch = LayerStats(outputs=acc.numel(), overflowed=int(overflowed.sum()), tile_values=clipped.numel(),
                           clipped=int(clipped.sum()), max_abs_acc=int(acc.abs().max()) if acc.numel() else 0)
        if self.diagnostics:
            exact = torch.matmul(a, self.weights.matrix)  # (G, M, O) exact: float64 below 2^53
            if self.bias is not None:
                exact += self.bias.unsqueeze(1)
            batch.signal_power = float(exact.pow(2).sum())
            batch.error_power = float((acc.double() * step - exact).pow(2).sum())
        self.stats.add(batch)


def _tile_sums(a: torch.Tensor, w: torch.Tensor, tile: int, samples: int) -> torch.Tensor:
    """Per-tile sums (G, T, M, O) of a (G, M, K) with weights (G, K, O), or per-sample weights (N, G, K, O)."""
    g, m, k = a.shape
    t = math.ceil(k / tile)
    pad = t * tile - k
    a = torch.nn.functional.pad(a, (0, pad)).view(g, m, t, tile).transpose(1, 2)  # (G, T, M, L)
    if w.dim() == 3:
        return torch.matmul(a, torch.nn.functional.pad(w, (0, 0, 0, pad)).view(g, t, tile, -1))
    w = torch.nn.functional.pad(w, (0, 0, 0, pad)).view(samples, g, t, tile, -1)  # (N, G, T, L, O)
    a = a.unflatten(2, (samples, m // samples)).permute(2, 0, 1, 3, 4)  # (N, G, T, P, L)
    return torch.matmul(a, w).permute(1, 2, 0, 3, 4).reshape(g, t, m, -1)

