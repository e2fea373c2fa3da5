"""One layer's readout, described once: what an optical core sums and how its sums become accumulator codes.

Built from a layer's resolved settings (photosim.hardware.plan) and its geometry, before anything runs. Every
execution backend (photosim.engine.backends) reads this one frozen object: tile length, full scale, ADC step and
bits, accumulator, the noise coefficients by effect name (the effects of hardware.config.NOISE_EFFECTS), and the
input side (DAC noise, modulator transfer) and detector saturation.
The model and its sources: docs/hardware.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from photosim.hardware.adc import adc_step
from photosim.hardware.config import LayerHardware, ModulatorTransfer, TileSignal
from photosim.hardware.drift import DriftConfig
from photosim.hardware.mesh import MeshConfig
from photosim.hardware.noise import SIGNAL_NOISE_VARIANCE, dac_sigma

FLOAT32_EXACT = 1 << 24  # float32 holds every integer below this


def tile_length(k: int, tile: int | None) -> int:
    """L, the products one optical core sums: the ``tile`` setting, at most K (None: one tile of K)."""
    return min(tile or k, k)


@dataclass(frozen=True)
class Readout:
    """The tile step of one conv/linear: tiles of L products, analog noise, per-tile ADC, finite accumulator."""

    layer: int  # the layer's position in the graph: keys its random streams
    k: int  # dot-product length K (per group)
    tile: int  # L = tile_length(K, the tile setting)
    x_max: int  # largest |x - z_in| the input clamp range allows
    w_max: int  # largest |weight code|: 2^(w_bits-1)
    adc_bits: int | None = None  # None: ideal readout (integer grid), also while the ADC range is being measured
    adc_range: float | None = None  # +-range in product units (None: full scale)
    acc_bits: int = 32
    overflow: Literal["wrap", "saturate", "none"] = "none"
    bias_at: Literal["start", "end"] = "start"
    tile_noise: dict[str, float] = field(default_factory=dict)  # effect on -> sigma (output: of FS; shot: coef.)
    tile_signals: dict[str, TileSignal] = field(default_factory=dict)  # tile effect on -> the optical quantity
    # its variance follows (NoiseEffect.signal), for the effects that need one
    weight_noise: dict[str, tuple[str, float]] = field(default_factory=dict)  # effect on -> (kind, sigma)
    custom: str | None = None  # the user's noise function (module:function or file.py:function)
    weight_models: dict[str, MeshConfig | DriftConfig] = field(default_factory=dict)  # per-chip realisation of the
    # programmed weights (LayerHardware.weight_models), in the order they apply
    seed: int = 0
    repeat: int = 0  # the simulated chip
    calibrating: bool = False  # the tile values are being recorded to measure the ADC range
    x_span: int = 0  # the span (codes) of x - z_in the input clamp allows: hi - lo, the DAC's input range
    dac_enob: float | None = None  # effective bits of the input conversion over x_span (None: no DAC noise)
    dac_transfer: ModulatorTransfer = "linear"  # the modulator's law (photosim.hardware.noise.MODULATOR_TRANSFERS)
    saturation: float | None = None  # detector saturation as a fraction of FS (None: none)

    @classmethod
    def of(cls, settings: LayerHardware, k: int, x_max: int, w_max: int, *, layer: int, seed: int = 0,
           repeat: int = 0, measured_range: float | None = None, calibrating: bool = False,
           x_span: int | None = None) -> Readout:
        """The readout of a layer with these resolved settings. ``measured_range``: the calibrated ADC's +-range
        (product units), required for ``adc.range: calibrated`` unless ``calibrating``. ``x_span``: hi - lo of the
        input clamp's x - z_in (None: 2 Xmax, a clamp symmetric about the zero point, the widest Xmax allows)."""
        tile = tile_length(k, settings.tile)
        adc, acc = settings.adc, settings.accumulator
        adc_range = None
        if calibrating:
            adc_bits = None
        else:
            adc_bits = adc.bits
            if isinstance(adc.range, float):
                adc_range = adc.range * float(tile * x_max * w_max)
            elif settings.calibrated_adc:
                if measured_range is None:
                    raise ValueError("a calibrated ADC range was not measured")
                adc_range = measured_range
        effects = settings.noise.effects()
        tile_noise = {name: e.strength for name, e in effects.items() if e.acts_on == "tile" and e.on}
        tile_signals = {name: e.signal for name, e in effects.items() if name in tile_noise and e.signal}
        weight_noise = {name: (e.kind, e.strength) for name, e in effects.items() if e.acts_on == "weight" and e.on}
        dac, detector = settings.dac, settings.detector
        return cls(layer, k, tile, x_max, w_max, adc_bits, adc_range, acc.bits, acc.overflow, acc.bias_at,
                   tile_noise, tile_signals, weight_noise, settings.noise.custom.function, settings.weight_models(),
                   seed, repeat, calibrating, 2 * x_max if x_span is None else x_span,
                   None if dac is None else dac.enob, "linear" if dac is None else dac.transfer,
                   None if detector is None else detector.saturation)

    @property
    def signal_effects(self) -> tuple[str, ...]:
        """The tile effects whose noise follows the tile's light or signal (photocurrent, rin), in the order drawn:
        first of the tile noise, in torch, on every backend that serves the layer."""
        return tuple(name for name in self.tile_noise if name in SIGNAL_NOISE_VARIANCE)

    @property
    def tiles(self) -> int:
        """T = ceil(K / L)."""
        return math.ceil(self.k / self.tile)

    @property
    def full_scale(self) -> float:
        """FS = L * Xmax * Wmax: the largest |tile value| the codes allow."""
        return float(self.tile * self.x_max * self.w_max)

    @property
    def step(self) -> float:
        """ADC step in product units (1 for the ideal readout)."""
        if self.adc_bits is None:
            return 1.0
        return adc_step(self.full_scale if self.adc_range is None else self.adc_range, self.adc_bits)

    @property
    def exact_weights(self) -> bool:
        """No weight error: the tile sums are the exact integer ones."""
        return not self.weight_noise and not self.weight_models

    @property
    def exact_inputs(self) -> bool:
        """No DAC noise and a linear modulator: the operands are the exact integer codes."""
        return self.dac_enob is None and self.dac_transfer == "linear"

    @property
    def dac_sigma(self) -> float:
        """The DAC noise std on every operand, in codes (0: off)."""
        return 0.0 if self.dac_enob is None else dac_sigma(self.x_span, self.dac_enob)

    @property
    def input_effects(self) -> list[str]:
        """The input-side and detector effects that are on, by name (for reports)."""
        return [*(["dac"] if self.dac_enob is not None else []),
                *([f"{self.dac_transfer} modulator"] if self.dac_transfer != "linear" else []),
                *(["saturation"] if self.saturation is not None else [])]

    @property
    def dtype(self) -> torch.dtype:
        """The tile values' working dtype: float32 under tile noise (whose std swamps float32's rounding of the
        noisy values) when every tile value is an integer below 2^24 (exact weights and inputs, FS < 2^24), so
        exact in float32; else float64 (custom noise functions get float64, as documented; so do signal-dependent
        effects, drawn in float64 because their per-tile light and power sums may pass 2^24). It depends on the
        settings only, never on the matmul a machine picks, so every CPU and GPU computes the same numbers."""
        exact32 = (self.exact_weights and self.exact_inputs and self.full_scale < FLOAT32_EXACT
                   and not self.signal_effects)
        return torch.float32 if self.tile_noise and not self.custom and exact32 else torch.float64
