"""Energy, time and throughput of a model on optical cores, from counts of conversions, cycles and bank loads.

A core holds a bank of L x fan_out weight devices, takes one input vector of L values per cycle (1 / clock) and
forms ``fan_out`` tile values at once. A layer with O outputs per group, G groups, P output positions and
T = ceil(K / L) tiles needs ``G * T * ceil(O / fan_out)`` bank loads; each load computes its P cycles for every
inference of a batch before the next load (weight-stationary), so a load's settling time and energy are shared
by the batch. A matmul of two activations (attention) loads its second operand into the bank for every input:
nothing is shared. Loads are spread over the cores; layers run one after another. Formulas and sources:
docs/photonics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from photosim.hardware.photonic_config import PhotonicsConfig

PJ, FJ = 1e-12, 1e-15
MW, GHZ, US, UM2_MM2 = 1e-3, 1e9, 1e-6, 1e-6  # unit -> SI factors; um^2 -> mm^2
TERA = 1e12


def walden_adc_energy(fom_j: float, bits: int) -> float:
    """Energy per ADC conversion, J, from the Walden figure of merit: FOM * 2^ENOB (ENOB taken as ``bits``)."""
    return fom_j * 2.0 ** bits


def laser_energy(optical_w: float, wall_plug_efficiency: float, seconds: float) -> float:
    """Electrical energy a laser draws, J: optical power / wall-plug efficiency * time."""
    return optical_w / wall_plug_efficiency * seconds


@dataclass(frozen=True)
class LayerCounts:
    """How often each part of the core works for one inference of one layer, and how often its bank is loaded."""

    macs: int  # P * G * O * K
    outputs: int  # P * G * O
    cycles: int  # input vectors presented: P * loads
    input_conversions: int  # cycles * L (a partial last tile still drives all L modulators)
    adc_conversions: int  # tile values: P * T * G * O
    weights: int  # G * O * K devices written per pass over the layer's weights
    tile: int  # L
    fan_out: int
    positions: int  # P: cycles per inference per bank load
    loads: int  # bank loads of one pass over the layer: G * T * ceil(O / fan_out)
    per_input: bool = False  # the bank holds an activation (a matmul's second operand): loaded for every input

    @classmethod
    def of(cls, positions: int, groups: int, out_per_group: int, k: int, tile: int, fan_out: int,
           per_input: bool = False) -> LayerCounts:
        """The counts of a conv (positions = OH * OW) or linear (positions = tokens, 1 for a vector) layer, or of
        a matmul of two activations (``per_input``: positions = M rows, groups = the batched dimensions, O = P)."""
        tiles = math.ceil(k / tile)
        outputs = positions * groups * out_per_group
        loads = groups * tiles * math.ceil(out_per_group / fan_out)
        cycles = positions * loads
        return cls(macs=outputs * k, outputs=outputs, cycles=cycles, input_conversions=cycles * tile,
                   adc_conversions=outputs * tiles, weights=groups * out_per_group * k, tile=tile, fan_out=fan_out,
                   positions=positions, loads=loads, per_input=per_input)

    def inferences_per_load(self, batch_size: int) -> int:
        """Inferences one bank load serves: the whole batch for weights, one for a matmul's second operand."""
        return 1 if self.per_input else batch_size

    @property
    def bank(self) -> int:
        """Weight devices of one bank: L * fan_out."""
        return self.tile * self.fan_out

    @property
    def additions(self) -> int:
        """Digital additions: every ADC code into its output's accumulator (the bias starts it)."""
        return self.adc_conversions


@dataclass(frozen=True)
class LayerSchedule:
    """How one layer runs a batch: its bank loads spread over the cores, each load settling, then computing."""

    loads: int  # bank loads per batch
    rounds: int  # ceil(loads / cores): loads one after another on the busiest core
    load_s: float  # settling (write) time of one load
    compute_s: float  # one load's cycles for the whole batch: batch * P / clock

    @property
    def load_time_s(self) -> float:
        """Time the layer spends loading banks per batch, s."""
        return self.rounds * self.load_s

    @property
    def latency_s(self) -> float:
        """Time the layer takes for one batch, s: every round loads, then computes."""
        return self.rounds * (self.load_s + self.compute_s)


