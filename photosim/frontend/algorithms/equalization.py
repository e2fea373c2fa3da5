"""Cross-layer equalization: per-channel rescaling of consecutive layers so that their weight ranges match.

Nagel, van Baalen, Blankevoort and Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019 (arXiv:1906.04721), section 4.1. For a layer ``A`` whose output channel ``c`` feeds
only layer ``B`` through positively homogeneous ops (ReLU, max/average pooling, flatten), ``A``'s row ``c``
and bias are divided by ``s_c`` and ``B``'s weights on input channel ``c`` multiplied by it, with
``s_c = sqrt(r1_c * r2_c) / r2_c`` (``r1``, ``r2``: the channel's weight ranges in ``A`` and ``B``): both ranges
become ``sqrt(r1_c * r2_c)`` and the float function is unchanged. Sweeps over all pairs repeat until the scales
settle, which equalizes chains of layers too. Data-free; it runs on the float graph before calibration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from photosim.frontend.algorithms.registry import GraphAlgorithm, register_algorithm
from photosim.frontend.graph import FloatGraph, FloatNode
from photosim.ir.ops import OPS, consumers

MAX_SWEEPS = 100
TOLERANCE = 1e-6  # stop when every scale of a sweep is within this of 1


@dataclass(frozen=True)
class Pair:
    """Layer ``first`` feeding layer ``second`` through channel-preserving, positively homogeneous ops."""

    first: FloatNode
    second: FloatNode


def _homogeneous(node: FloatNode) -> bool:
    return node.act is None or all(v in (0.0, math.inf, -math.inf) for v in node.act)


def equalizable_pairs(graph: FloatGraph) -> list[Pair]:
    """The (A, B) layer pairs of the graph that equalization may rescale."""
    readers = consumers(graph.nodes)
    pairs = []
    for first in (n for n in graph.nodes if OPS[n.op].weighted and _homogeneous(n)):
        node = first
        while node.name != graph.output and len(readers.get(node.name, [])) == 1:
            node = readers[node.name][0]
            if OPS[node.op].weighted:
                pairs.append(Pair(first, node))
                break
            if not OPS[node.op].channel_homogeneous or not _homogeneous(node):
                break
    return pairs


def input_channel_index(node: FloatNode, channels: int) -> torch.Tensor:
    """For each element of ``node.weight``, the input channel (of ``channels``) it multiplies."""
    weight = node.weight
    if node.op == "linear":  # after a flatten, each channel feeds in_features / channels consecutive features
        per_channel = weight.shape[1] // channels
        return (torch.arange(weight.shape[1]) // per_channel).expand(weight.shape)
    groups = int(node.attrs["groups"])
    per_group_in, per_group_out = weight.shape[1], weight.shape[0] // groups
    index = (torch.arange(weight.shape[0]) // per_group_out)[:, None] * per_group_in + torch.arange(per_group_in)
    return index[:, :, None, None].expand(weight.shape)


def equalize_pair(pair: Pair) -> torch.Tensor:
    """Rescale one pair in place; return the scales ``s`` (C,) applied."""
    w1, w2 = pair.first.weight.double(), pair.second.weight.double()
    channels = w1.shape[0]
    index = input_channel_index(pair.second, channels)
    r1 = w1.abs().reshape(channels, -1).amax(dim=1)
    r2 = torch.zeros(channels, dtype=torch.float64).scatter_reduce(0, index.reshape(-1), w2.abs().reshape(-1),
                                                                   "amax")
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2, torch.ones_like(r1))
    pair.first.weight = (w1 / s.view(-1, *([1] * (w1.dim() - 1)))).float()
    pair.first.bias = (pair.first.bias.double() / s).float()
    pair.second.weight = (w2 * s[index]).float()
    return s


def equalize(graph: FloatGraph, batches: Sequence[torch.Tensor] = ()) -> None:
    """Cross-layer equalization of every equalizable pair of ``graph``, in place (data-free: ``batches`` unused)."""
    pairs = equalizable_pairs(graph)
    for _ in range(MAX_SWEEPS):
        largest = max((float((equalize_pair(p) - 1).abs().max()) for p in pairs), default=0.0)
        if largest < TOLERANCE:
            break


register_algorithm(GraphAlgorithm("equalize", "Nagel et al. 2019, arXiv:1906.04721", equalize))
