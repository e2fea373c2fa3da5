"""The integer executor: runs a QuantizedModel node by node on integer codes, bit-true.

Each conv/linear gets a flat LayerPlan (photosim.engine.plan) and the backend the registry chooses for it
(photosim.engine.backends): exact integer accumulators turned into output codes by the configured requant mode
(photosim.engine.requant), or the analog tile step of its readout; pools, clamps and reshapes work on codes
directly. On the CPU a batch goes through the graph in cache-sized sub-batches; noise is drawn per sample, so
results never depend on batching.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from photosim.engine import backends, kernels
from photosim.engine.analog import AnalogLayer
from photosim.engine.backends import Choice, LayerRunner
from photosim.engine.plan import LayerPlan, describe, plan_layer
from photosim.engine.requant import REQUANT_MODES, RequantMode
from photosim.errors import PhotosimError
from photosim.hardware.config import HardwareConfig, LayerHardware
from photosim.hardware.philox import MASK32
from photosim.hardware.plan import HardwarePlan, HardwareSpec
from photosim.hardware.readout import Readout
from photosim.ir import ieee
from photosim.ir.format import Node, QParams, QuantizedModel, validate
from photosim.ir.ops import OPS, infer_shapes, walk

# On the CPU a batch runs through the graph in sub-batches whose largest tensor has about this many
# elements: a layer's temporaries then stay in the caches instead of being paged in afresh (3-10x faster).
SUB_BATCH_ELEMENTS = 1 << 19


def check_device(device: str) -> torch.device:
    """The torch device named by ``--device``, refused with a message when unknown or without its GPU."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise PhotosimError(f"unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if parsed.type not in ("cpu", "cuda"):
        raise PhotosimError(f"unknown device {device!r}; use cpu, cuda or cuda:N.")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PhotosimError(f"device {device!r} was requested but no CUDA GPU is available; use --device cpu.")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise PhotosimError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            "numbered from 0; use cuda or cuda:N with a smaller N.")
    return parsed


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


def plan_layers(qmodel: QuantizedModel, hw: HardwarePlan, device: torch.device, *, seed: int = 0, repeat: int = 0,
                adc_ranges: dict[str, float] | None = None, calibrate_adc: bool = False) -> dict[str, LayerPlan]:
    """Every conv/linear's LayerPlan under ``hw`` on ``device`` (node name -> plan, in graph order).

    Layers whose settings are not ideal run the analog tile step; with ``calibrate_adc`` so do the layers with a
    calibrated ADC, recording their tile values instead of reading them out (``adc_ranges``: the measured ranges).
    """
    plans = {}
    for index, node in enumerate(qmodel.nodes):
        if not OPS[node.op].weighted:
            continue
        settings = hw.layers[node.name]
        calibrating = calibrate_adc and settings.calibrated_adc
        measured = _measured_range(node, settings, adc_ranges, calibrating)
        plans[node.name] = plan_layer(qmodel, index, settings, device, seed=seed, repeat=repeat,
                                      measured_range=measured, analog=not settings.is_ideal or calibrating,
                                      calibrating=calibrating)
    return plans


def _output_codes(y: torch.Tensor, q: QParams) -> torch.Tensor:
    """Real values (float64) -> codes: clamp(rne(y / s_out) + z_out, qmin, qmax), the division correctly rounded
    on every device (docs/format.md, constant; docs/integer-semantics.md, the float64 ops)."""
    return (torch.round(ieee.divide(y, q.scale)) + q.zero_point).clamp(q.qmin, q.qmax).to(torch.int32)


def check_modes(qmodel: QuantizedModel, hw: HardwarePlan) -> None:
    """Refuse a node its requant mode has no rule for: an op it does not emulate, or codes wider than it takes."""
    for node in qmodel.nodes:
        mode = REQUANT_MODES[hw.layers[node.name].requant]
        if node.op in mode.unsupported:
            raise PhotosimError(f"node {node.name!r} ({node.op}) has no rule in the {mode.name!r} requant mode; use "
                                "requant float or fixedpoint for it (a per-layer override can set it for this node "
                                "alone).")
        _check_bits(node, mode)


