"""Float graph capture with torch.fx: the supported ops, BatchNorm folding and activation fusion.

The captured ``FloatGraph`` has the same node vocabulary as the integer file (conv2d, linear, add,
clamp, pools, flatten, reshape) so quantization is a node-by-node translation. It also executes
itself in float, which is what calibration observes.
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from photosim.errors import PhotosimError
from photosim.frontend.nonlinearity import Curve
from photosim.ir.ops import OPS, weighted_ops

SUPPORTED = ", ".join(layer for op in OPS.values() for layer in op.layers) + (
    "; BatchNorm1d/2d after a conv/linear (folded), BatchNorm2d elsewhere (a depthwise 1x1 conv); Conv1d, "
    "MaxPool1d, AvgPool1d, AdaptiveAvgPool1d (as their 2-D ops on (N, C, 1, L)); Dropout and Identity (removed in "
    "eval). Convs need zeros padding, clamp constant bounds"
)
_ACTIVATION_FUSABLE = tuple(name for name, op in OPS.items() if op.observed)  # a ReLU narrows their clamp range
_BATCHNORM_FUSABLE = weighted_ops()
PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
PASS_THROUGH_CALLS = {F.dropout, "contiguous", "clone", "detach"}
_SHAPE_CALLS = {"size", getattr, operator.getitem, operator.mul, operator.floordiv}


@dataclass
class FloatNode:
    """One float op; ``act`` is the (lo, hi) clamp fused into its output (ReLU = (0, inf))."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act: tuple[float, float] | None = None

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The op on float inputs, with the fused clamp applied."""
        y = OPS[self.op].reference(self.attrs, inputs, self.weight, self.bias)
        return y if self.act is None else y.clamp(self.act[0], self.act[1])


@dataclass
class FloatGraph:
    """Nodes in topological order; the graph input is named ``input``."""

    nodes: list[FloatNode]
    output: str
    input_shape: tuple[int, ...]

    def run(self, x: torch.Tensor, observe: Any = None) -> torch.Tensor:
        """Execute in float; ``observe(name, tensor)`` is called for the input and every node output."""
        values = {"input": x}
        if observe:
            observe("input", x)
        for node in self.nodes:
            values[node.name] = y = node.forward([values[i] for i in node.inputs])
            if observe:
                observe(node.name, y)
        return values[self.output]


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _single(v: Any) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def conv_attrs(m: nn.Conv1d | nn.Conv2d, name: str) -> dict[str, Any]:
    """A Conv2d's attributes, or a Conv1d's as the conv2d of kernel 1 x k it equals on (N, C, 1, L)."""
    if m.padding_mode != "zeros":
        raise PhotosimError(f"layer {name!r}: padding_mode {m.padding_mode!r} is not supported (only 'zeros').")
    if isinstance(m, nn.Conv1d):
        padding = m.padding if isinstance(m.padding, str) else (0, _single(m.padding))
        return conv_attrs(nn.Conv2d(m.in_channels, m.out_channels, (1, _single(m.kernel_size)),
                                    (1, _single(m.stride)), padding, (1, _single(m.dilation)), m.groups,
                                    bias=False, device="meta"), name)
    padding = m.padding
    if isinstance(padding, str):  # 'same' / 'valid'
        padding = [0, 0] if padding == "valid" else [d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation)]
        if any(d * (k - 1) % 2 for k, d in zip(m.kernel_size, m.dilation)):
            raise PhotosimError(f"layer {name!r}: padding='same' with an even kernel is asymmetric; pad explicitly.")
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel": _pair(m.kernel_size),
        "stride": _pair(m.stride), "padding": _pair(padding), "dilation": _pair(m.dilation), "groups": m.groups,
    }


def _pool_attrs(kernel: Any, stride: Any, padding: Any, **extra: Any) -> dict[str, Any]:
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, [], ()) else kernel
    return {"kernel": kernel, "stride": stride, "padding": _pair(padding), **extra}


def activation_bounds(target: Any, module: nn.Module | None, args: tuple, kwargs: dict) -> tuple[float, float] | None:
    """(lo, hi) of a ReLU-like op, or None when the node is not one."""
    inf = float("inf")
    if isinstance(module, nn.ReLU) or target in (F.relu, torch.relu, "relu"):
        return 0.0, inf
    if isinstance(module, nn.ReLU6) or target is F.relu6:
        return 0.0, 6.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if target is F.hardtanh:
        return float(kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)), float(
            kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        )
    if target in (torch.clamp, "clamp", torch.clip, "clip"):
        lo = kwargs.get("min", args[1] if len(args) > 1 else None)
        hi = kwargs.get("max", args[2] if len(args) > 2 else None)
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return None
        return (-inf if lo is None else float(lo)), (inf if hi is None else float(hi))
    return None


class _Tracer(fx.Tracer):
    """symbolic_trace with source lines recorded, for error messages; photosim's Curve is one node."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Curve) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """fx-trace ``model`` and annotate shapes; name the module and the reason when tracing fails."""
    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's model, reported as such
        raise PhotosimError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. photosim needs a model "
            "without data-dependent control flow in forward(); rewrite that part, or wrap it in a leaf module."
        ) from None
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


