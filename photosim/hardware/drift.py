"""Weights that drift in time: microring thermal drift and PCM conductance drift, with a recalibration period.

A chip's weights are right when it is programmed (or locked) and wander afterwards. Two devices are modelled,
one law per function, in float64 torch: a thermally tuned add-drop microring, whose resonance shifts with
temperature against its Lorentzian drop transmission, and a phase-change memory (PCM) cell pair, whose
conductance decays as (t / t0)^-nu with programming and read noise as in aihwkit's ``PCMLikeNoiseModel``.
``realised_weights`` is the engine's hook: weight codes in, the codes the chip realises at ``time_s`` out.
Every formula, default and source: docs/drift.md.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from photosim._config import StrictModel

MAX_TIME_S = 3.2e9  # about 100 years: past any device's rated retention (PCM: 10 years at 85 C)
# Nandakumar et al. (ICECS 2019) fits, as aihwkit src/aihwkit/inference/noise/pcm.py uses them:
PROGRAMMING_COEFFS_US = (0.26348, 1.9650, -1.1731)  # programming-noise std polynomial in G/Gmax, uS ...
PROGRAMMING_FIT_G_MAX_US = 25.0  # ... fitted at Gmax = 25 uS, so std / Gmax = polynomial / 25
WALK_GRID_S = tuple(2.0 ** k for k in range(-10, 33))  # the random walk's grid: 1 ms to 136 years (> MAX_TIME_S)
SMALLEST_RELATIVE_G = 1e-7  # aihwkit's _ZERO_CLIP: log(G / Gmax) of an empty device stays finite


class RingDrift(StrictModel):
    """Thermal drift of add-drop microring weights in a balanced bank (w = T_drop - T_through, Lorentzian)."""

    shift_nm_per_k: float = Field(
        0.075, ge=0, le=1, strict=True,
        description="Resonance shift per kelvin, nm/K, 0 to 1: silicon rings at 1550 nm shift 0.06-0.09 nm/K "
                    "(thermo-optic dn/dT = 1.8e-4 /K), silicon nitride about 0.01-0.02, athermal designs ~0; no "
                    "waveguide material reaches 1 nm/K.")
    fwhm_nm: float = Field(
        0.2, ge=1e-4, le=100, strict=True,
        description="Ring linewidth (full width at half maximum of the drop port), nm, 1e-4 to 100: 1e-4 nm is a "
                    "loaded Q of 1.5e7 at 1550 nm (beyond the best silicon rings), 100 nm is no resonance at all; "
                    "weight-bank rings use 0.1-0.3 nm.")
    temperature_offset_k: float = Field(
        0.0, ge=-100, le=100, strict=True,
        description="Temperature of the chip minus its temperature when the weights were locked, K, constant in "
                    "time (a step the lock does not see), -100 to 100 (a packaged chip's whole operating range).")
    random_walk_k_per_rts: float = Field(
        0.0, ge=0, le=10, strict=True,
        description="Temperature random walk of the chip since locking, K/sqrt(s): std = this * sqrt(age), one "
                    "draw per chip; 0 to 10 (10 K after one second is no package's behaviour).")
    per_ring_spread: float = Field(
        0.0, ge=0, le=1, strict=True,
        description="rms spread of each ring's temperature change around the chip's common one, as a fraction of "
                    "it, 0 to 1 (0: every ring shifts alike; 1: gradients as large as the change itself).")


class PcmDrift(StrictModel):
    """PCM weights as aihwkit's PCMLikeNoiseModel with a single device pair per weight (Nandakumar et al. 2019).

    The scales multiply aihwkit's fitted laws (1: as measured, 0: off); conductances are fractions of Gmax."""

    t0_s: float = Field(
        20.0, gt=0, le=MAX_TIME_S, strict=True,
        description="Time after programming at which the conductance is read as programmed (drift reference "
                    "t0), s; aihwkit's t_0 = 20 s. Drift runs from t0: G(age) = G_prog ((age + t0) / t0)^-nu.")
    t_read_s: float = Field(
        250e-9, gt=0, le=1, strict=True,
        description="Duration of one read (1/f noise fit), s, at most 1; aihwkit's t_read = 250 ns.")
    programming_noise_scale: float = Field(
        1.0, ge=0, le=10, strict=True, description="Scale of the programming noise, 0 to 10 (aihwkit "
                                                   "prog_noise_scale).")
    read_noise_scale: float = Field(
        1.0, ge=0, le=10, strict=True, description="Scale of the accumulated 1/f read noise, 0 to 10 (aihwkit "
                                                   "read_noise_scale).")
    drift_scale: float = Field(
        1.0, ge=0, le=10, strict=True, description="Scale of the drift exponents nu, 0 to 10 (aihwkit drift_scale).")
    global_drift_compensation: bool = Field(
        True, strict=True,
        description="Rescale the layer's weights by mean|W_programmed| / mean|W(age)|, one factor per layer "
                    "(aihwkit GlobalDriftCompensation, on by default in its InferenceRPUConfig).")


