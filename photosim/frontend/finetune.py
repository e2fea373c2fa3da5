"""The trainable graph of hardware-aware fine-tuning, and its export back to an integer model file.

The graph is the integer file's (the captured FloatGraph with BatchNorm folded and PTQ's rewrites, the node
vocabulary of photosim.ir.ops), executed in float32 with quantize-dequantize at the points where the engine
requantizes (photosim.ir.fakequant), but every quantizer is learnable:

- weights: per channel (or per tensor, as the file has them), signed narrow range, latent float weights that
  start at the PTQ codes times their scale, so the first forward pass is the PTQ model;
- activations: the PTQ scale, zero point and clamp codes; the scale is learned, zero point and clamp codes stay;
- step sizes by LSQ (Esser et al., "Learned step size quantization", ICLR 2020): straight-through rounding and
  the gradient of a step size scaled by 1 / sqrt(N * Qp); a step size is learned relative to its PTQ value
  (s = s_PTQ * u, u starts at 1), so one learning rate suits weights and step sizes under Adam as under SGD.

The hardware's effects enter each conv / linear through a ``LayerNoise`` (plain numbers in the engine's units,
derived from the hardware plan by photosim.experiments.finetune, since the front end knows no hardware), and
``export`` turns the learned quantizers back into a QuantizedModel that the engine runs like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from photosim.ir.fakequant import lookup_table
from photosim.ir.format import Node, QParams, QuantizedModel, bias_dtype, weight_dtype, weights_scale
from photosim.ir.ops import OPS
from photosim.ir.ranges import int_range, narrow_range

MIN_STEP_FACTOR = 1e-2  # a step size never shrinks below 1% of its PTQ value (it must stay positive)


@dataclass(frozen=True)
class LayerNoise:
    """What one conv / linear's readout does to its accumulator, in the engine's units (integer products).

    tiles: T = ceil(K / L); full_scale: FS = L * Xmax * Wmax; output_sigma: additive noise per tile, fraction of
    FS; shot_sigma: signal-dependent noise coefficient per tile; weight: (kind, sigma) of each weight error;
    adc_step: the ADC step (None: no rounding surrogate); adc_range: +-range per tile (None: never clips);
    acc_limit: the saturating accumulator's largest magnitude (None: exact); photocurrent: (sigma, light) of the
    photocurrent shot noise (light: inputs or products); rin: (sigma, lasers) of the intensity noise."""

    tiles: int
    full_scale: float
    w_max: int
    output_sigma: float = 0.0
    shot_sigma: float = 0.0
    weight: tuple[tuple[str, float], ...] = ()
    adc_step: float | None = None
    adc_range: float | None = None
    acc_limit: float | None = None
    photocurrent: tuple[float, str] = (0.0, "inputs")
    rin: tuple[float, str] = (0.0, "independent")

    @property
    def gaussian(self) -> bool:
        """True when a Gaussian noise term is on (the uniform rounding surrogate alone draws uniform numbers)."""
        return bool(self.output_sigma or self.shot_sigma or self.photocurrent[0] or self.rin[0])

    @property
    def on(self) -> bool:
        return bool(self.gaussian or self.weight or self.adc_step or self.adc_range or self.acc_limit)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x forward, gradient times ``scale`` backward (LSQ's step-size gradient scale)."""
    return (x - x * scale).detach() + x * scale


def lsq(x: torch.Tensor, step: torch.Tensor, zero_point: float, qmin: float, qmax: float) -> torch.Tensor:
    """LSQ quantize-dequantize: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with straight-through rounding
    (the gradient of x passes inside the clamp range, that of s is LSQ's)."""
    codes = torch.clamp(_round_ste(x / step) + zero_point, qmin, qmax)
    return (codes - zero_point) * step


class StepSize(nn.Module):
    """A learnable step size ``s_PTQ * u`` (scalar or per channel) with LSQ's gradient scale 1 / sqrt(N * Qp)."""

    def __init__(self, initial: torch.Tensor, grad_scale: float) -> None:
        super().__init__()
        self.register_buffer("initial", initial.detach().double().clone())  # the PTQ value, exactly
        self.u = nn.Parameter(torch.ones_like(self.initial, dtype=torch.float32))
        self.grad_scale = grad_scale

    def forward(self) -> torch.Tensor:
        return self.initial.float() * _grad_scale(self.u, self.grad_scale).clamp_min(MIN_STEP_FACTOR)

    def value(self) -> torch.Tensor:
        """The current step size, without gradient, float64."""
        return (self.initial.double() * self.u.detach().double().clamp_min(MIN_STEP_FACTOR))


def _per_sample(shape: tuple[int, ...]) -> int:
    return max(1, math.prod(shape))