def _source_line(node: fx.Node) -> str:
    frames = [line.strip() for line in (node.stack_trace or "").splitlines() if line.strip().startswith("File ")]
    user_frames = [f for f in frames if f"{os.sep}torch{os.sep}" not in f]  # skip fx's own frames
    return user_frames[-1] if user_frames else "source line unknown"


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and "tensor_meta" in node.meta


def capture(model: nn.Module, example: torch.Tensor) -> FloatGraph:
    """Trace ``model`` on ``example`` (a batch) into a FloatGraph with BN folded and activations fused."""
    gm = trace(model, example)
    modules = dict(gm.named_modules())
    nodes: dict[str, FloatNode] = {}
    alias: dict[str, str] = {}  # fx node name -> name of the FloatNode holding its value
    shared: set[str] = set()  # FloatNodes whose value is read by more than one op (never fused into)
    unsupported: list[str] = []
    output = None

    def src(arg: Any) -> str:
        return alias.get(arg.name, arg.name)  # unsupported nodes have no alias; they are reported below

    def bind(fx_node: fx.Node, float_name: str) -> None:
        alias[fx_node.name] = float_name
        if len(fx_node.users) > 1:
            shared.add(float_name)

    one_d: dict[str, str] = {}  # the reshape back to (C, L) after a 1-D layer run as 2-D -> that 2-D node

    def fusable(arg: Any, ops: tuple[str, ...]) -> FloatNode | None:
        """The op producing ``arg`` (through a 1-D layer's reshape back) when a BN or clamp may fold into it."""
        producer = nodes.get(one_d.get(src(arg), src(arg)))
        ok = producer is not None and producer.op in ops and src(arg) not in shared and producer.name not in shared
        return producer if ok else None

    def as_2d(fx_node: fx.Node, name: str, op: str, attrs: dict[str, Any], weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> FloatNode:
        """A 1-D layer on (N, C, L) as its 2-D op (keeping the layer's name) on (N, C, 1, L) between two reshapes
        (codes unchanged by either); adds the first two nodes and returns the reshape back to (N, C', L')."""
        c, length = (int(d) for d in fx_node.args[0].meta["tensor_meta"].shape[1:])
        nodes[f"{name}.as_2d"] = FloatNode(f"{name}.as_2d", "reshape", [src(fx_node.args[0])],
                                           {"shape": [c, 1, length]})
        nodes[name] = FloatNode(name, op, [f"{name}.as_2d"], attrs, weight, bias)
        one_d[f"{name}.as_1d"] = name
        return FloatNode(f"{name}.as_1d", "reshape", [name],
                         {"shape": [int(d) for d in fx_node.meta["tensor_meta"].shape[1:]]})

    splits: dict[str, fx.Node] = {}  # chunk / split nodes: their pieces become slices where read
    attentions: dict[str, str] = {}  # MultiheadAttention calls -> the name of their output node

    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        target = node.target
        args = node.args
        if node.op in ("call_function", "call_method") and target in SPLIT_CALLS:
            splits[node.name] = node
            continue
        if node.op == "placeholder":
            if alias:
                unsupported.append(f"{node.name} (second graph input; photosim models take one input tensor)")
            bind(node, "input")
            continue
        if node.op == "output":
            if not is_tensor(args[0]):
                unsupported.append(f"output (returns {type(args[0]).__name__}; photosim needs a single tensor)")
            else:
                output = src(args[0])
            continue
        if isinstance(module, nn.MultiheadAttention):
            for attention_node in attention_nodes(str(target), node, src):
                nodes[attention_node.name] = attention_node
            attentions[node.name] = str(target)
            continue
        if target is operator.getitem and isinstance(args[0], fx.Node) and args[0].name in attentions:
            if args[1] == 0:
                bind(node, attentions[args[0].name])  # the output; item 1, the weights, is not asked for
            continue
        if not is_tensor(node):
            continue  # shape arithmetic (x.size(0) ...) feeding a view/reshape
        name = str(target) if node.op == "call_module" else node.name
        tensor_args = [a for a in args if isinstance(a, fx.Node) and is_tensor(a)]
        if node.op == "get_attr":
            value = operator.attrgetter(str(target))(gm).detach()
            if value.dim() == 0 or value.shape[0] != 1:
                unsupported.append(f"{name} (a parameter read as a tensor whose first dimension is not 1: not one "
                                   f"constant for every sample) at {_source_line(node)}")
                continue
            nodes[name] = FloatNode(name, "constant", ["input"], {"shape": list(value.shape[1:])}, value[0].clone())
            bind(node, name)
            continue
        if target == "expand" and nodes.get(src(args[0])) is not None and nodes[src(args[0])].op == "constant" \
                and all(d == -1 for d in args[2:]):
            bind(node, src(args[0]))  # a constant over the batch: every sample reads the same value
            continue
        bounds = activation_bounds(target, module, args, node.kwargs)
        new: FloatNode | None = None
        if isinstance(module, PASS_THROUGH_MODULES) or (node.op != "call_module" and target in PASS_THROUGH_CALLS) \
                or (_is_stochastic_depth(target) and not _arg(args, node.kwargs, 3, "training", True)):
            bind(node, src(args[0]))
            continue
        if bounds is not None:
            producer = fusable(args[0], _ACTIVATION_FUSABLE)
            if producer is not None:
                lo, hi = producer.act or (float("-inf"), float("inf"))
                producer.act = (max(lo, bounds[0]), min(hi, bounds[1]))
                bind(node, src(args[0]))  # the producer, or a 1-D layer's reshape back of it
                continue
            new = FloatNode(name, "clamp", [src(args[0])], act=bounds)
        elif isinstance(module, nn.Conv2d):
            new = FloatNode(name, "conv2d", [src(args[0])], conv_attrs(module, name),
                            module.weight.detach().clone(), _bias(module))
        elif isinstance(module, nn.Linear):
            new = FloatNode(name, "linear", [src(args[0])], {"in_features": module.in_features,
                            "out_features": module.out_features}, module.weight.detach().clone(), _bias(module))
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            producer = fusable(args[0], _BATCHNORM_FUSABLE)
            if producer is None or producer.act is not None:
                if not isinstance(module, nn.BatchNorm2d):
                    unsupported.append(f"{name} (BatchNorm1d not directly after a linear or Conv1d) at "
                                       f"{_source_line(node)}")
                    continue
                new = _batchnorm_as_conv(name, src(args[0]), module)
            else:
                _fold_batchnorm(producer, module)
                bind(node, src(args[0]))  # the producer, or a Conv1d's reshape back of it
                continue
        elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            c = module.normalized_shape[0]
            gamma = module.weight.detach().clone() if module.weight is not None else torch.ones(c)
            beta = module.bias.detach().clone() if module.bias is not None else torch.zeros(c)
            new = FloatNode(name, "layer_norm", [src(args[0])], {"eps": float(module.eps)}, gamma, beta)
        elif isinstance(module, nn.Conv1d):
            new = as_2d(node, name, "conv2d", conv_attrs(module, name), module.weight.detach().unsqueeze(2).clone(),
                        _bias(module))
        elif isinstance(module, nn.MaxPool1d):
            attrs = maxpool_attrs(None, (None, [1, _single(module.kernel_size)],
                                         [1, _single(module.stride or module.kernel_size)],
                                         [0, _single(module.padding)], [1, _single(module.dilation)],
                                         module.ceil_mode), {})
            new = as_2d(node, name, "maxpool2d", attrs)
        elif isinstance(module, nn.AvgPool1d):
            attrs = avgpool_attrs(None, (None, [1, _single(module.kernel_size)],
                                         [1, _single(module.stride or module.kernel_size)],
                                         [0, _single(module.padding)], module.ceil_mode, module.count_include_pad),
                                  {})
            new = as_2d(node, name, "avgpool2d", attrs)
        elif isinstance(module, nn.AdaptiveAvgPool1d):
            new = as_2d(node, name, "adaptive_avgpool2d",
                        {"output_size": [1, int(node.meta["tensor_meta"].shape[2])]})
        elif target in (operator.add, torch.add, "add") and len(tensor_args) == 2 and len(args) == 2 \
                and not node.kwargs:
            new = FloatNode(name, "add", [src(a) for a in tensor_args])
        elif isinstance(module, nn.MaxPool2d) or target is F.max_pool2d:
            new = FloatNode(name, "maxpool2d", [src(args[0])], maxpool_attrs(module, args, node.kwargs))
        elif isinstance(module, nn.AvgPool2d) or target is F.avg_pool2d:
            new = FloatNode(name, "avgpool2d", [src(args[0])], avgpool_attrs(module, args, node.kwargs))
        elif isinstance(module, nn.AdaptiveAvgPool2d) or target is F.adaptive_avg_pool2d:
            out_shape = node.meta["tensor_meta"].shape  # resolves None entries of output_size
            new = FloatNode(name, "adaptive_avgpool2d", [src(args[0])],
                            {"output_size": [int(out_shape[2]), int(out_shape[3])]})
        elif isinstance(module, nn.Flatten) or target in (torch.flatten, "flatten", "view", "reshape"):
            new = reshape_node(name, src(args[0]), node)
        elif isinstance(module, Curve):
            new = FloatNode(name, "table", [src(args[0])], {"function": "curve", "x": module.x, "y": module.y})
        elif (function := table_function(target, module, node.kwargs)) is not None:
            new = FloatNode(name, "table", [src(args[0])], {"function": function})
        elif target in (operator.mul, torch.mul, "mul") and len(tensor_args) == 2 and len(args) == 2 \
                and not node.kwargs and len({len(a.meta["tensor_meta"].shape) for a in tensor_args}) == 1:
            new = FloatNode(name, "mul", [src(a) for a in tensor_args])  # equal ranks: no broadcast over the batch
        elif (factor := constant_factor(target, args, tensor_args, node.kwargs)) is not None:
            new = FloatNode(name, "scale", [src(tensor_args[0])], {"factor": factor})
        elif target in (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm") and len(tensor_args) == 2 \
                and len({len(a.meta["tensor_meta"].shape) for a in tensor_args}) == 1:
            new = FloatNode(name, "matmul", [src(a) for a in tensor_args])
        elif isinstance(module, nn.Softmax) or target in (torch.softmax, F.softmax, "softmax"):
            dim = module.dim if module is not None else _arg(args, node.kwargs, 1, "dim", None)
            ndim = len(node.meta["tensor_meta"].shape)
            if dim is None or dim % ndim != ndim - 1:
                raise PhotosimError(f"{name}: softmax over dimension {dim!r}; photosim runs softmax over the last "
                                    "dimension (permute the tensor first).")
            new = FloatNode(name, "softmax", [src(args[0])])
        elif target in (torch.cat, torch.concat, torch.concatenate):
            pieces = _arg(args, node.kwargs, 0, "tensors", ())
            new = FloatNode(name, "concat", [src(a) for a in pieces], {"dim": _data_dim(node, _arg(
                args, node.kwargs, 1, "dim", 0), name)})
        elif target in (torch.mean, "mean"):
            new = mean_node(name, src(args[0]), node)
        elif target in (torch.permute, "permute", torch.transpose, "transpose"):
            new = permute_node(name, src(args[0]), node)
        elif target is operator.getitem and isinstance(args[0], fx.Node) and args[0].name in splits:
            split = splits[args[0].name]
            new = split_piece(name, src(split.args[0]), split, args[1])
        elif target is operator.getitem and is_tensor(args[0]) and (picked := pick_node(name, src(args[0]), node)):
            nodes[picked.name] = picked  # x[:, i]: the slice i:i+1, then the dimension dropped
            new = FloatNode(name, "reshape", [picked.name],
                            {"shape": [int(d) for d in node.meta["tensor_meta"].shape[1:]]})
        elif target is operator.getitem and is_tensor(args[0]):
            new = slice_node(name, src(args[0]), node)
        if new is None:
            what = type(module).__name__ if module is not None else getattr(target, "__name__", str(target))
            unsupported.append(f"{name} ({node.op} {what}) at {_source_line(node)}")
            continue
        nodes[new.name] = new
        bind(node, new.name)
    if unsupported:
        raise PhotosimError(
            f"{type(model).__name__} has {len(unsupported)} operation(s) photosim cannot run on integers: "
            + "; ".join(unsupported) + f". Supported: {SUPPORTED}. Replace or remove these ops "
            "(photosim never falls back to float silently)."
        )
    return FloatGraph(list(nodes.values()), output or "input", tuple(example.shape[1:]))


TABLE_MODULES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                 nn.Tanh: "tanh"}
TABLE_CALLS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid", F.hardsigmoid: "hardsigmoid",
               F.silu: "silu", F.hardswish: "hardswish", torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh",
               torch.exp: "exp", "exp": "exp"}
