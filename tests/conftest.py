"""Shared fixtures: hand-built integer models (independent of the PTQ pipeline)."""

from __future__ import annotations

from typing import Any

import torch

from photosim.engine.analog import AnalogLayer, TileStep
from photosim.engine.kernels import IntegerWeights
from photosim.engine.plan import LayerPlan
from photosim.engine.requant import REQUANT_MODES
from photosim.hardware.config import LayerHardware
from photosim.hardware.readout import Readout
from photosim.ir.fakequant import fake_quant_forward
from photosim.ir.format import Node, QParams, QuantizedModel


def qp(scale: float = 1.0, zero_point: int = 0, bits: int = 8, signed: bool = False,
       qmin: int | None = None, qmax: int | None = None) -> QParams:
    """QParams with the storage range as default clamp."""
    lo, hi = QParams.storage_range(bits, signed)
    return QParams(scale, zero_point, bits, signed, lo if qmin is None else qmin, hi if qmax is None else qmax)


class ModelBuilder:
    """Builds a QuantizedModel node by node; each node's input_q is its producers' output quantization."""

    def __init__(self, input_shape: tuple[int, ...], input_q: QParams, input_name: str = "x"):
        self.input_name, self.input_shape, self.input_q = input_name, input_shape, input_q
        self.nodes: list[Node] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def qparams(self, name: str) -> QParams:
        return self.input_q if name == self.input_name else next(n.output_q for n in self.nodes if n.name == name)

    def add(self, name: str, op: str, inputs: list[str], output_q: QParams | None = None, **attrs: Any) -> str:
        """A node without weights; output_q defaults to the first input's."""
        input_q = [self.qparams(i) for i in inputs]
        self.nodes.append(Node(name, op, inputs, input_q, output_q or input_q[0], attrs))
        return name

    def weighted(self, name: str, op: str, source: str, output_q: QParams, weight: torch.Tensor,
                 bias: torch.Tensor, weight_scale: float | torch.Tensor, w_bits: int = 8, bias_bits: int = 32,
                 **attrs: Any) -> str:
        """A conv2d / linear node with its integer tensors."""
        self.add(name, op, [source], output_q, **attrs)
        self.nodes[-1].w_bits, self.nodes[-1].bias_bits = w_bits, bias_bits
        self.tensors[f"{name}.weight"] = weight
        self.tensors[f"{name}.bias"] = bias.to(torch.int32 if bias_bits <= 32 else torch.int64)
        self.tensors[f"{name}.weight_scale"] = torch.as_tensor(weight_scale, dtype=torch.float32)
        return name

    def conv(self, name: str, source: str, output_q: QParams, weight: torch.Tensor, bias: torch.Tensor,
             weight_scale: float | torch.Tensor, *, stride: int = 1, padding: int = 0, dilation: int = 1,
             groups: int = 1, w_bits: int = 8) -> str:
        o, cg, kh, kw = weight.shape
        return self.weighted(name, "conv2d", source, output_q, weight, bias, weight_scale, w_bits,
                             in_channels=cg * groups, out_channels=o, kernel=[kh, kw], stride=[stride, stride],
                             padding=[padding, padding], dilation=[dilation, dilation], groups=groups)

    def linear(self, name: str, source: str, output_q: QParams, weight: torch.Tensor, bias: torch.Tensor,
               weight_scale: float | torch.Tensor, w_bits: int = 8) -> str:
        return self.weighted(name, "linear", source, output_q, weight, bias, weight_scale, w_bits,
                             in_features=weight.shape[1], out_features=weight.shape[0])

    def build(self) -> QuantizedModel:
        return QuantizedModel(self.input_name, self.input_shape, self.input_q, self.nodes, self.tensors,
                              self.nodes[-1].name)


def random_weights(shape: tuple[int, ...], bits: int, generator: torch.Generator) -> torch.Tensor:
    """Random signed ``bits``-bit codes (int16 / int8 storage as the format prescribes)."""
    lo, hi = QParams.storage_range(bits, True)
    dtype = torch.int8 if bits <= 8 else torch.int16
    return torch.randint(lo, hi + 1, shape, generator=generator).to(dtype)


