"""Layer sensitivity: the fidelity a model loses when one layer alone is made coarser (fewer weight and / or
activation bits) or alone gets the hardware's effects, every other layer staying at the base configuration.

Each probe quantizes the whole model again with one exact-name override appended to the base QuantSpec, so
the probed model is what ``photosim quantize --config`` would build with that override (the next layer's
input scale and integer bias follow a changed activation). The drops are measured against the base model
on calibration data, label-free (see :mod:`photosim.experiments.fidelity`), and on the test split on request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.progress import track
from torch import nn

from photosim._config import load_config, with_layer_overrides
from photosim._progress import progress_options
from photosim.errors import PhotosimError
from photosim.experiments.fidelity import FloatReference, Score
from photosim.experiments.plot import draw_bars
from photosim.frontend.ptq import quantize
from photosim.frontend.qconfig import QuantSpec
from photosim.hardware.config import HardwareConfig, load_hardware
from photosim.hardware.plan import HardwarePlan, HardwareSpec
from photosim.ir.format import QuantizedModel
from photosim.ir.ops import OPS
from photosim.ir.ranges import MAX_BITS, MIN_BITS
from photosim.ir.summary import bits_per_mac, layer_table

INPUT = "input"  # the graph input's quantization is set under this name in a QuantSpec
RANKED_BY = {"agreement": "agreement_drop", "snr": "snr_loss_db"}  # --metric -> the column it ranks by


@dataclass(frozen=True)
class Probe:
    """What one probe changes in the layer it probes: weight bits, output activation bits, hardware (None: kept).

    Weight bits and hardware apply to conv / linear layers; activation bits to every node with its own output
    quantization (conv, linear, add) and to the graph input.
    """

    w_bits: int | None = None
    a_bits: int | None = None
    hw: HardwareConfig | None = None

    def layers(self, qmodel: QuantizedModel) -> list[str]:
        """The names this probe changes something in, in graph order."""
        weights, activations = self.w_bits is not None or self.hw is not None, self.a_bits is not None
        return [INPUT] * activations + [n.name for n in qmodel.nodes
                                        if (weights and OPS[n.op].weighted) or (activations and OPS[n.op].observed)]

    def spec(self, base: QuantSpec, layer: str, qmodel: QuantizedModel) -> QuantSpec:
        """``base`` with this probe's bits for ``layer`` (weight bits only where the layer has weights)."""
        settings = {"a_bits": self.a_bits}
        if layer != INPUT and OPS[qmodel.node(layer).op].weighted:
            settings["w_bits"] = self.w_bits
        given = {key: value for key, value in settings.items() if value is not None}
        return with_layer_overrides(base, {layer: given}, f"probe of {layer}") if given else base

    def base_hardware(self) -> HardwareConfig | None:
        """The hardware of the base model: the ideal engine with the probe hardware's requantization."""
        return None if self.hw is None else self.hw.ideal()

    def hardware(self, layer: str) -> HardwareConfig | None:
        """The base hardware with this probe's hardware settings on ``layer`` alone."""
        base = self.base_hardware()
        if base is None or self.hw is None or layer == INPUT:
            return base
        return with_layer_overrides(base, {layer: self.hw.for_layer(layer).model_dump()}, f"probe of {layer}")


@dataclass(frozen=True)
class Sensitivity:
    """The base model's score and one row per probed layer, most sensitive first."""

    base: Score
    layers: pd.DataFrame