SPLIT_CALLS = {torch.chunk, "chunk", torch.split, "split"}


def _is_stochastic_depth(target: Any) -> bool:
    """torchvision.ops.stochastic_depth (an identity in eval mode), recognised without importing torchvision."""
    return getattr(target, "__name__", None) == "stochastic_depth" and "torchvision" in getattr(target, "__module__",
                                                                                                "")


def table_function(target: Any, module: nn.Module | None, kwargs: dict) -> str | None:
    """The TABLE_FUNCTIONS name of a unary nonlinearity (photosim.ir.ops.Table), or None."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if module is not None:
        return TABLE_MODULES.get(type(module))
    if target is F.gelu:
        return "gelu_tanh" if kwargs.get("approximate") == "tanh" else "gelu"
    try:
        return TABLE_CALLS.get(target)
    except TypeError:  # unhashable targets are not table functions
        return None


def constant_factor(target: Any, args: tuple, tensor_args: list, kwargs: dict) -> float | None:
    """The positive factor of ``x * c``, ``c * x`` or ``x / c`` with a Python number c (None: not such a node)."""
    if len(args) != 2 or len(tensor_args) != 1 or kwargs:
        return None
    other = args[1] if args[0] is tensor_args[0] else args[0]
    if isinstance(other, bool) or not isinstance(other, (int, float)):
        return None
    if target in (operator.mul, torch.mul, "mul"):
        factor = float(other)
    elif target in (operator.truediv, torch.div, "div") and args[0] is tensor_args[0] and other:
        factor = 1.0 / other
    else:
        return None
    return factor if factor > 0 else None


def _data_dim(node: fx.Node, dim: Any, name: str) -> int:
    """A dimension argument as a nonnegative index of the node's first input; the batch dimension refused."""
    ndim = len(node.all_input_nodes[0].meta["tensor_meta"].shape)
    if not isinstance(dim, int) or not -ndim <= dim < ndim or dim % ndim == 0:
        raise PhotosimError(f"{name}: dimension {dim!r} is not a fixed non-batch dimension of a {ndim}-d input; "
                            "photosim keeps dimension 0 as the batch.")
    return dim % ndim


