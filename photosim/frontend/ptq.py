"""Post-training quantization: float model + calibration data -> QuantizedModel (the integer file).

Weights: signed, symmetric, narrow range, per channel or per tensor. Activations: unsigned with a zero
point; activations that can be negative cover their observed range with a zero point (``activation_range:
affine``) or are signed symmetric (``symmetric``). The graph output gets at least ``output_bits``. Bias:
integer at scale ``s_in * s_w[c]``, rounded half to even, saturated at ``bias_bits``. Pools, flatten and
reshape keep their input's quantization. The error-correcting algorithms of ``spec.ptq`` (docs/ptq.md)
rewrite the float graph, choose the weight codes or correct the bias; ``auto`` picks among them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from rich.progress import track
from torch import nn

from photosim._config import load_config
from photosim._progress import progress_options
from photosim._version import __version__
from photosim.errors import PhotosimError
from photosim.frontend.algorithms import Selection
from photosim.frontend.algorithms.layer import LayerData
from photosim.frontend.algorithms.selection import select
from photosim.frontend.capture import capture
from photosim.frontend.data import calibration_batches
from photosim.frontend.graph import FloatGraph, FloatNode
from photosim.frontend.hf import Logits, is_transformers_model
from photosim.frontend.lockstep import LockstepRun
from photosim.frontend.qconfig import LayerSettings, QuantSpec
from photosim.ir.fakequant import exp_table, lookup_table
from photosim.ir.format import Node, QParams, QuantizedModel, bias_dtype, weight_dtype
from photosim.ir.observers import ActivationObserver, affine_params, quantize_weight, weight_scale
from photosim.ir.ops import OPS
from photosim.ir.ranges import int_range


def _activation_qparams(obs: ActivationObserver, s: LayerSettings, act: tuple[float, float] | None,
                        unsigned: bool) -> QParams:
    """Unsigned (with a zero point) when ``unsigned`` or affine ranges are chosen, else signed symmetric."""
    signed = not unsigned and s.activation_range == "symmetric"
    lo, hi = obs.clip_range(s.observer, s.percentile, s.a_bits, signed=signed)
    if act is not None:
        lo, hi = max(lo, act[0]), min(hi, act[1])
    scale_t, zp_t = affine_params(torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64),
                                  s.a_bits, signed=signed)
    qmin, qmax = int_range(s.a_bits, signed=signed)
    q = QParams(float(scale_t), int(zp_t), s.a_bits, signed, qmin, qmax)
    return _with_clamp(q, act)


def _with_clamp(q: QParams, act: tuple[float, float] | None) -> QParams:
    """Narrow q's clamp range to the codes of the float bounds ``act`` (a fused ReLU sets qmin = zero point)."""
    if act is None:
        return q

    def code(v: float) -> int:
        if abs(v) == float("inf"):
            return q.qmin if v < 0 else q.qmax
        return min(max(round(v / q.scale) + q.zero_point, q.qmin), q.qmax)

    return QParams(q.scale, q.zero_point, q.bits, q.signed, max(q.qmin, code(act[0])), min(q.qmax, code(act[1])))


def _observe(graph: FloatGraph, batches: list[torch.Tensor], progress: bool) -> dict[str, ActivationObserver]:
    names = ["input"] + [n.name for n in graph.nodes if OPS[n.op].observed]
    observers = {name: ActivationObserver(seed=i) for i, name in enumerate(names)}

    def observe(name: str, y: torch.Tensor) -> None:
        if name in observers:
            observers[name].update(y)

    with torch.no_grad():
        for x in track(batches, description="calibrating", **progress_options(progress)):
            graph.run(x.float(), observe)
    return observers


def _output_layer(graph: FloatGraph) -> str:
    """The tensor whose quantization the graph output carries: its producer, or the first observed one upstream
    of it through ops that keep their input's quantization (pools, flatten, reshape, clamp)."""
    by_name = {node.name: node for node in graph.nodes}
    name = graph.output
    while name in by_name and not OPS[by_name[name].op].observed:
        name = by_name[name].inputs[0]
    return name


def _weighted_node(node: FloatNode, s: LayerSettings, input_q: QParams, tensors: dict[str, torch.Tensor],
                   algorithms: Selection, layer: LayerData | None) -> int:
    """Quantize weights and bias into ``tensors`` (with ``algorithms``, which need ``layer`` if any);
    return how many bias values saturated."""
    scale = weight_scale(node.weight, s.w_bits, s.weight_granularity == "per_channel", s.w_observer)
    if algorithms.rounding is not None and layer is not None:
        codes = algorithms.rounding.codes(layer, node.weight, scale, s.w_bits)
    else:
        codes = quantize_weight(node.weight, scale, s.w_bits)
    tensors[f"{node.name}.weight"] = codes.to(weight_dtype(s.w_bits))
    tensors[f"{node.name}.weight_scale"] = scale
    bias_scale = input_q.scale * scale.double().expand(node.weight.shape[0])
    float_bias = node.bias.double()
    if layer is not None:
        weight = codes.double() * scale.double().reshape(-1, *([1] * (codes.dim() - 1)))
        for algorithm in algorithms.bias:
            float_bias = algorithm.correct(layer, weight, float_bias)
    bias = torch.round(float_bias / bias_scale)
    lo, hi = int_range(s.bias_bits, True)
    saturated = int(((bias < lo) | (bias > hi)).sum())
    tensors[f"{node.name}.bias"] = bias.clamp(lo, hi).to(torch.int64).to(bias_dtype(s.bias_bits))
    return saturated


