"""Import quantized ONNX models (ONNX Runtime's QDQ and QOperator forms, Brevitas' QCDQ) as integer files.

The file is read with ``onnx.load`` (protobuf only, no external data) and never run: no custom-op library is loaded
and nothing executes. Integer tensors (QuantizeLinear outputs, QLinear* outputs) become photosim tensors with their
scale and zero point; DequantizeLinear of such a tensor is a float view of the same codes; a float op (Conv, Gemm,
MatMul, Add, GlobalAveragePool, MaxPool, Flatten, Reshape, Relu, Clip) between views and a QuantizeLinear becomes the
photosim node that QuantizeLinear gives its output quantization; an integer Clip after a QuantizeLinear narrows its
codes (sub-8-bit QCDQ). Anything else is refused by node name (docs/onnx.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photosim._files import require_file, save_model_atomic
from photosim.errors import PhotosimError
from photosim.frontend.onnx_nodes import (
    Codes,
    Pending,
    Refused,
    Weight,
    activation,
    attributes,
    bits_for,
    code_bound,
    conv_attrs,
    linear_attrs,
    maxpool_attrs,
    quantize_constant,
)
from photosim.frontend.torch_import import integer_bias
from photosim.ir.format import Node, QParams, QuantizedModel, validate
from photosim.ir.onnx_export import require_onnx
from photosim.ir.ops import OPS, AttrError, infer_shapes

try:
    import onnx
    from onnx import TensorProto, numpy_helper
except ImportError:  # the onnx extra is not installed: read_onnx and from_onnx say how to install it
    onnx = None

SUPPORTED = (
    "QuantizeLinear / DequantizeLinear (per-tensor activations, per-tensor or per-channel weights), integer Clip "
    "(QCDQ), and between them Conv, Gemm, MatMul (+ Add of a bias), Add, GlobalAveragePool, MaxPool, Flatten, "
    "Reshape, Relu, Clip; or the QOperator kernels QLinearConv, QLinearMatMul, QGemm, QLinearAdd, "
    "QLinearGlobalAveragePool with MaxPool / Flatten / Reshape / Clip on their codes; Identity and Dropout pass through"
)
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")
BIAS_BITS = 32  # ONNX's quantized bias is int32
UINT8, INT8 = 2, 3  # TensorProto's element types of activation codes


def keeps_codes(op: str) -> bool:
    """Ops whose output codes are their input's, moved or clamped to a narrower range: they never requantize."""
    return OPS[op].moves_codes or op == "clamp"