def mean_node(name: str, source: str, node: fx.Node) -> FloatNode:
    """torch.mean / x.mean over fixed non-batch dimensions."""
    dims = _arg(node.args, node.kwargs, 1, "dim", None)
    if dims is None:
        raise PhotosimError(f"{name}: a mean over every dimension includes the batch; give the dimensions.")
    dims = [dims] if isinstance(dims, int) else list(dims)
    keepdim = bool(_arg(node.args, node.kwargs, 2, "keepdim", False))
    return FloatNode(name, "mean", [source], {"dims": sorted(_data_dim(node, d, name) for d in dims),
                                              "keepdim": keepdim})


def permute_node(name: str, source: str, node: fx.Node) -> FloatNode:
    """permute / transpose as a permutation that keeps the batch dimension first."""
    ndim = len(node.all_input_nodes[0].meta["tensor_meta"].shape)
    rest = node.args[1:]
    if node.target in (torch.transpose, "transpose"):
        a, b = (_data_dim(node, d, name) for d in rest[:2])
        dims = list(range(ndim))
        dims[a], dims[b] = dims[b], dims[a]
    else:
        given = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        dims = [d % ndim for d in given]
        if dims[0] != 0:
            raise PhotosimError(f"{name}: permutation {given} moves the batch dimension; keep dimension 0 first.")
    return FloatNode(name, "permute", [source], {"dims": dims})