class DriftConfig(StrictModel):
    """Time since programming or calibration, the recalibration policy, and the drifting weight device."""

    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("ring", "pcm"),)
    time_s: float = Field(
        0.0, ge=0, le=MAX_TIME_S, strict=True,
        description=f"Time since the weights were programmed and locked, s, 0 to {MAX_TIME_S:g} (about 100 years, "
                    "past any device's rated retention); the sweep axis of accuracy against time.")
    recalibration_period_s: float | None = Field(
        None, gt=0, le=MAX_TIME_S, strict=True,
        description="The chip is re-locked (rings) or re-programmed (PCM) every this many seconds, so the age "
                    "of its weights is time_s mod period; null: never.")
    lock_residual_k: float = Field(
        0.0, ge=0, le=10, strict=True,
        description="rms temperature error each ring keeps after locking, K, 0 to 10 (feedback locks reach a "
                    "few mK; 10 K is no lock); rings only.")
    ring: RingDrift | None = Field(None, description="Microring thermal drift; give this or pcm.")
    pcm: PcmDrift | None = Field(None, description="PCM conductance drift; give this or ring.")

    @model_validator(mode="after")
    def _residual_needs_rings(self) -> DriftConfig:
        """Refuse a lock residual without rings: a PCM chip is re-programmed, not locked."""
        if self.lock_residual_k > 0 and self.ring is None:
            raise ValueError("lock_residual_k is a ring's temperature error after locking; give a ring section or "
                             "set it to 0")
        return self


def effective_age_s(time_s: float, recalibration_period_s: float | None) -> float:
    """Age of the weights: time since the last calibration, time_s mod the period (time_s when never)."""
    return time_s if recalibration_period_s is None else math.fmod(time_s, recalibration_period_s)


def drop_transmission(detuning_nm: torch.Tensor, fwhm_nm: float) -> torch.Tensor:
    """Lorentzian drop-port transmission of a lossless add-drop ring: 1 / (1 + (2 delta / FWHM)^2)."""
    return 1.0 / (1.0 + (2.0 * detuning_nm / fwhm_nm) ** 2)


def weight_for_detuning(detuning_nm: torch.Tensor, fwhm_nm: float) -> torch.Tensor:
    """Balanced weight T_drop - T_through = 2 T_drop - 1 in [-1, 1] (lossless: T_through = 1 - T_drop)."""
    return 2.0 * drop_transmission(detuning_nm, fwhm_nm) - 1.0


def detuning_for_weight(weight: torch.Tensor, fwhm_nm: float) -> torch.Tensor:
    """The detuning >= 0 that sets a weight in [-1, 1]: (FWHM / 2) sqrt((1 - w) / (1 + w)); -1 is infinitely far."""
    return 0.5 * fwhm_nm * torch.sqrt((1.0 - weight) / (1.0 + weight))


