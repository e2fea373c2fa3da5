"""Label-free choice among PTQ algorithm combinations: the one whose outputs agree best with the float model.

Each candidate is quantized and run (fake-quantized) on the calibration inputs; candidates are ranked by the
mean KL divergence of the softmax of the outputs (float || quantized), ties broken by top-1 agreement. KL
rather than top-1 agreement first: on a few hundred calibration inputs agreement moves in steps of one input
and saturates near 100%, and the algorithms were fitted on these same inputs, so it picks noise (seen on
the built-ins at 3 bits); KL measures every output. Only the calibration inputs are used, never labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from photosim.ir.fakequant import fake_quant_forward
from photosim.ir.format import QuantizedModel
from photosim.ir.ops import consumers

# every combination of equalization, one Gram-based weight rounding (or none) and bias correction
CANDIDATES: list[list[str]] = [
    [*graph, *rounding, *bias]
    for graph in ([], ["equalize"]) for rounding in ([], ["gptq"], ["gpfq"]) for bias in ([], ["bias_correction"])
]
# tried too when some layer has weights of at most RECONSTRUCTION_BITS bits: a reconstruction costs 10 to 30
# Gram-based quantizations, and of the reconstructions this one came closest to float on the built-ins (docs/ptq.md)
RECONSTRUCTION_BITS = 4
RECONSTRUCTION_CANDIDATES: list[list[str]] = [["adaround", "bias_correction"]]
# tried too when a LayerNorm feeds only linear layers (a transformer's pre-norm blocks): SmoothQuant's migration
SMOOTHING_CANDIDATES: list[list[str]] = [["smoothquant"], ["smoothquant", "bias_correction"],
                                         ["smoothquant", "gptq", "bias_correction"]]


CRITERION = "mean KL(softmax(float) || softmax(quantized)), then top-1 agreement, on the calibration inputs"


@dataclass(frozen=True)
class Agreement:
    """How closely quantized outputs follow the float ones on the calibration inputs."""

    top1: float  # fraction of inputs with the same arg-max
    kl: float  # mean KL(softmax(float) || softmax(quantized)), nats

    def rank(self) -> tuple[float, float]:
        """Sort key: smaller is better."""
        return self.kl, -self.top1


def top1_agreement(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of rows of ``outputs`` (N, classes) whose argmax is the ``reference`` row's argmax."""
    return float((outputs.argmax(dim=1) == reference.argmax(dim=1)).double().mean())


def agreement(reference: torch.Tensor, outputs: torch.Tensor) -> Agreement:
    """Agreement of ``outputs`` (N, classes) with the float ``reference`` (N, classes)."""
    reference, outputs = reference.double().flatten(1), outputs.double().flatten(1)
    top1 = top1_agreement(outputs, reference)
    log_p, log_q = reference.log_softmax(dim=1), outputs.log_softmax(dim=1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())
    return Agreement(top1, kl)


def label(names: list[str]) -> str:
    """A candidate's name in reports: its algorithms joined by commas, or `none`."""
    return ",".join(names) or "none"


def _norm_feeds_linears(qmodel: QuantizedModel) -> bool:
    """Whether some layer_norm's consumers are all linear layers (what SmoothQuant rescales)."""
    readers = consumers(qmodel.nodes)
    return any(node.op == "layer_norm" and {r.op for r in readers.get(node.name, [])} == {"linear"}
               for node in qmodel.nodes)


def candidates(qmodel: QuantizedModel) -> list[list[str]]:
    """The combinations `auto` tries for a model of ``qmodel``'s graph and bit widths (any candidate of it will do)."""
    weight_bits = [node.w_bits for node in qmodel.nodes if node.w_bits is not None]
    low = min(weight_bits, default=RECONSTRUCTION_BITS + 1) <= RECONSTRUCTION_BITS
    return (CANDIDATES + (RECONSTRUCTION_CANDIDATES if low else [])
            + (SMOOTHING_CANDIDATES if _norm_feeds_linears(qmodel) else []))


def select(build: Callable[[list[str]], QuantizedModel], x: torch.Tensor,
           reference: torch.Tensor) -> tuple[QuantizedModel, dict[str, Any]]:
    """The candidate model whose fake-quantized outputs on ``x`` agree best with ``reference``, and the scores."""
    first = build(CANDIDATES[0])
    results = []
    for names in candidates(first):
        qmodel = first if names == CANDIDATES[0] else build(names)
        results.append((agreement(reference, fake_quant_forward(qmodel, x)), label(names), qmodel))
    _, chosen, qmodel = min(results, key=lambda result: result[0].rank())
    return qmodel, {"chosen": chosen, "criterion": CRITERION,
                    "candidates": {name: asdict(score) for score, name, _ in results}}