def split_piece(name: str, source: str, split: fx.Node, index: Any) -> FloatNode:
    """Piece ``index`` of a chunk / split of a fixed non-batch dimension, as a slice."""
    sizes = _arg(split.args, split.kwargs, 1, "split_size_or_sections" if split.target in (torch.split, "split")
                 else "chunks", None)
    dim = _data_dim(split, _arg(split.args, split.kwargs, 2, "dim", 0), name)
    length = split.all_input_nodes[0].meta["tensor_meta"].shape[dim]
    positions = torch.arange(length)
    pieces = positions.chunk(sizes) if split.target in (torch.chunk, "chunk") else positions.split(sizes)
    if not isinstance(index, int) or not -len(pieces) <= index < len(pieces):
        raise PhotosimError(f"{name}: piece {index!r} of a split into {len(pieces)} is not a fixed index.")
    piece = pieces[index]
    return FloatNode(name, "slice", [source], {"dim": dim, "start": int(piece[0]), "stop": int(piece[-1]) + 1})


def slice_node(name: str, source: str, node: fx.Node) -> FloatNode | None:
    """``x[:, ..., a:b]``: a contiguous slice of one non-batch dimension (None for other indexing)."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    shape = getattr(node.args[0].meta["tensor_meta"], "shape", None)
    if shape is None:  # an item of a tuple (a module returning several values)
        return None
    cut = [(d, s) for d, s in enumerate(index) if s != slice(None)]
    if len(cut) != 1 or not isinstance(cut[0][1], slice) or cut[0][0] == 0 or cut[0][1].step not in (None, 1):
        return None
    d, s = cut[0]
    start, stop, _ = s.indices(shape[d])
    if not (isinstance(start, int) and isinstance(stop, int)) or stop <= start:
        return None
    return FloatNode(name, "slice", [source], {"dim": d, "start": start, "stop": stop})


def pick_node(name: str, source: str, node: fx.Node) -> FloatNode | None:
    """``x[:, i]`` (an integer index of one non-batch dimension, the others whole): the slice i:i+1 (None for other
    indexing); the caller drops the dimension with a reshape."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    shape = getattr(node.args[0].meta["tensor_meta"], "shape", None)
    picks = [(d, i) for d, i in enumerate(index) if i != slice(None)]
    if shape is None or len(picks) != 1 or picks[0][0] == 0 or isinstance(picks[0][1], bool) \
            or not isinstance(picks[0][1], int) or Ellipsis in index:
        return None
    d, i = picks[0]
    i %= shape[d]
    return FloatNode(f"{name}.pick", "slice", [source], {"dim": d, "start": i, "stop": i + 1})


