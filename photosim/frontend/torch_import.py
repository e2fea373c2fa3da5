"""Import PyTorch's own quantized models (``torch.ao.quantization`` FX ``convert_fx`` output) as integer files.

The converted graph already holds integer weights, scales and zero points; this module copies them
verbatim (scales as the float32 values PyTorch uses, the float bias kept as ``<node>.bias_float``) so
that ``requant: pytorch`` reproduces the PyTorch model's integer outputs bit for bit. torchao PT2E graphs
(``convert_pt2e``) are handed to photosim.frontend.pt2e_import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import fx, nn

from photosim._files import save_model_atomic
from photosim._imports import call_object, user_code_location
from photosim.engine.requant import INT32_MAX, INT32_MIN
from photosim.engine.torch_requant import quantize_val
from photosim.errors import PhotosimError
from photosim.frontend.capture import PASS_THROUGH_CALLS, PASS_THROUGH_MODULES, is_tensor
from photosim.frontend.patterns import activation_bounds, avgpool_attrs, conv_attrs, maxpool_attrs, reshape_node
from photosim.ir.format import Node, QParams, QuantizedModel, validate

SUPPORTED = (
    "torch.quantize_per_tensor to quint8 (the graph input), quantized Conv2d / ConvReLU2d / Linear / LinearReLU "
    "(not their reference or dynamic variants), quantized add / add_relu, mul / mul_relu, torch.cat / "
    "quantized cat, ReLU, ReLU6, Hardtanh, clamp, "
    "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (modules or functional), flatten / reshape / view, dequantize "
    "(the graph output, or around a float flatten / reshape that keeps the quantization); Identity, Dropout "
    "and contiguous pass through"
)
_CONV_TYPES = {nnq.Conv2d: False, nniq.ConvReLU2d: True}  # exact types: subclasses fuse more (e.g. ConvAdd2d)
_LINEAR_TYPES = {nnq.Linear: False, nniq.LinearReLU: True}
_ADDS = {torch.ops.quantized.add: False, torch.ops.quantized.add_relu: True}
_MULS = {torch.ops.quantized.mul: False, torch.ops.quantized.mul_relu: True}
_CATS = (torch.cat, torch.ops.quantized.cat)
_RESHAPES = (torch.flatten, torch.reshape, "flatten", "view", "reshape")
_POOLS = (torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
          torch.nn.functional.adaptive_avg_pool2d)
_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
W_BITS, BIAS_BITS, A_BITS = 8, 32, 8


@dataclass(frozen=True)
class _Value:
    """What an fx node's result is in the integer graph: the tensor's name, its quantization, and
    whether PyTorch holds it dequantized (float) at that point."""

    name: str
    q: QParams
    is_float: bool = False


def _activation_q(scale: float, zero_point: int, relu: bool = False) -> QParams:
    """quint8 activation; a fused ReLU clamps at the zero point."""
    return QParams(float(scale), int(zero_point), A_BITS, False, int(zero_point) if relu else 0, 255)


class _Importer:
    """One pass over a converted GraphModule's nodes, building integer nodes and tensors.

    Unsupported nodes are collected (not raised one by one); nodes downstream of one are skipped quietly.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.values: dict[str, _Value] = {}
        self.nodes: list[Node] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.taken = {"input"}
        self.unsupported: list[str] = []
        self.failed: set[str] = set()
        self.input_q: QParams | None = None  # set by the quantize_per_tensor of the graph input
        self.output: str | None = None

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
            elif node.op != "get_attr" and is_tensor(node):  # get_attr: scales read where used
                self._op(node)

    def _value(self, arg: Any) -> _Value | None:
        return self.values.get(arg.name) if isinstance(arg, fx.Node) else None

    def _scalar(self, arg: Any) -> Any:
        """A constant argument: a literal, or a ``get_attr`` of the module (``_scale_0`` etc.)."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = self.gm
            for part in str(arg.target).split("."):
                value = getattr(value, part)
            return value.item() if isinstance(value, torch.Tensor) else value
        return arg

    def _unsupported(self, node: fx.Node, why: str = "") -> None:
        self.failed.add(node.name)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
        self.unsupported.append(f"{node.name} ({node.op} {what}{', ' + why if why else ''})")

    def _missing_input(self, node: fx.Node, why: str) -> None:
        """An input is not an imported tensor: report it unless an unsupported producer explains it."""
        if any(arg.name in self.failed for arg in node.all_input_nodes):
            self.failed.add(node.name)
        else:
            self._unsupported(node, why)

    def _placeholder(self, node: fx.Node) -> None:
        if self.values:
            self._unsupported(node, "a second graph input; photosim models take one input tensor")
        else:
            self.values[node.name] = _Value("input", _activation_q(1.0, 0), is_float=True)  # q: until quantized

    def _output(self, node: fx.Node) -> None:
        value = self._value(node.args[0])
        if value is None:
            self._missing_input(node, "the graph must return one tensor")
        else:
            self.output = value.name

    def _unique(self, name: str, node: fx.Node) -> str:
        """The module path (or fx name) unless taken, e.g. by a second call of the same module."""
        candidates = (name, node.name, *(f"{node.name}_{i}" for i in range(1, len(self.taken) + 2)))
        chosen = next(c for c in candidates if c not in self.taken)
        self.taken.add(chosen)
        return chosen

    def _emit(self, node: fx.Node, op: str, inputs: list[_Value], output_q: QParams, attrs: dict[str, Any],
              **extra: Any) -> Node:
        name = self._unique(str(node.target) if node.op == "call_module" else node.name, node)
        new = Node(name, op, [v.name for v in inputs], [v.q for v in inputs], output_q, attrs, **extra)
        self.nodes.append(new)
        self.values[node.name] = _Value(name, output_q, is_float=inputs[0].is_float)
        return new

    def _op(self, node: fx.Node) -> None:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        handler = self._handler(node, module)
        first = node.args[0] if node.args else None
        source = self._value(first[0] if isinstance(first, (list, tuple)) and first else first)
        if handler is None:
            self._unsupported(node)
        elif source is None:
            self._missing_input(node, "its input is not an imported tensor")
        elif source.is_float and handler not in (self._pass_through, self._reshape, self._quantize):
            self._unsupported(node, "runs in float between a dequantize and a quantize")
        else:
            handler(node, module, source)

    def _handler(self, node: fx.Node, module: nn.Module | None) -> Callable[..., None] | None:
        target = node.target if module is None else None
        if isinstance(module, PASS_THROUGH_MODULES) or target in PASS_THROUGH_CALLS:
            return self._pass_through
        if isinstance(module, nn.Flatten) or target in _RESHAPES:
            return self._reshape
        if target in ("dequantize", torch.dequantize):
            return self._dequantize
        if target is torch.quantize_per_tensor:
            return self._quantize
        if type(module) in _CONV_TYPES or type(module) in _LINEAR_TYPES:
            return self._weighted
        if target in _ADDS:
            return self._add
        if target in _MULS:
            return self._mul
        if target in _CATS:
            return self._cat
        if _bounds(node, module) is not None:
            return self._clamp
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)) or target in _POOLS:
            return self._pool
        return None

    def _pass_through(self, node: fx.Node, module: nn.Module | None, source: _Value) -> None:
        self.values[node.name] = source

    def _reshape(self, node: fx.Node, module: nn.Module | None, source: _Value) -> None:
        reshaped = reshape_node(node.name, source.name, node)
        self._emit(node, reshaped.op, [source], source.q, reshaped.attrs)

    def _dequantize(self, node: fx.Node, module: None, source: _Value) -> None:
        self.values[node.name] = _Value(source.name, source.q, is_float=True)

    def _quantize(self, node: fx.Node, module: None, source: _Value) -> None:
        scale, zero_point, dtype = (self._scalar(a) for a in node.args[1:4])
        if dtype != torch.quint8:
            self._unsupported(node, f"dtype {dtype}; photosim imports quint8 activations")
            return
        q = _activation_q(scale, zero_point)
        if self.input_q is None:  # the graph input, perhaps after float reshapes (they commute with quantize)
            self.input_q = q
            for n in self.nodes:
                n.input_q, n.output_q = [q], q
            self.values = {k: _Value(v.name, q, v.is_float) for k, v in self.values.items()}
        elif not (source.is_float and (source.q.scale, source.q.zero_point) == (q.scale, q.zero_point)):
            self._unsupported(node, "a requantization in float (scale and zero point differ from the "
                                    "dequantized tensor's); use torch.flatten instead of nn.Flatten")
            return
        self.values[node.name] = _Value(source.name, self.values[node.args[0].name].q)

    def _weighted(self, node: fx.Node, module: nn.Module, source: _Value) -> None:
        is_conv = type(module) in _CONV_TYPES
        relu = (_CONV_TYPES if is_conv else _LINEAR_TYPES)[type(module)]
        layer = str(node.target)
        if is_conv:
            attrs = conv_attrs(module, layer)
        else:
            attrs = {"in_features": module.in_features, "out_features": module.out_features}
        weight, weight_scale = _weights(module.weight(), layer)
        new = self._emit(node, "conv2d" if is_conv else "linear", [source],
                         _activation_q(module.scale, module.zero_point, relu), attrs, w_bits=W_BITS,
                         bias_bits=BIAS_BITS)
        bias = module.bias()
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float()
        self.tensors.update({
            f"{new.name}.weight": weight,
            f"{new.name}.weight_scale": weight_scale,
            f"{new.name}.bias_float": bias,
            f"{new.name}.bias": integer_bias(bias, source.q.scale, weight_scale),
        })

    def _add(self, node: fx.Node, module: None, source: _Value) -> None:
        self._binary(node, "add", source, _ADDS[node.target])

    def _mul(self, node: fx.Node, module: None, source: _Value) -> None:
        self._binary(node, "mul", source, _MULS[node.target])

    def _binary(self, node: fx.Node, op: str, source: _Value, relu: bool) -> None:
        """quantized::add / mul (and their _relu variants): two quantized operands, the output's scale and
        zero point as arguments 2 and 3."""
        other = self._value(node.args[1])
        if other is None or other.is_float:
            self._missing_input(node, "its second operand is not a quantized tensor")
            return
        scale, zero_point = self._scalar(node.args[2]), self._scalar(node.args[3])
        self._emit(node, op, [source, other], _activation_q(scale, zero_point, relu), {})

    def _cat(self, node: fx.Node, module: None, source: _Value) -> None:
        """torch.cat of quantized tensors keeps the first input's scale and zero point (PyTorch requires all to
        share them); quantized::cat takes the output's as arguments 2 and 3 (None: the first input's)."""
        inputs = [self._value(arg) for arg in node.args[0]]
        if any(v is None or v.is_float for v in inputs):
            self._missing_input(node, "one of its inputs is not a quantized tensor")
            return
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(node.meta["tensor_meta"].shape)
        q = source.q
        if node.target is torch.ops.quantized.cat and len(node.args) > 3 and node.args[2] is not None:
            q = _activation_q(self._scalar(node.args[2]), self._scalar(node.args[3]))
        self._emit(node, "concat", inputs, _activation_q(q.scale, q.zero_point), {"dim": dim % rank})

    def _clamp(self, node: fx.Node, module: nn.Module | None, source: _Value) -> None:
        """ReLU / ReLU6 / Hardtanh / clamp on codes: PyTorch quantizes the bounds with quantize_val."""
        lo, hi = _bounds(node, module)
        q = source.q
        storage = _activation_q(q.scale, q.zero_point)
        qmin = q.qmin if lo == float("-inf") else quantize_val(lo, storage)
        qmax = q.qmax if hi == float("inf") else quantize_val(hi, storage)
        self._emit(node, "clamp", [source], QParams(q.scale, q.zero_point, q.bits, q.signed, qmin, qmax), {})

    def _pool(self, node: fx.Node, module: nn.Module | None, source: _Value) -> None:
        """Quantized pools keep their input's scale and zero point."""
        target = node.target if module is None else None
        if isinstance(module, nn.MaxPool2d) or target is _POOLS[0]:
            op, attrs = "maxpool2d", maxpool_attrs(module, node.args, node.kwargs)
        elif isinstance(module, nn.AvgPool2d) or target is _POOLS[1]:
            op, attrs = "avgpool2d", avgpool_attrs(module, node.args, node.kwargs)
        else:
            shape = node.meta["tensor_meta"].shape
            op, attrs = "adaptive_avgpool2d", {"output_size": [int(shape[2]), int(shape[3])]}
        self._emit(node, op, [source], source.q, attrs)