def layer_sensitivity(model: nn.Module, calibration: Any, spec: QuantSpec | dict | str | Path | None = None, *,
                      w_bits: int | None = None, a_bits: int | None = None, hw: HardwareSpec = None,
                      metric: str = "agreement", test: Any = None, repeats: int = 1, seed: int = 0,
                      batch_size: int = 256, progress: bool = False) -> Sensitivity:
    """Rank the layers of ``model`` by the fidelity lost when only that layer is probed.

    Args:
        model: the float model (eval mode), as for :func:`photosim.quantize`.
        calibration: calibration inputs (tensor, Dataset, DataLoader, batches): PTQ and the label-free scores.
        spec: the base quantization (QuantSpec, dict, YAML path; None: W8A8 defaults).
        w_bits, a_bits: the probed layer's weight / output activation bits (either or both).
        hw: hardware given to the probed layer alone (the others run on the ideal engine); may be combined
            with bits.
        metric: rank by ``agreement`` (top-1 agreement with the float model) or ``snr`` (output SNR, dB).
        test: labelled data (Dataset, DataLoader, (x, y)) for test accuracy columns; None skips them.
        repeats, seed: Monte Carlo repeats and seed when ``hw`` is random (scores are averaged).

    Returns the base score and a table: rank, layer, op, macs, w_bits, a_bits (the probed layer's bits),
    agreement, agreement_drop, snr_db, snr_loss_db, w_bits_per_mac, a_bits_per_mac (of the probed model,
    see :func:`photosim.ir.summary.bits_per_mac`), and test_top1 / test_drop with ``test``.

    Example:
        >>> ranking = layer_sensitivity(model, calibration, {"w_bits": 8, "a_bits": 8}, w_bits=4, a_bits=4)
        >>> ranking.layers[["layer", "agreement_drop"]].head()
    """
    if metric not in RANKED_BY:
        raise PhotosimError(f"unknown sensitivity metric {metric!r}; use {' or '.join(RANKED_BY)}.")
    if any(b is not None and not MIN_BITS <= b <= MAX_BITS for b in (w_bits, a_bits)):
        raise PhotosimError(f"probe bits must lie in {MIN_BITS}..{MAX_BITS}; got w_bits={w_bits}, a_bits={a_bits}.")
    probe = Probe(w_bits, a_bits, None if hw is None else load_hardware(hw))
    if probe == Probe():
        raise PhotosimError("a sensitivity probe needs lower weight bits, activation bits or a hardware config "
                            "(--bits and / or --hw) to give each layer in turn.")
    spec = load_config(QuantSpec, spec)
    reference = FloatReference(model, calibration, spec.calibration_samples, test)
    base_model = quantize(model, reference.inputs, spec)
    if probe.hw is not None:
        HardwarePlan.resolve(base_model, probe.hw)  # as a run would: overrides match layers, link budgets compute

    def score(qmodel: QuantizedModel, hardware: HardwareConfig | None) -> Score:
        return reference.score(qmodel, hardware, repeats=repeats, seed=seed, batch_size=batch_size)

    base = score(base_model, probe.base_hardware())
    facts = layer_table(base_model)
    macs = dict(zip(facts["layer"], facts["macs"]))
    rows = []
    for layer in track(probe.layers(base_model), description="probing layers",
                       **progress_options(progress)):
        layer_spec = probe.spec(spec, layer, base_model)
        qmodel = base_model if layer_spec is spec else quantize(model, reference.inputs, layer_spec)
        rows.append(_row(qmodel, layer, macs.get(layer, 0), score(qmodel, probe.hardware(layer)), base))
    table = pd.DataFrame(rows).astype({"w_bits": "Int64"})
    primary = RANKED_BY[metric]
    secondary = next(column for column in RANKED_BY.values() if column != primary)
    table = table.sort_values([primary, secondary], ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return Sensitivity(base, table)


def _row(qmodel: QuantizedModel, layer: str, macs: int, score: Score, base: Score) -> dict[str, Any]:
    """One table row: the probed layer, its bits in the probed model, its score and the drops from ``base``."""
    node = None if layer == INPUT else qmodel.node(layer)
    w_per_mac, a_per_mac = bits_per_mac(qmodel)
    row = {
        "layer": layer, "op": INPUT if node is None else node.op, "macs": macs,
        "w_bits": None if node is None else node.w_bits,
        "a_bits": qmodel.input_q.bits if node is None else node.output_q.bits,
        "agreement": score.agreement, "agreement_drop": base.agreement - score.agreement,
        "snr_db": score.snr_db, "snr_loss_db": _loss(base.snr_db, score.snr_db),
        "w_bits_per_mac": w_per_mac, "a_bits_per_mac": a_per_mac,
    }
    if score.test_top1 is not None and base.test_top1 is not None:
        row.update(test_top1=score.test_top1, test_drop=base.test_top1 - score.test_top1)
    return row


def _loss(base: float, value: float) -> float:
    """``base - value``, 0 when both are infinite (two exact models)."""
    return 0.0 if base == value else base - value


def plot_sensitivity(result: Sensitivity, metric: str, out: str | Path, *, title: str | None = None) -> Path:
    """Bar chart of each layer's drop in ``metric`` (agreement in points, or SNR in dB), in rank order."""
    column = RANKED_BY[metric]
    table = result.layers
    values = table[column] * 100 if metric == "agreement" else table[column]
    label = "top-1 agreement drop (points)" if metric == "agreement" else "output SNR loss (dB)"
    return draw_bars(list(table["layer"]), list(values.where(values.map(math.isfinite), 0.0)), label, out,
                     title=title)
