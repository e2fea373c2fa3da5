"""PyTorch layers and calls as float nodes of the op table: each pattern capture recognises (a layer's attributes,
a ReLU's bounds, a nonlinearity's table function, a split's pieces, a MultiheadAttention's decomposition, ...),
one function each, so that photosim.frontend.capture reads as the walk over the traced graph."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from photosim.errors import PhotosimError
from photosim.frontend.graph import FloatNode


def pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


def single(v: Any) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def conv_attrs(m: nn.Conv1d | nn.Conv2d, name: str) -> dict[str, Any]:
    """A Conv2d's attributes, or a Conv1d's as the conv2d of kernel 1 x k it equals on (N, C, 1, L)."""
    if m.padding_mode != "zeros":
        raise PhotosimError(f"layer {name!r}: padding_mode {m.padding_mode!r} is not supported (only 'zeros').")
    if isinstance(m, nn.Conv1d):
        padding = m.padding if isinstance(m.padding, str) else (0, single(m.padding))
        return conv_attrs(nn.Conv2d(m.in_channels, m.out_channels, (1, single(m.kernel_size)),
                                    (1, single(m.stride)), padding, (1, single(m.dilation)), m.groups,
                                    bias=False, device="meta"), name)
    padding = m.padding
    if isinstance(padding, str):  # 'same' / 'valid'
        padding = [0, 0] if padding == "valid" else [d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation)]
        if any(d * (k - 1) % 2 for k, d in zip(m.kernel_size, m.dilation)):
            raise PhotosimError(f"layer {name!r}: padding='same' with an even kernel is asymmetric; pad explicitly.")
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel": pair(m.kernel_size),
        "stride": pair(m.stride), "padding": pair(padding), "dilation": pair(m.dilation), "groups": m.groups,
    }


def pool_attrs(kernel: Any, stride: Any, padding: Any, **extra: Any) -> dict[str, Any]:
    kernel = pair(kernel)
    stride = pair(stride) if stride not in (None, [], ()) else kernel
    return {"kernel": kernel, "stride": stride, "padding": pair(padding), **extra}


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


TABLE_MODULES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                 nn.Tanh: "tanh"}


TABLE_CALLS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid", F.hardsigmoid: "hardsigmoid",
               F.silu: "silu", F.hardswish: "hardswish", torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh",
               torch.exp: "exp", "exp": "exp"}


SPLIT_CALLS = {torch.chunk, "chunk", torch.split, "split"}


SWAP_CALLS = (torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")


def torchvision_function(target: Any, name: str) -> bool:
    """Whether ``target`` is torchvision's function ``name`` (recognised without importing torchvision)."""
    return getattr(target, "__name__", None) == name and "torchvision" in getattr(target, "__module__", "")


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


def data_dim(node: fx.Node, dim: Any, name: str) -> int:
    """A dimension argument as a nonnegative index of the node's first input; the batch dimension refused."""
    ndim = len(node.all_input_nodes[0].meta["tensor_meta"].shape)
    if not isinstance(dim, int) or not -ndim <= dim < ndim or dim % ndim == 0:
        raise PhotosimError(f"{name}: dimension {dim!r} is not a fixed non-batch dimension of a {ndim}-d input; "
                            "photosim keeps dimension 0 as the batch.")
    return dim % ndim


def mean_node(name: str, source: str, node: fx.Node) -> FloatNode:
    """torch.mean / x.mean over fixed non-batch dimensions."""
    dims = arg(node.args, node.kwargs, 1, "dim", None)
    if dims is None:
        raise PhotosimError(f"{name}: a mean over every dimension includes the batch; give the dimensions.")
    dims = [dims] if isinstance(dims, int) else list(dims)
    keepdim = bool(arg(node.args, node.kwargs, 2, "keepdim", False))
    return FloatNode(name, "mean", [source], {"dims": sorted(data_dim(node, d, name) for d in dims),
                                              "keepdim": keepdim})


def permute_node(name: str, source: str, node: fx.Node) -> FloatNode:
    """permute / transpose as a permutation that keeps the batch dimension first."""
    ndim = len(node.all_input_nodes[0].meta["tensor_meta"].shape)
    rest = node.args[1:]
    if node.target in SWAP_CALLS:
        a, b = (data_dim(node, d, name) for d in rest[:2])
        dims = list(range(ndim))
        dims[a], dims[b] = dims[b], dims[a]
    else:
        given = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        dims = [d % ndim for d in given]
        if dims[0] != 0:
            raise PhotosimError(f"{name}: permutation {given} moves the batch dimension; keep dimension 0 first.")
    return FloatNode(name, "permute", [source], {"dims": dims})


