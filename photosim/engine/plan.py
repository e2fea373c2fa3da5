"""The flat, frozen plan of one conv/linear: everything an execution backend needs, resolved once.

A LayerPlan holds the layer's integer weights and geometry, its requantization parameters, how its exact matmul
forms dot products, whether PyTorch's kernel saturates pair sums (``pytorch`` requant), and, for a layer that is
not ideal, its readout (photosim.hardware.readout). Backends (photosim.engine.backends) decide from it whether they
can run the layer, and run it from it; none reads the configuration tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from photosim.engine import fbgemm, kernels
from photosim.engine.requant import REQUANT_MODES, RequantMode, RequantParams
from photosim.engine.torch_requant import pytorch_kernel, resolve_cpu_family
from photosim.hardware.config import LayerHardware
from photosim.hardware.readout import FLOAT32_EXACT, Readout, tile_length
from photosim.ir.format import Node, QuantizedModel, weights_scale
from photosim.ir.ranges import max_magnitude
from photosim.ir.summary import operand_max

Kind = Literal["ideal", "analog"]


@dataclass(frozen=True)
class LayerPlan:
    """One conv/linear prepared for execution (the tensors stay on the CPU; backends move what they use)."""

    node: Node  # name, op, attrs, quantization of input and output
    index: int  # position in the graph
    weight: torch.Tensor  # integer weight codes as in the file: (O, C/G, kh, kw) or (O, K)
    mode: RequantMode
    requant: RequantParams
    matmul: kernels.MatmulPlan  # how exact dot products (ideal) or tile sums (analog) are formed
    pair_saturation: bool  # PyTorch's FBGEMM kernel adds u8 x s8 pairs in saturating int16 (``pytorch`` requant)
    readout: Readout | None  # None: the ideal integer dot product

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def kind(self) -> Kind:
        """``ideal`` (exact accumulators) or ``analog`` (the tile step of photosim.hardware.readout)."""
        return "ideal" if self.readout is None else "analog"

    @property
    def groups(self) -> int:
        return self.node.attrs.get("groups", 1)

    @property
    def k(self) -> int:
        """Dot-product length per output (per group)."""
        return self.weight[0].numel()

    @property
    def z_in(self) -> int:
        return self.node.input_q[0].zero_point

    @property
    def x_range(self) -> kernels.IntPair:
        """The range of ``x - z_in`` the input clamp allows."""
        q_in = self.node.input_q[0]
        return q_in.qmin - q_in.zero_point, q_in.qmax - q_in.zero_point

    def conv_geometry(self) -> tuple[kernels.IntPair, kernels.IntPair, kernels.IntPair, kernels.IntPair]:
        """(kernel, stride, padding, dilation) of a conv2d."""
        a = self.node.attrs
        return tuple(kernels.pair(a[key]) for key in ("kernel", "stride", "padding", "dilation"))  # type: ignore


def tile_plan(k: int, readout: Readout, x_range: kernels.IntPair, w_bits: int, device: torch.device
              ) -> kernels.MatmulPlan:
    """How a layer forms its tile sums. Integer weights: int8 operands (int32 sums, exact) where the operands fit
    int8, with an offset if need be, and int8 GEMMs are faster: on CPUs where torch._int_mm beats float32 (VNNI,
    AMX: 8x faster here), and on CUDA, where the Triton tile step takes int8 operands of any tile length (float
    ones only below 2^24). Else float32 where the sums are exact there (full scale below 2^24). Otherwise float64
    (exact for tile sums of up to 16-bit codes, and the path of weights with error and of inexact inputs: DAC noise,
    a nonlinear modulator)."""
    if not (readout.exact_weights and readout.exact_inputs):
        return kernels.MatmulPlan("float64", chunk=k)
    plan = kernels.plan_matmul(tile_length(k, readout.tile), x_range, w_bits, device=device)
    if plan.path == "int_mm":
        return kernels.MatmulPlan("int_mm", chunk=k, offset=plan.offset)
    x_max, w_max = max(-x_range[0], x_range[1]), max_magnitude(w_bits)
    exact32 = tile_length(k, readout.tile) * x_max * w_max < FLOAT32_EXACT
    return kernels.MatmulPlan("float32" if exact32 else "float64", chunk=k)


def plan_layer(qmodel: QuantizedModel, index: int, settings: LayerHardware, device: torch.device, *,
               seed: int = 0, repeat: int = 0, measured_range: float | None = None, analog: bool = False,
               calibrating: bool = False, qengine: str | None = None) -> LayerPlan:
    """The plan of node ``index`` (a conv/linear) under its resolved ``settings`` on ``device``.

    ``analog``: run the tile step (settings that are not ideal, or an ADC range being measured: ``calibrating``);
    ``measured_range``: the calibrated ADC's +-range in product units.
    """
    node = qmodel.nodes[index]
    tensors = qmodel.tensors
    weight = tensors[f"{node.name}.weight"]
    q_in = node.input_q[0]
    bias_float = tensors.get(f"{node.name}.bias_float")
    kernel_name = pytorch_kernel(node, qengine or qmodel.provenance.get("qengine", "x86"), settings.pytorch_cpu)
    requant = RequantParams(
        input_scale=q_in.scale,
        weight_scale=weights_scale(qmodel, node).to(device),
        output=node.output_q,
        bias=tensors[f"{node.name}.bias"].to(device, torch.int64),
        bias_float=None if bias_float is None else bias_float.to(device),
        per_channel=tensors[f"{node.name}.weight_scale"].dim() == 1,
        kernel=kernel_name,
        node=node.name,
    )
    groups = node.attrs.get("groups", 1)
    x_range = (q_in.qmin - q_in.zero_point, q_in.qmax - q_in.zero_point)
    readout = None
    if analog:
        x_max, w_max = operand_max(node)
        readout = Readout.of(settings, weight[0].numel(), x_max, w_max, layer=index, seed=seed, repeat=repeat,
                             measured_range=measured_range, calibrating=calibrating, x_span=x_range[1] - x_range[0])
        matmul = tile_plan(weight[0].numel(), readout, x_range, node.w_bits, device)
    else:
        matmul = kernels.plan_matmul(weight[0].numel(), x_range, node.w_bits, groups=groups, device=device)
    saturation = readout is None and _pair_saturation(node, settings, kernel_name, weight)
    return LayerPlan(node, index, weight, REQUANT_MODES[settings.requant], requant, matmul, saturation, readout)


def _pair_saturation(node: Node, settings: LayerHardware, kernel_name: str, weight: torch.Tensor) -> bool:
    """Whether PyTorch's kernel for this layer sums uint8 x int8 pairs in saturating int16 (vpmaddubsw) and some
    pair can saturate: FBGEMM's depthwise kernel on every x86 CPU, and its GEMM on CPUs without VNNI."""
    q_in = node.input_q[0]
    if settings.requant != "pytorch" or q_in.signed:
        return False
    no_vnni = resolve_cpu_family(settings.pytorch_cpu) == "avx2"
    if not (kernel_name == "fbgemm-depthwise" or (kernel_name == "fbgemm" and no_vnni)):
        return False
    return fbgemm.can_saturate(weight, max(q_in.qmax, q_in.zero_point))


def describe(plan: LayerPlan) -> dict[str, Any]:
    """A layer plan's facts for reports: op, kind, requant mode, matmul path and the readout's main settings."""
    row: dict[str, Any] = {"layer": plan.name, "op": plan.node.op, "kind": plan.kind, "requant": plan.mode.name,
                           "matmul": plan.matmul.path}
    if plan.readout is not None:
        r = plan.readout
        effects = [*r.tile_noise, *r.weight_noise, *r.weight_models, *(["custom"] if r.custom else []),
                   *r.input_effects]
        row.update(tile=r.tile, tiles=r.tiles, adc_bits=r.adc_bits, acc_bits=r.acc_bits, overflow=r.overflow,
                   noise=",".join(effects) or "-")
    return row