def layer_schedule(cfg: PhotonicsConfig, counts: LayerCounts) -> LayerSchedule:
    """The schedule of one layer for ``cfg.batch_size`` inferences on ``cfg.cores`` cores."""
    shared = counts.inferences_per_load(cfg.batch_size)
    loads = counts.loads * cfg.batch_size // shared  # a matmul loads its operand for every inference
    return LayerSchedule(loads=loads, rounds=math.ceil(loads / cfg.cores), load_s=cfg.weight_load_us * US,
                         compute_s=shared * counts.positions / (cfg.clock_ghz * GHZ))


@dataclass(frozen=True)
class LayerEnergy:
    """Joules per inference of one layer at the configured batch size, by part."""

    laser: float
    modulators: float
    weights: float  # weight devices held while computing
    weight_load: float  # writes and holding while settling, shared by the batch
    adc: float
    digital: float

    @property
    def total(self) -> float:
        """All parts, J per inference."""
        return self.laser + self.modulators + self.weights + self.weight_load + self.adc + self.digital


def layer_energy(cfg: PhotonicsConfig, counts: LayerCounts, adc_bits: int) -> LayerEnergy:
    """Energy per inference of one layer: laser (and LO) on for every cycle, one modulator conversion per input
    value, the bank's devices held while they compute and while each load settles, every weight written once per
    pass and those two load costs shared by the batch (not for a matmul's second operand, written for every
    input), one ADC conversion per tile value, one digital addition per ADC code and one requantization per
    output."""
    e, seconds = cfg.energy, counts.cycles / (cfg.clock_ghz * GHZ)
    optical = counts.tile * cfg.laser_power_mw * MW
    if cfg.architecture == "coherent" and cfg.lo_power_mw is not None:
        optical += counts.fan_out * cfg.lo_power_mw * MW
    hold_w = e.weight_hold_mw * MW * counts.bank
    load_j = counts.weights * e.weight_write_pj * PJ + hold_w * counts.loads * cfg.weight_load_us * US
    return LayerEnergy(
        laser=laser_energy(optical, cfg.wall_plug_efficiency, seconds),
        modulators=counts.input_conversions * e.modulator_pj * PJ,
        weights=hold_w * seconds,
        weight_load=load_j / counts.inferences_per_load(cfg.batch_size),
        adc=counts.adc_conversions * walden_adc_energy(e.adc_fom_fj * FJ, adc_bits),
        digital=counts.additions * e.accumulate_pj * PJ + counts.outputs * e.requant_pj * PJ,
    )


def chip_area_mm2(cfg: PhotonicsConfig, tile: int) -> float | None:
    """Area of the cores' weight devices, mm^2: cores * L * fan_out * device area (None without a device area)."""
    if cfg.device_area_um2 is None:
        return None
    return cfg.cores * tile * cfg.fan_out * cfg.device_area_um2 * UM2_MM2


@dataclass(frozen=True)
class Throughput:
    """A model's speed and efficiency on the chip at one batch size (one MAC is two operations)."""

    batch_size: int
    latency_s: float  # one batch through every layer
    macs: int  # per inference
    energy_j: float  # per inference at this batch size
    area_mm2: float | None = None

    @property
    def inferences_per_s(self) -> float:
        """Inferences the chip finishes per second: batch / latency."""
        return self.batch_size / self.latency_s

    @property
    def tops(self) -> float:
        """Tera-operations per second: 2 * MACs * inferences per second / 1e12."""
        return 2.0 * self.macs * self.inferences_per_s / TERA

    @property
    def tops_per_w(self) -> float:
        """TOPS per watt of average power, i.e. tera-operations per joule: 2 * MACs / energy per inference / 1e12."""
        return 2.0 * self.macs / self.energy_j / TERA

    @property
    def tops_per_mm2(self) -> float | None:
        """TOPS per mm^2 of weight devices (None without an area)."""
        return None if self.area_mm2 is None else self.tops / self.area_mm2
