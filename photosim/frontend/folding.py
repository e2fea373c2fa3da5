"""Constant folding at capture: every part of a traced graph with no path from the model input (parameters, buffers,
literals and what is computed from them alone: Swin's relative position bias tables, Swin v2's continuous position
bias MLP, index tables) is evaluated once in float, so it costs nothing on the engine and is never refused.

What reaches an input-dependent op becomes one Constant node (photosim.ir.ops.Constant): a value the same for every
sample, stored in the model file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx


def input_dependent(graph: fx.Graph) -> set[str]:
    """Names of the nodes with a path from a graph input (shape arithmetic on the input included)."""
    dependent: set[str] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a.name in dependent for a in node.all_input_nodes):
            dependent.add(node.name)
    return dependent


def fold_constants(gm: fx.GraphModule) -> dict[str, Any]:
    """fx node name -> its value, for every node with no path from the input, evaluated once in the model's float
    dtype (exactly what the float model computes for it)."""
    dependent = input_dependent(gm.graph)
    interpreter = fx.Interpreter(gm)
    values: dict[str, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output") or node.name in dependent:
                continue
            interpreter.env[node] = values[node.name] = interpreter.run_node(node)
    return values


def per_sample_constant(value: torch.Tensor, rank: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A folded ``value`` read by an op whose output has ``rank`` dimensions (the batch included), as the per-sample
    value of a Constant node: left-padded with size-1 dimensions (broadcasting), the batch dimension dropped, and
    expanded to ``shape`` (per sample) for ops that take equal shapes (add). ValueError with the reason when the
    value is not one value for every sample."""
    if value.dim() > rank:
        raise ValueError(f"has shape {tuple(value.shape)}, more dimensions than the {rank} of the op reading it")
    padded = value.detach().reshape(*(1,) * (rank - value.dim()), *value.shape)
    if padded.shape[0] != 1:
        raise ValueError(f"has shape {tuple(value.shape)}: its first dimension {padded.shape[0]} lines up with the "
                         "batch, so it is not one value for every sample")
    sample = padded[0]
    return (sample.expand(shape) if shape is not None else sample).float().clone()