def attention_nodes(name: str, call: fx.Node, src: Any) -> list[FloatNode]:
    """nn.MultiheadAttention as self-attention on (N, T, C) tokens (batch_first, no masks): the input projection,
    per-head q, k, v (slices, reshapes, permutes), scores q k^T, the 1/sqrt(d) scale, softmax, the weighted sum
    of v, heads merged, and the output projection (named as the module, holding its output)."""
    mha: nn.MultiheadAttention = call.graph.owning_module.get_submodule(str(call.target))
    query, key, value = (call.kwargs.get(k, a) for k, a in zip(("query", "key", "value"), (*call.args, None, None)))
    masks = [k for k in ("key_padding_mask", "attn_mask") if call.kwargs.get(k) is not None] + (
        ["attn_mask"] if len(call.args) > 5 and call.args[5] is not None else [])
    if not (mha.batch_first and query is key is value and mha._qkv_same_embed_dim and mha.bias_k is None
            and not mha.add_zero_attn and not masks):
        raise PhotosimError(f"{name}: MultiheadAttention is supported as unmasked self-attention with "
                            "batch_first=True (query, key and value the same tensor, no bias_k / add_zero_attn); "
                            "rewrite it with Linear, matmul and softmax.")
    tokens, channels = (int(d) for d in query.meta["tensor_meta"].shape[1:])
    heads = mha.num_heads
    dim = channels // heads
    zeros = torch.zeros(3 * channels)
    in_bias = mha.in_proj_bias.detach().clone() if mha.in_proj_bias is not None else zeros
    out_bias = mha.out_proj.bias.detach().clone() if mha.out_proj.bias is not None else zeros[:channels]

    def linear(suffix: str, source: str, weight: torch.Tensor, bias: torch.Tensor) -> FloatNode:
        return FloatNode(f"{name}{suffix}", "linear", [source], {"in_features": weight.shape[1],
                                                                 "out_features": weight.shape[0]}, weight, bias)

    out = [linear(".in_proj", src(query), mha.in_proj_weight.detach().clone(), in_bias)]
    for i, part in enumerate("qkv"):
        out.append(FloatNode(f"{name}.{part}", "slice", [f"{name}.in_proj"],
                             {"dim": 2, "start": i * channels, "stop": (i + 1) * channels}))
        out.append(FloatNode(f"{name}.{part}_heads", "reshape", [f"{name}.{part}"], {"shape": [tokens, heads, dim]}))
        order = [0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]  # k as (heads, d, T): the scores are q @ k
        out.append(FloatNode(f"{name}.{part}_t", "permute", [f"{name}.{part}_heads"], {"dims": order}))
    out += [
        FloatNode(f"{name}.scores", "matmul", [f"{name}.q_t", f"{name}.k_t"]),
        FloatNode(f"{name}.scaled", "scale", [f"{name}.scores"], {"factor": 1 / math.sqrt(dim)}),
        FloatNode(f"{name}.weights", "softmax", [f"{name}.scaled"]),
        FloatNode(f"{name}.context", "matmul", [f"{name}.weights", f"{name}.v_t"]),
        FloatNode(f"{name}.merged", "permute", [f"{name}.context"], {"dims": [0, 2, 1, 3]}),
        FloatNode(f"{name}.tokens", "reshape", [f"{name}.merged"], {"shape": [tokens, channels]}),
        linear("", f"{name}.tokens", mha.out_proj.weight.detach().clone(), out_bias),
    ]
    return out


