"""photosim's integer model as an ONNX graph that ONNX Runtime runs on the CPU (``photosim export``).

Two forms of the same integer model (docs/onnx.md): ``qdq``, standard ONNX QuantizeLinear / DequantizeLinear pairs
around float Conv, Gemm, Add and GlobalAveragePool, which ONNX Runtime fuses into its QLinear kernels; and
``qoperator``, those kernels written out (QLinearConv, and com.microsoft's QGemm, QLinearAdd,
QLinearGlobalAveragePool). Codes travel in 8-bit containers (uint8 / int8); an activation whose clamp range is
narrower (sub-8-bit codes, a ReLU not at the container's end) gets an integer Clip. Ops that move codes (max pool,
flatten, reshape, clamp) run on the codes directly. What ONNX cannot say is written in the file's metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photosim._imports import import_extra
from photosim._version import __version__
from photosim.errors import PhotosimError
from photosim.ir.containers import CONTAINER_BITS, clamp_needed, in_container
from photosim.ir.format import Node, QParams, QuantizedModel, validate
from photosim.ir.ops import OPS, conv_output_size, infer_shapes

ONNX_OPSET = 13  # per-axis DequantizeLinear and integer MaxPool / Clip
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (QGemm, QLinearAdd, QLinearGlobalAveragePool)
IR_VERSION = 8  # read by every ONNX Runtime since 1.10
FORMS = ("qdq", "qoperator")
MAX_CODE_BITS = CONTAINER_BITS
NOT_EXPRESSED = (
    "ONNX cannot state: photosim's exact integer accumulators (ONNX Runtime sums in int32 and wraps); the hardware "
    "model (tiles, ADC, noise, accumulator width: photosim run --hw simulates them on the photosim file); the float64 "
    "scales of the photosim file (written here rounded to float32); the requantization rounding of photosim's float "
    "and fixedpoint modes (ONNX Runtime rounds as photosim's onnxruntime mode, docs/integer-semantics.md)."
)


def load_extra(module: str) -> Any:
    """Import an optional dependency of the ONNX commands, or say how to install it (a PhotosimError: exit 2)."""
    return import_extra(module, "onnx", "this command")


try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # the onnx extra is not installed: require_onnx says how to install it
    onnx = None


def require_onnx() -> None:
    """Refuse (a PhotosimError naming the install) when the ``onnx`` package is missing."""
    if onnx is None:
        load_extra("onnx")


def container(q: QParams) -> type:
    """The numpy dtype of the 8-bit container holding codes of ``q``: int8 or uint8."""
    return np.int8 if q.signed else np.uint8


@dataclass
class _Graph:
    """The ONNX graph under construction: nodes, initializers and where each photosim tensor's codes are.

    In the ``qdq`` form every activation is held in uint8 (signed codes moved by 128, photosim.ir.containers): ONNX
    Runtime on x86 fuses DequantizeLinear -> op -> QuantizeLinear into its integer kernels only for uint8 activations
    (int8 ones stay float unless the session option ``session.qdqisint8allowed`` is 1). The ``qoperator`` form keeps
    each tensor's own container and moves a kernel's inputs to its output's, as its kernels take one type.
    """

    model: QuantizedModel
    form: str
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    codes: dict[str, str] = field(default_factory=dict)  # photosim tensor -> its ONNX code tensor
    views: dict[str, str] = field(default_factory=dict)  # "<tensor>_as_int8" / "_as_uint8" -> moved code tensor
    scales: dict[str, tuple[str, str]] = field(default_factory=dict)  # tensor or view -> (scale, zero point)

    def held(self, tensor: str) -> QParams:
        """The quantization of a photosim tensor's codes as the ONNX graph holds them."""
        q = self.model.qparams(tensor)
        return in_container(q, False) if self.form == "qdq" else q

    def constant(self, name: str, value: np.ndarray) -> str:
        """Add an initializer (a unique name derived from ``name``); returns its name."""
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self.names:
            candidate, index = f"{name}_{index}", index + 1
        self.names.add(candidate)
        return candidate

    def add(self, op: str, inputs: list[str], output: str, name: str, domain: str = "", **attrs: Any) -> str:
        """Append a node producing ``output`` (a unique name derived from it); returns the output's name."""
        output = self.unique(output)
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.unique(f"{name}/{op}"), domain=domain,
                                           **attrs))
        return output

    def qparams(self, key: str, q: QParams) -> tuple[str, str]:
        """Scale (float32) and zero point (container dtype) initializers of a tensor's (or view's) quantization."""
        if key not in self.scales:
            self.scales[key] = (self.constant(f"{key}_scale", np.array(_scale32(q.scale, key), np.float32)),
                                self.constant(f"{key}_zero_point", np.array(q.zero_point, container(q))))
        return self.scales[key]

    def view(self, tensor: str, signed: bool) -> tuple[str, QParams, str]:
        """A photosim tensor's codes held in the ``signed`` (or unsigned) container, for a kernel whose output is:
        (code tensor, its quantization, the key of its scale and zero point). The codes move by 128 through an exact
        DequantizeLinear / QuantizeLinear pair of scale 1 (photosim.ir.containers)."""
        q = self.held(tensor)
        moved = in_container(q, signed)
        if moved is q:
            return self.codes[tensor], q, tensor
        key = f"{tensor}_as_{'int8' if signed else 'uint8'}"
        if key not in self.views:
            one = self.constant("one", np.array(1.0, np.float32))
            offset = self.constant(f"{tensor}_offset", np.array(q.zero_point - moved.zero_point, container(q)))
            centred = self.add("DequantizeLinear", [self.codes[tensor], one, offset], f"{key}_float", key)
            zero = self.constant(f"{key}_origin", np.array(0, container(moved)))
            self.views[key] = self.add("QuantizeLinear", [centred, one, zero], key, key)
        return self.views[key], moved, key

    def dequantized(self, tensor: str, consumer: str) -> str:
        """A DequantizeLinear of a photosim tensor's codes for one consumer (QDQ form)."""
        scale, zero_point = self.qparams(tensor, self.held(tensor))
        return self.add("DequantizeLinear", [self.codes[tensor], scale, zero_point], f"{tensor}_dequantized",
                        consumer)

    def quantized(self, float_out: str, node: Node) -> None:
        """QuantizeLinear of a node's float result to its output codes (QDQ form), clipped when narrower."""
        scale, zero_point = self.qparams(node.name, self.held(node.name))
        self.store(node.name, self.add("QuantizeLinear", [float_out, scale, zero_point], f"{node.name}_quantized",
                                       node.name))

    def store(self, tensor: str, codes: str) -> None:
        """Record a tensor's codes, after an integer Clip when its clamp range is narrower than the container."""
        self.codes[tensor] = self.clip(codes, self.held(tensor), tensor)

    def clip(self, codes: str, q: QParams, name: str) -> str:
        if not clamp_needed(q):
            return codes
        dtype = container(q)
        low, high = (self.constant(f"{name}_{k}", np.array(v, dtype)) for k, v in (("qmin", q.qmin), ("qmax", q.qmax)))
        return self.add("Clip", [codes, low, high], f"{name}_clipped", name)