def roll_nodes(name: str, source: str, node: fx.Node) -> list[FloatNode]:
    """torch.roll / x.roll over given non-batch dimensions: one roll node per dimension (the last named as the call),
    each shift taken modulo the dimension's size."""
    shifts, dims = arg(node.args, node.kwargs, 1, "shifts", None), arg(node.args, node.kwargs, 2, "dims", None)
    shifts, dims = ([v] if isinstance(v, int) else list(v or ()) for v in (shifts, dims))
    if not dims or len(shifts) != len(dims) or not all(isinstance(s, int) for s in shifts):
        raise PhotosimError(f"{name}: torch.roll needs fixed integer shifts and one dimension for each (without "
                            "dims it rolls the flattened tensor, batch included).")
    shape = node.all_input_nodes[0].meta["tensor_meta"].shape
    out: list[FloatNode] = []
    for i, (shift, dim) in enumerate(zip(shifts, dims)):
        d = data_dim(node, dim, name)
        out.append(FloatNode(f"{name}.{i}", "roll", [out[-1].name if out else source],
                             {"dim": d, "shift": shift % shape[d]}))
    out[-1].name = name
    return out


def einsum_nodes(name: str, sources: list[str], node: fx.Node) -> list[FloatNode] | None:
    """torch.einsum of two activations that is a batched matrix product (``bgid,bgjd->bgij``: equal leading
    letters, one contracted letter): matmul, after swapping the last two dimensions of an operand that holds them
    the other way round (None: another equation)."""
    equation = arg(node.args, node.kwargs, 0, "equation", "")
    if not isinstance(equation, str) or "->" not in equation or len(sources) != 2:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    left, _, right = inputs.partition(",")
    lead = out[:-2]
    if len(out) < 3 or not (left[:-2] == right[:-2] == lead) or len({*left, *right, *out}) != len(lead) + 3:
        return None
    contracted = set(left[-2:]) & set(right[-2:])
    if {*left[-2:], *right[-2:]} - contracted != set(out[-2:]) or len(contracted) != 1 \
            or out[-2] not in left or out[-1] not in right:
        return None
    k = contracted.pop()
    out_nodes, operands = [], list(sources)
    for i, (letters, wanted) in enumerate(((left, out[-2] + k), (right, k + out[-1]))):
        if letters[-2:] != wanted:
            order = [*range(len(letters) - 2), len(letters) - 1, len(letters) - 2]
            out_nodes.append(FloatNode(f"{name}.operand_{i}", "permute", [operands[i]], {"dims": order}))
            operands[i] = out_nodes[-1].name
    return [*out_nodes, FloatNode(name, "matmul", operands)]