def _measured_range(node: Node, settings: LayerHardware, adc_ranges: dict[str, float] | None,
                    calibrating: bool) -> float | None:
    """A layer's measured ADC range; PhotosimError when its ADC is calibrated but was not measured."""
    measured = (adc_ranges or {}).get(node.name)
    if settings.calibrated_adc and not calibrating and measured is None:
        raise PhotosimError(
            f"layer {node.name!r} uses a calibrated ADC range but none was measured; calibrate on the calibration "
            "split (photosim run does; in Python use calibrate_adc_ranges) or set adc.range to `full` or a "
            "fraction of full scale."
        )
    return measured


def analog_matmuls(qmodel: QuantizedModel, hw: HardwarePlan, *, seed: int = 0, repeat: int = 0,
                   adc_ranges: dict[str, float] | None = None, calibrate_adc: bool = False) -> dict[str, LayerPlan]:
    """The matmuls of two activations whose settings are not ideal (or whose ADC range is being measured): their
    plans, with the readout of a tile step over K = the operands' inner dimension."""
    shapes = infer_shapes(qmodel.input_name, qmodel.input_shape, qmodel.nodes)
    plans = {}
    for index, node in enumerate(qmodel.nodes):
        settings = hw.layers[node.name]
        calibrating = calibrate_adc and settings.calibrated_adc
        if node.op != "matmul" or (settings.is_ideal and not calibrating):
            continue
        qa, qb = node.input_q
        k = shapes[node.inputs[0]][-1]
        readout = Readout.of(settings, k, qa.largest_offset, qb.largest_offset, layer=index, seed=seed, repeat=repeat,
                             measured_range=_measured_range(node, settings, adc_ranges, calibrating),
                             calibrating=calibrating, x_span=qa.qmax - qa.qmin)
        plans[node.name] = LayerPlan(node, index, torch.empty(0), REQUANT_MODES[settings.requant], None,  # type: ignore
                                     kernels.MatmulPlan("float64", k), False, readout)
    return plans


def _check_bits(node: Node, mode: RequantMode) -> None:
    """Refuse a node whose codes are wider than ``mode`` has a rule for (``pytorch``, ``onnxruntime``: 8-bit
    kernels)."""
    if mode.max_bits is None:
        return
    widths = {"input": max(q.bits for q in node.input_q), "output": node.output_q.bits, "weight": node.w_bits or 0}
    wide = {what: bits for what, bits in widths.items() if bits > mode.max_bits}
    if wide:
        found = ", ".join(f"{bits}-bit {what}" for what, bits in wide.items())
        raise PhotosimError(f"node {node.name!r} ({node.op}) has {found} codes; the {mode.name!r} requant mode "
                            f"reproduces another runtime's quantized kernels, which take codes of at most "
                            f"{mode.max_bits} bits (there is no kernel to follow for wider ones). Use requant float "
                            f"or fixedpoint, or quantize with at most {mode.max_bits} bits.")