def make_conv_net(seed: int = 0, w_bits: int = 8, a_bits: int = 8) -> QuantizedModel:
    """A small random CNN using every op: conv (grouped, depthwise), clamps, pools, add, flatten, linear."""
    g = torch.Generator().manual_seed(seed)
    a_hi = (1 << a_bits) - 1
    act = qp(0.05, a_hi // 8, a_bits)
    relu = qp(0.05, a_hi // 8, a_bits, qmin=a_hi // 8)
    m = ModelBuilder((3, 12, 12), qp(1 / 64, a_hi // 2, a_bits))
    m.conv("conv1", "x", act, random_weights((8, 3, 3, 3), w_bits, g), torch.randint(-500, 500, (8,), generator=g),
           torch.rand(8, generator=g) * 0.01 + 0.001, padding=1, w_bits=w_bits)
    m.add("relu1", "clamp", ["conv1"], relu)
    m.add("pool1", "maxpool2d", ["relu1"], kernel=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1],
          ceil_mode=True)
    m.conv("dw", "pool1", act, random_weights((8, 1, 3, 3), w_bits, g), torch.randint(-50, 50, (8,), generator=g),
           0.02, padding=1, groups=8, w_bits=w_bits)
    m.conv("grouped", "dw", act, random_weights((8, 4, 1, 1), w_bits, g), torch.zeros(8, dtype=torch.int32), 0.03,
           groups=2, w_bits=w_bits)
    m.add("res", "add", ["grouped", "pool1"], qp(0.07, a_hi // 4, a_bits))
    m.add("avg", "avgpool2d", ["res"], qp(0.06, a_hi // 4, a_bits), kernel=[3, 3], stride=[2, 2], padding=[1, 1],
          ceil_mode=True, count_include_pad=False, divisor_override=None)
    m.add("gap", "adaptive_avgpool2d", ["avg"], output_size=[1, 1])
    m.add("flat", "flatten", ["gap"], start_dim=1)
    m.linear("fc", "flat", qp(0.1, 0, a_bits, signed=True), random_weights((10, 8), w_bits, g),
             torch.randint(-100, 100, (10,), generator=g), 0.01, w_bits=w_bits)
    return m.build()


def analog_layer(hw: dict[str, Any], weights: IntegerWeights, bias: torch.Tensor | None, *, x_max: int, w_max: int,
                 seed: int = 0, repeat: int = 0, index: int = 3, tile_step: TileStep = "torch",
                 diagnostics: bool = True) -> AnalogLayer:
    """An AnalogLayer of prepared weights under the layer settings ``hw``, outside any model (its plan carries the
    readout; the requant fields, unused by the tile step, are left empty)."""
    settings = LayerHardware.model_validate(hw)
    readout = Readout.of(settings, weights.k, x_max, w_max, layer=index, seed=seed, repeat=repeat)
    node = Node("fc", "linear", ["x"], [qp()], qp(), {})
    plan = LayerPlan(node, index, torch.empty(0), REQUANT_MODES[settings.requant], None, weights.plan,  # type: ignore
                     False, readout)
    return AnalogLayer(plan, weights, bias, tile_step, diagnostics)


def make_cnn_ops_net() -> QuantizedModel:
    """A small graph of the ops make_conv_net does not use: slice, table, mul, concat, permute, mean."""
    from photosim.ir.fakequant import lookup_table

    q = qp(0.05, 16, 8)
    m = ModelBuilder((4, 6, 6), q)
    m.add("gate_in", "slice", ["x"], dim=1, start=0, stop=2)
    m.add("value", "slice", ["x"], dim=1, start=2, stop=4)
    m.add("gate", "table", ["gate_in"], qp(1 / 255, 0, 8), function="sigmoid")
    m.tensors["gate.table"] = lookup_table(m.nodes[-1])
    m.add("gated", "mul", ["gate", "value"], qp(0.04, 20, 8))
    m.add("both", "concat", ["gated", "x"], qp(0.05, 18, 8), dim=1)
    m.add("turned", "permute", ["both"], dims=[0, 1, 3, 2])
    m.add("rows", "mean", ["turned"], dims=[2], keepdim=False)
    return m.build()


def box_muller_edge_words() -> torch.Tensor:
    """uint32 words (int64) where a Box-Muller implementation can part from photosim.hardware.philox's: every
    power-of-two boundary of the radius' integer k = (w >> 8) + 1 (k = 2^24 is u = 1, radius 0), the lowest and
    highest 4096 words, every quadrant boundary of the angle, and random words."""
    ks = {k for e in range(25) for k in (2**e - 1, 2**e, 2**e + 1) if 1 <= k <= 2**24}
    words = {(k - 1) << 8 | low for k in ks for low in (0, 0x80, 0xFF)}
    words |= set(range(4096)) | set(range(2**32 - 4096, 2**32))
    words |= {(q << 30) + d for q in range(5) for d in (-1, 0, 1, 1 << 29) if 0 <= (q << 30) + d < 2**32}
    random = torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    return torch.tensor(sorted(words | set(random.tolist())), dtype=torch.int64)


def w8a8_outputs(model: torch.nn.Module, calibration: torch.Tensor, x: torch.Tensor, **simulate: Any
                 ) -> tuple[QuantizedModel, torch.Tensor, torch.Tensor]:
    """A float model quantized W8A8 on ``calibration``, and its ideal integer engine's and the fake-quant
    reference's outputs on ``x`` (``simulate``: photosim.simulate's options)."""
    import photosim

    qm = photosim.quantize(model, calibration, {"w_bits": 8, "a_bits": 8})
    return qm, photosim.simulate(qm, x, **simulate), fake_quant_forward(qm, x)