def _scale32(scale: float, where: str) -> float:
    """A scale as the float32 an ONNX file holds; refused when float32 cannot represent it."""
    value = float(np.float32(scale))
    if not (math.isfinite(value) and value > 0):
        raise PhotosimError(f"{where}: scale {scale!r} is not a positive finite float32, which ONNX requires; "
                            "quantize the model again.")
    return value


def _unsupported(model: QuantizedModel, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The nodes (and tensors) the export cannot write, each with its reason."""
    found = []
    quantized = [("graph input", model.input_q)] + [(f"node {n.name!r}", n.output_q) for n in model.nodes]
    found += [f"{where} ({q.bits}-bit codes; ONNX Runtime's kernels take at most {MAX_CODE_BITS})"
              for where, q in quantized if q.bits > MAX_CODE_BITS]
    for n in model.nodes:
        why = _refusal(model, n, shapes)
        if why:
            found.append(f"node {n.name!r} ({n.op}: {why})")
    return found


def _refusal(model: QuantizedModel, n: Node, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why one node cannot be exported, or None."""
    if n.op not in WRITERS:
        return "no exact ONNX Runtime kernel is mapped for this op"
    if OPS[n.op].weighted:
        bias = model.tensors[f"{n.name}.bias"]
        if n.w_bits > MAX_CODE_BITS:
            return f"{n.w_bits}-bit weights; ONNX Runtime's kernels take at most {MAX_CODE_BITS}"
        if bias.numel() and (int(bias.min()) < -(1 << 31) or int(bias.max()) >= 1 << 31):
            return "an integer bias outside int32, the type of ONNX's quantized bias"
    if n.op == "linear" and len(shapes[n.inputs[0]]) != 1:
        return f"input of per-sample shape {shapes[n.inputs[0]]}; Gemm takes (N, features) only"
    if n.op == "adaptive_avgpool2d" and shapes[n.name][1:] != (1, 1):
        return f"output size {list(shapes[n.name][1:])}; only the global average (1x1) has an exact ONNX kernel"
    if n.op == "add" and shapes[n.inputs[0]] != shapes[n.inputs[1]]:
        return "inputs of different shapes"
    return None


def _weights(g: _Graph, n: Node) -> tuple[str, str, str, str]:
    """Weight codes (int8), weight scale, weight zero point and int32 bias initializers of a conv/linear."""
    t = g.model.tensors
    w_scale = t[f"{n.name}.weight_scale"].float().numpy()
    weight = g.constant(f"{n.name}.weight_quantized", t[f"{n.name}.weight"].to(torch.int8).numpy())
    scale = g.constant(f"{n.name}.weight_scale", w_scale)
    zero_point = g.constant(f"{n.name}.weight_zero_point", np.zeros(w_scale.shape, np.int8))
    bias = g.constant(f"{n.name}.bias_quantized", t[f"{n.name}.bias"].to(torch.int32).numpy())
    return weight, scale, zero_point, bias


def _conv_attrs(n: Node) -> dict[str, Any]:
    a = n.attrs
    return {"kernel_shape": a["kernel"], "strides": a["stride"], "pads": [*a["padding"], *a["padding"]],
            "dilations": a["dilation"], "group": a["groups"]}


def _weighted(g: _Graph, n: Node, shapes: dict[str, tuple[int, ...]]) -> None:
    """conv2d -> QLinearConv, or DQ -> Conv -> Q; linear -> QGemm, or DQ -> Gemm -> Q (weights per channel on axis 0,
    the int32 bias in units of s_in * s_w)."""
    weight, w_scale, w_zero, bias = _weights(g, n)
    src = n.inputs[0]
    attrs = _conv_attrs(n) if n.op == "conv2d" else {"transB": 1}
    if g.form == "qoperator":
        codes, q_in, key = g.view(src, n.output_q.signed)
        x_scale, x_zero = g.qparams(key, q_in)
        y_scale, y_zero = g.qparams(n.name, n.output_q)
        if n.op == "conv2d":
            inputs = [codes, x_scale, x_zero, weight, w_scale, w_zero, y_scale, y_zero, bias]
            g.store(n.name, g.add("QLinearConv", inputs, f"{n.name}_quantized", n.name, **attrs))
        else:
            inputs = [codes, x_scale, x_zero, weight, w_scale, w_zero, bias, y_scale, y_zero]
            g.store(n.name, g.add("QGemm", inputs, f"{n.name}_quantized", n.name, MS_DOMAIN, **attrs))
        return
    axis = {"axis": 0}
    w_float = g.add("DequantizeLinear", [weight, w_scale, w_zero], f"{n.name}.weight", n.name, **axis)
    w32 = g.model.tensors[f"{n.name}.weight_scale"].float()
    bias_scale = (torch.tensor(_scale32(n.input_q[0].scale, src), dtype=torch.float32) * w32).expand(
        g.model.tensors[f"{n.name}.weight"].shape[0]).contiguous().numpy()  # float32 s_in * s_w, as ONNX requires
    b_scale = g.constant(f"{n.name}.bias_scale", bias_scale)
    b_zero = g.constant(f"{n.name}.bias_zero_point", np.zeros(bias_scale.shape, np.int32))
    b_float = g.add("DequantizeLinear", [bias, b_scale, b_zero], f"{n.name}.bias", n.name, **axis)
    x = g.dequantized(src, n.name)
    op = "Conv" if n.op == "conv2d" else "Gemm"
    g.quantized(g.add(op, [x, w_float, b_float], f"{n.name}_float", n.name, **attrs), n)


def _add(g: _Graph, n: Node, shapes: dict[str, tuple[int, ...]]) -> None:
    """add -> QLinearAdd, or DQ, DQ -> Add -> Q."""
    if g.form == "qoperator":
        inputs = []
        for src in n.inputs:
            codes, q, key = g.view(src, n.output_q.signed)
            inputs += [codes, *g.qparams(key, q)]
        inputs += g.qparams(n.name, n.output_q)
        g.store(n.name, g.add("QLinearAdd", inputs, f"{n.name}_quantized", n.name, MS_DOMAIN))
        return
    a, b = (g.dequantized(src, n.name) for src in n.inputs)
    g.quantized(g.add("Add", [a, b], f"{n.name}_float", n.name), n)


def _global_average(g: _Graph, n: Node, shapes: dict[str, tuple[int, ...]]) -> None:
    """adaptive_avgpool2d to 1x1 -> QLinearGlobalAveragePool, or DQ -> GlobalAveragePool -> Q."""
    src = n.inputs[0]
    if g.form == "qoperator":
        codes, q_in, key = g.view(src, n.output_q.signed)
        inputs = [codes, *g.qparams(key, q_in), *g.qparams(n.name, n.output_q)]
        g.store(n.name, g.add("QLinearGlobalAveragePool", inputs, f"{n.name}_quantized", n.name, MS_DOMAIN,
                         channels_last=0))
        return
    g.quantized(g.add("GlobalAveragePool", [g.dequantized(src, n.name)], f"{n.name}_float", n.name), n)


def _maxpool(g: _Graph, n: Node, shapes: dict[str, tuple[int, ...]]) -> None:
    """maxpool2d -> MaxPool on the codes; PyTorch's ceil mode as extra end padding (padding never wins a max)."""
    a = n.attrs
    ends = []
    for size, k, s, p, d in zip(shapes[n.inputs[0]][1:], a["kernel"], a["stride"], a["padding"], a["dilation"]):
        out = conv_output_size(size, k, s, p, d, a["ceil_mode"])
        ends.append(max(p, (out - 1) * s + d * (k - 1) + 1 - size - p))
    attrs = {"kernel_shape": a["kernel"], "strides": a["stride"], "dilations": a["dilation"],
             "pads": [*a["padding"], *ends]}
    g.codes[n.name] = g.add("MaxPool", [g.codes[n.inputs[0]]], f"{n.name}_quantized", n.name, **attrs)


def _moved(g: _Graph, n: Node, shapes: dict[str, tuple[int, ...]]) -> None:
    """clamp, flatten, reshape: integer Clip, Flatten or Reshape of the codes (they never requantize)."""
    src = g.codes[n.inputs[0]]
    if n.op == "clamp":
        g.store(n.name, src)
    elif n.op == "flatten" and n.attrs["start_dim"] == 1:
        g.codes[n.name] = g.add("Flatten", [src], f"{n.name}_quantized", n.name, axis=1)
    else:  # 0 keeps the batch size, as torch's per-sample shapes do
        shape = g.constant(f"{n.name}_shape", np.array([0, *shapes[n.name]], np.int64))
        g.codes[n.name] = g.add("Reshape", [src, shape], f"{n.name}_quantized", n.name)


# The ONNX writer of each exported op (the others are refused by name).
WRITERS: dict[str, Callable[[_Graph, Node, dict[str, tuple[int, ...]]], None]] = {
    "conv2d": _weighted, "linear": _weighted, "add": _add, "adaptive_avgpool2d": _global_average,
    "maxpool2d": _maxpool, "clamp": _moved, "flatten": _moved, "reshape": _moved}


def _graph_input(g: _Graph, float_input: str) -> None:
    """The float input to codes as photosim quantizes it (PyTorch's ``quantize_per_tensor``): a float32 product with
    ``f32(1 / s)``, then QuantizeLinear with scale 1 (rounding half to even, zero point, saturation). A plain
    QuantizeLinear of scale ``s`` divides instead, which moves inputs on a .5 boundary (8-bit images times 1/255:
    every pixel of value 0.5)."""
    held = g.held(g.model.input_name)
    reciprocal = g.constant("input_reciprocal_scale", np.array(1.0 / held.scale, np.float32))
    scaled = g.add("Mul", [float_input, reciprocal], "input_scaled", "input")
    unit = g.constant("input_unit_scale", np.array(1.0, np.float32))
    zero_point = g.constant("input_zero_point", np.array(held.zero_point, container(held)))
    g.store(g.model.input_name, g.add("QuantizeLinear", [scaled, unit, zero_point],
                                      f"{g.model.input_name}_quantized", "input"))


def to_onnx(model: QuantizedModel, form: str = "qdq") -> Any:
    """An integer model as an ONNX ModelProto (opset 13; ``form``: ``qdq`` or ``qoperator``).

    The graph takes float32 ``input`` (N, *input_shape) and returns float32 ``output``, the dequantized codes of
    the model's output; every photosim tensor's codes are the ONNX tensor named in the metadata key
    ``photosim.codes``. Raises PhotosimError naming every node it cannot write exactly.

    Example:
        >>> onnx.save(to_onnx(photosim.load("m.safetensors")), "m.onnx")
    """
    require_onnx()
    if form not in FORMS:
        raise PhotosimError(f"unknown ONNX form {form!r}; use one of {', '.join(FORMS)}.")
    validate(model)
    shapes = infer_shapes(model.input_name, model.input_shape, model.nodes)
    refused = _unsupported(model, shapes)
    if refused:
        raise PhotosimError(f"the model has {len(refused)} part(s) ONNX export cannot write exactly: "
                            + "; ".join(refused) + f". Exported ops: {', '.join(WRITERS)} (average pools to 1x1), "
                            f"with codes of at most {MAX_CODE_BITS} bits; quantize the model without the others.")
    g = _Graph(model, form)
    float_input = g.unique("input")
    _graph_input(g, float_input)
    for n in model.nodes:
        WRITERS[n.op](g, n, shapes)
    float_output = g.unique("output")
    out_q = g.held(model.output)
    g.nodes.append(helper.make_node("DequantizeLinear", [g.codes[model.output], *g.qparams(model.output, out_q)],
                                    [float_output], name=g.unique("output/DequantizeLinear")))
    graph = helper.make_graph(
        g.nodes, "photosim", [helper.make_tensor_value_info(float_input, TensorProto.FLOAT, ["N", *model.input_shape])],
        [helper.make_tensor_value_info(float_output, TensorProto.FLOAT, ["N", *shapes[model.output]])],
        g.initializers)
    opsets = [helper.make_opsetid("", ONNX_OPSET)]
    if form == "qoperator":
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="photosim", producer_version=__version__)
    proto.ir_version = IR_VERSION
    proto.doc_string = f"photosim integer model ({form} form). {NOT_EXPRESSED}"
    helper.set_model_props(proto, _metadata(model, g))
    onnx.checker.check_model(proto)
    return proto


