"""One layer's calibration data as the weight-rounding and bias algorithms see it.

A conv/linear layer computes, per group ``g``, ``y = W_g x_g`` on input patches ``x_g`` (length ``K``: the
group's input channels times the kernel window). The algorithms need the layer's input twice: from the float
model (``x_float``) and from the already-quantized prefix (``x_quant``, fake-quantized), and mostly only
through the Gram matrices ``X_quant^T X_quant`` and ``X_quant^T X_float`` over every patch of the calibration set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from photosim.frontend.graph import FloatNode
from photosim.ir.ops import OPS

PATCH_ELEMENTS = 1 << 24  # patch values materialised at once while summing the Gram matrices


@dataclass(frozen=True)
class LayerGrams:
    """Gram matrices (K, K) of one group's input patches: quantized x quantized, quantized x float."""

    qq: torch.Tensor
    qf: torch.Tensor


@dataclass
class LayerData:
    """A conv/linear node with its calibration inputs from the float model and from the quantized prefix."""

    node: FloatNode
    x_float: torch.Tensor
    x_quant: torch.Tensor

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("groups", 1))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Input patches of a batch, per group: (groups, patches, K), float64."""
        x = x.double()
        if self.node.op == "linear":
            return x.reshape(1, -1, x.shape[-1])  # every position (token) of every sample is a patch
        a = self.node.attrs
        cols = F.unfold(x, a["kernel"], a["dilation"], a["padding"], a["stride"])  # (N, C * kh * kw, L)
        n, length = cols.shape[0], cols.shape[2]
        return cols.view(n, self.groups, -1, length).permute(1, 0, 3, 2).reshape(self.groups, n * length, -1)

    def grams(self) -> list[LayerGrams]:
        """The Gram matrices of each group over the whole calibration set (summed in chunks of samples)."""
        one = self.patches(self.x_quant[:1])  # (groups, patches per sample, K)
        chunk = max(1, PATCH_ELEMENTS // one.numel())
        qq = qf = one.new_zeros(one.shape[0], one.shape[2], one.shape[2])
        for start in range(0, len(self.x_quant), chunk):
            xq = self.patches(self.x_quant[start:start + chunk])
            xf = self.patches(self.x_float[start:start + chunk])
            qq = qq + xq.transpose(1, 2) @ xq
            qf = qf + xq.transpose(1, 2) @ xf
        return [LayerGrams(a, b) for a, b in zip(qq, qf)]

    def outputs(self, weight: torch.Tensor, bias: torch.Tensor, quantized_input: bool) -> torch.Tensor:
        """The layer's output before its fused activation, float64, on the quantized or the float input."""
        x = (self.x_quant if quantized_input else self.x_float).double()
        return OPS[self.node.op].reference(self.node.attrs, [x], weight.double(), bias.double())

    def round(self, rounding: Rounding, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        """Integer codes of the layer's weights (shape of ``weight``), chosen group by group by ``rounding``."""
        rows = weight.double().reshape(self.groups, weight.shape[0] // self.groups, -1)  # (groups, O / groups, K)
        scales = scale.double().expand(weight.shape[0]).reshape(self.groups, -1)
        codes = [rounding(w, s, bits, grams) for w, s, grams in zip(rows, scales, self.grams())]
        return torch.stack(codes).reshape(weight.shape).to(torch.int64)


Rounding = Callable[[torch.Tensor, torch.Tensor, int, LayerGrams], torch.Tensor]