def pad_nodes(name: str, source: str, node: fx.Node) -> list[FloatNode] | None:
    """F.pad with zeros of non-batch dimensions: one pad node per padded dimension, the last named as the call
    (None: another mode, a nonzero value or a negative width, which crops)."""
    widths = list(arg(node.args, node.kwargs, 1, "pad", ()))
    mode, fill = arg(node.args, node.kwargs, 2, "mode", "constant"), arg(node.args, node.kwargs, 3, "value", None)
    if mode != "constant" or fill not in (None, 0) or not all(isinstance(p, int) and p >= 0 for p in widths):
        return None
    rank = len(node.all_input_nodes[0].meta["tensor_meta"].shape)
    out: list[FloatNode] = []
    for i in range(len(widths) // 2):
        if widths[2 * i] or widths[2 * i + 1] or (not out and 2 * i + 2 >= len(widths)):  # one node at least
            out.append(FloatNode(f"{name}.{i}", "pad", [out[-1].name if out else source],
                                 {"dim": data_dim(node, rank - 1 - i, name), "before": widths[2 * i],
                                  "after": widths[2 * i + 1]}))
    out[-1].name = name
    return out


def split_piece(name: str, source: str, split: fx.Node, index: Any) -> FloatNode:
    """Piece ``index`` of a chunk / split of a fixed non-batch dimension, as a slice."""
    sizes = arg(split.args, split.kwargs, 1, "split_size_or_sections" if split.target in (torch.split, "split")
                 else "chunks", None)
    dim = data_dim(split, arg(split.args, split.kwargs, 2, "dim", 0), name)
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


def layer_norm_node(name: str, source: str, node: fx.Node, normalized_shape: Any, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float) -> FloatNode | None:
    """nn.LayerNorm or F.layer_norm (ConvNeXt's LayerNorm2d, after a permute) over the last dimension, with its
    weight and bias or ones and zeros (None: normalized over more than the last dimension)."""
    channels = int(node.meta["tensor_meta"].shape[-1])
    if list(normalized_shape) != [channels]:
        return None
    gamma = weight.detach().float().clone() if weight is not None else torch.ones(channels)
    beta = bias.detach().float().clone() if bias is not None else torch.zeros(channels)
    return FloatNode(name, "layer_norm", [source], {"eps": float(eps)}, gamma, beta)


def normalize_node(name: str, source: str, node: fx.Node) -> FloatNode | None:
    """F.normalize with p = 2 over the last dimension (None: another norm or dimension)."""
    p, dim = arg(node.args, node.kwargs, 1, "p", 2.0), arg(node.args, node.kwargs, 2, "dim", 1)
    rank = len(node.meta["tensor_meta"].shape)
    if p != 2 or not isinstance(dim, int) or dim % rank != rank - 1:
        return None
    return FloatNode(name, "l2_normalize", [source], {"eps": float(arg(node.args, node.kwargs, 3, "eps", 1e-12))})


def batchnorm_as_conv(name: str, source: str, bn: nn.BatchNorm2d) -> FloatNode:
    """A BatchNorm2d with no conv before it (pre-activation blocks), as the depthwise 1x1 conv it equals."""
    channels = bn.num_features
    node = FloatNode(name, "conv2d", [source], {"in_channels": channels, "out_channels": channels, "kernel": [1, 1],
                                                "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1],
                                                "groups": channels},
                     torch.ones(channels, 1, 1, 1), torch.zeros(channels))
    fold_batchnorm(node, bn)
    return node


def bias_of(m: nn.Module) -> torch.Tensor:
    return m.bias.detach().clone() if m.bias is not None else torch.zeros(m.weight.shape[0])


def fold_batchnorm(producer: FloatNode, bn: nn.Module) -> None:
    """w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta, in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    factor = gamma / torch.sqrt(var + bn.eps)
    shape = (-1,) + (1,) * (producer.weight.dim() - 1)
    producer.weight = (producer.weight.double() * factor.view(shape)).float()
    producer.bias = ((producer.bias.double() - mean) * factor + beta).float()


def arg(args: tuple, kwargs: dict, index: int, key: str, default: Any) -> Any:
    return kwargs.get(key, args[index] if len(args) > index else default)


def maxpool_attrs(m: nn.Module | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    if m is not None:
        if m.return_indices:
            raise PhotosimError("MaxPool2d(return_indices=True) is not supported.")
        return pool_attrs(m.kernel_size, m.stride, m.padding, dilation=pair(m.dilation),
                           ceil_mode=bool(m.ceil_mode))
    return pool_attrs(arg(args, kwargs, 1, "kernel_size", None), arg(args, kwargs, 2, "stride", None),
                       arg(args, kwargs, 3, "padding", 0), dilation=pair(arg(args, kwargs, 4, "dilation", 1)),
                       ceil_mode=bool(arg(args, kwargs, 5, "ceil_mode", False)))


def avgpool_attrs(m: nn.Module | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    if m is not None:
        return pool_attrs(m.kernel_size, m.stride, m.padding, ceil_mode=bool(m.ceil_mode),
                           count_include_pad=bool(m.count_include_pad), divisor_override=m.divisor_override)
    return pool_attrs(arg(args, kwargs, 1, "kernel_size", None), arg(args, kwargs, 2, "stride", None),
                       arg(args, kwargs, 3, "padding", 0), ceil_mode=bool(arg(args, kwargs, 4, "ceil_mode", False)),
                       count_include_pad=bool(arg(args, kwargs, 5, "count_include_pad", True)),
                       divisor_override=arg(args, kwargs, 6, "divisor_override", None))


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

