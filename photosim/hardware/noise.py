"""Analog noise models on tile values and weights, as pure functions of a standard-normal draw ``e``, and the
input side's laws (modulator transfer, DAC noise) and the detector's saturation.

Drawing ``e`` is the job of ``photosim.hardware.rng`` (one seeded stream per effect, indexed by sample),
so each model here is a one-line law that tests can check against its analytic statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from photosim.ir import ieee

# (tile values p, sigma, full scale FS, standard normals e, the effect's per-tile signal or None) -> noisy p
TileNoise = Callable[[torch.Tensor, float, float, torch.Tensor, torch.Tensor | None], torch.Tensor]
WeightNoise = Callable[[torch.Tensor, float, float, torch.Tensor], torch.Tensor]
Transfer = Callable[[torch.Tensor, float], torch.Tensor]  # (operands x - z_in, Xmax) -> modulated operands
TILE_NOISE: dict[str, TileNoise] = {}
WEIGHT_NOISE: dict[str, WeightNoise] = {}
MODULATOR_TRANSFERS: dict[str, Transfer] = {}  # DACConfig.transfer -> its law


def _register(table: dict, name: str) -> Callable:
    def decorator(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"law {name!r} is registered twice")
        table[name] = fn
        return fn

    return decorator


@_register(TILE_NOISE, "output")
def output_noise(p: torch.Tensor, sigma: float, full_scale: float, e: torch.Tensor,
                 signal: torch.Tensor | None = None) -> torch.Tensor:
    """Additive thermal / detector noise: std = sigma * FS, independent of the signal."""
    return p + (sigma * full_scale) * e


@_register(TILE_NOISE, "shot")
def shot_noise(p: torch.Tensor, sigma: float, full_scale: float, e: torch.Tensor,
               signal: torch.Tensor | None = None) -> torch.Tensor:
    """Signal-dependent noise: std = sigma * sqrt(|p| * FS) (variance grows with the detected power), the square
    root correctly rounded (photosim.ir.ieee) as the compiled readouts take it."""
    return p + sigma * ieee.sqrt(p.abs() * full_scale) * e


@_register(TILE_NOISE, "photocurrent")
def photocurrent_noise(p: torch.Tensor, sigma: float, full_scale: float, e: torch.Tensor,
                       signal: torch.Tensor | None = None) -> torch.Tensor:
    """Shot noise of the tile's real photocurrent: std = sigma * sqrt(FS * light), ``signal`` the tile's detected
    light in product units (sum |x_i| Wmax or sum |x_i w_i|, float64), at most FS."""
    assert signal is not None
    return p + sigma * ieee.sqrt(signal * full_scale) * e


@_register(TILE_NOISE, "rin")
def intensity_noise(p: torch.Tensor, sigma: float, full_scale: float, e: torch.Tensor,
                    signal: torch.Tensor | None = None) -> torch.Tensor:
    """Laser intensity noise carried by the signal: std = sigma * sqrt(sum (x_i w_i)^2) (``signal``: that sum, one
    laser per input) or sigma * |p| (None: one laser for all inputs)."""
    spread = p.abs() if signal is None else ieee.sqrt(signal)
    return p + sigma * spread * e


# The variance each signal-dependent law adds to a tile value, (p, sigma, FS, signal) -> tensor broadcastable to p:
# what a link budget predicts from a layer's real light and signal.
SIGNAL_NOISE_VARIANCE: dict[str, Callable[[torch.Tensor, float, float, torch.Tensor | None], torch.Tensor]] = {
    "photocurrent": lambda p, sigma, full_scale, light: sigma ** 2 * full_scale * light,
    "rin": lambda p, sigma, full_scale, power: sigma ** 2 * (p.double() ** 2 if power is None else power),
}


@_register(WEIGHT_NOISE, "multiplicative")
def multiplicative_weight_noise(w: torch.Tensor, sigma: float, w_max: float, e: torch.Tensor) -> torch.Tensor:
    """Relative programming / read error: w * (1 + sigma * e)."""
    return w * (1.0 + sigma * e)


@_register(WEIGHT_NOISE, "additive")
def additive_weight_noise(w: torch.Tensor, sigma: float, w_max: float, e: torch.Tensor) -> torch.Tensor:
    """Absolute error relative to the largest weight code: w + sigma * Wmax * e."""
    return w + (sigma * w_max) * e


# The modulator transfers act on the drive fraction u = |x| / Xmax in [0, 1] and keep the sign of x. A Mach-Zehnder
# modulator transmits T(V) = cos^2(phi0 / 2 - pi V / (2 V_pi)) of the power (Saleh and Teich, Fundamentals of
# Photonics, 2nd ed., Wiley 2007, sec. 20.1B), and in push-pull (no chirp) the field cos(phi0 / 2 - pi V / (2 V_pi));
# biased at null (phi0 = pi) and driven with V = u V_pi these are sin^2(pi u / 2) and sin(pi u / 2).


@_register(MODULATOR_TRANSFERS, "linear")
def linear_transfer(x: torch.Tensor, x_max: float) -> torch.Tensor:
    """An ideal modulator: the light follows the code."""
    return x


@_register(MODULATOR_TRANSFERS, "sin2")
def intensity_mzm_transfer(x: torch.Tensor, x_max: float) -> torch.Tensor:
    """An intensity MZM biased at null, driven up to V_pi (incoherent cores): Xmax sin^2(pi |x| / (2 Xmax)), signed."""
    return torch.sign(x) * x_max * torch.sin(x.abs() * (math.pi / (2.0 * x_max))).square()


@_register(MODULATOR_TRANSFERS, "sin")
def field_mzm_transfer(x: torch.Tensor, x_max: float) -> torch.Tensor:
    """A field MZM biased at null, driven up to V_pi (coherent cores): Xmax sin(pi |x| / (2 Xmax)), signed."""
    return torch.sign(x) * x_max * torch.sin(x.abs() * (math.pi / (2.0 * x_max)))


def dac_sigma(input_range: float, enob: float) -> float:
    """The input noise std, in codes, of an ENOB-bit conversion over ``input_range`` codes: the quantization noise
    of an ideal ENOB-bit converter over that range, range / (2^ENOB sqrt(12))."""
    return input_range / (2.0 ** enob * math.sqrt(12.0))


def dac_noise(x: torch.Tensor, sigma: float, e: torch.Tensor) -> torch.Tensor:
    """Input conversion noise on every operand: x + sigma * e (sigma in codes, dac_sigma)."""
    return x + sigma * e


def detector_saturation(p: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A photodetector / TIA that saturates: tile values clamped to +-limit (product units), and the mask of the
    values it clamped."""
    saturated = p.abs() > limit
    return p.clamp(-limit, limit), saturated


