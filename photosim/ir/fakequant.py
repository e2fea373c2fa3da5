"""The fake-quantized float reference: the integer file executed in float64 with quantize-dequantize
at the same points and with the same parameters as the integer engine.

It is what fake-quant toolkits compute; the integer engine's ``float`` requant mode agrees with it to
within one output LSB (float rounding of the accumulation), so float / fake-quant / engine accuracies
can be compared.
"""

from __future__ import annotations

import torch

from photosim.ir.format import Node, QParams, QuantizedModel, weights_scale
from photosim.ir.ops import EXP_ONE, OPS, walk


def fake_quantize(x: torch.Tensor, q: QParams) -> torch.Tensor:
    """Quantize-dequantize in float64: ``(clamp(rne(x / s) + z, qmin, qmax) - z) * s``."""
    codes = torch.round(x / q.scale) + q.zero_point
    return (codes.clamp(q.qmin, q.qmax) - q.zero_point) * q.scale


def dequantized_params(model: QuantizedModel, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv/linear node's weights and bias in float64, as the integer engine applies them."""
    scale = weights_scale(model, node)  # (O,) float64
    w = model.tensors[f"{node.name}.weight"].double()
    weight = w * scale.view(-1, *([1] * (w.dim() - 1)))
    bias = model.tensors[f"{node.name}.bias"].double() * node.input_q[0].scale * scale
    return weight, bias


def lookup_table(node: Node) -> torch.Tensor:
    """A table node's ``<node>.table``: the fake-quantized function at every input storage code, lowest first
    (int32): ``clamp(rne(f((c - z_in) s_in) / s_out) + z_out, qmin, qmax)`` in float64."""
    q_in = node.input_q[0]
    lo, hi = QParams.storage_range(q_in.bits, q_in.signed)
    x = (torch.arange(lo, hi + 1, dtype=torch.float64) - q_in.zero_point) * q_in.scale
    y = OPS[node.op].reference(node.attrs, [x])
    codes = torch.round(y / node.output_q.scale) + node.output_q.zero_point
    return codes.clamp(node.output_q.qmin, node.output_q.qmax).to(torch.int32)


def exp_table(node: Node) -> torch.Tensor:
    """A softmax node's ``<node>.exp``: ``rne(2^30 exp(-k s_in))`` for k = 0 .. 2^bits - 1 (int32, float64 exp)."""
    k = torch.arange(1 << node.input_q[0].bits, dtype=torch.float64)
    return torch.round(EXP_ONE * torch.exp(-k * node.input_q[0].scale)).to(torch.int32)


def run_node(model: QuantizedModel, node: Node, *inputs: torch.Tensor) -> torch.Tensor:
    """One node on dequantized float64 inputs -> its fake-quantized float64 output."""
    op = OPS[node.op]
    weight, bias = dequantized_params(model, node) if op.weighted else (None, None)
    if op.affine:
        weight, bias = (model.tensors[f"{node.name}.{k}"].double() for k in ("gamma", "beta"))
    if op.valued:
        weight = model.tensors[f"{node.name}.value"].double()
    y = op.reference(node.attrs, inputs, weight, bias)
    return y if op.moves_codes else fake_quantize(y, node.output_q)


def fake_quant_forward(model: QuantizedModel, x: torch.Tensor) -> torch.Tensor:
    """Float32 outputs of the fake-quantized reference for a batch of float inputs."""
    values = {model.input_name: fake_quantize(x.double(), model.input_q)}
    return walk(model.nodes, values, model.output, lambda node, xs: run_node(model, node, *xs))[model.output].float()