def quantize(model: nn.Module, calibration_data: Any, spec: QuantSpec | dict | str | Path | None = None, *,
             progress: bool = False, provenance: dict[str, Any] | None = None) -> QuantizedModel:
    """Post-training quantization of ``model`` to an integer model.

    Args:
        model: float model, fx-traceable, built from the supported ops (see ``photosim.frontend.capture.SUPPORTED``).
        calibration_data: input batches (tensor, Dataset, DataLoader or iterable of tensors / (x, y)).
        spec: QuantSpec, the equivalent dict, or a YAML path; None = 8-bit defaults.
        progress: show a progress bar over calibration batches.
        provenance: extra facts recorded in the file (model spec, weights hash, data).

    Example:
        >>> qm = photosim.quantize(model, calib_images, {"w_bits": 4, "a_bits": 4})
        >>> qm.save("m.safetensors")
    """
    spec = load_config(QuantSpec, spec)
    batches = calibration_batches(calibration_data, spec.calibration_samples)
    if not spec.auto:
        return _quantize(model, batches, spec, progress, provenance)
    x = torch.cat(batches).float()
    if is_transformers_model(model):
        model = Logits(model)  # the output object's logits, as capture takes them
    with torch.no_grad():
        reference = model.eval()(x)
    qmodel, selection = select(
        lambda names: _quantize(model, batches, spec.model_copy(update={"ptq": names}), progress, provenance),
        x, reference)
    qmodel.provenance["ptq_selection"] = selection
    return qmodel


def _quantize(model: nn.Module, batches: list[torch.Tensor], spec: QuantSpec, progress: bool,
              provenance: dict[str, Any] | None) -> QuantizedModel:
    """``quantize`` with the algorithms of ``spec.ptq`` (not `auto`)."""
    graph = capture(model, batches[0][:1].float())
    names = ["input"] + [n.name for n in graph.nodes]
    unmatched = spec.unmatched_overrides(names)
    if unmatched:
        raise PhotosimError(f"layer override(s) {unmatched} match no layer. Layer names: {', '.join(names)}.")
    algorithms = Selection.of(spec.ptq)
    for algorithm in algorithms.graph:
        algorithm.transform(graph, batches)
    observers = _observe(graph, batches, progress)
    output_layer = _output_layer(graph)

    def settings(name: str) -> LayerSettings:
        return spec.for_output(name) if name == output_layer else spec.for_layer(name)

    qparams = {"input": _activation_qparams(observers["input"], settings("input"), None,
                                            unsigned=observers["input"].lo >= 0)}
    tensors: dict[str, torch.Tensor] = {}
    nodes: list[Node] = []
    qmodel = QuantizedModel(input_name="input", input_shape=graph.input_shape, input_q=qparams["input"],
                            nodes=nodes, tensors=tensors, output=graph.output)
    run = LockstepRun(graph, torch.cat(batches), qparams["input"]) if algorithms.needs_data else None
    saturated: dict[str, int] = {}
    for fnode in graph.nodes:
        s = settings(fnode.name)
        input_q = [qparams[i] for i in fnode.inputs]
        if OPS[fnode.op].observed:
            output_q = _activation_qparams(observers[fnode.name], s, fnode.act, unsigned=fnode.act is not None)
        else:  # clamp, pools, mean, flatten, reshape, permute, slice keep their input's quantization
            output_q = _with_clamp(input_q[0], fnode.act)
        qparams[fnode.name] = output_q
        node = Node(fnode.name, fnode.op, fnode.inputs, input_q, output_q, dict(fnode.attrs))
        if OPS[fnode.op].weighted:
            node.w_bits, node.bias_bits = s.w_bits, s.bias_bits
            count = _weighted_node(fnode, s, input_q[0], tensors, algorithms, run.layer(fnode) if run else None)
            if count:
                saturated[fnode.name] = count
        if OPS[fnode.op].tabled:
            tensors[f"{fnode.name}.table"] = lookup_table(node)
        if OPS[fnode.op].valued:
            tensors[f"{fnode.name}.value"] = fnode.weight.float()
        if OPS[fnode.op].exp_tabled:
            tensors[f"{fnode.name}.exp"] = exp_table(node)
        if OPS[fnode.op].affine:
            tensors[f"{fnode.name}.gamma"], tensors[f"{fnode.name}.beta"] = fnode.weight.float(), fnode.bias.float()
        nodes.append(node)
        if run is not None:
            run.advance(fnode, node, qmodel)
    if saturated:
        warnings.warn(f"integer bias saturated at its bit width in {saturated} (layer: values); "
                      "raise bias_bits to keep them exact.", stacklevel=3)
    samples = sum(len(b) for b in batches)
    qmodel.provenance = {
        **(provenance or {}),
        "calibration": {**(provenance or {}).get("calibration", {}), "samples": samples},
        "quant_spec": spec.model_dump(),
        "bias_saturated": saturated,
        "photosim_version": __version__,
    }
    return qmodel
