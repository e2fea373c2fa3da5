"""Energy of one layer on an optical core, in joules per inference, from counts of conversions and cycles.

The core takes one input vector of L values per cycle (1 / clock) and forms ``fan_out`` tile values at once.
A layer with O outputs per group, G groups, P output positions and T = ceil(K / L) tiles therefore needs
``P * T * G * ceil(O / fan_out)`` cycles, L input conversions per cycle, and one ADC conversion per tile
value (``P * T * G * O``). Formulas and sources: docs/photonics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from photosim.hardware.photonic_config import PhotonicsConfig

PJ, FJ = 1e-12, 1e-15
MW, GHZ = 1e-3, 1e9


def walden_adc_energy(fom_j: float, bits: int) -> float:
    """Energy per ADC conversion, J, from the Walden figure of merit: FOM * 2^ENOB (ENOB taken as ``bits``)."""
    return fom_j * 2.0 ** bits


def laser_energy(optical_w: float, wall_plug_efficiency: float, seconds: float) -> float:
    """Electrical energy a laser draws, J: optical power / wall-plug efficiency * time."""
    return optical_w / wall_plug_efficiency * seconds


@dataclass(frozen=True)
class LayerCounts:
    """How often each part of the core works for one inference of one layer."""

    macs: int  # P * G * O * K
    outputs: int  # P * G * O
    cycles: int  # input vectors presented: P * T * G * ceil(O / fan_out)
    input_conversions: int  # cycles * L (a partial last tile still drives all L modulators)
    adc_conversions: int  # tile values: P * T * G * O
    weights: int  # G * O * K devices to program
    tile: int  # L
    fan_out: int

    @classmethod
    def of(cls, positions: int, groups: int, out_per_group: int, k: int, tile: int, fan_out: int) -> LayerCounts:
        """The counts of a conv (positions = OH * OW) or linear (positions = 1) layer."""
        tiles = math.ceil(k / tile)
        outputs = positions * groups * out_per_group
        cycles = positions * tiles * groups * math.ceil(out_per_group / fan_out)
        return cls(macs=outputs * k, outputs=outputs, cycles=cycles, input_conversions=cycles * tile,
                   adc_conversions=outputs * tiles, weights=groups * out_per_group * k, tile=tile, fan_out=fan_out)

    @property
    def additions(self) -> int:
        """Digital additions: every ADC code into its output's accumulator (the bias starts it)."""
        return self.adc_conversions


@dataclass(frozen=True)
class LayerEnergy:
    """Joules per inference of one layer, by part."""

    laser: float
    modulators: float
    weights: float
    adc: float
    digital: float

    @property
    def total(self) -> float:
        """All parts, J per inference."""
        return self.laser + self.modulators + self.weights + self.adc + self.digital


def layer_energy(cfg: PhotonicsConfig, counts: LayerCounts, adc_bits: int) -> LayerEnergy:
    """Energy per inference of one layer: laser (and LO) on for every cycle, one modulator conversion per input
    value, weight devices held for every cycle and written once per ``weight_reuse`` inferences, one ADC
    conversion per tile value, one digital addition per ADC code and one requantization per output."""
    e, seconds = cfg.energy, counts.cycles / (cfg.clock_ghz * GHZ)
    optical = counts.tile * cfg.laser_power_mw * MW
    if cfg.architecture == "coherent":
        optical += counts.fan_out * cfg.lo_power_mw * MW
    return LayerEnergy(
        laser=laser_energy(optical, cfg.wall_plug_efficiency, seconds),
        modulators=counts.input_conversions * e.modulator_pj * PJ,
        weights=(e.weight_hold_mw * MW * counts.tile * counts.fan_out * seconds
                 + counts.weights / e.weight_reuse * e.weight_write_pj * PJ),
        adc=counts.adc_conversions * walden_adc_energy(e.adc_fom_fj * FJ, adc_bits),
        digital=counts.additions * e.accumulate_pj * PJ + counts.outputs * e.requant_pj * PJ,
    )
