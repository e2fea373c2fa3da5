"""Float graph capture with torch.fx: the walk over the traced graph, BatchNorm folding and activation fusion.

The captured FloatGraph (photosim.frontend.graph) has the node vocabulary of the integer file, so quantization is
a node-by-node translation; how each PyTorch pattern becomes nodes is in photosim.frontend.patterns.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from photosim.errors import PhotosimError
from photosim.frontend.concrete_trace import ConcreteTracer, RecordingTracer, source_line
from photosim.frontend.folding import fold_constants, per_sample_constant
from photosim.frontend.graph import FloatGraph, FloatNode
from photosim.frontend.hf import Logits, embedding_refusal, is_transformers_model
from photosim.frontend.nonlinearity import Curve
from photosim.frontend.patterns import (
    SPLIT_CALLS,
    SWAP_CALLS,
    activation_bounds,
    arg,
    attention_nodes,
    avgpool_attrs,
    batchnorm_as_conv,
    bias_of,
    constant_factor,
    conv_attrs,
    data_dim,
    einsum_nodes,
    fold_batchnorm,
    layer_norm_node,
    maxpool_attrs,
    mean_node,
    normalize_node,
    pad_nodes,
    permute_node,
    pick_node,
    reshape_node,
    roll_nodes,
    single,
    slice_node,
    split_piece,
    table_function,
    torchvision_function,
)
from photosim.frontend.windows import patch_merging_nodes, window_attention_nodes
from photosim.ir.ops import OPS, weighted_ops

SUPPORTED = ", ".join(layer for op in OPS.values() for layer in op.layers) + (
    "; BatchNorm1d/2d after a conv/linear (folded), BatchNorm2d elsewhere (a depthwise 1x1 conv); Conv1d, "
    "MaxPool1d, AvgPool1d, AdaptiveAvgPool1d (as their 2-D ops on (N, C, 1, L)); Dropout and Identity (removed in "
    "eval). Convs need zeros padding, clamp constant bounds"
)


_ACTIVATION_FUSABLE = tuple(name for name, op in OPS.items() if op.observed)  # a ReLU narrows their clamp range


_BATCHNORM_FUSABLE = weighted_ops()


ADD_CALLS = (operator.add, torch.add, "add")


PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)


PASS_THROUGH_CALLS = {F.dropout, "contiguous", "clone", "detach"}


DTYPE_CASTS = {"to", "type", "type_as", "float"}  # methods that change nothing when the dtype stays


_SHAPE_CALLS = {"size", getattr, operator.getitem, operator.mul, operator.floordiv}


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """fx-trace ``model`` (a transformers model: its logits) on ``example`` and annotate shapes; name the module and
    the reason when tracing fails."""
    model = model.eval()
    if is_transformers_model(model):
        model = Logits(model)
    tracer = ConcreteTracer(example) if isinstance(model, Logits) else RecordingTracer()
    try:
        graph = tracer.trace(model)
    except PhotosimError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's model, reported as such
        raise PhotosimError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. photosim needs a model "
            "without data-dependent control flow in forward(); rewrite that part, or wrap it in a leaf module."
        ) from None
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


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
    constants: dict[tuple[str, tuple[int, ...]], str] = {}  # (folded fx node, per-sample shape) -> Constant node
    output = None

    folded = fold_constants(gm)  # the parts computed from parameters, buffers and literals alone
    reader: list[fx.Node] = []  # the node being translated (a folded value becomes a constant shaped for it)

    def src(arg: Any) -> str:
        if arg.name in folded:
            return constant(arg, reader[0])
        return alias.get(arg.name, arg.name)  # unsupported nodes have no alias; they are reported below

    def decomposed(parts: list[FloatNode]) -> FloatNode:
        """Add the inner nodes of a call decomposed into several; return the last, which holds its output."""
        nodes.update((n.name, n) for n in parts[:-1])
        return parts[-1]

    def value(arg: Any) -> Any:
        """An argument a pattern needs as a value (a weight, a bias table): a folded constant's, or the literal."""
        if isinstance(arg, fx.Node) and arg.name not in folded:
            raise PhotosimError(f"{reader[0].name} at {source_line(reader[0])}: its argument {arg.name} is computed "
                                "from the model input; photosim needs a constant (a parameter or buffer) there.")
        return folded[arg.name] if isinstance(arg, fx.Node) else arg

    def constant(arg: fx.Node, consumer: fx.Node) -> str:
        """The Constant node holding a folded value as ``consumer`` reads it (one per distinct per-sample shape)."""
        out_shape = tuple(consumer.meta["tensor_meta"].shape) if is_tensor(consumer) else tuple(folded[arg.name].shape)
        equal_shapes = consumer.target in ADD_CALLS  # add takes equal shapes: the constant is expanded
        try:
            value = per_sample_constant(folded[arg.name], len(out_shape), out_shape[1:] if equal_shapes else None)
        except ValueError as exc:
            unsupported.append(f"{arg.name} (a constant read by {consumer.name}: it {exc}) at {source_line(consumer)}")
            return arg.name
        key = (arg.name, tuple(value.shape))
        if key not in constants:
            constants[key] = arg.name if arg.name not in nodes else f"{arg.name}.{consumer.name}"
            nodes[constants[key]] = FloatNode(constants[key], "constant", ["input"], {"shape": list(value.shape)},
                                              value)
        return constants[key]

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
        if node.name in folded:
            continue
        reader[:] = [node]
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
        if target == "expand" and nodes.get(src(args[0])) is not None and nodes[src(args[0])].op == "constant" \
                and all(d == -1 for d in args[2:]):
            bind(node, src(args[0]))  # a constant over the batch: every sample reads the same value
            continue
        bounds = activation_bounds(target, module, args, node.kwargs)
        new: FloatNode | None = None
        eval_stochastic_depth = torchvision_function(target, "stochastic_depth") and not arg(
            args, node.kwargs, 3, "training", True)
        same_dtype_cast = node.op == "call_method" and target in DTYPE_CASTS and is_tensor(args[0]) \
            and args[0].meta["tensor_meta"].dtype == node.meta["tensor_meta"].dtype  # float32 -> float32
        if isinstance(module, PASS_THROUGH_MODULES) or (node.op != "call_module" and target in PASS_THROUGH_CALLS) \
                or eval_stochastic_depth or same_dtype_cast:
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
                            module.weight.detach().clone(), bias_of(module))
        elif isinstance(module, nn.Linear):
            new = FloatNode(name, "linear", [src(args[0])], {"in_features": module.in_features,
                            "out_features": module.out_features}, module.weight.detach().clone(), bias_of(module))
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            producer = fusable(args[0], _BATCHNORM_FUSABLE)
            if producer is None or producer.act is not None:
                if not isinstance(module, nn.BatchNorm2d):
                    unsupported.append(f"{name} (BatchNorm1d not directly after a linear or Conv1d) at "
                                       f"{source_line(node)}")
                    continue
                new = batchnorm_as_conv(name, src(args[0]), module)
            else:
                fold_batchnorm(producer, module)
                bind(node, src(args[0]))  # the producer, or a Conv1d's reshape back of it
                continue
        elif isinstance(module, nn.LayerNorm):
            new = layer_norm_node(name, src(args[0]), node, module.normalized_shape, module.weight, module.bias,
                                  module.eps)
        elif target is F.layer_norm:  # weight and bias must be constants (parameters)
            new = layer_norm_node(name, src(args[0]), node, arg(args, node.kwargs, 1, "normalized_shape", ()),
                                  *(value(arg(args, node.kwargs, i, key, None)) for i, key in ((2, "weight"),
                                                                                               (3, "bias"))),
                                  arg(args, node.kwargs, 4, "eps", 1e-5))
        elif isinstance(module, nn.Conv1d):
            new = as_2d(node, name, "conv2d", conv_attrs(module, name), module.weight.detach().unsqueeze(2).clone(),
                        bias_of(module))
        elif isinstance(module, nn.MaxPool1d):
            attrs = maxpool_attrs(None, (None, [1, single(module.kernel_size)],
                                         [1, single(module.stride or module.kernel_size)],
                                         [0, single(module.padding)], [1, single(module.dilation)],
                                         module.ceil_mode), {})
            new = as_2d(node, name, "maxpool2d", attrs)
        elif isinstance(module, nn.AvgPool1d):
            attrs = avgpool_attrs(None, (None, [1, single(module.kernel_size)],
                                         [1, single(module.stride or module.kernel_size)],
                                         [0, single(module.padding)], module.ceil_mode, module.count_include_pad),
                                  {})
            new = as_2d(node, name, "avgpool2d", attrs)
        elif isinstance(module, nn.AdaptiveAvgPool1d):
            new = as_2d(node, name, "adaptive_avgpool2d",
                        {"output_size": [1, int(node.meta["tensor_meta"].shape[2])]})
        elif target in ADD_CALLS and len(tensor_args) == 2 and len(args) == 2 \
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
                and not node.kwargs and len({len(a.meta["tensor_meta"].shape) for a in tensor_args
                                             if a.name not in folded}) == 1:
            # equal ranks (a folded constant takes the other's): no broadcast over the batch
            new = FloatNode(name, "mul", [src(a) for a in tensor_args])
        elif (factor := constant_factor(target, args, tensor_args, node.kwargs)) is not None:
            new = FloatNode(name, "scale", [src(tensor_args[0])], {"factor": factor})
        elif target in (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm") and len(tensor_args) == 2 \
                and len({len(a.meta["tensor_meta"].shape) for a in tensor_args}) == 1:
            new = FloatNode(name, "matmul", [src(a) for a in tensor_args])
        elif isinstance(module, nn.Softmax) or target in (torch.softmax, F.softmax, "softmax"):
            dim = module.dim if module is not None else arg(args, node.kwargs, 1, "dim", None)
            ndim = len(node.meta["tensor_meta"].shape)
            if dim is None or dim % ndim != ndim - 1:
                raise PhotosimError(f"{name}: softmax over dimension {dim!r}; photosim runs softmax over the last "
                                    "dimension (permute the tensor first).")
            new = FloatNode(name, "softmax", [src(args[0])])
        elif target in (torch.cat, torch.concat, torch.concatenate):
            pieces = arg(args, node.kwargs, 0, "tensors", ())
            new = FloatNode(name, "concat", [src(a) for a in pieces], {"dim": data_dim(node, arg(
                args, node.kwargs, 1, "dim", 0), name)})
        elif target in (torch.mean, "mean"):
            new = mean_node(name, src(args[0]), node)
        elif target in (torch.permute, "permute", *SWAP_CALLS):
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
        elif target is torch.einsum and (parts := einsum_nodes(name, [src(a) for a in tensor_args], node)):
            new = decomposed(parts)
        elif target is F.normalize:
            new = normalize_node(name, src(args[0]), node)
        elif target in (torch.roll, "roll"):
            new = decomposed(roll_nodes(name, src(args[0]), node))
        elif target is F.pad and (parts := pad_nodes(name, src(args[0]), node)):
            new = decomposed(parts)
        elif torchvision_function(target, "shifted_window_attention"):
            new = decomposed(window_attention_nodes(name, src(args[0]), node, value))
        elif torchvision_function(target, "_patch_merging_pad"):
            new = decomposed(patch_merging_nodes(name, src(args[0]), node))
        elif isinstance(module, nn.Embedding) or target is F.embedding:
            unsupported.append(embedding_refusal(name, source_line(node)))
            continue
        if new is None:
            what = type(module).__name__ if module is not None else getattr(target, "__name__", str(target))
            unsupported.append(f"{name} ({node.op} {what}) at {source_line(node)}")
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

