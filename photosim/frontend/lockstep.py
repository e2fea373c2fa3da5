"""The calibration set pushed through the float graph and the quantized prefix in lockstep, layer by layer.

Error-correcting PTQ (GPTQ, GPFQ, bias correction) quantizes a layer knowing the inputs it will really get:
those of the layers before it as already quantized (the fake-quantized reference of ``photosim.ir.fakequant``,
the integer engine's semantics in float64), next to the float model's.
"""

from __future__ import annotations

from collections import Counter

import torch

from photosim.frontend.algorithms.layer import LayerData
from photosim.frontend.graph import FloatGraph, FloatNode
from photosim.ir.fakequant import fake_quantize, run_node
from photosim.ir.format import Node, QParams, QuantizedModel


class LockstepRun:
    """Float and quantized-prefix values of the calibration batch; advance it one node at a time, in order."""

    def __init__(self, graph: FloatGraph, x: torch.Tensor, input_q: QParams) -> None:
        self.float = {"input": x.float()}
        self.quant = {"input": fake_quantize(x.double(), input_q)}
        self.uses = Counter(name for node in graph.nodes for name in node.inputs)
        self.output = graph.output

    def layer(self, fnode: FloatNode) -> LayerData:
        """A conv/linear node with its calibration inputs from both runs."""
        return LayerData(fnode, self.float[fnode.inputs[0]], self.quant[fnode.inputs[0]])

    def advance(self, fnode: FloatNode, node: Node, model: QuantizedModel) -> None:
        """Run ``fnode`` in float and ``node`` (whose tensors are in ``model``) fake-quantized; free spent inputs."""
        self.float[fnode.name] = fnode.forward([self.float[i] for i in fnode.inputs])
        self.quant[fnode.name] = run_node(model, node, *(self.quant[i] for i in node.inputs))
        for name in fnode.inputs:
            self.uses[name] -= 1
            if self.uses[name] == 0 and name != self.output:
                del self.float[name], self.quant[name]