def _metadata(model: QuantizedModel, g: _Graph) -> dict[str, str]:
    """What the graph cannot carry: each tensor's bits and clamp range, weight and bias bits, provenance, limits."""
    quantized = {model.input_name: model.input_q, **{n.name: n.output_q for n in model.nodes}}
    ranges = {name: {"bits": q.bits, "signed": q.signed, "qmin": q.qmin, "qmax": q.qmax, "scale": q.scale,
                     "zero_point": q.zero_point} for name, q in quantized.items()}
    weights = {n.name: {"w_bits": n.w_bits, "bias_bits": n.bias_bits} for n in model.nodes if n.w_bits is not None}
    return {
        "photosim.form": g.form,
        "photosim.opset": str(ONNX_OPSET),
        "photosim.codes": json.dumps(g.codes),
        "photosim.code_offsets": json.dumps({name: g.held(name).zero_point - q.zero_point
                                             for name, q in quantized.items() if g.held(name) is not q}),
        "photosim.activations": json.dumps(ranges),
        "photosim.weights": json.dumps(weights),
        "photosim.provenance": json.dumps(model.provenance, default=str),
        "photosim.not_expressed": NOT_EXPRESSED,
    }


def export_onnx(model: QuantizedModel, output: str | Path, form: str = "qdq") -> Any:
    """``photosim export``: write ``model`` as an ONNX file (atomically) and return the ModelProto."""
    from photosim._files import atomic_path

    proto = to_onnx(model, form)
    with atomic_path(output) as tmp:
        onnx.save(proto, str(tmp))
    return proto