def ring_weight_change(weight: torch.Tensor, shift_nm: torch.Tensor, fwhm_nm: float) -> torch.Tensor:
    """Change of weights in [-1, 1] when each resonance moves by ``shift_nm`` (positive: away from the carrier).

    Written as w(delta + shift) - w(delta), both terms by one formula, so a zero shift changes nothing exactly."""
    detuning = detuning_for_weight(weight.clamp(-1.0, 1.0), fwhm_nm)
    return weight_for_detuning(detuning + shift_nm, fwhm_nm) - weight_for_detuning(detuning, fwhm_nm)


def random_walk_k(rate_k_per_rts: float, age_s: float, e: torch.Tensor) -> torch.Tensor:
    """The chip's temperature random walk at ``age_s``, K: one Brownian path per chip, from its standard normals
    ``e`` (2, len(WALK_GRID_S)): row 0 the increments over the grid's intervals, so W(T_k) = rate * sum_{j<=k}
    sqrt(T_j - T_{j-1}) e_0j (T_-1 = 0); between grid points the linear interpolation plus a Brownian bridge of
    variance (t - T_k)(T_k+1 - t) / (T_k+1 - T_k) drawn from row 1. Var W(t) = rate^2 t at every t, and a time
    sweep follows the same path (at grid times Cov = rate^2 min(t, t'))."""
    grid = torch.tensor((0.0, *WALK_GRID_S), dtype=torch.float64)
    path = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(grid.diff().sqrt() * e[0].cpu(), 0)])
    k = max(0, int(torch.searchsorted(grid, torch.tensor(age_s, dtype=torch.float64), right=True)) - 1)
    k = min(k, len(WALK_GRID_S) - 1)
    lo, hi = float(grid[k]), float(grid[k + 1])
    share = (age_s - lo) / (hi - lo)
    bridge = math.sqrt(max(0.0, (age_s - lo) * (hi - age_s) / (hi - lo))) * float(e[1, k])
    return torch.tensor(rate_k_per_rts * ((1 - share) * float(path[k]) + share * float(path[k + 1]) + bridge),
                        dtype=torch.float64, device=e.device)


