"""The integer executor: runs a QuantizedModel node by node on integer codes, bit-true.

Conv and linear form exact integer accumulators (photosim.engine.onednn's int8 convolutions where they apply,
else photosim.engine.kernels' matmul paths), which the configured requant mode (photosim.engine.requant) turns into
output codes; pools, clamps and reshapes work on codes directly. On the CPU a batch goes through the
graph in cache-sized sub-batches; noise is drawn per sample, so results never depend on batching.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from photosim.engine import fbgemm, kernels, onednn
from photosim.engine.requant import REQUANT_MODES, RequantMode, RequantParams, channel_view
from photosim.engine.torch_requant import pytorch_kernel, resolve_cpu_family
from photosim.errors import PhotosimError
from photosim.frontend.observers import ActivationObserver
from photosim.hardware.analog import AnalogLayer, tile_plan
from photosim.hardware.config import HardwareConfig, LayerHardware
from photosim.hardware.plan import HardwarePlan
from photosim.ir.format import Node, QuantizedModel, validate, weights_scale
from photosim.ir.ops import OPS, conv_output_size, infer_shapes
from photosim.ir.summary import operand_max

if TYPE_CHECKING:
    from photosim.engine.cuda_ideal import FusedLayer

HardwareSpec = HardwarePlan | HardwareConfig | dict[str, Any] | str | Path | None
# On the CPU a batch runs through the graph in sub-batches whose largest tensor has about this many
# elements: a layer's temporaries then stay in the caches instead of being paged in afresh (3-10x faster).
SUB_BATCH_ELEMENTS = 1 << 19


def check_device(device: str) -> torch.device:
    """The torch device named by ``--device``, refused with a message when unknown or without its GPU."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise PhotosimError(f"unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PhotosimError(f"device {device!r} was requested but no CUDA GPU is available; use --device cpu.")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise PhotosimError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            "numbered from 0; use cuda or cuda:N with a smaller N.")
    return parsed


@dataclass(frozen=True)
class _Layer:
    """A conv/linear node prepared for one device: matmul weights, integer bias, requant parameters."""

    weights: kernels.IntegerWeights
    bias: torch.Tensor  # (O,) int64
    params: RequantParams
    conv: onednn.OneDNNConv | None = None  # the fast conv, where oneDNN can run this layer exactly
    saturating_weight: torch.Tensor | None = None  # int8 codes, where PyTorch's FBGEMM kernel saturates pair sums
    fused: FusedLayer | None = None  # the one-pass CUDA path (photosim.engine.cuda_ideal), where it applies


Kernel = Callable[["Engine", Node, list[torch.Tensor], torch.Tensor], torch.Tensor]
# op name (photosim.ir.ops.OPS) -> integer kernel: (engine, node, input codes, sample ids) -> codes
KERNELS: dict[str, Kernel] = {}


def kernel(op: str) -> Callable[[Kernel], Kernel]:
    """Register an Engine method as the integer kernel of ``op``, which must be in the op table, once."""

    def register(fn: Kernel) -> Kernel:
        if op not in OPS or op in KERNELS:
            raise ValueError(f"kernel for {op!r}: not an op of photosim.ir.ops, or registered twice")
        KERNELS[op] = fn
        return fn

    return register


