"""Mixed precision under a fidelity target: per-layer weight and activation bits chosen greedily on layer
sensitivity, so that the integer model keeps a top-1 agreement with the float model on calibration data
at the smallest mean operand width per MAC.

The cost of a model is ``(w + a) / 2`` with ``w`` and ``a`` its weight bits and input-activation bits
averaged over every multiply-accumulate (:func:`photosim.ir.summary.bits_per_mac`): a layer counts with
its MACs, and the activation bits of a tensor count at the layers that read it.

The search (HAWQ-like): start with every layer at the widest choice. Probe each setting (a layer's weight
bits, or a tensor's activation bits) alone at the narrowest choice, which gives its output error power
``dE`` on the float model's logits and the cost it saves; model the error of narrower steps as
quantization noise, ``dE * 4^(narrowest - b)`` at ``b`` bits, and order every step (one setting, one
choice narrower) by added error per bit saved. Then take the longest prefix of that order that still meets
the target (bisection, each trial a whole-model evaluation), leave the setting of the first failing step
where it is, and repeat with the steps after it. The result is an ordinary QuantSpec: the base settings
plus one ``layers:`` override per narrowed layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from photosim._config import load_config, with_layer_overrides, with_settings
from photosim.errors import PhotosimError
from photosim.experiments.fidelity import FloatReference, Score
from photosim.experiments.sensitivity import INPUT, layer_sensitivity
from photosim.frontend.ptq import quantize
from photosim.frontend.qconfig import QuantSpec
from photosim.ir.format import QuantizedModel
from photosim.ir.ops import OPS
from photosim.ir.ranges import MAX_BITS, MIN_BITS
from photosim.ir.summary import bits_per_mac

DEFAULT_CHOICES = (8, 6, 5, 4, 3)
Setting = tuple[str, str]  # ("w_bits" or "a_bits", layer name)


def cost(qmodel: QuantizedModel) -> float:
    """Mean operand bits per MAC: the mean of the MAC-weighted weight bits and input-activation bits."""
    return sum(bits_per_mac(qmodel)) / 2


@dataclass(frozen=True)
class MixedPrecision:
    """The chosen quantization, its model and score, and the same for the all-widest start."""

    spec: QuantSpec
    qmodel: QuantizedModel
    score: Score
    base: Score
    base_cost: float
    target: float
    trials: int  # whole-model evaluations of the greedy pass

    @property
    def cost(self) -> float:
        """Mean operand bits per MAC of the chosen model."""
        return cost(self.qmodel)

    def yaml(self) -> str:
        """The QuantSpec as YAML (loadable with ``--config``), headed by comments on how it was found."""
        w, a = bits_per_mac(self.qmodel)
        samples = self.qmodel.provenance["calibration"]["samples"]
        header = (f"# mixed precision: top-1 agreement with the float model {100 * self.score.agreement:.2f}% "
                  f"(target {100 * self.target:.2f}%) on {samples} calibration images;\n# {w:.2f} weight bits and "
                  f"{a:.2f} input bits per MAC (from {self.base_cost:.2f} mean bits with every layer at the widest "
                  "choice).\n")
        return header + yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False)


def search_mixed_precision(model: nn.Module, calibration: Any, target: float,
                           spec: QuantSpec | dict | str | Path | None = None, *,
                           choices: tuple[int, ...] = DEFAULT_CHOICES, test: Any = None,
                           progress: bool = False) -> MixedPrecision:
    """Per-layer weight and activation bits from ``choices`` that keep ``target`` top-1 agreement with the
    float model on the calibration inputs at the smallest mean bits per MAC (greedy; see the module doc).

    Args:
        model: the float model (eval mode).
        calibration: calibration inputs (tensor, Dataset, DataLoader, batches), for PTQ and the agreement.
        target: the agreement to keep, in (0, 1].
        spec: base settings (observers, granularity, ...; QuantSpec, dict or YAML path); the search sets the
            global bits to the widest choice and appends its per-layer overrides to the spec's own.
        choices: the bit widths a layer's weights and activations may take.
        test: labelled data scored for information only (``score.test_top1``); the search never sees it.

    Example:
        >>> result = search_mixed_precision(model, calibration, 0.99, choices=(8, 6, 4, 3))
        >>> Path("mixed.yaml").write_text(result.yaml())  # photosim quantize --config mixed.yaml
    """
    if not 0 < target <= 1:
        raise PhotosimError(f"the agreement target must lie in (0, 1] (a fraction, e.g. 0.99), got {target}.")
    if not choices or not all(MIN_BITS <= b <= MAX_BITS for b in choices):
        raise PhotosimError(f"bit-width choices must be integers from {MIN_BITS} to {MAX_BITS}, got {list(choices)}.")
    widest = max(choices)
    base_spec = with_settings(load_config(QuantSpec, spec), {"w_bits": widest, "a_bits": widest}, "mixed precision")
    reference = FloatReference(model, calibration, base_spec.calibration_samples, test)
    base_model = quantize(model, reference.inputs, base_spec)
    base = reference.score(base_model, with_test=False)
    if base.agreement < target:
        raise PhotosimError(f"with every layer at {widest} bits the model agrees with the float model on only "
                            f"{100 * base.agreement:.2f}% of the calibration images, below the target "
                            f"{100 * target:.2f}%; lower the target or allow wider bits.")
    start = _settings(base_model)
    steps = _steps(model, reference.inputs, base_spec, sorted(set(choices)), start, cost(base_model), progress)
    current, best, best_score, trials = start, base_model, base, 0
    while steps:
        passed, failed = 0, len(steps) + 1  # the longest passing prefix of steps lies in [passed, failed)
        while failed - passed > 1:
            middle = (passed + failed) // 2
            trial = _applied(current, steps[:middle])
            qmodel = quantize(model, reference.inputs, _spec(base_spec, trial, start))
            score, trials = reference.score(qmodel, with_test=False), trials + 1
            if score.agreement >= target:
                passed, best, best_score = middle, qmodel, score
            else:
                failed = middle
        current = _applied(current, steps[:passed])
        frozen = steps[passed][0] if passed < len(steps) else None
        steps = [step for step in steps[passed + 1:] if step[0] != frozen]
    if test is not None:  # test accuracy is reported, never searched on
        base, best_score = reference.score(base_model), reference.score(best)
    return MixedPrecision(_spec(base_spec, current, start), best, best_score, base, cost(base_model), target, trials)


def _applied(bits: dict[Setting, int], steps: list[tuple[Setting, int]]) -> dict[Setting, int]:
    """``bits`` after the ``steps`` (each sets one setting's bits), in order."""
    return {**bits, **dict(steps)}


def _settings(qmodel: QuantizedModel) -> dict[Setting, int]:
    """The bits of every setting the search may narrow, as ``qmodel`` has them."""
    bits = {("a_bits", INPUT): qmodel.input_q.bits}
    for node in qmodel.nodes:
        if OPS[node.op].weighted:
            bits["w_bits", node.name] = node.w_bits
        if OPS[node.op].observed:
            bits["a_bits", node.name] = node.output_q.bits
    return bits


def _steps(model: nn.Module, inputs: torch.Tensor, spec: QuantSpec, choices: list[int], start: dict[Setting, int],
           base_cost: float, progress: bool) -> list[tuple[Setting, int]]:
    """Every one-choice-narrower step of every setting that saves cost, least added error per bit saved first."""
    narrowest, ranked = choices[0], []
    for key in ("w_bits", "a_bits"):
        sensitivity = layer_sensitivity(model, inputs, spec, **{key: narrowest}, progress=progress)
        base_error = _error_power(sensitivity.base.snr_db)
        for row in sensitivity.layers.itertuples():
            setting, bits = (key, row.layer), start[key, row.layer]
            saved = base_cost - (row.w_bits_per_mac + row.a_bits_per_mac) / 2
            if bits <= narrowest or saved <= 0:
                continue
            saved_per_bit = saved / (bits - narrowest)
            error = max(_error_power(row.snr_db) - base_error, 0.0)  # dE at the narrowest choice
            widths = [bits] + [b for b in reversed(choices) if b < bits]
            for wide, narrow in zip(widths, widths[1:]):
                added = error * (4.0 ** (narrowest - narrow) - 4.0 ** (narrowest - wide))
                ranked.append((added / (saved_per_bit * (wide - narrow)), (setting, narrow)))
    return [step for _, step in sorted(ranked, key=lambda item: item[0])]


def _error_power(snr_db: float) -> float:
    """Error power relative to the signal's, from an SNR in dB."""
    return 10 ** (-snr_db / 10)


def _spec(base: QuantSpec, bits: dict[Setting, int], start: dict[Setting, int]) -> QuantSpec:
    """``base`` with one override per layer whose bits differ from ``start``, in graph order."""
    layers: dict[str, dict[str, int]] = {}
    for (key, layer), value in bits.items():
        if value != start[key, layer]:
            layers.setdefault(layer, {})[key] = value
    return with_layer_overrides(base, layers, "mixed precision")
