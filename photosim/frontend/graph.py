"""The captured float graph: nodes of the op table (photosim.ir.ops) with float weights and fused clamps, in
topological order, executable in float (what calibration observes and PTQ translates node by node)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from photosim.ir.ops import OPS, walk


@dataclass
class FloatNode:
    """One float op; ``act`` is the (lo, hi) clamp fused into its output (ReLU = (0, inf))."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act: tuple[float, float] | None = None

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The op on float inputs, with the fused clamp applied."""
        y = OPS[self.op].reference(self.attrs, inputs, self.weight, self.bias)
        return y if self.act is None else y.clamp(self.act[0], self.act[1])


@dataclass
class FloatGraph:
    """Nodes in topological order; the graph input is named ``input``."""

    nodes: list[FloatNode]
    output: str
    input_shape: tuple[int, ...]

    def run(self, x: torch.Tensor, observe: Any = None) -> torch.Tensor:
        """Execute in float; ``observe(name, tensor)`` is called for the input and every node output (each tensor
        is dropped after its last consumer: photosim.ir.ops.walk)."""
        if observe:
            observe("input", x)
        return walk(self.nodes, {"input": x}, self.output, lambda node, xs: node.forward(xs),
                    observe=observe)[self.output]