def _bounds(node: fx.Node, module: nn.Module | None) -> tuple[float, float] | None:
    """(lo, hi) of a ReLU-like node; torch.ao's quantized ReLU6 module subclasses nn.ReLU, so it goes first."""
    if isinstance(module, nnq.ReLU6):
        return 0.0, 6.0
    return activation_bounds(node.target if module is None else None, module, node.args, node.kwargs)


def _weights(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales (shape () per-tensor, (O,) per-channel) of a quantized weight."""
    scheme = w.qscheme()
    if w.dtype != torch.qint8 or scheme not in _PER_TENSOR + _PER_CHANNEL:
        raise PhotosimError(
            f"layer {name!r}: weights are {w.dtype} with {scheme}; photosim imports qint8 weights quantized "
            "per tensor or per output channel. Use the x86 / fbgemm default qconfig for weights."
        )
    if scheme in _PER_TENSOR:
        zero_points, scale = torch.tensor([w.q_zero_point()]), torch.tensor(w.q_scale(), dtype=torch.float32)
    else:
        if w.q_per_channel_axis() != 0:
            raise PhotosimError(f"layer {name!r}: per-channel weights along axis {w.q_per_channel_axis()}; "
                                "photosim needs them along the output channels (axis 0).")
        zero_points, scale = w.q_per_channel_zero_points(), w.q_per_channel_scales().float()
    if bool((zero_points != 0).any()):
        raise PhotosimError(
            f"layer {name!r}: weight zero points {zero_points.tolist()[:8]} are not 0; photosim's integer "
            "format has symmetric weights. Quantize weights with a symmetric observer (qscheme "
            "torch.per_channel_symmetric or torch.per_tensor_symmetric)."
        )
    return w.int_repr().clone(), scale


def integer_bias(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """``rne(bias / (s_in * s_w))`` as int32, saturated: the bias in accumulator units for integer modes."""
    units = bias.double() / (input_scale * weight_scale.double())
    return torch.round(units).clamp(INT32_MIN, INT32_MAX).to(torch.int32)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once, storing each tensor node's shape as ``meta["tensor_meta"]`` (as ShapeProp does)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - any failure here is the user's model or input shape
            raise PhotosimError(
                f"running the quantized graph module failed at node {n.name!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}); check the per-sample input shape (e.g. (3, 32, 32)) and that "
                "the model runs in PyTorch."
            ) from None
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = SimpleNamespace(shape=tuple(result.shape))
        else:
            n.meta.pop("tensor_meta", None)  # an exported graph's own metadata, of a size or other Python value
        return result


def record_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...], batch: int = 2) -> None:
    """Shapes for reshape / adaptive-pool attributes: one run on a batch of ``batch`` zero samples."""
    with torch.no_grad():
        _ShapeRecorder(gm).run(torch.zeros(batch, *input_shape))


def from_torch(graph_module: fx.GraphModule, input_shape: tuple[int, ...], *, name: str = "torch") -> QuantizedModel:
    """Convert a ``convert_fx`` quantized GraphModule into an integer model, keeping PyTorch's exact numbers.

    Args:
        graph_module: output of ``torch.ao.quantization.quantize_fx.convert_fx`` (x86, fbgemm or
            per-tensor qconfigs; quint8 activations, symmetric qint8 weights), or of torchao's ``convert_pt2e``
            (imported by photosim.frontend.pt2e_import).
        input_shape: one sample's shape without the batch dimension, e.g. ``(3, 32, 32)``.
        name: recorded in the provenance as the model's name.

    Example:
        >>> qm = from_torch(convert_fx(prepared), (3, 32, 32))
        >>> simulate(qm, x, {"requant": "pytorch"})
    """
    from photosim.frontend import pt2e_import

    if pt2e_import.is_pt2e(graph_module):
        return pt2e_import.from_pt2e(graph_module, input_shape, name=name)
    if not isinstance(graph_module, fx.GraphModule):
        raise PhotosimError(
            f"expected a torch.fx.GraphModule from convert_fx or torchao's convert_pt2e, got "
            f"{type(graph_module).__name__}; quantize the model with torch.ao.quantization.quantize_fx (prepare_fx, "
            "calibrate, convert_fx) or torchao.quantization.pt2e (prepare_pt2e, calibrate, convert_pt2e) first."
        )
    input_shape = tuple(int(d) for d in input_shape)
    record_shapes(graph_module, input_shape)
    importer = _Importer(graph_module)
    importer.run()
    return imported_model(importer, input_shape, name, "quantized graph module", "torch.quantize_per_tensor",
                          f"Supported: {SUPPORTED}. Leave those ops out of the model or out of quantization",
                          {"source": "torch.ao.quantization", "model": name,
                           "qengine": torch.backends.quantized.engine, "torch_version": torch.__version__})


def imported_model(importer: Any, input_shape: tuple[int, ...], name: str, graph: str, quantize_op: str, fix: str,
                   provenance: dict[str, Any]) -> QuantizedModel:
    """The integer model a graph walker (this module's, or photosim.frontend.pt2e_import's) built, validated; or one
    PhotosimError listing every op it could not import (``graph`` and ``quantize_op`` name the source's terms,
    ``fix`` says what to do)."""
    if importer.input_q is None and not importer.unsupported:
        importer.unsupported.append(f"the graph input is never quantized with {quantize_op}")
    if importer.unsupported:
        raise PhotosimError(
            f"the {graph} has {len(importer.unsupported)} operation(s) photosim cannot import: "
            + "; ".join(importer.unsupported) + f". {fix} (photosim never falls back to float silently)."
        )
    model = QuantizedModel(input_name="input", input_shape=input_shape, input_q=importer.input_q,
                           nodes=importer.nodes, tensors=importer.tensors, output=importer.output or "input",
                           provenance=provenance)
    validate(model, source=name)
    return model


def import_torch(spec: str, output: str | Path) -> QuantizedModel:
    """``photosim import-torch``: build a quantized model with user code, convert it, save it to ``output``.

    ``spec`` is ``path/to/script.py:FUNCTION``; ``FUNCTION()`` takes no arguments and returns the tuple
    ``(graph_module, input_shape)``: the ``convert_fx`` (or torchao ``convert_pt2e``) result and one sample's
    shape, e.g. ``(3, 32, 32)``. (A converted GraphModule cannot be saved and loaded back, so the script builds it.)
    """
    from photosim.frontend.pt2e_import import INSTALL, torchao_missing

    try:
        result = call_object(spec, "torch import function", "(graph_module, input_shape)")
    except PhotosimError as exc:
        if torchao_missing(exc):
            where = user_code_location(exc)
            raise PhotosimError(f"{spec} imports torchao (PT2E quantization){f' {where}' if where else ''}, which is "
                                f"not installed; {INSTALL}.") from exc
        raise
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], (tuple, list))
            and all(isinstance(d, int) and d > 0 for d in result[1])):
        raise PhotosimError(
            f"{spec} returned {type(result).__name__}; it must return (graph_module, input_shape), e.g. "
            "(convert_fx(prepared), (3, 32, 32))."
        )
    model = from_torch(result[0], tuple(result[1]), name=spec)
    save_model_atomic(model, output)
    return model
