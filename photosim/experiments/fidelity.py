"""Label-free fidelity of an integer model to its float model on calibration inputs: top-1 agreement and
output SNR, plus test-split accuracy when labels are at hand.

Agreement (``top1_agreement``, shared with the PTQ selection) is the fraction of inputs whose integer top-1
class is the float model's top-1 class; the output SNR is ``10 log10(sum f^2 / sum (q - f)^2)`` over every
logit ``f`` of the float model and ``q`` of the integer model. Neither needs labels, so both can steer
choices made on calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from photosim.engine.executor import in_chunks
from photosim.experiments.accuracy import accuracy
from photosim.experiments.workflow import chip_engine
from photosim.frontend.algorithms.selection import top1_agreement
from photosim.frontend.data import calibration_batches
from photosim.hardware.plan import HardwarePlan, HardwareSpec
from photosim.ir.format import QuantizedModel


@dataclass(frozen=True)
class Score:
    """Fidelity of one integer model: agreement in [0, 1], output SNR in dB, test top-1 (None: not asked)."""

    agreement: float
    snr_db: float
    test_top1: float | None = None


def output_snr_db(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal (reference) to error power over all elements, in dB; inf when they are equal."""
    error = float((logits.double() - reference.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return math.inf if error == 0 else 10 * math.log10(signal / error)


class FloatReference:
    """Calibration inputs with the float model's outputs on them, and the test split to score accuracy on."""

    def __init__(self, model: nn.Module, calibration: Any, samples: int, test: Any = None) -> None:
        """Take up to ``samples`` calibration inputs (as PTQ does) and run ``model`` (eval mode) on them."""
        self.inputs = torch.cat(calibration_batches(calibration, samples)).float()
        with torch.no_grad():
            self.logits = model(self.inputs).float()
        self.test = test

    def score(self, qmodel: QuantizedModel, hw: HardwareSpec = None, *, repeats: int = 1, seed: int = 0,
              batch_size: int = 256, with_test: bool = True) -> Score:
        """Fidelity of ``qmodel`` on the engine under ``hw``, averaged over ``repeats`` simulated chips when
        ``hw`` is random (a calibrated ADC takes its ranges from the calibration inputs); test accuracy too
        when the reference has a test split and ``with_test``."""
        plan = HardwarePlan.resolve(qmodel, hw)
        return _mean([self._score_chip(qmodel, plan, seed, repeat, batch_size, with_test)
                      for repeat in range(plan.chips(repeats))])

    def _score_chip(self, qmodel: QuantizedModel, hw: HardwarePlan, seed: int, repeat: int, batch_size: int,
                    with_test: bool) -> Score:
        """The score on one simulated chip."""
        engine = chip_engine(qmodel, hw, self.inputs, seed=seed, repeat=repeat, batch_size=batch_size,
                             adc_samples=len(self.inputs), diagnostics=False)
        with torch.no_grad():
            logits = in_chunks(engine, self.inputs, batch_size)
        test = None
        if self.test is not None and with_test:  # noise streams from sample 0, as in `photosim run`
            test = accuracy(engine, self.test, batch_size=batch_size).top1
        return Score(top1_agreement(logits, self.logits), output_snr_db(logits, self.logits), test)


def _mean(scores: list[Score]) -> Score:
    """The mean score over Monte Carlo repeats."""
    tests = [s.test_top1 for s in scores if s.test_top1 is not None]
    return Score(sum(s.agreement for s in scores) / len(scores), sum(s.snr_db for s in scores) / len(scores),
                 sum(tests) / len(tests) if tests else None)
