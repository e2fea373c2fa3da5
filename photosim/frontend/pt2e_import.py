"""Import torchao PT2E-quantized models (``prepare_pt2e`` / ``convert_pt2e`` output) as integer files.

``convert_pt2e`` leaves a ``torch.export`` graph in the Q/DQ representation: every quantized tensor is a
``quantized_decomposed.quantize_per_tensor`` whose ``dequantize_per_tensor`` feeds float aten ops (conv2d on the
dequantized int8 weights, linear, add, pools), and the next quantize closes the float island. This module turns each
island (a conv, linear, add or average pool, with the ReLU-like ops before its quantize fused into its clamp) into one
integer node, and each op that only moves codes (max pool, flatten, view, a clamp on dequantized codes) into the op
that moves them. Weights and scales are copied verbatim, as torch_import does for ``convert_fx`` models.

The graph is walked by op name (``aten.conv2d``), so the walk needs no torchao; torchao (the ``torchao`` extra) is
imported only by :func:`with_quantized_output`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from photosim._imports import import_extra
from photosim.errors import PhotosimError
from photosim.frontend.capture import is_tensor
from photosim.frontend.patterns import avgpool_attrs, maxpool_attrs, pair, reshape_node
from photosim.frontend.torch_import import imported_model, integer_bias, record_shapes
from photosim.ir.format import Node, QParams, QuantizedModel

QUANTIZE = "quantized_decomposed.quantize_per_tensor"
DEQUANTIZE = "quantized_decomposed.dequantize_per_tensor"
WEIGHT_DEQUANTIZE = {DEQUANTIZE: False, "quantized_decomposed.dequantize_per_channel": True}  # name -> per channel
# activation dtypes of a quantize op -> (bits, signed)
CODE_DTYPES = {torch.uint8: (8, False), torch.int8: (8, True), torch.int16: (16, True), torch.uint16: (16, False)}
# ops that compute a new tensor from dequantized inputs: their float result waits for its quantize
COMPUTE_OPS = ("aten.conv2d", "aten.linear", "aten.add", "aten.add_", "aten.avg_pool2d", "aten.adaptive_avg_pool2d")
# ops that only move dequantized codes (their results dequantize the same codes, moved)
CODE_MOVING_OPS = ("aten.max_pool2d", "aten.flatten", "aten.view", "aten.reshape", "aten._unsafe_view")
PASS_THROUGH_OPS = ("aten.dropout", "aten.dropout_", "aten.clone", "aten.contiguous", "aten.alias", "aten.detach")
EXPORT_GUARDS = "_guards_fn"  # the input-shape check torch.export adds as a module call (torch/export/_unlift.py)
SUPPORTED = (
    "quantize_per_tensor / dequantize_per_tensor of uint8, int8 or int16 activations; conv2d and linear on "
    "dequantized int8 weights (per tensor or per output channel, zero point 0) with a float bias; add of two "
    "dequantized tensors; avg_pool2d and adaptive_avg_pool2d; each followed by ReLU-like ops (relu, hardtanh, "
    "relu6, clamp) and a quantize; max_pool2d, flatten, view, reshape and ReLU-like ops on dequantized codes, "
    "requantized with the same scale and zero point; dropout, clone and contiguous pass through"
)
INSTALL = "pip install 'photosim[torchao]' (or pip install torchao)"


@dataclass(frozen=True)
class _Value:
    """An fx node's result in the integer graph: the tensor's name and quantization, and whether PyTorch holds it
    dequantized (float) at that point."""

    name: str
    q: QParams
    dequantized: bool


@dataclass(frozen=True)
class _Pending:
    """A float result not quantized yet: the op computing it, and the ReLU-like clamp (real units) applied since."""

    anchor: fx.Node
    op: str
    inputs: tuple[_Value, ...]
    attrs: dict[str, Any]
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # int8 codes, float32 scales, float bias
    bounds: tuple[float, float] = (-math.inf, math.inf)


def op_name(target: Any) -> str:
    """``aten.conv2d`` for ``torch.ops.aten.conv2d.default`` (namespace and op, any overload); else the name."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.replace("::", ".")
    return getattr(target, "__name__", str(target))


