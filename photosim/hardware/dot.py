"""The photonic dot product: tiles of length L, weight error, analog noise, per-tile ADC, finite accumulator.

Replaces the exact integer matmul of a layer when its hardware settings are not ideal (see
docs/hardware.md for the model and ../shared/reference/hardware-models.md for its sources).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from photosim._imports import load_object
from photosim.hardware import rng
from photosim.hardware.accumulator import accumulate
from photosim.hardware.adc import digitize
from photosim.hardware.config import LayerHardware
from photosim.hardware.noise import TILE_NOISE, WEIGHT_NOISE


@dataclass
class LayerStats:
    """Diagnostics of one layer, summed over the batches of one repeat."""

    outputs: int = 0
    overflowed: int = 0
    tile_values: int = 0
    clipped: int = 0
    signal_power: float = 0.0  # sum of ideal accumulator^2
    error_power: float = 0.0  # sum of (hardware - ideal)^2, in accumulator units
    max_abs_acc: int = 0

    def add(self, other: LayerStats) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            setattr(self, name, max(getattr(self, name), value) if name == "max_abs_acc" else
                    getattr(self, name) + value)


@dataclass
class TiledLayer:
    """What the tiled dot product needs to know about one layer besides its operands."""

    name: str
    index: int  # position in the graph: keys this layer's random streams
    hw: LayerHardware
    k: int  # dot-product length per output
    x_max: int  # largest |x - z_in|
    w_max: int  # largest |weight code|
    adc_step: float = 1.0
    adc_bits: int | None = None
    calibration: list[torch.Tensor] | None = None  # when set: collect |tile values| instead of digitizing
    stats: LayerStats = field(default_factory=LayerStats)

    @property
    def tile(self) -> int:
        return min(self.hw.tile or self.k, self.k)

    @property
    def full_scale(self) -> float:
        """FS = L * Xmax * Wmax: the largest |tile value| the codes allow."""
        return float(self.tile * self.x_max * self.w_max)


def _perturbed_weights(w: torch.Tensor, layer: TiledLayer, sample_ids: torch.Tensor, seed: int, repeat: int
                       ) -> torch.Tensor:
    """Weights (G, K, O) float64 with chip error; with read noise, one copy per sample (N, G, K, O)."""
    noise = layer.hw.noise
    wf = w.double()
    if noise.weight_static.sigma:
        e = rng.normal(tuple(w.shape), seed, repeat, "weight_static", layer.index, w.device)
        wf = WEIGHT_NOISE[noise.weight_static.kind](wf, noise.weight_static.sigma, layer.w_max, e)
    if noise.weight_read.sigma:
        e = rng.normal_per_sample(tuple(w.shape), sample_ids, seed, repeat, "weight_read", layer.index, w.device)
        wf = WEIGHT_NOISE[noise.weight_read.kind](wf.unsqueeze(0), noise.weight_read.sigma, layer.w_max, e)
    return wf


def _tile_sums(a: torch.Tensor, w: torch.Tensor, tile: int, samples: int) -> torch.Tensor:
    """Per-tile sums (G, T, M, O) of operands a (G, M, K) and weights (G, K, O) or per-sample (N, G, K, O)."""
    g, m, k = a.shape
    t = math.ceil(k / tile)
    pad = t * tile - k
    a = torch.nn.functional.pad(a, (0, pad)).view(g, m, t, tile).transpose(1, 2)  # (G, T, M, L)
    if w.dim() == 3:
        w = torch.nn.functional.pad(w, (0, 0, 0, pad)).view(g, t, tile, -1)  # (G, T, L, O)
        return torch.matmul(a, w)
    w = torch.nn.functional.pad(w, (0, 0, 0, pad)).view(samples, g, t, tile, -1)  # (N, G, T, L, O)
    a = a.unflatten(2, (samples, m // samples)).permute(2, 0, 1, 3, 4)  # (N, G, T, P, L)
    return torch.matmul(a, w).permute(1, 2, 0, 3, 4).reshape(g, t, m, -1)


def _per_sample_normal(p: torch.Tensor, sample_ids: torch.Tensor, seed: int, repeat: int, stream: str,
                       layer: int) -> torch.Tensor:
    """Standard normals shaped like p (G, T, N*P, O), drawn per sample so batching does not matter."""
    g, t, m, o = p.shape
    n = len(sample_ids)
    e = rng.normal_per_sample((g, t, m // n, o), sample_ids, seed, repeat, stream, layer, p.device)  # (N,G,T,P,O)
    return e.permute(1, 2, 0, 3, 4).reshape(g, t, m, o)


def analog_dot(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, layer: TiledLayer,
               sample_ids: torch.Tensor, seed: int, repeat: int) -> torch.Tensor:
    """Accumulators (G, M, O) int64 in ADC steps, bias included, for operands a (G, M, K) = x - z_in.

    Rows of ``a`` are ordered sample-major (N samples x P positions); ``bias`` is the layer's integer
    bias (G, O), converted here to ADC steps (round half to even) before it enters the accumulator.
    """
    hw, noise = layer.hw, layer.hw.noise
    n = len(sample_ids)
    weights = _perturbed_weights(w, layer, sample_ids, seed, repeat)
    p = _tile_sums(a.double(), weights, layer.tile, n)  # (G, T, M, O) analog tile values
    if layer.calibration is not None:
        layer.calibration.append(p.abs().flatten())
    fs = layer.full_scale
    for name, sigma in (("output", noise.output.resolved_sigma), ("shot", noise.shot.sigma)):
        if sigma:
            p = TILE_NOISE[name](p, sigma, fs, _per_sample_normal(p, sample_ids, seed, repeat, name, layer.index))
    if noise.custom.function:
        context = {"layer": layer.name, "full_scale": fs, "tile": layer.tile, "sample_ids": sample_ids,
                   "layout": "(groups, tiles, samples*positions, outputs)",
                   "normal": lambda: _per_sample_normal(p, sample_ids, seed, repeat, "custom", layer.index)}
        p = load_object(noise.custom.function, "custom noise")(p, context)
    codes, clipped = digitize(p, layer.adc_step, layer.adc_bits)
    bias_steps = None if bias is None else torch.round(bias.double() / layer.adc_step).to(torch.int64).unsqueeze(1)
    acc, overflowed = accumulate(codes.permute(0, 2, 3, 1), bias_steps, hw.accumulator.bits,
                                 hw.accumulator.overflow, hw.accumulator.bias_at)
    _record(layer, a, w, bias, acc, overflowed, clipped)
    return acc


def _record(layer: TiledLayer, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, acc: torch.Tensor,
            overflowed: torch.Tensor, clipped: torch.Tensor) -> None:
    """Add this batch's overflow, clip and SNR counts (vs the exact accumulator) to the layer's stats."""
    ideal = torch.matmul(a.double(), w.double())  # (G, M, O) exact below 2^53
    if bias is not None:
        ideal = ideal + bias.unsqueeze(1).double()
    error = acc.double() * layer.adc_step - ideal
    layer.stats.add(LayerStats(
        outputs=acc.numel(), overflowed=int(overflowed.sum()), tile_values=clipped.numel(),
        clipped=int(clipped.sum()), signal_power=float(ideal.pow(2).sum()), error_power=float(error.pow(2).sum()),
        max_abs_acc=int(acc.abs().max()) if acc.numel() else 0,
    ))
