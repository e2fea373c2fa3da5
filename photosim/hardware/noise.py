"""Analog noise models on tile values and weights, as pure functions of a standard-normal draw ``e``.

Drawing ``e`` is the job of ``photosim.hardware.rng`` (one seeded stream per effect, indexed by sample),
so each model here is a one-line law that tests can check against its analytic statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from photosim.hardware import philox

TileNoise = Callable[[torch.Tensor, float, float, torch.Tensor], torch.Tensor]
WeightNoise = Callable[[torch.Tensor, float, float, torch.Tensor], torch.Tensor]
TILE_NOISE: dict[str, TileNoise] = {}
WEIGHT_NOISE: dict[str, WeightNoise] = {}


def _register(table: dict, name: str) -> Callable:
    def decorator(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"noise model {name!r} is registered twice")
        table[name] = fn
        return fn

    return decorator


@_register(TILE_NOISE, "output")
def output_noise(p: torch.Tensor, sigma: float, full_scale: float, e: torch.Tensor) -> torch.Tensor:
    """Additive thermal / detector noise: std = sigma * FS, independent of the signal."""
    return p + (sigma * full_scale) * e


@_register(TILE_NOISE, "shot")
def shot_noise(p: torch.Tensor, sigma: float, full_scale: float, e: torch.Tensor) -> torch.Tensor:
    """Signal-dependent noise: std = sigma * sqrt(|p| * FS) (variance grows with the detected power).

    float32 takes the correctly rounded square root (philox.sqrt32; torch's CPU sqrt is not), which the compiled
    CPU readout (photosim.engine.fused_cpu) repeats bit for bit."""
    power = p.abs() * full_scale
    root = philox.sqrt32(power) if p.dtype == torch.float32 else torch.sqrt(power)
    return p + sigma * root * e


@_register(WEIGHT_NOISE, "multiplicative")
def multiplicative_weight_noise(w: torch.Tensor, sigma: float, w_max: float, e: torch.Tensor) -> torch.Tensor:
    """Relative programming / read error: w * (1 + sigma * e)."""
    return w * (1.0 + sigma * e)


@_register(WEIGHT_NOISE, "additive")
def additive_weight_noise(w: torch.Tensor, sigma: float, w_max: float, e: torch.Tensor) -> torch.Tensor:
    """Absolute error relative to the largest weight code: w + sigma * Wmax * e."""
    return w + (sigma * w_max) * e


def sigma_from_snr_db(snr_db: float) -> float:
    """Output-noise sigma (fraction of full scale) for SNR = 20 log10(FS / noise std)."""
    return 10.0 ** (-snr_db / 20.0)


def sigma_from_enob(enob: float) -> float:
    """Output-noise sigma for an effective number of bits, via SNR_dB = 6.02 ENOB + 1.76."""
    return sigma_from_snr_db(6.02 * enob + 1.76)


def snr_db(signal_power: float, error_power: float) -> float:
    """10 log10(signal / error) in dB; +inf when there is no error."""
    if error_power <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / error_power)


def enob(snr: float) -> float:
    """Effective bits of a given SNR in dB (inverse of 6.02 ENOB + 1.76)."""
    return (snr - 1.76) / 6.02