def _batchnorm_as_conv(name: str, source: str, bn: nn.BatchNorm2d) -> FloatNode:
    """A BatchNorm2d with no conv before it (pre-activation blocks), as the depthwise 1x1 conv it equals."""
    channels = bn.num_features
    node = FloatNode(name, "conv2d", [source], {"in_channels": channels, "out_channels": channels, "kernel": [1, 1],
                                                "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1],
                                                "groups": channels},
                     torch.ones(channels, 1, 1, 1), torch.zeros(channels))
    _fold_batchnorm(node, bn)
    return node


def _bias(m: nn.Module) -> torch.Tensor:
    return m.bias.detach().clone() if m.bias is not None else torch.zeros(m.weight.shape[0])


def _fold_batchnorm(producer: FloatNode, bn: nn.Module) -> None:
    """w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta, in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    factor = gamma / torch.sqrt(var + bn.eps)
    shape = (-1,) + (1,) * (producer.weight.dim() - 1)
    producer.weight = (producer.weight.double() * factor.view(shape)).float()
    producer.bias = ((producer.bias.double() - mean) * factor + beta).float()


def _arg(args: tuple, kwargs: dict, index: int, key: str, default: Any) -> Any:
    return kwargs.get(key, args[index] if len(args) > index else default)


def maxpool_attrs(m: nn.Module | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    if m is not None:
        if m.return_indices:
            raise PhotosimError("MaxPool2d(return_indices=True) is not supported.")
        return _pool_attrs(m.kernel_size, m.stride, m.padding, dilation=_pair(m.dilation),
                           ceil_mode=bool(m.ceil_mode))
    return _pool_attrs(_arg(args, kwargs, 1, "kernel_size", None), _arg(args, kwargs, 2, "stride", None),
                       _arg(args, kwargs, 3, "padding", 0), dilation=_pair(_arg(args, kwargs, 4, "dilation", 1)),
                       ceil_mode=bool(_arg(args, kwargs, 5, "ceil_mode", False)))


def avgpool_attrs(m: nn.Module | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    if m is not None:
        return _pool_attrs(m.kernel_size, m.stride, m.padding, ceil_mode=bool(m.ceil_mode),
                           count_include_pad=bool(m.count_include_pad), divisor_override=m.divisor_override)
    return _pool_attrs(_arg(args, kwargs, 1, "kernel_size", None), _arg(args, kwargs, 2, "stride", None),
                       _arg(args, kwargs, 3, "padding", 0), ceil_mode=bool(_arg(args, kwargs, 4, "ceil_mode", False)),
                       count_include_pad=bool(_arg(args, kwargs, 5, "count_include_pad", True)),
                       divisor_override=_arg(args, kwargs, 6, "divisor_override", None))


def reshape_node(name: str, source: str, node: fx.Node) -> FloatNode:
    """flatten / view / reshape: a flatten from dim 1 when the result is (N, -1), else a reshape."""
    in_shape = node.all_input_nodes[0].meta["tensor_meta"].shape
    out_shape = tuple(node.meta["tensor_meta"].shape)
    if out_shape[0] != in_shape[0]:
        raise PhotosimError(f"{name}: reshapes across the batch dimension ({tuple(in_shape)} -> {out_shape}) "
                            "are not supported; keep dimension 0 as the batch.")
    if len(out_shape) == 2:
        return FloatNode(name, "flatten", [source], {"start_dim": 1})
    return FloatNode(name, "reshape", [source], {"shape": list(out_shape[1:])})