class Engine:
    """A quantized model prepared for simulation under one hardware config on one device.

    Noise is keyed by sample index: a batch passes the index of its first sample (default 0), so an Engine
    holds no counter and gives the same numbers however often, and in whatever order, it is called.

    Example:
        >>> engine = Engine(qmodel, {"requant": "fixedpoint"})
        >>> logits = engine(x)  # one batch, float32 on the CPU
        >>> more = engine(x2, first_sample=len(x))  # the next samples of the same pass
        >>> engine.backends["conv1"].backend  # which backend runs a layer, e.g. "onednn"
    """

    def __init__(self, qmodel: QuantizedModel, hw: HardwareSpec = None, *, device: str | torch.device = "cpu",
                 seed: int = 0, repeat: int = 0, adc_ranges: dict[str, float] | None = None,
                 calibrate_adc: bool = False, diagnostics: bool = True, backend: Sequence[str] = ()):
        """Prepare ``qmodel`` for ``hw`` on ``device``.

        ``hw`` is resolved once here (photosim.hardware.plan.HardwarePlan.resolve: a plan, config, dict, YAML path,
        preset name or None). ``seed`` and ``repeat`` key the noise streams (a repeat is one simulated chip);
        ``adc_ranges`` gives the layers with a calibrated ADC their +-range (product units), see
        :func:`calibrate_adc_ranges`; ``calibrate_adc`` records their tile values instead; ``diagnostics`` adds the
        SNR to layer stats; ``backend`` names backends the layers they serve must run on (photosim.engine.backends).
        """
        validate(qmodel)
        self.model = qmodel
        self.plan = HardwarePlan.resolve(qmodel, hw)
        self.hw: HardwareConfig = self.plan.config
        self.settings: dict[str, LayerHardware] = self.plan.layers
        self.modes: dict[str, RequantMode] = {n.name: REQUANT_MODES[self.settings[n.name].requant]
                                              for n in qmodel.nodes}
        check_modes(qmodel, self.plan)
        self.device = check_device(str(device))
        backends.check_names(backend)
        self.layer_plans = plan_layers(qmodel, self.plan, self.device, seed=seed, repeat=repeat,
                                       adc_ranges=adc_ranges, calibrate_adc=calibrate_adc)
        self.backends: dict[str, Choice] = {name: backends.choose(plan, self.device, backend)
                                            for name, plan in self.layer_plans.items()}
        self.layers: dict[str, LayerRunner] = {
            name: backends.BACKENDS[self.backends[name].backend].prepare(plan, self.device, diagnostics=diagnostics)
            for name, plan in self.layer_plans.items()}
        self.analog: dict[str, AnalogLayer] = {name: layer for name, layer in self.layers.items()
                                               if isinstance(layer, AnalogLayer)}
        for name, plan in analog_matmuls(qmodel, self.plan, seed=seed, repeat=repeat, adc_ranges=adc_ranges,
                                         calibrate_adc=calibrate_adc).items():
            self.analog[name] = AnalogLayer.for_matmul(plan, diagnostics)
            self.backends[name] = Choice("torch")  # the torch tile step: the only one with per-sample weights
        # CUDA with Triton: adds in the float and fixedpoint modes run as one fused kernel of the cuda-ideal backend
        # (photosim.engine.cuda_ideal), unless ``backend`` requires other ideal backends
        self._cuda_adds = {}
        cuda_ideal_allowed = not backend or "cuda-ideal" in backend or not any(
            "ideal" in backends.BACKENDS[name].kinds for name in backend)
        if self.device.type == "cuda" and importlib.util.find_spec("triton") is not None and cuda_ideal_allowed:
            from photosim.engine import cuda_ideal

            self._cuda_adds = cuda_ideal.ADDS
        self._tables = {n.name: qmodel.tensors[f"{n.name}.table"].to(self.device) for n in qmodel.nodes
                        if OPS[n.op].tabled}  # output code per input storage code, from the lowest
        self._constants = {n.name: _output_codes(qmodel.tensors[f"{n.name}.value"].to(self.device, torch.float64),
                                                 n.output_q)
                           for n in qmodel.nodes if OPS[n.op].valued}
        self._exp = {n.name: qmodel.tensors[f"{n.name}.exp"].to(self.device, torch.int64) for n in qmodel.nodes
                     if OPS[n.op].exp_tabled}  # softmax: round(2^30 exp(-k s_in)) for k = 0 ..
        self._affine = {n.name: tuple(qmodel.tensors[f"{n.name}.{k}"].to(self.device, torch.float64)
                                      for k in ("gamma", "beta")) for n in qmodel.nodes if OPS[n.op].affine}
        self.sub_batch = self._sub_batch()

    def _sub_batch(self) -> int | None:
        """Samples per pass through the graph (None: the whole batch). Not on GPUs, which want large
        batches. Every op computes each sample alone (``pytorch`` adds as PyTorch at batch size 1), so the
        passes change no code."""
        if self.device.type != "cpu":
            return None
        shapes = infer_shapes(self.model.input_name, self.model.input_shape, self.model.nodes)
        largest = max(math.prod(shape) for shape in shapes.values())
        return max(1, SUB_BATCH_ELEMENTS // largest)

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
        return walk(self.model.nodes, {self.model.input_name: codes}, self.model.output,
                    lambda node, xs: KERNELS[node.op](self, node, xs, sample_ids), keep_all=keep_all)

    def _run_batch(self, x: torch.Tensor, first_sample: int, keep_all: bool) -> dict[str, torch.Tensor]:
        """One batch of float inputs, samples numbered from ``first_sample``, run in sub-batches (results depend on
        neither) -> :meth:`run`'s dict."""
        self.check_inputs(x)
        if first_sample < 0 or first_sample + len(x) - 1 > MASK32:
            raise PhotosimError(f"first_sample {first_sample} numbers this batch's {len(x)} samples outside "
                                "[0, 2^32) (noise streams are keyed by a 32-bit sample index); number the samples "
                                "of a pass from 0.")
        # pinned memory (a DataLoader's pin_memory=True) goes to the GPU without blocking the host
        codes = self.model.input_q.quantize(x.to(self.device, non_blocking=x.is_pinned()))
        ids = torch.arange(first_sample, first_sample + len(codes), device=self.device)  # made where it is used
        step = max(self.sub_batch or len(codes), 1)
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

    @kernel("conv2d")
    def _conv2d(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        return self.layers[node.name].conv2d(xs[0], sample_ids)

    @kernel("linear")
    def _linear(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        x = xs[0]  # (N, ..., K): every position of a sample (a token) is a row, rows sample-major
        out = self.layers[node.name].linear(x.reshape(-1, x.shape[-1]), sample_ids)  # (N * positions, O)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @kernel("add")
    def _add(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        args = (xs[0], xs[1], node.input_q[0], node.input_q[1], node.output_q)
        fused_add = self._cuda_adds.get(self.modes[node.name].name)
        if fused_add is not None:
            fused = fused_add(*args)  # None when the two inputs are laid out differently
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

    @kernel("concat")
    def _concat(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        mode = self.modes[node.name]
        return torch.cat([mode.rescale(x, q, node.output_q) for x, q in zip(xs, node.input_q)], node.attrs["dim"])

    @kernel("mul")
    def _mul(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        qa, qb = node.input_q
        products = (xs[0].to(torch.int64) - qa.zero_point) * (xs[1].to(torch.int64) - qb.zero_point)  # exact
        return self.modes[node.name].requantize_products(products, qa, qb, node.output_q, node.name)

    @kernel("mean")
    def _mean(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        dims, q_in = node.attrs["dims"], node.input_q[0]
        sums = (xs[0].to(torch.int64) - q_in.zero_point).sum(dim=dims, keepdim=True)  # exact
        count = torch.tensor(math.prod(xs[0].shape[d] for d in dims), dtype=torch.int64, device=sums.device)
        codes = self.modes[node.name].average(sums, count, q_in, node.output_q)
        return codes if node.attrs["keepdim"] else codes.squeeze(tuple(dims))

    @kernel("permute")
    def _permute(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        return xs[0].permute(*node.attrs["dims"])

    @kernel("slice")
    def _slice(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        a = node.attrs
        return xs[0].narrow(a["dim"], a["start"], a["stop"] - a["start"])

    @kernel("roll")
    def _roll(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        return xs[0].roll(node.attrs["shift"], node.attrs["dim"])

    @kernel("pad")
    def _pad(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        a, q = node.attrs, node.input_q[0]  # the fill: float 0's code, clamp(z_in, qmin, qmax)
        pads = [0, 0] * (xs[0].dim() - 1 - a["dim"]) + [a["before"], a["after"]]
        return torch.nn.functional.pad(xs[0], pads, value=min(max(q.zero_point, q.qmin), q.qmax))

    @kernel("constant")
    def _constant(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        codes = self._constants[node.name]  # clamp(rne(value / s_out) + z_out), computed once
        return codes.expand(xs[0].shape[0], *codes.shape)

    @kernel("matmul")
    def _matmul(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        """Exact sums of products of a - z_a and b - z_b (float64 where below 2^53, else int64 on the CPU)."""
        qa, qb = node.input_q
        a, b = xs[0].to(torch.int64) - qa.zero_point, xs[1].to(torch.int64) - qb.zero_point
        bound = a.shape[-1] * qa.largest_offset * qb.largest_offset  # the largest |sum of products|
        if node.name in self.analog:  # on the optical engine: sums in ADC steps, the multiplier absorbs the step
            layer = self.analog[node.name]
            products = layer.matmul_acc(a, b, sample_ids)
            qa = replace(qa, scale=qa.scale * layer.step)
        elif bound < 1 << 53:
            products = torch.matmul(a.double(), b.double()).to(torch.int64)
        elif a.device.type == "cpu":
            products = torch.matmul(a, b)
        else:
            raise PhotosimError(f"node {node.name!r} (matmul): sums of products up to {bound:.3g} are exact only in "
                                "int64 on the CPU; run it with --device cpu or with fewer bits.")
        return self.modes[node.name].requantize_products(products, qa, qb, node.output_q, node.name)

    @kernel("scale")
    def _scale(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        q = node.input_q[0]  # x * factor: the codes of q, read at scale s_in * factor, rescaled to the output
        return self.modes[node.name].rescale(xs[0], replace(q, scale=q.scale * node.attrs["factor"]), node.output_q)

    @kernel("softmax")
    def _softmax(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        """docs/integer-semantics.md, softmax: integer max subtraction, the stored exp table, exact sums."""
        x, out = xs[0].to(torch.int64), node.output_q
        e = self._exp[node.name][x.amax(-1, keepdim=True) - x]  # (..., C) int64, exp(-(max - x) s_in) * 2^30
        y = e.double() / e.sum(-1, keepdim=True).double()  # the sum is exact: below C * 2^30 < 2^53
        return _output_codes(y, out)

    @kernel("layer_norm")
    def _layer_norm(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        """docs/integer-semantics.md, layer_norm: exact integer sums, then one float64 formula per element."""
        q, out = node.input_q[0], node.output_q
        gamma, beta = self._affine[node.name]
        d = xs[0].to(torch.int64) - q.zero_point
        c = d.shape[-1]
        u = c * d - d.sum(-1, keepdim=True)  # C * (x - mean), exact
        v = (u * u).sum(-1, keepdim=True)  # exact: load refuses C^3 * 2^(2 bits) >= 2^63
        den = ieee.sqrt(ieee.divide(v.double(), c) + node.attrs["eps"] * c * c / (q.scale * q.scale))
        return _output_codes(u.double() / den * gamma + beta, out)

    @kernel("l2_normalize")
    def _l2_normalize(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        """docs/integer-semantics.md, l2_normalize: an exact integer sum of squares, then one float64 formula."""
        q, out = node.input_q[0], node.output_q
        d = xs[0].to(torch.int64) - q.zero_point
        norm = ieee.sqrt((d * d).sum(-1, keepdim=True).double()).clamp_min(node.attrs["eps"] / q.scale)
        return _output_codes(d.double() / norm, out)

    @kernel("table")
    def _table(self, node: Node, xs: list[torch.Tensor], sample_ids: torch.Tensor) -> torch.Tensor:
        table = self._tables[node.name]
        return table[(xs[0] - QParams.storage_range(node.input_q[0].bits, node.input_q[0].signed)[0]).long()]


def execution_plan(qmodel: QuantizedModel, hw: HardwareSpec = None, *, device: str | torch.device = "cpu",
                   backend: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Which backend would run each conv/linear under ``hw`` on ``device``, and why the faster ones decline it,
    without running anything: one row per layer (photosim.engine.plan.describe plus ``backend``, ``declined``).

    Example:
        >>> rows = execution_plan(qmodel, "photonic-8bit")  # [{"layer": "conv1", ..., "backend": "fused-cpu"}, ...]
    """
    validate(qmodel)
    hw_plan, parsed = HardwarePlan.resolve(qmodel, hw), check_device(str(device))
    check_modes(qmodel, hw_plan)
    backends.check_names(backend)
    ranges = dict.fromkeys(hw_plan.layers, 1.0)  # a calibrated ADC's range, measured at run time, changes no choice
    plans = plan_layers(qmodel, hw_plan, parsed, adc_ranges=ranges)
    return [{**describe(plan), **backends.choose(plan, parsed, backend).as_row()} for plan in plans.values()]


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
