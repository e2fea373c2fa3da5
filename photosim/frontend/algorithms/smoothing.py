"""SmoothQuant: per-channel outliers of a LayerNorm's output moved into the weights of the linear layers it feeds.

Xiao, Lin, Seznec, Wu, Demouth and Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023 (arXiv:2211.10438), section 4. A transformer's LayerNorm outputs have a few channels
far larger than the rest, and one per-tensor activation scale spends its codes on them. For a layer_norm whose
every consumer is a linear layer (pre-norm attention's in-projection, the MLP's first layer), channel ``j`` of
its output is divided by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``max|X_j|``: over the calibration
inputs; ``max|W_j|``: over the consumers' weights on input ``j``; ``alpha = 0.5``, the paper's choice for most
models) by scaling the LayerNorm's gamma and beta, and the consumers' columns ``j`` are multiplied by it: the
float function is unchanged, activation and weight ranges meet halfway. The weights are per channel (over
outputs), so the moved range costs them little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from photosim.frontend.algorithms.registry import GraphAlgorithm, register_algorithm
from photosim.frontend.graph import FloatGraph, FloatNode
from photosim.ir.ops import consumers

ALPHA = 0.5  # migration strength (the paper's default)


def smoothable(graph: FloatGraph) -> dict[str, list[FloatNode]]:
    """layer_norm nodes (by name) with a learned affine and no fused clamp whose consumers are all linear layers,
    with those consumers."""
    readers = consumers(graph.nodes)
    return {node.name: readers[node.name] for node in graph.nodes
            if node.op == "layer_norm" and node.weight is not None and node.bias is not None and node.act is None
            and node.name != graph.output and readers.get(node.name)
            and all(c.op == "linear" for c in readers[node.name])}


def channel_ranges(graph: FloatGraph, names: Sequence[str], batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """max |x| per last-dimension channel of each named node's output over the calibration batches, float64."""
    ranges: dict[str, torch.Tensor] = {}

    def observe(name: str, y: torch.Tensor) -> None:
        if name in names:
            r = y.detach().abs().reshape(-1, y.shape[-1]).amax(dim=0).double()
            ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r

    with torch.no_grad():
        for x in batches:
            graph.run(x.float(), observe)
    return ranges


def smooth(graph: FloatGraph, batches: Sequence[torch.Tensor]) -> None:
    """SmoothQuant on every smoothable LayerNorm of ``graph``, in place (the float function is unchanged)."""
    targets = smoothable(graph)
    by_name = {node.name: node for node in graph.nodes}
    ranges = channel_ranges(graph, list(targets), batches)
    for name, linears in targets.items():
        norm = by_name[name]
        w_range = torch.stack([lin.weight.double().abs().amax(dim=0) for lin in linears]).amax(dim=0)
        x_range = ranges[name]
        s = x_range.pow(ALPHA) / w_range.pow(1 - ALPHA)
        s = torch.where((x_range > 0) & (w_range > 0) & torch.isfinite(s), s, torch.ones_like(s))
        norm.weight = (norm.weight.double() / s).float()
        norm.bias = (norm.bias.double() / s).float()
        for lin in linears:
            lin.weight = (lin.weight.double() * s).float()


register_algorithm(GraphAlgorithm("smoothquant", "Xiao et al. 2023, arXiv:2211.10438", smooth))