def is_pt2e(graph_module: Any) -> bool:
    """Whether ``graph_module`` is an exported program or a graph module holding PT2E quantize ops."""
    if isinstance(graph_module, torch.export.ExportedProgram):
        return True
    return isinstance(graph_module, fx.GraphModule) and any(
        n.op == "call_function" and op_name(n.target) == QUANTIZE for n in graph_module.graph.nodes)


def _activation_q(args: tuple) -> QParams | str:
    """The quantization a (de)quantize op's arguments give, or why photosim cannot hold it."""
    scale, zero_point, qmin, qmax, dtype = args[1:6]
    if dtype not in CODE_DTYPES:
        return f"dtype {dtype}; photosim imports {', '.join(str(d) for d in CODE_DTYPES)} activations"
    if not all(isinstance(v, (int, float)) for v in (scale, zero_point, qmin, qmax)):
        return "its scale or zero point is a tensor computed in the graph (dynamic quantization)"
    bits, signed = CODE_DTYPES[dtype]
    return QParams(float(scale), int(zero_point), bits, signed, int(qmin), int(qmax))


def _bounds(name: str, args: tuple, kwargs: dict) -> tuple[float, float] | None:
    """(lo, hi) of an aten ReLU-like op (relu, hardtanh, relu6, clamp), or None when it is not one."""
    def get(index: int, key: str, default: Any) -> Any:
        value = kwargs.get(key, args[index] if len(args) > index else default)
        return default if value is None else value

    if name in ("aten.relu", "aten.relu_"):
        return 0.0, math.inf
    if name in ("aten.relu6", "aten.relu6_"):
        return 0.0, 6.0
    if name in ("aten.hardtanh", "aten.hardtanh_"):
        return float(get(1, "min_val", -1.0)), float(get(2, "max_val", 1.0))
    if name in ("aten.clamp", "aten.clamp_", "aten.clip", "aten.clip_"):
        lo, hi = get(1, "min", -math.inf), get(2, "max", math.inf)
        return (float(lo), float(hi)) if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else None
    return None


def _clamped(q: QParams, bounds: tuple[float, float]) -> QParams:
    """``q`` whose code range also holds the real bounds of ReLU-like ops, quantized as the graph's own
    quantize_per_tensor quantizes the clamped values (QParams.quantize: a float32 reciprocal)."""
    lo, hi = (int(q.quantize(torch.tensor(b))) if math.isfinite(b) else None for b in bounds)
    qmin = q.qmin if lo is None else lo
    return replace(q, qmin=qmin, qmax=q.qmax if hi is None else max(hi, qmin))


