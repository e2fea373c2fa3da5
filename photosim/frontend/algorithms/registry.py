"""The registry of error-correcting PTQ algorithms, by name, and the rules for combining them.

An algorithm acts at one of three stages of ``photosim.frontend.ptq.quantize``:

* ``graph``: rewrites the float graph before calibration (cross-layer equalization, SmoothQuant);
* ``rounding``: chooses a layer's integer weight codes, given its weight scales and the Gram matrices of its
  calibration inputs (GPTQ, GPFQ), or the inputs themselves (reconstruction: AdaRound, QDrop); at most one per
  quantization;
* ``bias``: corrects a layer's float bias before it is rounded to the integer bias (bias correction).

None of them changes the integer file format: only the codes, scales and integer biases written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from photosim.frontend.algorithms.layer import LayerData, LayerGrams
    from photosim.frontend.graph import FloatGraph

AUTO = "auto"  # choose the combination by agreement with the float model (selection.py)


@dataclass(frozen=True)
class GraphAlgorithm:
    """Rewrites the float graph in place, keeping its float function (given the calibration batches, which a
    data-free one ignores)."""

    name: str
    paper: str
    transform: Callable[[FloatGraph, Sequence[torch.Tensor]], None]


@dataclass(frozen=True)
class RoundingAlgorithm:
    """``round(w (O, K), scale (O,), bits, grams) -> codes (O, K)`` for one group of a layer, in float64."""

    name: str
    paper: str
    round: Callable[[torch.Tensor, torch.Tensor, int, LayerGrams], torch.Tensor]

    def codes(self, layer: LayerData, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        """The layer's integer weight codes (shape of ``weight``), group by group from its Gram matrices."""
        return layer.round(self.round, weight, scale, bits)


@dataclass(frozen=True)
class ReconstructionAlgorithm:
    """``reconstruct(layer, weight, scale, bits) -> codes``: codes (shape of ``weight``) fitted by optimisation
    to the layer's calibration inputs themselves (too many statistics for Gram matrices: minibatches, masks)."""

    name: str
    paper: str
    reconstruct: Callable[[LayerData, torch.Tensor, torch.Tensor, int], torch.Tensor]

    def codes(self, layer: LayerData, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        """The layer's integer weight codes (shape of ``weight``)."""
        return self.reconstruct(layer, weight, scale, bits)


@dataclass(frozen=True)
class BiasAlgorithm:
    """``correct(layer, dequantized_weight, bias) -> bias``: a corrected float bias (O,) float64."""

    name: str
    paper: str
    correct: Callable[[LayerData, torch.Tensor, torch.Tensor], torch.Tensor]


WeightRounding = RoundingAlgorithm | ReconstructionAlgorithm
Algorithm = GraphAlgorithm | WeightRounding | BiasAlgorithm
ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm to the registry; refuses a name taken already."""
    if algorithm.name in ALGORITHMS or algorithm.name == AUTO:
        raise ValueError(f"PTQ algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def check_selection(names: list[str]) -> None:
    """Raise ValueError unless ``names`` is `auto` alone, or known algorithms, each once, one rounding at most."""
    if AUTO in names:
        if names != [AUTO]:
            raise ValueError(f"`{AUTO}` chooses the algorithms itself; give it alone, not with {names}")
        return
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown PTQ algorithm(s) {unknown}; known: {', '.join(ALGORITHMS)} or {AUTO}")
    if len(set(names)) != len(names):
        raise ValueError(f"PTQ algorithms {names} name one twice")
    rounding = [n for n in names if isinstance(ALGORITHMS[n], WeightRounding)]
    if len(rounding) > 1:
        raise ValueError(f"{' and '.join(rounding)} both choose the weight codes; pick one of them")


@dataclass(frozen=True)
class Selection:
    """The algorithms of one quantization, by stage."""

    graph: tuple[GraphAlgorithm, ...]
    rounding: WeightRounding | None
    bias: tuple[BiasAlgorithm, ...]

    @classmethod
    def of(cls, names: list[str]) -> Selection:
        check_selection(names)
        chosen = [ALGORITHMS[n] for n in names]
        rounding = [a for a in chosen if isinstance(a, WeightRounding)]
        return cls(tuple(a for a in chosen if isinstance(a, GraphAlgorithm)), rounding[0] if rounding else None,
                   tuple(a for a in chosen if isinstance(a, BiasAlgorithm)))

    @property
    def needs_data(self) -> bool:
        """Whether layers need their calibration inputs (from the float and the quantized prefix)."""
        return self.rounding is not None or bool(self.bias)