@dataclass
class _Importer:
    """One pass over the ONNX graph's nodes (topological, as ONNX requires), building integer nodes and tensors."""

    graph: Any
    source: str
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, Weight] = field(default_factory=dict)
    codes: dict[str, Codes] = field(default_factory=dict)
    views: dict[str, Codes] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    folded: set[str] = field(default_factory=set)  # integer Clips folded into their producer
    float_input: str = ""
    scaled_input: dict[str, float] = field(default_factory=dict)  # Mul(input, f32(1 / s)) -> the reciprocal
    input_division: bool = True  # the input's QuantizeLinear divides by its scale (else: photosim's reciprocal)
    input_shape: tuple[int, ...] = ()
    input_q: QParams | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        self.consts = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.consumers = Counter(i for n in self.graph.node for i in n.input if i)
        self.users = {}
        for n in self.graph.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    # -- the walk ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        self._graph_input()
        for node in self.graph.node:
            where = f"node {node.name or node.output[0]!r} ({node.op_type})"
            if node.domain not in KNOWN_DOMAINS:
                self.refused.append(f"{where}: op of domain {node.domain!r}, a custom op library photosim never loads")
                self.failed.update(node.output)
                continue
            if any(i in self.failed for i in node.input):
                self.failed.update(node.output)
                continue
            try:
                self._node(node, where)
            except Refused as exc:
                self.refused.append(str(exc))
                self.failed.update(node.output)
        for name, p in self.pending.items():
            if self.consumers[name] == 0 or name in {o.name for o in self.graph.output}:
                self.refused.append(f"node {p.source.name or name!r} ({p.source.op_type}): its float result is never "
                                    "quantized, so it runs in float")
        self._graph_output()

    def _graph_input(self) -> None:
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise PhotosimError(f"{self.source}: the graph has {len(inputs)} inputs; photosim models take one tensor.")
        tensor = inputs[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if len(dims) < 2 or any(d is None or d < 1 for d in dims[1:]):
            raise PhotosimError(
                f"{self.source}: input {inputs[0].name!r} has dynamic or unknown dimensions {dims}; photosim needs a "
                "fixed per-sample shape (only the batch dimension may be symbolic). Fix the shape, e.g. with "
                "onnxruntime.tools.make_dynamic_shape_fixed.")
        if tensor.elem_type != TensorProto.FLOAT:
            raise PhotosimError(f"{self.source}: input {inputs[0].name!r} is not float32; photosim quantizes a float "
                                "input with the graph's first QuantizeLinear.")
        self.float_input, self.input_shape = inputs[0].name, tuple(dims[1:])

    def _graph_output(self) -> None:
        if len(self.graph.output) != 1:
            self.refused.append(f"graph: {len(self.graph.output)} outputs; photosim models have one")
            return
        name = self.graph.output[0].name
        found = self.codes.get(name) or self.views.get(name)
        if found is not None:
            self.output = found.name
        elif name not in self.failed:
            self.refused.append(f"graph output {name!r}: not the codes of a quantized tensor (or their "
                                "DequantizeLinear)")

    def _node(self, node: Any, where: str) -> None:
        op, ins = node.op_type, list(node.input)
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise Refused(where, f"op {op} is not supported")
        if op not in ("Constant", "QuantizeLinear", "DequantizeLinear", "Mul", "Clip") and not any(
                i in self.codes or i in self.views or i in self.pending for i in ins if i):
            raise Refused(where, "no input is a quantized tensor: this part of the graph is float only")
        handler(node, ins, where)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _const(self, name: str, where: str) -> np.ndarray:
        if name not in self.consts:
            raise Refused(where, f"input {name!r} must be a constant")
        return self.consts[name]

    def _optional(self, ins: list[str], index: int) -> np.ndarray | None:
        return self.consts[ins[index]] if len(ins) > index and ins[index] else None

    def _view(self, name: str, where: str) -> Codes:
        """The codes an input reads: a DequantizeLinear's (or integer) codes, or those of a pending op that only moves
        or clamps codes (a float ReLU or max pool that ONNX Runtime runs between a DequantizeLinear and the op)."""
        if name in self.pending and keeps_codes(self.pending[name].op):
            p = self.pending.pop(name)
            self.views[name] = self._finish(p, p.inputs[0].q)
        found = self.views.get(name) or self.codes.get(name)
        if found is None:
            raise Refused(where, f"input {name!r} is not a dequantized (or integer) quantized tensor")
        return found

    def _unique(self, wanted: str) -> str:
        taken = {"input", *(n.name for n in self.nodes)}
        candidate, index = wanted or "node", 1
        while candidate in taken:
            candidate, index = f"{wanted}_{index}", index + 1
        return candidate

    def _emit(self, source: Any, op: str, inputs: list[Codes], q: QParams, attrs: dict[str, Any],
              **extra: Any) -> Codes:
        node = Node(self._unique(source.name or source.output[0]), op, [c.name for c in inputs],
                    [c.q for c in inputs], q, attrs, **extra)
        self.nodes.append(node)
        try:
            infer_shapes("input", self.input_shape, self.nodes)
        except AttrError as exc:
            self.nodes.pop()
            raise Refused(f"node {source.name!r} ({source.op_type})", str(exc)) from None
        return Codes(node.name, q)

    def _shape(self, tensor: str) -> tuple[int, ...]:
        return infer_shapes("input", self.input_shape, self.nodes)[tensor]

    def _clip_after(self, output: str, q: QParams) -> QParams:
        """Fold an integer Clip that is the only consumer of a QuantizeLinear's output into its quantization."""
        users = self.users.get(output, [])
        if len(users) != 1 or users[0].op_type != "Clip" or self.consumers[output] != 1:
            return q
        clip = users[0]
        bounds = [self.consts.get(i) for i in clip.input[1:3]]
        if len(clip.input) < 3 or any(b is None or b.dtype.kind not in "iu" for b in bounds):
            return q
        qmin, qmax = max(q.qmin, int(bounds[0])), min(q.qmax, int(bounds[1]))
        self.folded.add(clip.output[0])
        bits = bits_for(min(qmin, q.zero_point), max(qmax, q.zero_point), q.signed)
        return replace(q, bits=bits, qmin=qmin, qmax=qmax)

    # -- QuantizeLinear / DequantizeLinear / constants ----------------------------------------------------------

    def _op_Constant(self, node: Any, ins: list[str], where: str) -> None:
        value = attributes(node).get("value")
        if value is None:
            raise Refused(where, "only tensor constants are supported")
        self.consts[node.output[0]] = numpy_helper.to_array(value)

    def _op_QuantizeLinear(self, node: Any, ins: list[str], where: str) -> None:
        scale, zero_point = self._const(ins[1], where), self._optional(ins, 2)
        out = node.output[0]
        if ins[0] in self.consts:  # a float weight quantized in the graph (Brevitas QCDQ)
            axis = attributes(node).get("axis", 1)
            self.consts[out] = quantize_constant(self.consts[ins[0]], scale, zero_point, axis)
            return
        q = self._clip_after(out, activation(scale, zero_point, where))
        if ins[0] in self.scaled_input:  # photosim's export: Mul by f32(1 / s), then scale 1
            if q.scale != 1.0:
                raise Refused(where, "quantizes a scaled input with a scale other than 1")
            q = replace(q, scale=self._reader_scale(out, where))
            self.input_division = False
        if ins[0] == self.float_input or ins[0] in self.scaled_input:
            if self.input_q is not None:
                raise Refused(where, "the graph input is quantized twice")
            self.input_q = q
            self.codes[out] = Codes("input", q)
        elif ins[0] in self.pending:
            self.codes[out] = self._finish(self.pending.pop(ins[0]), q)
        elif ins[0] in self.views:
            view = self.views[ins[0]]
            if (view.q.scale, view.q.zero_point, view.q.signed) != (q.scale, q.zero_point, q.signed):
                raise Refused(where, "requantizes in float (its scale or zero point differs from the "
                                      "DequantizeLinear before it); photosim has no such op")
            narrowed = replace(view.q, qmin=max(view.q.qmin, q.qmin), qmax=min(view.q.qmax, q.qmax))
            self.codes[out] = view if narrowed == view.q else self._emit(node, "clamp", [view], narrowed, {})
        else:
            raise Refused(where, f"quantizes {ins[0]!r}, which is neither the graph input nor the result of a "
                                  "supported op")

    def _reader_scale(self, codes: str, where: str) -> float:
        """The scale with which the nodes after ``codes`` read them: a DequantizeLinear, or a QLinear kernel's scale
        input right after the codes, past ops that only move codes (Clip, MaxPool, Flatten, Reshape)."""
        found, frontier = set(), [codes]
        while frontier:
            tensor = frontier.pop()
            for user in self.users.get(tensor, []):
                position = list(user.input).index(tensor)
                if user.op_type in ("Clip", "MaxPool", "Flatten", "Reshape", "Identity") and position == 0:
                    frontier.append(user.output[0])
                elif user.op_type in ("DequantizeLinear", "QGemm") or user.op_type.startswith("QLinear"):
                    found.add(float(self._const(user.input[position + 1], where).reshape(())))
        if len(found) != 1:
            raise Refused(where, "quantizes the input with scale 1 after a Mul, but no single scale reads its codes")
        return found.pop()

    def _op_Mul(self, node: Any, ins: list[str], where: str) -> None:
        constant = next((self.consts[i] for i in ins if i in self.consts), None)
        if self.float_input not in ins or constant is None or constant.size != 1:
            raise Refused(where, "only the product of the graph input and a constant (photosim's input stage) is "
                                  "supported")
        self.scaled_input[node.output[0]] = float(constant.reshape(()))

    def _op_DequantizeLinear(self, node: Any, ins: list[str], where: str) -> None:
        scale, zero_point = self._const(ins[1], where), self._optional(ins, 2)
        out = node.output[0]
        if ins[0] in self.consts:
            codes = self.consts[ins[0]]
            axis = attributes(node).get("axis", 1)
            if scale.size > 1 and axis != 0:
                raise Refused(where, f"per-channel weights along axis {axis}; photosim needs the output channels "
                                      "(axis 0)")
            zp = np.zeros((), codes.dtype) if zero_point is None else zero_point
            self.weights[out] = Weight(codes, scale.astype(np.float32), zp)
            return
        codes = self._view(ins[0], where)
        q = activation(scale, zero_point, where)
        if (q.scale, q.zero_point, q.signed) != (codes.q.scale, codes.q.zero_point, codes.q.signed):
            raise Refused(where, "its scale or zero point differs from those the codes were quantized with")
        self.views[out] = codes

    def _op_Clip(self, node: Any, ins: list[str], where: str) -> None:
        out = node.output[0]
        if ins[0] in self.consts:  # integer weights clipped to their range (QCDQ)
            low, high = (self._const(ins[k], where) if len(ins) > k and ins[k] else None for k in (1, 2))
            self.consts[out] = np.clip(self.consts[ins[0]], low, high).astype(self.consts[ins[0]].dtype)
        elif out in self.folded:
            self.codes[out] = self.codes[ins[0]]
        elif ins[0] in self.codes:  # an integer clamp on codes
            codes = self.codes[ins[0]]
            low, high = (int(self._const(ins[k], where)) if len(ins) > k and ins[k] else None for k in (1, 2))
            q = replace(codes.q, qmin=codes.q.qmin if low is None else max(codes.q.qmin, low),
                        qmax=codes.q.qmax if high is None else min(codes.q.qmax, high))
            self.codes[out] = self._emit(node, "clamp", [codes], q, {})
        elif ins[0] in self.views or ins[0] in self.pending:
            low = float(self._const(ins[1], where)) if len(ins) > 1 and ins[1] else -np.inf
            high = float(self._const(ins[2], where)) if len(ins) > 2 and ins[2] else np.inf
            self._bounded(node, ins[0], low, high, where)
        else:
            raise Refused(where, "no input is a quantized tensor: this part of the graph is float only")

    def _op_Relu(self, node: Any, ins: list[str], where: str) -> None:
        if ins[0] in self.codes:
            codes = self.codes[ins[0]]
            self.codes[node.output[0]] = self._emit(node, "clamp", [codes], replace(
                codes.q, qmin=max(codes.q.qmin, codes.q.zero_point)), {})
        else:
            self._bounded(node, ins[0], 0.0, np.inf, where)

    def _bounded(self, node: Any, src: str, low: float, high: float, where: str) -> None:
        """A float Relu / Clip: fused into the pending op before it, or a clamp of a view."""
        if src in self.pending:
            p = self.pending.pop(src)
            self.pending[node.output[0]] = replace(p, low=max(p.low, low), high=min(p.high, high))
        else:
            self.pending[node.output[0]] = Pending("clamp", node, [self._view(src, where)], {}, low=low, high=high)

    def _op_Identity(self, node: Any, ins: list[str], where: str) -> None:
        for table in (self.codes, self.views, self.pending):
            if ins[0] in table:
                table[node.output[0]] = table[ins[0]]

    _op_Dropout = _op_Identity

    # -- float ops between DequantizeLinear and QuantizeLinear (QDQ) ----------------------------------------------

    def _op_Conv(self, node: Any, ins: list[str], where: str) -> None:
        weight = self._weight(ins[1], where)
        bias = self._bias(ins, 2, where)
        self.pending[node.output[0]] = Pending("conv2d", node, [self._view(ins[0], where)],
                                                conv_attrs(node, weight.codes.shape, where), weight, bias)

    def _op_Gemm(self, node: Any, ins: list[str], where: str) -> None:
        a = attributes(node)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise Refused(where, "transA, alpha or beta other than 0, 1, 1")
        weight = self._weight(ins[1], where, transpose=not a.get("transB", 0))
        self.pending[node.output[0]] = Pending("linear", node, [self._view(ins[0], where)],
                                                linear_attrs(weight), weight, self._bias(ins, 2, where))

    def _op_MatMul(self, node: Any, ins: list[str], where: str) -> None:
        weight = self._weight(ins[1], where, transpose=True)
        self.pending[node.output[0]] = Pending("linear", node, [self._view(ins[0], where)], linear_attrs(weight),
                                                weight)

    def _op_Add(self, node: Any, ins: list[str], where: str) -> None:
        matmul = next((i for i in ins if i in self.pending and self.pending[i].op == "linear"), None)
        other = next((i for i in ins if i != matmul), None)
        if matmul is not None and self.pending[matmul].bias is None and (other in self.weights or other in self.consts):
            self.pending[node.output[0]] = replace(self.pending.pop(matmul), bias=self.weights.get(
                other, self.consts.get(other)))
            return
        self.pending[node.output[0]] = Pending("add", node, [self._view(i, where) for i in ins], {})

    def _op_GlobalAveragePool(self, node: Any, ins: list[str], where: str) -> None:
        self.pending[node.output[0]] = Pending("adaptive_avgpool2d", node, [self._view(ins[0], where)],
                                                {"output_size": [1, 1]})

    def _op_MaxPool(self, node: Any, ins: list[str], where: str) -> None:
        self._moved(node, ins, "maxpool2d", maxpool_attrs(node, where), where)

    def _op_Flatten(self, node: Any, ins: list[str], where: str) -> None:
        if attributes(node).get("axis", 1) != 1:
            raise Refused(where, "Flatten with an axis other than 1 (it would merge samples)")
        self._moved(node, ins, "flatten", {"start_dim": 1}, where)

    def _op_Reshape(self, node: Any, ins: list[str], where: str) -> None:
        target = [int(d) for d in self._const(ins[1], where)]
        if not target or target[0] not in (0, -1, 1) or (target[0] == -1 and -1 in target[1:]):
            raise Refused(where, f"target shape {target} does not keep the batch dimension first")
        if self._after_pending(node, ins, "reshape", {"shape": target[1:]}) and 0 not in target[1:]:
            return
        shape = self._shape(self._view(ins[0], where).name)
        per_sample = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(target[1:])]
        self._moved(node, ins, "reshape", {"shape": per_sample}, where)

    def _after_pending(self, node: Any, ins: list[str], op: str, attrs: dict[str, Any]) -> bool:
        """A moving op on the float result of a pending conv, add or average: it commutes with the (monotonic)
        quantization, so it runs on that op's codes once they are quantized. True when so deferred."""
        p = self.pending.get(ins[0])
        if p is None or keeps_codes(p.op):
            return False
        self.pending[node.output[0]] = replace(self.pending.pop(ins[0]), after=[*p.after, (node, op, attrs)])
        return True

    def _moved(self, node: Any, ins: list[str], op: str, attrs: dict[str, Any], where: str) -> None:
        """An op that moves codes: on integer codes it is emitted now; on a view it waits for its QuantizeLinear."""
        if self._after_pending(node, ins, op, attrs):
            return
        if ins[0] in self.codes:
            codes = self.codes[ins[0]]
            self.codes[node.output[0]] = self._emit(node, op, [codes], codes.q, attrs)
        else:
            self.pending[node.output[0]] = Pending(op, node, [self._view(ins[0], where)], attrs)

    def _weight(self, name: str, where: str, transpose: bool = False) -> Weight:
        if name not in self.weights:
            raise Refused(where, f"weight {name!r} is not a constant dequantized with DequantizeLinear")
        w = self.weights[name]
        if transpose:
            if w.codes.ndim != 2 or w.scale.size > 1 or w.zero_point.size > 1:
                raise Refused(where, "a (K, N) weight quantized per column; photosim needs per-output-channel "
                                      "scales on the rows of a (N, K) weight")
            return Weight(np.ascontiguousarray(w.codes.T), w.scale, w.zero_point)
        return w

    def _bias(self, ins: list[str], index: int, where: str) -> Any:
        if len(ins) <= index or not ins[index]:
            return None
        name = ins[index]
        if name in self.weights:
            return self.weights[name]
        if name in self.consts:
            return self.consts[name]
        raise Refused(where, f"bias {name!r} is not a constant")

    # -- finishing a node --------------------------------------------------------------------------------------

    def _finish(self, p: Pending, q: QParams) -> Codes:
        """The photosim node of a pending op, now that its QuantizeLinear gave the output quantization."""
        where = f"node {p.source.name!r} ({p.source.op_type})"
        if keeps_codes(p.op):
            return self._moved_codes(p, q)
        q = replace(q, qmin=max(q.qmin, code_bound(p.low, q)), qmax=min(q.qmax, code_bound(p.high, q)))
        codes = self._weighted(p, q, where) if OPS[p.op].weighted else self._emit(
            p.source, p.op, p.inputs, q, p.attrs)
        for node, op, attrs in p.after:
            codes = self._emit(node, op, [codes], codes.q, attrs)
        return codes

    def _moved_codes(self, p: Pending, q: QParams) -> Codes:
        """A max pool, flatten, reshape or float clamp on codes: the op with its input's quantization, a clamp for
        the real bounds of a Relu / Clip, and a rescale (photosim's ``scale``, factor 1) when the QuantizeLinear
        after it has another scale or zero point (ONNX Runtime computes these in float)."""
        source = p.inputs[0]
        moved = self._emit(p.source, p.op, [source], source.q, p.attrs) if p.op != "clamp" else source
        kept = replace(source.q, qmin=max(source.q.qmin, code_bound(p.low, source.q)),
                       qmax=min(source.q.qmax, code_bound(p.high, source.q)))
        if kept != source.q:
            moved = self._emit(p.source, "clamp", [moved], kept, {})
        if (q.scale, q.zero_point, q.signed) == (kept.scale, kept.zero_point, kept.signed):
            narrowed = replace(kept, qmin=max(kept.qmin, q.qmin), qmax=min(kept.qmax, q.qmax))
            return moved if narrowed == kept else self._emit(p.source, "clamp", [moved], narrowed, {})
        return self._emit(p.source, "scale", [moved], q, {"factor": 1.0})

    def _weighted(self, p: Pending, q: QParams, where: str) -> Codes:
        weight, source = p.weight, p.inputs[0]
        out_channels = weight.codes.shape[0]
        zero_point = weight.zero_point.astype(np.int64).reshape(-1, *([1] * (weight.codes.ndim - 1)))
        codes = weight.codes.astype(np.int64) - zero_point  # symmetric codes: real = s * (w - z)
        w_bits = bits_for(int(codes.min()), int(codes.max()), True)
        scale = torch.from_numpy(weight.scale.astype(np.float32).reshape(-1) if weight.scale.size > 1
                                 else weight.scale.astype(np.float32).reshape(()))
        if p.op == "linear" and len(self._shape(source.name)) != 1:
            raise Refused(where, "a matrix product of an input with more than one dimension per sample")
        node = self._emit(p.source, p.op, [source], q, p.attrs, w_bits=w_bits, bias_bits=BIAS_BITS)
        bias = p.bias
        if isinstance(bias, Weight):
            integer = torch.from_numpy(bias.codes.astype(np.int64) - bias.zero_point.astype(np.int64)).reshape(-1)
        elif bias is not None:
            integer = integer_bias(torch.from_numpy(np.asarray(bias, np.float32)).reshape(-1), source.q.scale,
                                   scale.double().expand(out_channels))
        else:
            integer = torch.zeros(out_channels, dtype=torch.int64)
        self.tensors.update({
            f"{node.name}.weight": torch.from_numpy(codes).to(torch.int8 if w_bits <= 8 else torch.int16),
            f"{node.name}.weight_scale": scale.contiguous(),
            f"{node.name}.bias": integer.expand(out_channels).to(torch.int32).contiguous(),
        })
        return node

    # -- QOperator kernels on codes ------------------------------------------------------------------------------

    def _qparams(self, ins: list[str], scale: int, zero_point: int, where: str) -> QParams:
        return activation(self._const(ins[scale], where), self._optional(ins, zero_point), where)

    def _op_QLinearConv(self, node: Any, ins: list[str], where: str) -> None:
        weight = Weight(self._const(ins[3], where), self._const(ins[4], where), self._const(ins[5], where))
        bias = Weight(self.consts[ins[8]], np.ones(1, np.float32), np.zeros((), np.int32)) if len(ins) > 8 and \
            ins[8] else None
        self._qlinear(node, ins, "conv2d", conv_attrs(node, weight.codes.shape, where), weight, bias, (6, 7), where)

    def _op_QGemm(self, node: Any, ins: list[str], where: str) -> None:
        a = attributes(node)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or len(ins) < 9 or not ins[7]:
            raise Refused(where, "transA, alpha other than 0, 1, or a float output")
        w = Weight(self._const(ins[3], where), self._const(ins[4], where), self._const(ins[5], where))
        if not a.get("transB", 0):
            w = Weight(np.ascontiguousarray(w.codes.T), w.scale, w.zero_point)
        bias = Weight(self.consts[ins[6]], np.ones(1, np.float32), np.zeros((), np.int32)) if ins[6] else None
        self._qlinear(node, ins, "linear", linear_attrs(w), w, bias, (7, 8), where)

    def _op_QLinearMatMul(self, node: Any, ins: list[str], where: str) -> None:
        w = Weight(self._const(ins[3], where), self._const(ins[4], where), self._const(ins[5], where))
        if w.codes.ndim != 2 or w.scale.size > 1 or w.zero_point.size > 1:
            raise Refused(where, "a weight that is not a (K, N) matrix quantized per tensor")
        w = Weight(np.ascontiguousarray(w.codes.T), w.scale, w.zero_point)
        self._qlinear(node, ins, "linear", linear_attrs(w), w, None, (6, 7), where)

    def _qlinear(self, node: Any, ins: list[str], op: str, attrs: dict[str, Any], weight: Weight, bias: Any,
                 out: tuple[int, int], where: str) -> None:
        source = self._codes_in(ins, 0, 1, 2, where)
        q = self._clip_after(node.output[0], self._qparams(ins, *out, where))
        pending = Pending(op, node, [source], attrs, weight, bias)
        self.codes[node.output[0]] = self._weighted(pending, q, where)

    def _codes_in(self, ins: list[str], codes: int, scale: int, zero_point: int, where: str) -> Codes:
        """A QLinear kernel's input: integer codes whose scale and zero point the kernel repeats."""
        found = self.codes.get(ins[codes])
        if found is None:
            raise Refused(where, f"input {ins[codes]!r} is not the codes of a quantized tensor")
        q = self._qparams(ins, scale, zero_point, where)
        if (q.scale, q.zero_point, q.signed) != (found.q.scale, found.q.zero_point, found.q.signed):
            raise Refused(where, f"reads {ins[codes]!r} with another scale or zero point than it was quantized with")
        return found

    def _op_QLinearAdd(self, node: Any, ins: list[str], where: str) -> None:
        a, b = self._codes_in(ins, 0, 1, 2, where), self._codes_in(ins, 3, 4, 5, where)
        if self._shape(a.name) != self._shape(b.name):
            raise Refused(where, "inputs of different shapes (broadcasting); photosim's add takes equal shapes")
        q = self._clip_after(node.output[0], self._qparams(ins, 6, 7, where))
        self.codes[node.output[0]] = self._emit(node, "add", [a, b], q, {})

    def _op_QLinearGlobalAveragePool(self, node: Any, ins: list[str], where: str) -> None:
        if attributes(node).get("channels_last", 0):
            raise Refused(where, "channels_last layout; photosim's tensors are NCHW")
        source = self._codes_in(ins, 0, 1, 2, where)
        q = self._clip_after(node.output[0], self._qparams(ins, 3, 4, where))
        self.codes[node.output[0]] = self._emit(node, "adaptive_avgpool2d", [source], q, {"output_size": [1, 1]})