def ring_temperature_change_k(ring: RingDrift, lock_residual_k: float, age_s: float, shape: torch.Size,
                              generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Temperature change of each ring since locking, K: the chip's common change (offset plus random walk)
    scaled by (1 + spread e_ring), plus the ring's lock residual. Draws, in this order: the chip's walk (2 x the
    grid), rings, residuals."""
    chip, rings, residual = (_normal(s, generator, device) for s in ((2, len(WALK_GRID_S)), shape, shape))
    common = ring.temperature_offset_k + random_walk_k(ring.random_walk_k_per_rts, age_s, chip)
    return common * (1.0 + ring.per_ring_spread * rings) + lock_residual_k * residual


def programming_sigma(g_rel: torch.Tensor) -> torch.Tensor:
    """PCM programming-noise std / Gmax at target G / Gmax: (0.26348 + 1.9650 g - 1.1731 g^2) / 25 (aihwkit)."""
    c0, c1, c2 = PROGRAMMING_COEFFS_US
    return (c0 + c1 * g_rel + c2 * g_rel ** 2) / PROGRAMMING_FIT_G_MAX_US


def drift_exponent_moments(g_rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the drift exponent nu at target G / Gmax (aihwkit): mean -0.0155 ln g + 0.0244 in
    [0.049, 0.1], std -0.0125 ln g - 0.0059 in [0.008, 0.045]."""
    log_g = torch.log(g_rel.abs().clamp(min=SMALLEST_RELATIVE_G))
    return (-0.0155 * log_g + 0.0244).clamp(0.049, 0.1), (-0.0125 * log_g - 0.0059).clamp(0.008, 0.045)


def pcm_drift(g: torch.Tensor, nu: torch.Tensor, t_s: float, t0_s: float) -> torch.Tensor:
    """Conductance drift: G(t) = G(t0) (t / t0)^-nu."""
    return g * (t_s / t0_s) ** -nu


def read_sigma(g_rel: torch.Tensor, t_s: float, t_read_s: float) -> torch.Tensor:
    """Relative std of the 1/f noise accumulated by time t (aihwkit): q sqrt(ln((t + t_read) / (2 t_read))),
    q = 0.0088 / max((G / Gmax)^0.65, 1e-3), at most 0.2."""
    q = (0.0088 / (g_rel.abs() ** 0.65).clamp(min=1e-3)).clamp(max=0.2)
    return q * math.sqrt(math.log((t_s + t_read_s) / (2.0 * t_read_s)))


def global_drift_factor(programmed: torch.Tensor, drifted: torch.Tensor) -> torch.Tensor:
    """aihwkit's global drift compensation: mean|W_programmed| / mean|W(t)| (1 when nothing is left to read)."""
    now = drifted.abs().mean()
    return torch.where(now > 0, programmed.abs().mean() / now, torch.ones_like(now))


def pcm_weights(w: torch.Tensor, w_max: float, pcm: PcmDrift, age_s: float,
                generator: torch.Generator) -> torch.Tensor:
    """Codes a PCM chip reads at ``age_s`` after programming ``w``: a device pair per weight (G+ for w > 0, G- for
    w < 0, Gmax at |w| = w_max), programming noise, drift, read noise, then optional global compensation.
    Conductances are kept in code units (Gmax = w_max), so noiseless devices give back w exactly. Draws, in this
    order: programming (2, O, K), drift exponents (2, O, K), read noise (2, O, K)."""
    programming, exponent, read = (_normal((2, *w.shape), generator, w.device) for _ in range(3))
    target = torch.stack((w.clamp(min=0.0), (-w).clamp(min=0.0)))  # (2, O, K) the pair G+, G-
    g_rel = target / w_max
    programmed = (target + pcm.programming_noise_scale * w_max * programming_sigma(g_rel) * programming).clamp(min=0.0)
    mean, std = drift_exponent_moments(g_rel)
    nu = pcm.drift_scale * (mean + std * exponent).abs()
    t = age_s + pcm.t0_s
    drifted = pcm_drift(programmed, nu, t, pcm.t0_s)
    noise = pcm.read_noise_scale * read_sigma(programmed / w_max, t, pcm.t_read_s) * read
    pair = (drifted + drifted.abs() * noise).clamp(min=0.0)
    weights = pair[0] - pair[1]
    if not pcm.global_drift_compensation:
        return weights
    return weights * global_drift_factor(programmed[0] - programmed[1], weights)


def realised_weights(w: torch.Tensor, w_max: float, tile: int, cfg: DriftConfig,
                     generator: torch.Generator) -> torch.Tensor:
    """The (O, K) float64 codes a chip realises at ``cfg.time_s`` for programmed codes ``w`` in [-w_max, w_max].

    Random draws (one chip) come from ``generator`` in a fixed order that does not depend on the time, so the
    same generator state gives the same chip at every time. Without a section, or at age 0 with no temperature
    offset, no lock residual and (PCM) no programming or read noise, the result is ``w`` exactly. ``tile`` is
    unused: drift acts per device, and the hook keeps the engine's common signature.

    Example:
        >>> cfg = DriftConfig(time_s=3600.0, ring=RingDrift(temperature_offset_k=0.1))
        >>> w = torch.tensor([[127.0, 0.0, -127.0]], dtype=torch.float64)
        >>> realised_weights(w, 127.0, 16, cfg, torch.Generator().manual_seed(0)).round(decimals=2)
        tensor([[ 125.5800,   -9.1700, -127.0000]], dtype=torch.float64)
    """
    age = effective_age_s(cfg.time_s, cfg.recalibration_period_s)
    if cfg.ring is not None:
        temperature = ring_temperature_change_k(cfg.ring, cfg.lock_residual_k, age, w.shape, generator, w.device)
        return w + w_max * ring_weight_change(w / w_max, cfg.ring.shift_nm_per_k * temperature, cfg.ring.fwhm_nm)
    if cfg.pcm is not None:
        return pcm_weights(w, w_max, cfg.pcm, age, generator)
    return w


def _normal(shape: tuple[int, ...] | torch.Size, generator: torch.Generator,
            device: torch.device | str) -> torch.Tensor:
    """float64 standard normals of ``shape`` drawn by ``generator`` (on its own device), moved to ``device``."""
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device).to(device)
