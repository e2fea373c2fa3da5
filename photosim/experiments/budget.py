"""The link budget, energy and schedule of a whole model on photonic cores: one row per conv/linear layer and per
matmul of two activations (whose second operand is loaded into the bank for every input).

``photosim budget`` prints this table; ``photosim run`` and sweeps add its totals (``energy_totals``: energy per
inference by part, latency, throughput, TOPS, TOPS/W) to their rows when the hardware config has a ``photonics``
section. Noise terms are fractions of the tile's full scale FS at full-scale inputs (docs/photonics.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from photosim.errors import PhotosimError
from photosim.hardware.adc import adc_step
from photosim.hardware.config import HardwareConfig, LayerHardware
from photosim.hardware.energy import LayerCounts, Throughput, chip_area_mm2, layer_energy, layer_schedule
from photosim.hardware.noise import enob, snr_db
from photosim.hardware.photonics import link_budget
from photosim.hardware.plan import HardwarePlan
from photosim.hardware.readout import tile_length
from photosim.ir.format import Node, QuantizedModel
from photosim.ir.ops import OPS
from photosim.ir.summary import dot_length, operand_max, output_shapes

NOISE_TERMS = ("shot", "thermal", "rin", "adc", "weight")  # candidates for the dominant noise source
ENERGY_PARTS = ("laser_J", "modulators_J", "weights_J", "weight_load_J", "adc_J", "digital_J")  # per inference


def adc_sigma(hw: LayerHardware, full_scale: float) -> float:
    """ADC quantization noise, fraction of FS: step / sqrt(12) over the configured range (a calibrated range is
    measured only when the model runs, so it counts as full here); the ideal readout rounds to steps of 1."""
    bits, rng = hw.adc.bits, hw.adc.range
    span = full_scale * rng if isinstance(rng, float) else full_scale
    step = 1.0 if bits is None else adc_step(span, bits)
    return step / math.sqrt(12.0) / full_scale


def adc_bits_for_energy(hw: LayerHardware, full_scale: float) -> int:
    """Bits each conversion costs: adc.bits, or for the ideal readout the bits resolving every integer in +-FS."""
    return hw.adc.bits if hw.adc.bits is not None else math.ceil(math.log2(2 * full_scale + 1))


@dataclass(frozen=True)
class DotProducts:
    """What a layer asks of the dot-product engine: K, the operand ranges, and how its outputs group."""

    k: int
    x_max: int  # largest |x - z_in|
    w_max: int  # largest |weight code|, or |b - z_b| for a matmul's second operand
    positions: int  # outputs per bank row: a conv's OH * OW, a linear's tokens, a matmul's M rows
    groups: int  # conv groups, or a matmul's batched dimensions (heads, windows)
    out_per_group: int
    per_input: bool  # the bank holds an activation (a matmul's second operand)

    @classmethod
    def of(cls, node: Node, shapes: dict[str, tuple[int, ...]]) -> DotProducts:
        """A conv's (O, H, W), a linear's (..., O) or a matmul's (..., M, P) output, per sample."""
        out = shapes[node.name]
        if node.op == "matmul":
            qa, qb = node.input_q
            return cls(shapes[node.inputs[0]][-1], qa.largest_offset, qb.largest_offset, out[-2],
                       math.prod(out[:-2]), out[-1], True)
        x_max, w_max = operand_max(node)
        groups = node.attrs.get("groups", 1)
        positions, channels = (math.prod(out[:-1]), out[-1]) if node.op == "linear" else (math.prod(out[1:]), out[0])
        return cls(dot_length(node), x_max, w_max, positions, groups, channels // groups, False)


def layer_budget(node: Node, dots: DotProducts, hw: LayerHardware) -> dict[str, Any]:
    """One layer's powers, noise terms, SNR, dominant noise source, counts and energy."""
    cfg = hw.photonics
    assert cfg is not None
    k = dots.k
    tile = tile_length(k, hw.tile)
    full_scale = float(tile * dots.x_max * dots.w_max)
    link = link_budget(cfg, tile, node.name, hw.mesh)
    counts = LayerCounts.of(dots.positions, dots.groups, dots.out_per_group, k, tile, cfg.fan_out, dots.per_input)
    energy = layer_energy(cfg, counts, adc_bits_for_energy(hw, full_scale))
    schedule = layer_schedule(cfg, counts)
    sigmas = {"shot": link.sigma_shot, "thermal": link.sigma_thermal, "rin": link.sigma_rin,
              "adc": adc_sigma(hw, full_scale), "weight": link.sigma_weight / math.sqrt(tile)}
    snr = snr_db(1.0, sum(s ** 2 for s in sigmas.values()))
    return {
        "layer": node.name, "architecture": cfg.architecture, "tile": tile, "tiles": math.ceil(k / tile),
        "fan_out": cfg.fan_out, "full_scale": full_scale, "loss_dB": link.loss_db,
        "detector_power_mW": link.detector_power_w * 1e3, "signal_current_uA": link.signal_current_a * 1e6,
        "total_current_uA": link.total_current_a * 1e6, "offset_fs": link.offset_fs,
        **{f"sigma_{name}": value for name, value in sigmas.items()},
        "sigma_output": link.sigma_output, "sigma_weight_device": link.sigma_weight,
        "snr_db": snr, "enob": enob(snr), "dominant_noise": max(sigmas, key=lambda name: sigmas[name]),
        "macs": counts.macs, "cycles": counts.cycles, "input_conversions": counts.input_conversions,
        "adc_conversions": counts.adc_conversions, "batch_size": cfg.batch_size, "cores": cfg.cores,
        "loads": counts.loads, "weight_writes": counts.weights, "load_time_s": schedule.load_time_s,
        "latency_per_batch_s": schedule.latency_s, "area_mm2": chip_area_mm2(cfg, tile),
        "laser_J": energy.laser, "modulators_J": energy.modulators, "weights_J": energy.weights,
        "weight_load_J": energy.weight_load, "adc_J": energy.adc, "digital_J": energy.digital,
        "energy_per_inference_J": energy.total, "energy_per_mac_J": energy.total / counts.macs,
    }


def budget_table(qmodel: QuantizedModel, hw: HardwarePlan | HardwareConfig) -> pd.DataFrame:
    """One row per conv/linear/matmul node whose settings have a photonics section (empty when none has); the batch goes
    through the model together, so every layer must have the same ``photonics.batch_size``."""
    shapes = output_shapes(qmodel)
    plan = HardwarePlan.resolve(qmodel, hw)
    rows = []
    for node in qmodel.nodes:
        settings = plan.layers[node.name]
        if (OPS[node.op].weighted or node.op == "matmul") and settings.photonics is not None:
            rows.append(layer_budget(node, DotProducts.of(node, shapes), settings))
    table = pd.DataFrame(rows)
    if not table.empty and table["batch_size"].nunique() > 1:
        sizes = ", ".join(f"{row.layer} {row.batch_size}" for row in table.itertuples())
        raise PhotosimError(f"photonics.batch_size differs between layers ({sizes}), but a batch goes through the "
                            "whole model together: give it once, in the global photonics section.")
    return table


def throughput(table: pd.DataFrame) -> Throughput:
    """The model's latency, throughput and efficiency at its batch size: layers run one after another; the chip's
    area is that of the largest bank the model needs (None without a device area)."""
    areas = table["area_mm2"].dropna()
    return Throughput(batch_size=int(table["batch_size"].iloc[0]), latency_s=float(table["latency_per_batch_s"].sum()),
                      macs=int(table["macs"].sum()), energy_j=float(table["energy_per_inference_J"].sum()),
                      area_mm2=float(areas.max()) if not areas.empty else None)


def energy_totals(table: pd.DataFrame) -> dict[str, float]:
    """Per-inference joules of the whole model by part and per MAC at its batch size, with its latency per batch,
    inferences per second, TOPS, TOPS/W and (with a device area) TOPS/mm2; {} for an empty table."""
    if table.empty:
        return {}
    totals = {column: float(table[column].sum()) for column in ("energy_per_inference_J", *ENERGY_PARTS)}
    chip = throughput(table)
    totals.update(energy_per_mac_J=chip.energy_j / chip.macs, latency_per_batch_s=chip.latency_s,
                  inferences_per_s=chip.inferences_per_s, TOPS=chip.tops, TOPS_per_W=chip.tops_per_w)
    if chip.tops_per_mm2 is not None:
        totals["TOPS_per_mm2"] = chip.tops_per_mm2
    return totals