# SNR and ENOB are referenced to the tile's DC full scale FS (signal power FS^2, as ``sigma`` is a fraction of FS).
# An ideal N-bit quantizer over +-FS has steps 2 FS / 2^N and noise power step^2 / 12 = FS^2 / (3 * 4^N), so
# SNR = 20 log10(2) N + 10 log10(3) = 6.02 N + 4.77 dB. (The 1.76 dB of data sheets is for a full-scale sine,
# whose power is FS^2 / 2; using it against FS^2 overstates ENOB by half a bit.)
DB_PER_BIT = 20.0 * math.log10(2.0)
FULL_SCALE_DB = 10.0 * math.log10(3.0)


def sigma_from_snr_db(snr_db: float) -> float:
    """Output-noise sigma (fraction of full scale) for SNR = 20 log10(FS / noise std)."""
    return 10.0 ** (-snr_db / 20.0)


def sigma_from_enob(enob: float) -> float:
    """Output-noise sigma for an effective number of bits: the noise of an ideal ENOB-bit quantizer over +-FS,
    1 / (sqrt(3) 2^ENOB), i.e. SNR_dB = 6.02 ENOB + 4.77."""
    return sigma_from_snr_db(DB_PER_BIT * enob + FULL_SCALE_DB)


def snr_db(signal_power: float, error_power: float) -> float:
    """10 log10(signal / error) in dB; +inf when there is no error."""
    if error_power <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / error_power)


def enob(snr: float) -> float:
    """Effective bits of an SNR in dB referenced to the full scale FS^2 (inverse of 6.02 ENOB + 4.77)."""
    return (snr - FULL_SCALE_DB) / DB_PER_BIT