def read_onnx(path: str | Path) -> Any:
    """Parse an ONNX file (protobuf only: no external data is read, no code runs); PhotosimError when malformed."""
    require_onnx()
    require_file(path, "ONNX file", "give a .onnx model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a corrupt file
        raise PhotosimError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc}); export the model "
                            "again.") from None
    external = [t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise PhotosimError(f"{path}: tensors {external[:4]} are stored in external files, which photosim does not "
                            "read; save the model with its tensors inside (onnx.save(..., save_as_external_data="
                            "False)).")
    if not proto.graph.node:
        raise PhotosimError(f"{path} holds no graph nodes; it is not an ONNX model photosim can import.")
    return proto


def from_onnx(proto: Any, *, name: str = "onnx") -> QuantizedModel:
    """Convert a quantized ONNX ModelProto into an integer model (scales as the file's float32 values).

    Example:
        >>> qm = from_onnx(onnx.load("resnet18_int8.onnx"))
        >>> simulate(qm, x, {"requant": "onnxruntime"})
    """
    require_onnx()
    importer = _Importer(proto.graph, name)
    importer.run()
    if importer.input_q is None and not importer.refused:
        importer.refused.append("the graph input is never quantized (a float-only graph: quantize it first, e.g. "
                                "with onnxruntime.quantization.quantize_static)")
    if importer.refused:
        raise PhotosimError(f"{name}: {len(importer.refused)} part(s) of the ONNX graph cannot be imported: "
                            + "; ".join(importer.refused[:12]) + f". Supported: {SUPPORTED}.")
    forms = {"qoperator" if n.op_type.startswith("QLinear") or n.op_type == "QGemm" else "qdq"
             for n in proto.graph.node if n.op_type in ("QLinearConv", "QGemm", "Conv", "Gemm", "MatMul")}
    model = QuantizedModel(
        input_name="input", input_shape=importer.input_shape, input_q=importer.input_q, nodes=importer.nodes,
        tensors=importer.tensors, output=importer.output or "input",
        provenance={"source": "onnx", "model": name, "form": "+".join(sorted(forms)) or "none",
                    "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
                    "input_quantization": "division" if importer.input_division else "reciprocal",
                    "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import}},
    )
    validate(model, source=name)
    return model


def import_onnx(path: str | Path, output: str | Path) -> QuantizedModel:
    """``photosim import-onnx``: read ``path``, convert it, write the integer file ``output`` (atomically)."""
    model = from_onnx(read_onnx(path), name=Path(path).name)
    save_model_atomic(model, output)
    return model


def output_codes(proto: Any) -> str | None:
    """The ONNX tensor holding the graph output's integer codes: the input of the DequantizeLinear that produces the
    output, or the output itself when it is integer; None otherwise."""
    output = proto.graph.output[0]
    producer = next((n for n in proto.graph.node if output.name in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return producer.input[0]
    return output.name if output.type.tensor_type.elem_type in (UINT8, INT8) else None
