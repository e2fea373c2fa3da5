"""Per-layer facts of an integer model: shapes, bits, scales, MACs and worst-case accumulator width."""

from __future__ import annotations

import math

import pandas as pd

from photosim.ir.format import Node, QuantizedModel
from photosim.ir.ops import OPS, infer_shapes
from photosim.ir.ranges import max_int, max_magnitude


def dot_length(node: Node) -> int:
    """K: the number of products summed into one output of a conv/linear."""
    return OPS[node.op].dot_length(node.attrs)


def operand_max(node: Node) -> tuple[int, int]:
    """(Xmax, Wmax): the largest |x - z_in| the input clamp range allows and the largest |weight code|
    2^(w_bits-1); a tile of L products spans +-L * Xmax * Wmax (its full scale)."""
    q = node.input_q[0]
    return q.largest_offset, max_magnitude(node.w_bits)


def worst_case_acc_bits(input_bits: int, w_bits: int, k: int, bias_bits: int | None = None) -> int:
    """Brevitas' bound ``ceil(log2((2^b_in - 1)(2^b_w - 1) K))``; with a bias, ``max(that, b_bias) + 1``."""
    bits = math.ceil(math.log2(max_int(input_bits, signed=False) * max_int(w_bits, signed=False) * k))
    return bits if bias_bits is None else max(bits, bias_bits) + 1


def output_shapes(model: QuantizedModel) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of the graph input and every node's output, inferred from the node attributes."""
    return infer_shapes(model.input_name, model.input_shape, model.nodes)


def layer_table(model: QuantizedModel) -> pd.DataFrame:
    """One row per node: op, shapes, bits, scales, zero points, MACs per sample, accumulator bits."""
    shapes = output_shapes(model)
    rows = []
    for node in model.nodes:
        out_shape = shapes[node.name]
        row = {
            "layer": node.name,
            "op": node.op,
            "input_shape": "x".join(str(d) for d in shapes[node.inputs[0]]),
            "output_shape": "x".join(str(d) for d in out_shape),
            "in_bits": node.input_q[0].bits,
            "w_bits": node.w_bits,
            "a_bits": node.output_q.bits,
            "bias_bits": node.bias_bits,
            "input_scale": node.input_q[0].scale,
            "output_scale": node.output_q.scale,
            "output_zero_point": node.output_q.zero_point,
            "weight_scale": None,
            "macs": 0,
            "acc_bits": None,
            "acc_bits_with_bias": None,
        }
        if OPS[node.op].weighted:
            k = dot_length(node)
            scale = model.tensors[f"{node.name}.weight_scale"]
            row["weight_scale"] = (
                f"{float(scale):.3g}" if scale.dim() == 0 else f"{float(scale.min()):.3g}..{float(scale.max()):.3g}"
            )
            row["macs"] = math.prod(out_shape) * k
            row["acc_bits"] = worst_case_acc_bits(node.input_q[0].bits, node.w_bits, k)
            row["acc_bits_with_bias"] = worst_case_acc_bits(node.input_q[0].bits, node.w_bits, k, node.bias_bits)
        rows.append(row)
    return pd.DataFrame(rows)


def bits_per_mac(model: QuantizedModel) -> tuple[float, float]:
    """Weight bits and input-activation bits averaged over every multiply-accumulate of one inference.

    Each conv/linear layer counts with its MACs: a MAC multiplies one ``w_bits`` weight by one input code
    of the layer's input bits, so these are the mean operand widths a MAC engine sees.
    """
    weighted = [n for n in model.nodes if OPS[n.op].weighted]
    shapes = output_shapes(model)
    macs = [math.prod(shapes[n.name]) * dot_length(n) for n in weighted]
    total = sum(macs)
    if not total:
        return math.nan, math.nan
    return (sum(m * n.w_bits for m, n in zip(macs, weighted)) / total,
            sum(m * n.input_q[0].bits for m, n in zip(macs, weighted)) / total)