class Engine:
    """A quantized model prepared for simulation under one hardware config on one device.

    Noise is keyed by sample index: a batch passes the index of its first sample (default 0), so an Engine
    holds no counter and gives the same numbers however often, and in whatever order, it is called.

    Example:
        >>> engine = Engine(qmodel, {"requant": "fixedpoint"})
        >>> logits = engine(x)  # one batch, float32 on the CPU
        >>> more = engine(x2, first_sample=len(x))  # the next samples of the same pass
    """

    def __init__(self, qmodel: QuantizedModel, hw: HardwareSpec = None, *, device: str | torch.device = "cpu",
                 seed: int = 0, repeat: int = 0, adc_ranges: dict[str, float] | None = None,
                 calibrate_adc: bool = False, diagnostics: bool = True):
        """Prepare ``qmodel`` for ``hw`` on ``device``.

        ``hw`` may be a :class:`HardwarePlan` already resolved for ``qmodel``. ``seed`` and ``repeat`` key the
        noise streams (a repeat is one simulated chip); ``adc_ranges`` gives the layers with a calibrated ADC
        their +-range (product units), see :func:`calibrate_adc_ranges`; ``calibrate_adc`` records their tile
        values instead; ``diagnostics`` adds the SNR to layer stats.
        """
        validate(qmodel)
        self.model = qmodel
        self.plan = HardwarePlan.resolve(qmodel, hw)
        self.hw: HardwareConfig = self.plan.config
        self.settings: dict[str, LayerHardware] = self.plan.layers
        self.modes: dict[str, RequantMode] = {n.name: REQUANT_MODES[self.settings[n.name].requant]
                                              for n in qmodel.nodes}
        self.device = check_device(str(device))
        # CUDA with Triton: ideal float-mode layers and adds run as fused kernels (photosim.engine.cuda_ideal)
        self._cuda_ideal = None
        if self.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            from photosim.engine import cuda_ideal

            self._cuda_ideal = cuda_ideal
        self.layers = {n.name: self._prepare(n) for n in qmodel.nodes if OPS[n.op].weighted}
        self.analog = {
            n.name: self._analog(i, n, seed, repeat, adc_ranges or {}, calibrate_adc, diagnostics)
            for i, n in enumerate(qmodel.nodes)
            if OPS[n.op].weighted and (not self.settings[n.name].is_ideal
                                         or calibrate_adc and self.settings[n.name].calibrated_adc)
        }
        self._last_use = {name: i for i, n in enumerate(qmodel.nodes) for name in n.inputs}
        self.sub_batch = self._sub_batch()

    def _sub_batch(self) -> int | None:
        """Samples per pass through the graph (None: the whole batch). Not on GPUs, which want large
        batches, nor under ``pytorch`` requant, whose adds depend on the tensor size as PyTorch's do."""
        if self.device.type != "cpu" or any(mode.name == "pytorch" for mode in self.modes.values()):
            return None
        shapes = infer_shapes(self.model.input_name, self.model.input_shape, self.model.nodes)
        largest = max(math.prod(shape) for shape in shapes.values())
        return max(1, SUB_BATCH_ELEMENTS // largest)

    def _prepare(self, node: Node) -> _Layer:
        tensors = self.model.tensors
        q_in = node.input_q[0]
        weight = tensors[f"{node.name}.weight"]
        groups = node.attrs.get("groups", 1)
        x_range = (q_in.qmin - q_in.zero_point, q_in.qmax - q_in.zero_point)
        plan = kernels.plan_matmul(weight[0].numel(), x_range, node.w_bits, groups=groups, device=self.device)
        bias_float = tensors.get(f"{node.name}.bias_float")
        bias = tensors[f"{node.name}.bias"].to(self.device, torch.int64)
        params = RequantParams(
            input_scale=q_in.scale,
            weight_scale=weights_scale(self.model, node).to(self.device),
            output=node.output_q,
            bias=bias,
            bias_float=None if bias_float is None else bias_float.to(self.device),
            per_channel=tensors[f"{node.name}.weight_scale"].dim() == 1,
            kernel=pytorch_kernel(node, self.model.provenance.get("qengine", "x86"),
                                  self.settings[node.name].pytorch_cpu),
            node=node.name,
        )
        conv = None
        if node.op == "conv2d" and self.device.type == "cpu":
            a = node.attrs
            conv = onednn.prepare_conv(weight, x_range, kernels.pair(a["stride"]), kernels.pair(a["padding"]),
                                       kernels.pair(a["dilation"]), groups)
        saturating = self._fbgemm_saturates(node, params.kernel) and fbgemm.can_saturate(
            weight, max(q_in.qmax, q_in.zero_point))
        weights = kernels.prepare_weights(weight, groups, plan, self.device)
        fused = None
        if self._cuda_ideal and self.modes[node.name].name == "float" and self._cuda_ideal.applies(weights, groups):
            fused = self._cuda_ideal.FusedLayer.prepare(weights, params)
        return _Layer(weights, bias, params, conv, weight.to(self.device) if saturating else None, fused)

    def _fbgemm_saturates(self, node: Node, pytorch_kernel_name: str) -> bool:
        """Whether PyTorch's kernel for this layer sums uint8 x int8 pairs in saturating int16 (vpmaddubsw):
        FBGEMM's depthwise kernel on every x86 CPU, and its GEMM on CPUs without VNNI."""
        settings = self.settings[node.name]
        if settings.requant != "pytorch" or node.input_q[0].signed:
            return False
        no_vnni = resolve_cpu_family(settings.pytorch_cpu) == "avx2"
        return pytorch_kernel_name == "fbgemm-depthwise" or (pytorch_kernel_name == "fbgemm" and no_vnni)

    def _analog(self, index: int, node: Node, seed: int, repeat: int, adc_ranges: dict[str, float],
                calibrate_adc: bool, diagnostics: bool) -> AnalogLayer:
        """The photonic-engine version of a conv/linear whose hardware settings are not ideal."""
        hw = self.settings[node.name]
        weight = self.model.tensors[f"{node.name}.weight"]
        groups = node.attrs.get("groups", 1)
        x_max, w_max = operand_max(node)
        q_in = node.input_q[0]
        plan = tile_plan(weight[0].numel(), hw, (q_in.qmin - q_in.zero_point, q_in.qmax - q_in.zero_point),
                         node.w_bits, self.device)
        bias = self.layers[node.name].bias.view(groups, -1) if self.modes[node.name].integer_bias else None
        layer = AnalogLayer(
            node.name, index, hw, kernels.prepare_weights(weight, groups, plan, self.device), bias, x_max=x_max,
            w_max=w_max, seed=seed, repeat=repeat, diagnostics=diagnostics, conv=self.layers[node.name].conv,
        )
        rng_range = hw.adc.range
        if calibrate_adc and hw.calibrated_adc:
            layer.calibration = ActivationObserver(seed=index)
        elif isinstance(rng_range, float):
            layer.adc_range = rng_range * layer.full_scale
        elif hw.calibrated_adc:
            if node.name not in adc_ranges:
                raise PhotosimError(
                    f"layer {node.name!r} uses a calibrated ADC range but none was measured; calibrate on the "
                    "calibration split (photosim run does; in Python use calibrate_adc_ranges) or set adc.range "
                    "to `full` or a fraction of full scale."
                )
            layer.adc_range = adc_ranges[node.name]
        return layer

    def check_inputs(self, x: torch.Tensor) -> None:
        """Raise PhotosimError unless ``x`` is a batch of the model's input shape."""
        expected = tuple(self.model.input_shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise PhotosimError(
                f"inputs have shape {got}, but the model expects batches of shape (N, *{expected}); "
                "add the batch dimension or resize the inputs to the model's input shape."
            )

    def run(self, codes: torch.Tensor, sample_ids: torch.Tensor | None = None, *, keep_all: bool = False
            ) -> dict[str, torch.Tensor]:
        """Input codes (N, *input_shape) on the engine's device -> node name -> output codes.

        ``sample_ids`` (N,) int64 key each sample's noise (default 0 .. N - 1). Without ``keep_all`` a tensor is
        dropped after its last consumer (only the graph output remains).
        """
        if sample_ids is None:
            sample_ids = torch.arange(len(codes))
        values = {self.model.input_name: codes}
        for i, node in enumerate(self.model.nodes):
            values[node.name] = KERNELS[node.op](self, node, [values[name] for name in node.inputs], sample_ids)
            if not keep_all:
                for name in set(node.inputs):  # an add may read one tensor twice
                    if self._last_use[name] == i and name != self.model.output:
                        del values[name]
        return values

    def _run_batch(self, x: torch.Tensor, first_sample: int, keep_all: bool) -> dict[str, torch.Tensor]:
        """One batch of float inputs, samples numbered from ``first_sample``, run in sub-batches (results depend on
        neither) -> :meth:`run`'s dict."""
        self.check_inputs(x)
        if first_sample < 0:
            raise PhotosimError(f"first_sample must be 0 or more, got {first_sample}.")
        codes = self.model.input_q.quantize(x.to(self.device))
        ids, step = torch.arange(first_sample, first_sample + len(codes)), max(self.sub_batch or len(codes), 1)
        parts = [self.run(codes[start : start + step], ids[start : start + step], keep_all=keep_all)
                 for start in range(0, max(len(codes), 1), step)]  # an empty batch still runs once
        return parts[0] if len(parts) == 1 else {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def codes(self, x: torch.Tensor, first_sample: int = 0) -> torch.Tensor:
        """One batch of float inputs, samples ``first_sample``, ... of the pass -> int32 output codes (CPU)."""
        return self._run_batch(x, first_sample, keep_all=False)[self.model.output].cpu().contiguous()

    def node_outputs(self, x: torch.Tensor, first_sample: int = 0) -> dict[str, torch.Tensor]:
        """One batch of float inputs -> every graph tensor's int32 codes (the input's included), on the CPU."""
        # contiguous: CUDA layers may leave codes channels_last
        return {name: t.cpu().contiguous() for name, t in self._run_batch(x, first_sample, keep_all=True).items()}

    def __call__(self, x: torch.Tensor, first_sample: int = 0) -> torch.Tensor:
        """One batch of float inputs -> dequantized float32 outputs (on the CPU)."""
        return self.model.qparams(self.model.output).dequantize(self.codes(x, first_sample))

    # -- ops: (node, input codes) -> output codes ------------------------------------------------

    def _requantize(self, acc: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """Accumulators of a conv/linear (int64, or float64 holding integers) -> output codes."""
        mode = self.modes[layer.params.node]
        if mode.integer_bias:
            acc.add_(channel_view(layer.bias, acc))  # acc is a fresh tensor
        return self._requantize_acc(acc, mode, layer.params)

    @staticmethod
    def _requantize_acc(acc: torch.Tensor, mode: RequantMode, params: RequantParams) -> torch.Tensor:
        if acc.is_floating_point() and not mode.float_accumulators:
            acc = acc.to(torch.int64)
        return mode.requantize(acc, params)

    def _requantize_analog(self, acc: torch.Tensor, node: Node) -> torch.Tensor:
        """Accumulators in ADC steps (bias included) -> codes: the multiplier absorbs the step."""
        params = self.layers[node.name].params
        step = self.analog[node.name].step
        return self._requantize_acc(acc, self.modes[node.name], replace(params, input_scale=params.input_scale * step))

    @kernel("conv2d")
    def _conv2d(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        a = node.attrs
        if node.name in self.analog:
            acc = self.analog[node.name].conv_acc(xs[0], node.input_q[0].zero_point, a, sample_ids)
            return self._requantize_analog(acc, node)
        layer = self.layers[node.name]
        z_in = node.input_q[0].zero_point
        if layer.fused is not None:
            return layer.fused.conv(xs[0], z_in, kernels.pair(a["kernel"]), kernels.pair(a["stride"]),
                                    kernels.pair(a["padding"]), kernels.pair(a["dilation"]))
        if layer.saturating_weight is not None:
            return self._requantize(self._fbgemm_conv_acc(xs[0], z_in, a, layer), layer)
        acc = None if layer.conv is None else onednn.conv_acc(xs[0], z_in, layer.conv)
        if acc is None:
            acc = kernels.conv2d_acc(xs[0], z_in, layer.weights, kernels.pair(a["kernel"]), kernels.pair(a["stride"]),
                                     kernels.pair(a["padding"]), kernels.pair(a["dilation"]), a["groups"])
        return self._requantize(acc, layer)

    @kernel("linear")
    def _linear(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        if node.name in self.analog:
            acc = self.analog[node.name].linear_acc(xs[0], node.input_q[0].zero_point, sample_ids)
            return self._requantize_analog(acc, node)
        layer, z_in = self.layers[node.name], node.input_q[0].zero_point
        if layer.fused is not None:
            return layer.fused.linear(xs[0], z_in)
        if layer.saturating_weight is not None:
            acc = fbgemm.gemm_acc_saturating(xs[0], layer.saturating_weight, z_in)
        else:
            acc = kernels.linear_acc(xs[0], z_in, layer.weights)
        return self._requantize(acc, layer)

    @staticmethod
    def _fbgemm_conv_acc(x: torch.Tensor, z_in: int, a: dict[str, Any], layer: _Layer) -> torch.Tensor:
        """A conv's accumulators as PyTorch's FBGEMM kernel forms them, saturated pair sums included."""
        w, stride, padding, dilation = layer.saturating_weight, a["stride"], a["padding"], a["dilation"]
        if layer.params.kernel == "fbgemm-depthwise":
            return fbgemm.depthwise_acc_saturating(x, w, z_in, stride, padding, dilation)
        groups, (kh, kw) = a["groups"], a["kernel"]
        cols = fbgemm.im2col_codes(x, (kh, kw), z_in, stride, padding, dilation, groups)  # (G, N*OH*OW, K)
        w = w.view(groups, -1, w.shape[1], kh, kw).permute(0, 1, 3, 4, 2).reshape(groups, w.shape[0] // groups, -1)
        acc = torch.cat([fbgemm.gemm_acc_saturating(c, wg, z_in) for c, wg in zip(cols, w)], dim=1)  # (N*OH*OW, O)
        oh, ow = (conv_output_size(*args) for args in zip(x.shape[2:], (kh, kw), stride, padding, dilation))
        return acc.view(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2)

    @kernel("add")
    def _add(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        args = (xs[0], xs[1], node.input_q[0], node.input_q[1], node.output_q)
        if self._cuda_ideal and self.modes[node.name].name == "float":
            fused = self._cuda_ideal.add_codes(*args)  # None when the two inputs are laid out differently
            if fused is not None:
                return fused
        return self.modes[node.name].add(*args)

    @kernel("clamp")
    def _clamp(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        return xs[0].clamp(node.output_q.qmin, node.output_q.qmax)

    @kernel("maxpool2d")
    def _maxpool2d(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        a = node.attrs
        return kernels.max_pool2d(xs[0], kernels.pair(a["kernel"]), kernels.pair(a["stride"]),
                                  kernels.pair(a["padding"]), kernels.pair(a["dilation"]), a["ceil_mode"])

    @kernel("avgpool2d")
    def _avgpool2d(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        a = node.attrs
        sums, counts = kernels.avg_pool2d_sums(
            xs[0], node.input_q[0].zero_point, kernels.pair(a["kernel"]), kernels.pair(a["stride"]),
            kernels.pair(a["padding"]), a["ceil_mode"], a["count_include_pad"], a["divisor_override"])
        return self.modes[node.name].average(sums, counts, node.input_q[0], node.output_q)

    @kernel("adaptive_avgpool2d")
    def _adaptive_avgpool2d(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        sums, counts = kernels.adaptive_avg_pool2d_sums(xs[0], node.input_q[0].zero_point,
                                                        kernels.pair(node.attrs["output_size"]))
        return self.modes[node.name].average(sums, counts, node.input_q[0], node.output_q)

    @kernel("flatten")
    def _flatten(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        return xs[0].flatten(node.attrs["start_dim"])

    @kernel("reshape")
    def _reshape(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        return xs[0].reshape(xs[0].shape[0], *node.attrs["shape"])


def in_chunks(fn: Callable[[torch.Tensor, int], torch.Tensor], inputs: torch.Tensor, batch_size: int
               ) -> torch.Tensor:
    """fn(chunk, index of its first sample) over chunks of ``batch_size`` samples, concatenated."""
    if batch_size < 1:
        raise PhotosimError(f"batch_size must be at least 1, got {batch_size}.")
    return torch.cat([fn(inputs[start:start + batch_size], start)
                      for start in range(0, max(len(inputs), 1), batch_size)])  # an empty input runs once


def simulate(qmodel: QuantizedModel, inputs: torch.Tensor, hw: HardwareSpec = None, *, batch_size: int = 256,
             device: str | torch.device = "cpu", **engine_options: Any) -> torch.Tensor:
    """Bit-true integer inference: float inputs (N, *input_shape) -> float32 dequantized outputs (CPU).

    Works in chunks of ``batch_size`` samples so memory stays bounded; the result does not depend on it.
    ``engine_options`` (seed, repeat, adc_ranges, ...) go to :class:`Engine`.

    Example:
        >>> logits = simulate(photosim.load("m.safetensors"), x, {"requant": "fixedpoint"})
        >>> noisy = simulate(qm, x, {"tile": 64, "noise": {"output": {"sigma": 0.01}}}, seed=1)
    """
    engine = Engine(qmodel, hw, device=device, **engine_options)
    engine.check_inputs(inputs)
    return in_chunks(engine, inputs, batch_size)


def simulate_codes(qmodel: QuantizedModel, inputs: torch.Tensor, hw: HardwareSpec = None, *,
                   batch_size: int = 256, device: str | torch.device = "cpu", **engine_options: Any) -> torch.Tensor:
    """As :func:`simulate`, returning the graph output's int32 codes."""
    engine = Engine(qmodel, hw, device=device, **engine_options)
    engine.check_inputs(inputs)
    return in_chunks(engine.codes, inputs, batch_size)


def node_outputs(qmodel: QuantizedModel, inputs: torch.Tensor, hw: HardwareSpec = None, *,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every graph tensor's int32 codes for one batch (keyed by node name, plus the graph input)."""
    return Engine(qmodel, hw, device=device).node_outputs(inputs)