class _Importer:
    """One pass over a converted PT2E graph, building integer nodes and tensors.

    Unsupported nodes are collected (not raised one by one); nodes downstream of one are skipped quietly.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.values: dict[str, _Value] = {}
        self.pending: dict[str, _Pending] = {}
        self.constants = _constant_nodes(gm)
        self.nodes: list[Node] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.sources: dict[str, str] = {}  # integer node -> the fx node holding its codes
        self.taken = {"input"}
        self.unsupported: list[str] = []
        self.failed: set[str] = set()
        self.input_q: QParams | None = None
        self.raw_input: str | None = None  # the placeholder: the float input, before its quantize
        self.output: str | None = None

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.name in self.constants or node.op == "get_attr":
                continue
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
            elif node.op == "call_module" and node.target == EXPORT_GUARDS:
                continue
            elif node.op != "call_function":
                self._unsupported(node)
            elif is_tensor(node):  # sizes and other Python values only shape the views
                self._op(node)

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def _unsupported(self, node: fx.Node, why: str = "") -> None:
        self.failed.add(node.name)
        what = op_name(node.target) if node.op == "call_function" else f"{node.op} {node.target}"
        self.unsupported.append(f"{node.name} ({what}{', ' + why if why else ''})")

    def _missing_input(self, node: fx.Node, why: str) -> None:
        """An input is not an imported tensor: report it unless an unsupported producer explains it."""
        if any(arg.name in self.failed for arg in node.all_input_nodes):
            self.failed.add(node.name)
        else:
            self._unsupported(node, why)

    def _unique(self, node: fx.Node) -> str:
        """The layer's module path (``layer1.0.conv1``) for an op of a torch.nn layer, else the fx name; a name
        taken (a module called twice) falls back to the fx name and numbered variants."""
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path, kind = stack[-1] if stack else ("", "")
        kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        layer = path if kind.startswith("torch.nn.modules.") else ""
        candidates = (layer, node.name, *(f"{node.name}_{i}" for i in range(1, len(self.taken) + 2)))
        chosen = next(c for c in candidates if c and c not in self.taken)
        self.taken.add(chosen)
        return chosen

    def _emit(self, node: fx.Node, op: str, inputs: tuple[_Value, ...], output_q: QParams, attrs: dict[str, Any],
              dequantized: bool, **extra: Any) -> Node:
        new = Node(self._unique(node), op, [v.name for v in inputs], [v.q for v in inputs], output_q, attrs, **extra)
        self.nodes.append(new)
        self.values[node.name] = _Value(new.name, output_q, dequantized)
        return new

    def _constant(self, arg: Any) -> Any:
        """The value of a constant argument: a literal, a module attribute, or an op on constants (weights)."""
        if not isinstance(arg, fx.Node):
            return arg
        if arg.op == "get_attr":
            value: Any = self.gm
            for part in str(arg.target).split("."):
                value = getattr(value, part)
            return value
        return arg.target(*(self._constant(a) for a in arg.args),
                          **{k: self._constant(v) for k, v in arg.kwargs.items()})

    # -- graph input and output -------------------------------------------------------------------------------------

    def _placeholder(self, node: fx.Node) -> None:
        if self.values:
            self._unsupported(node, "a second graph input; photosim models take one input tensor")
        else:
            self.raw_input = node.name
            self.values[node.name] = _Value("input", QParams(1.0, 0, 8, False, 0, 255), dequantized=True)

    def _output(self, node: fx.Node) -> None:
        results = node.args[0]
        if isinstance(results, (tuple, list)) and len(results) == 1:
            results = results[0]
        value = self.values.get(results.name) if isinstance(results, fx.Node) else None
        if isinstance(results, fx.Node) and results.name in self.pending:
            anchor = self.pending[results.name].anchor
            self._unsupported(anchor, "its float result is the model output, never quantized (X86InductorQuantizer "
                                      "leaves the last conv or linear in float); photosim's integer graph ends in "
                                      "codes: quantize it with photosim.frontend.pt2e_import.with_quantized_output")
        elif value is None or results.name == self.raw_input:
            self._missing_input(node, "the graph must return one quantized tensor")
        else:
            self.output = value.name

    # -- ops ---------------------------------------------------------------------------------------------------------

    def _op(self, node: fx.Node) -> None:
        name = op_name(node.target)
        source = node.args[0] if node.args else None
        value = self.values.get(source.name) if isinstance(source, fx.Node) else None
        pending = next((self.pending[a.name] for a in node.all_input_nodes if a.name in self.pending), None)
        bounds = _bounds(name, node.args, node.kwargs)
        if name not in (QUANTIZE, DEQUANTIZE, *COMPUTE_OPS, *CODE_MOVING_OPS, *PASS_THROUGH_OPS) and bounds is None:
            self._unsupported(node)
        elif pending is not None:
            self._on_float_result(node, name, pending, bounds)
        elif value is None:
            self._missing_input(node, "its input is not an imported tensor")
        elif name == QUANTIZE:
            self._quantize_codes(node, value, source.name == self.raw_input)
        elif source.name == self.raw_input:
            self._unsupported(node, "runs on the float graph input before it is quantized")
        elif name == DEQUANTIZE:
            self._dequantize(node, value)
        elif not value.dequantized:
            self._unsupported(node, "takes quantized codes; PT2E ops run on dequantized tensors")
        elif name in PASS_THROUGH_OPS:
            self.values[node.name] = value
        elif name in CODE_MOVING_OPS or bounds is not None:
            self._move_codes(node, name, value, bounds)
        else:
            self._compute(node, name, value)

    def _on_float_result(self, node: fx.Node, name: str, pending: _Pending, bounds: tuple[float, float] | None) -> None:
        """An op on a not yet quantized result: its quantize, a ReLU-like clamp, or a pass-through."""
        if name in ("aten.add", "aten.add_"):
            self._unsupported(node, f"adds the unquantized float result of {pending.anchor.name}; photosim needs it "
                                    "quantized first (X86InductorQuantizer fuses a conv with the add after it and "
                                    "leaves the conv's output in float; XNNPACKQuantizer quantizes it)")
        elif name == QUANTIZE:
            self._quantize_result(node, pending)
        elif bounds is not None:
            lo, hi = pending.bounds
            self.pending[node.name] = replace(pending, bounds=(max(lo, bounds[0]), min(hi, bounds[1])))
        elif name in PASS_THROUGH_OPS:
            self.pending[node.name] = pending
        else:
            self._unsupported(node, f"runs in float on the unquantized result of {pending.anchor.name}; photosim "
                                    "needs a quantize between them")

    def _quantize_codes(self, node: fx.Node, value: _Value, raw_input: bool) -> None:
        """A quantize of the graph input, or of dequantized codes at their own scale (after max pool, flatten)."""
        q = _activation_q(node.args)
        if isinstance(q, str):
            self._unsupported(node, q)
        elif raw_input and self.input_q in (None, q):
            self.input_q = q
            self.values[node.name] = _Value("input", q, dequantized=False)
        elif raw_input:
            self._unsupported(node, "quantizes the graph input a second time, differently")
        elif value.dequantized and (q.scale, q.zero_point, q.bits, q.signed) == (
                value.q.scale, value.q.zero_point, value.q.bits, value.q.signed) and q.qmin <= value.q.qmin and \
                value.q.qmax <= q.qmax:
            self.values[node.name] = _Value(value.name, value.q, dequantized=False)
            if value.name in self.sources:
                self.sources[value.name] = node.name  # the moved codes, quantized again
        else:
            self._unsupported(node, f"requantizes a tensor of scale {value.q.scale:.6g}, zero point "
                                    f"{value.q.zero_point} and codes [{value.q.qmin}, {value.q.qmax}] to scale "
                                    f"{q.scale:.6g}, zero point {q.zero_point} and codes [{q.qmin}, {q.qmax}] in "
                                    "float; photosim requantizes only in conv, linear, add and pools")

    def _quantize_result(self, node: fx.Node, pending: _Pending) -> None:
        """The quantize that closes a float island: emit its integer node with this output quantization."""
        q = _activation_q(node.args)
        if isinstance(q, str):
            self._unsupported(node, q)
            return
        weighted = {} if pending.weights is None else {"w_bits": 8, "bias_bits": 32}
        new = self._emit(pending.anchor, pending.op, pending.inputs, _clamped(q, pending.bounds), pending.attrs,
                         dequantized=False, **weighted)
        self.values[node.name] = self.values[pending.anchor.name]
        self.sources[new.name] = node.name
        if pending.weights is not None:
            weight, weight_scale, bias = pending.weights
            self.tensors.update({
                f"{new.name}.weight": weight,
                f"{new.name}.weight_scale": weight_scale,
                f"{new.name}.bias_float": bias,
                f"{new.name}.bias": integer_bias(bias, pending.inputs[0].q.scale, weight_scale),
            })

    def _dequantize(self, node: fx.Node, value: _Value) -> None:
        q = _activation_q(node.args)
        if isinstance(q, str) or value.dequantized or (q.scale, q.zero_point) != (value.q.scale, value.q.zero_point):
            self._unsupported(node, q if isinstance(q, str) else "does not invert the quantize that produced its input")
        else:
            self.values[node.name] = _Value(value.name, value.q, dequantized=True)

    def _move_codes(self, node: fx.Node, name: str, value: _Value, bounds: tuple[float, float] | None) -> None:
        """Max pool, flatten / view / reshape or a ReLU-like clamp of dequantized codes: the op on the codes."""
        if bounds is not None:
            self._emit(node, "clamp", (value,), _clamped(value.q, bounds), {}, dequantized=True)
        elif name == "aten.max_pool2d":
            self._emit(node, "maxpool2d", (value,), value.q, maxpool_attrs(None, node.args, node.kwargs),
                       dequantized=True)
        else:
            moved = reshape_node(node.name, value.name, node)
            self._emit(node, moved.op, (value,), value.q, moved.attrs, dequantized=True)
        self.sources[self.values[node.name].name] = node.name

    def _compute(self, node: fx.Node, name: str, value: _Value) -> None:
        """conv2d, linear, add or an average pool of dequantized tensors: kept until its quantize."""
        weights = None
        if name in ("aten.conv2d", "aten.linear"):
            weights = self._weights(node)
            if weights is None:
                return
            if node.target is not torch.ops.aten.conv2d.default and name == "aten.conv2d":
                self._unsupported(node, "padding given as a string; give it as numbers")
                return
            op, attrs = ("conv2d", self._conv_attrs(node, weights[0])) if name == "aten.conv2d" else (
                "linear", {"in_features": int(weights[0].shape[1]), "out_features": int(weights[0].shape[0])})
            inputs: tuple[_Value, ...] = (value,)
        elif name in ("aten.add", "aten.add_"):
            other = node.args[1] if len(node.args) > 1 else None
            second = self.values.get(other.name) if isinstance(other, fx.Node) else None
            if second is None or not second.dequantized or node.kwargs.get("alpha", 1) != 1:
                self._missing_input(node, "its second operand is not a dequantized tensor (or alpha is not 1)")
                return
            op, attrs, inputs = "add", {}, (value, second)
        elif name == "aten.avg_pool2d":
            op, attrs, inputs = "avgpool2d", avgpool_attrs(None, node.args, node.kwargs), (value,)
        else:
            shape = node.meta["tensor_meta"].shape
            op, attrs, inputs = "adaptive_avgpool2d", {"output_size": [int(shape[2]), int(shape[3])]}, (value,)
        self.pending[node.name] = _Pending(node, op, inputs, attrs, weights)

    def _conv_attrs(self, node: fx.Node, weight: torch.Tensor) -> dict[str, Any]:
        """aten.conv2d(input, weight, bias, stride, padding, dilation, groups) as photosim's attributes."""
        stride, padding, dilation, groups = (self._constant(node.args[i]) if len(node.args) > i else default
                                             for i, default in ((3, 1), (4, 0), (5, 1), (6, 1)))
        return {"in_channels": int(weight.shape[1]) * int(groups), "out_channels": int(weight.shape[0]),
                "kernel": [int(d) for d in weight.shape[2:]], "stride": pair(stride), "padding": pair(padding),
                "dilation": pair(dilation), "groups": int(groups)}

    def _weights(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """int8 weight codes, float32 scales (() per tensor, (O,) per channel) and the float bias of a conv or
        linear whose weight is a dequantize of constant int8 codes; None (reported) otherwise."""
        weight = node.args[1]
        bias = self._constant(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        kind = op_name(weight.target) if isinstance(weight, fx.Node) and weight.op == "call_function" else ""
        if kind not in WEIGHT_DEQUANTIZE or weight.name not in self.constants:
            self._unsupported(node, "its weight is not a dequantize of constant int8 codes; quantize the layer's "
                                    "weights")
            return None
        if not isinstance(bias, (torch.Tensor, type(None))):
            self._unsupported(node, f"its bias is a {type(bias).__name__}, not a constant tensor")
            return None
        codes, scale, zero_point = (self._constant(a) for a in weight.args[:3])
        axis, dtype = (weight.args[3], weight.args[6]) if WEIGHT_DEQUANTIZE[kind] else (0, weight.args[5])
        zero_points = torch.as_tensor(zero_point).flatten()
        problem = ("" if dtype == torch.int8 else f"weights are {dtype}, photosim imports int8 weights") or (
            "" if axis == 0 else f"per-channel weights along axis {axis}, photosim needs the output channels (0)") or (
            "" if not bool((zero_points != 0).any()) else f"weight zero points {zero_points.tolist()[:8]} are not 0; "
            "photosim's weights are symmetric (use a per_channel_symmetric or per_tensor_symmetric weight spec)")
        if problem:
            self._unsupported(node, problem)
            return None
        codes = torch.as_tensor(codes).to(torch.int8).clone()
        scale = torch.as_tensor(scale, dtype=torch.float32).flatten().clone()
        bias = torch.zeros(codes.shape[0]) if bias is None else bias.detach().float()
        return codes, scale if WEIGHT_DEQUANTIZE[kind] else scale[0], bias


def _constant_nodes(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes that do not depend on the graph input (weights, their scales, their dequantize)."""
    variable: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a.name in variable for a in node.all_input_nodes) or node.op in (
                "call_module", "output"):
            variable.add(node.name)
    return {n.name for n in gm.graph.nodes if n.name not in variable and n.op != "get_attr"}


def _batch_size(gm: fx.GraphModule) -> int:
    """The batch size the exported graph was specialized to (its guards and views assume it), else 2."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value = placeholders[0].meta.get("val") if placeholders else None
    size = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
    return size if isinstance(size, int) else 2


def from_pt2e(graph_module: fx.GraphModule | torch.export.ExportedProgram, input_shape: tuple[int, ...], *,
              name: str = "pt2e") -> QuantizedModel:
    """Convert a ``convert_pt2e`` quantized graph into an integer model, keeping PyTorch's exact numbers.

    Args:
        graph_module: the output of torchao's ``convert_pt2e`` (or its ``torch.export`` program); the
            X86InductorQuantizer, XNNPACKQuantizer and any quantizer emitting the same Q/DQ patterns.
        input_shape: one sample's shape without the batch dimension, e.g. ``(1, 8, 8)``.
        name: recorded in the provenance as the model's name.

    Example:
        >>> qm = from_pt2e(convert_pt2e(prepared), (1, 8, 8))
        >>> simulate(qm, x, {"requant": "pytorch"})
    """
    if isinstance(graph_module, torch.export.ExportedProgram):
        graph_module = graph_module.module()
    gm = copy.deepcopy(graph_module)  # shapes are recorded in the nodes' meta: the caller's graph stays as it was
    shape = tuple(int(d) for d in input_shape)
    record_shapes(gm, shape, _batch_size(gm))
    importer = _Importer(gm)
    importer.run()
    return imported_model(importer, shape, name, "PT2E graph", "quantize_per_tensor",
                          f"Supported: {SUPPORTED}. Leave those ops out of the model or quantize them",
                          {"source": "torchao.pt2e", "model": name, "qengine": "onednn",
                           "torch_version": torch.__version__, "torchao_version": _torchao_version(),
                           "pt2e_nodes": importer.sources})


def _torchao_version() -> str | None:
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


def torchao_missing(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is the import of torchao failing."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "torchao":
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def with_quantized_output(quantizer: Any, output_spec: Any = None) -> Any:
    """``quantizer`` composed with one that also quantizes the model output, so the imported graph ends in codes.

    X86InductorQuantizer quantizes a conv or linear output only where a quantized op consumes it, so the last layer
    of a classifier stays float; photosim's integer graph ends in codes. ``output_spec`` (a torchao
    QuantizationSpec) defaults to ``quantizer.global_config.output_activation``.

    Example:
        >>> quantizer = with_quantized_output(X86InductorQuantizer().set_global(config))
        >>> prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    """
    composable = import_extra("torchao.quantization.pt2e.quantizer", "torchao", "with_quantized_output")
    spec = output_spec or getattr(getattr(quantizer, "global_config", None), "output_activation", None)
    if spec is None:
        raise PhotosimError(f"{type(quantizer).__name__} has no global config with an output_activation spec to "
                            "quantize the model output with; call its set_global(config) first or pass output_spec.")

    class OutputQuantizer(composable.Quantizer):  # type: ignore[name-defined, misc]
        """Adds an output quantization to each producer of the graph output that has none."""

        def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
            for output in (n for n in model.graph.nodes if n.op == "output"):
                for producer in output.all_input_nodes:
                    annotation = producer.meta.setdefault("quantization_annotation",
                                                          composable.QuantizationAnnotation())
                    if annotation.output_qspec is None:
                        annotation.output_qspec, annotation._annotated = spec, True
            return model

        def validate(self, model: fx.GraphModule) -> None:
            """Nothing to check: the annotation only adds an observer."""

    return composable.ComposableQuantizer([quantizer, OutputQuantizer()])