@dataclass
class _Activation:
    """One learnable activation quantizer: its step size (shared by the nodes that keep their input's
    quantization) and its fixed zero point, bits, sign and clamp codes."""

    key: str  # the StepSize's name in the graph's ModuleDict
    zero_point: int
    bits: int
    signed: bool
    qmin: int
    qmax: int


class TrainableGraph(nn.Module):
    """The integer file's graph with learnable quantizers and the hardware surrogates of ``noise``.

    ``generator`` draws every noise value (resampled each forward pass while ``noisy``)."""

    def __init__(self, qmodel: QuantizedModel, noise: dict[str, LayerNoise] | None = None) -> None:
        super().__init__()
        self.source = qmodel
        self.noise = noise or {}
        self.noisy = True
        self.generator: torch.Generator | None = None
        shapes = _shapes(qmodel)
        self.steps = nn.ModuleDict()
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        self.acts: dict[str, _Activation] = {}
        self._add_activation("input", qmodel.input_q, shapes[qmodel.input_name])
        for node in qmodel.nodes:
            op = OPS[node.op]
            if op.weighted:
                weight, bias = _dequantized(qmodel, node)
                key = _key(node.name)
                self.weights[key] = nn.Parameter(weight.float())
                self.biases[key] = nn.Parameter(bias.float())
                scale = qmodel.tensors[f"{node.name}.weight_scale"].float()
                per_channel = weight[0].numel() if scale.dim() else weight.numel()
                _, qp = narrow_range(node.w_bits)
                self.steps[f"w_{key}"] = StepSize(scale, 1.0 / math.sqrt(per_channel * qp))
            if op.observed:
                self._add_activation(node.name, node.output_q, shapes[node.name])
            else:  # the input's quantizer, with this node's clamp codes
                parent = self.acts[self._act_name(node.inputs[0])]
                q = node.output_q
                self.acts[node.name] = _Activation(parent.key, parent.zero_point, parent.bits, parent.signed,
                                                   max(parent.qmin, q.qmin), min(parent.qmax, q.qmax))

    def _add_activation(self, name: str, q: QParams, shape: tuple[int, ...]) -> None:
        key = f"a_{_key(name)}"
        qp = max(q.qmax - q.zero_point, 1)
        self.steps[key] = StepSize(torch.tensor(q.scale, dtype=torch.float64), 1.0 / math.sqrt(_per_sample(shape) * qp))
        self.acts[name] = _Activation(key, q.zero_point, q.bits, q.signed, q.qmin, q.qmax)

    def _act_name(self, tensor: str) -> str:
        return "input" if tensor == self.source.input_name else tensor

    def quantize_activation(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.acts[name]
        return lsq(x, self.steps[a.key](), a.zero_point, a.qmin, a.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.source.input_name: self.quantize_activation("input", x.float())}
        for node in self.source.nodes:
            op = OPS[node.op]
            inputs = [values[i] for i in node.inputs]
            y = self._weighted(node, inputs[0]) if op.weighted else op.reference(node.attrs, inputs)
            values[node.name] = y if op.moves_codes else self.quantize_activation(node.name, y)
        return values[self.source.output]

    def _weighted(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        """conv / linear with LSQ weights, the bias on its integer grid, and the layer's hardware surrogates."""
        key = _key(node.name)
        op = OPS[node.op]
        step = self.steps[f"w_{key}"]()
        shape = (-1,) + (1,) * (self.weights[key].dim() - 1)
        lo, hi = narrow_range(node.w_bits)
        w_step = step.reshape(shape) if step.dim() else step
        weight = lsq(self.weights[key], w_step, 0, lo, hi)
        s_in = self.steps[self.acts[self._act_name(node.inputs[0])].key]()
        unit = s_in * (step if step.dim() else step.expand(weight.shape[0]))  # float value of one product, (O,)
        bias = _round_ste(self.biases[key] / unit.detach()) * unit.detach()
        noise = self.noise.get(node.name)
        if noise is None or not noise.on or not self.noisy:
            return op.reference(node.attrs, [x], weight, bias)
        for kind, sigma in noise.weight:
            e = self._normal(weight.shape, weight)
            weight = weight * (1 + sigma * e) if kind == "multiplicative" else weight + sigma * noise.w_max * w_step * e
        y = op.reference(node.attrs, [x], weight, None)
        u = _channel_view(unit, y)
        variance = noise.tiles * (noise.output_sigma * noise.full_scale) ** 2  # product units^2, per output
        if noise.adc_step:
            variance += noise.tiles * noise.adc_step ** 2 / 12.0  # rounding of each tile: one step, uniform
        std = torch.as_tensor(math.sqrt(variance), dtype=y.dtype, device=y.device)
        if noise.shot_sigma or noise.photocurrent[1] == "products" and noise.photocurrent[0]:
            magnitude = (op.reference(node.attrs, [x.abs()], weight.abs(), None) / u).detach()  # sum_k |x_k w_k|
        if noise.shot_sigma:  # sum_t |p_t| <= sum_k |x_k w_k|: an upper bound of the shot-noise variance
            std = torch.sqrt(std ** 2 + noise.shot_sigma ** 2 * noise.full_scale * magnitude)
        sigma, light = noise.photocurrent
        if sigma:  # sum over the tiles of sigma^2 FS light_t: the law's variance exactly
            if light == "inputs":  # sum_k |x_k| Wmax: a weight of Wmax codes everywhere
                magnitude = (op.reference(node.attrs, [x.abs()], torch.ones_like(weight) * (noise.w_max * w_step),
                                          None) / u).detach()
            std = torch.sqrt(std ** 2 + sigma ** 2 * noise.full_scale * magnitude)
        sigma, lasers = noise.rin
        if sigma:  # independent lasers: sum_k (x_k w_k)^2 exactly; one laser: sum_t p_t^2 taken as p^2 / T
            power = (op.reference(node.attrs, [x.square()], weight.square(), None) / u.square() if
                     lasers == "independent" else (y / u).square() / noise.tiles).detach()
            std = torch.sqrt(std ** 2 + sigma ** 2 * power)
        if noise.tiles == 1 and noise.adc_step and not noise.gaussian:
            e = (torch.rand(y.shape, generator=self.generator, device=y.device) - 0.5) * math.sqrt(12.0)
        else:
            e = self._normal(y.shape, y)
        y = y + u * std * e
        if noise.adc_range is not None:  # each tile clips at +-range; the accumulator of T tiles at +-T * range
            limit = u * (noise.tiles * noise.adc_range)
            y = torch.minimum(torch.maximum(y, -limit), limit)
        y = y + _channel_view(bias, y)
        if noise.acc_limit is not None:
            limit = u * noise.acc_limit
            y = torch.minimum(torch.maximum(y, -limit), limit)
        return y

    def _normal(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=like.device, dtype=like.dtype)


def _channel_view(values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-output-channel values broadcast against a conv (N, O, H, W) or linear (..., O) output."""
    return values.reshape(-1, 1, 1) if y.dim() == 4 else values


def _key(name: str) -> str:
    """A node name as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


def _shapes(qmodel: QuantizedModel) -> dict[str, tuple[int, ...]]:
    from photosim.ir.summary import output_shapes

    return output_shapes(qmodel)


def _dequantized(qmodel: QuantizedModel, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weights_scale(qmodel, node)
    codes = qmodel.tensors[f"{node.name}.weight"].double()
    weight = codes * scale.view(-1, *([1] * (codes.dim() - 1)))
    bias = qmodel.tensors[f"{node.name}.bias"].double() * node.input_q[0].scale * scale
    return weight, bias


def export(graph: TrainableGraph, provenance: dict | None = None) -> QuantizedModel:
    """The learned quantizers as an ordinary integer model: weight codes with the learned (float32) scales, each
    activation's learned scale with its zero point and clamp codes, integer bias at scale s_in * s_w (rounded
    half to even, saturated at bias_bits), lookup tables recomputed; other tensors (norms' gamma / beta) kept."""
    source = graph.source

    def qparams(name: str) -> QParams:
        a = graph.acts[name]
        scale = float(graph.steps[a.key].value())
        return QParams(scale, a.zero_point, a.bits, a.signed, a.qmin, a.qmax)

    tensors = {k: v.clone() for k, v in source.tensors.items()}
    nodes: list[Node] = []
    for node in source.nodes:
        op = OPS[node.op]
        new = Node(node.name, node.op, list(node.inputs), [qparams(graph._act_name(i)) for i in node.inputs],
                   qparams(node.name), dict(node.attrs), node.w_bits, node.bias_bits)
        if op.weighted:
            key = _key(node.name)
            scale = graph.steps[f"w_{key}"].value().float()  # the file keeps float32 scales: codes use them
            weight = graph.weights[key].detach().double()
            s = scale.double().reshape(-1, *([1] * (weight.dim() - 1))) if scale.dim() else scale.double()
            lo, hi = narrow_range(node.w_bits)
            tensors[f"{node.name}.weight"] = torch.round(weight / s).clamp(lo, hi).to(weight_dtype(node.w_bits))
            tensors[f"{node.name}.weight_scale"] = scale
            unit = new.input_q[0].scale * scale.double().expand(weight.shape[0])
            blo, bhi = int_range(node.bias_bits, True)
            bias = torch.round(graph.biases[key].detach().double() / unit).clamp(blo, bhi)
            tensors[f"{node.name}.bias"] = bias.to(torch.int64).to(bias_dtype(node.bias_bits))
        if op.tabled:
            tensors[f"{node.name}.table"] = lookup_table(new)
        nodes.append(new)
    return QuantizedModel(source.input_name, tuple(source.input_shape), qparams("input"), nodes, tensors,
                          source.output, provenance=dict(provenance if provenance is not None else source.provenance))

