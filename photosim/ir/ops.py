"""The op table: every operation of the integer graph, declared once.

An op states its attributes (types and bounds), its number of inputs, whether it has weights, whether
its output is observed (gets its own scale and zero point), its float reference, its output shape as a
function of attributes and input shapes, and, with weights, their shape and the dot-product length K.
Graph capture, the file format, the quantizer, the fake-quant reference, summaries and the engine all
look ops up in :data:`OPS`; adding an op is one declaration here, one engine kernel, one capture pattern.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F

Shape = tuple[int, ...]
Attrs = dict[str, Any]
MAX_ELEMENTS = 1 << 31  # per sample and tensor: more is a corrupt or absurd file, not a model to simulate
MAX_INT32 = (1 << 31) - 1  # integer attributes fit int32, the index type of PyTorch's and oneDNN's kernels
MAX_WINDOW = 1 << 20  # kernel, stride, padding and dilation: a stride of 2^31 breaks oneDNN's memory descriptors
MAX_INPUTS = 1024  # inputs of one node (concat): DenseNet's widest concatenates about 50


class AttrError(ValueError):
    """An attribute value or input shape an op cannot take; the caller names the node."""


@dataclass(frozen=True)
class Attr:
    """One attribute of an op's JSON node: ``kind`` fixes its type, ``minimum`` bounds its integers."""

    name: str
    kind: Literal["int", "pair", "bool", "optional_int", "shape", "dims", "choice", "float"]
    minimum: int = 1
    choices: tuple[str, ...] = ()  # the allowed strings of a ``choice``
    maximum: int = MAX_INT32  # every integer fits int32, the index type of oneDNN's and PyTorch's kernels

    def check(self, value: Any) -> None:
        """Raise AttrError unless ``value`` has this attribute's type and bounds."""
        bounds = f">= {self.minimum} and <= {self.maximum}"
        expected = {
            "int": f"an integer {bounds}",
            "pair": f"a list of two integers {bounds}",
            "bool": "true or false",
            "optional_int": f"null or an integer {bounds}",
            "shape": f"a non-empty list of integers >= 1 and <= {self.maximum} (at most one -1)",
            "dims": f"a non-empty list of distinct integers {bounds}",
            "choice": f"one of {', '.join(self.choices)}",
            "float": "a finite number >= 0",
        }[self.kind]
        if not self._valid(value):
            raise AttrError(f"attribute {self.name!r} is {value!r}; it must be {expected}")

    def _valid(self, v: Any) -> bool:
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "choice":
            return isinstance(v, str) and v in self.choices
        if self.kind == "float":
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if self.kind == "int" or (self.kind == "optional_int" and v is not None):
            return _is_int(v) and self.minimum <= v <= self.maximum
        if self.kind == "optional_int":
            return True
        if not isinstance(v, (list, tuple)) or not all(_is_int(d) and d <= self.maximum for d in v):
            return False
        if self.kind == "pair":
            return len(v) == 2 and min(v) >= self.minimum
        if self.kind == "dims":
            return len(v) >= 1 and min(v) >= self.minimum and len(set(v)) == len(v)
        return len(v) >= 1 and all(d >= 1 or d == -1 for d in v) and list(v).count(-1) <= 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Op:
    """An op's declaration; subclasses set the class attributes and override what applies to them."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for docs
    layers: ClassVar[tuple[str, ...]]  # the PyTorch layers captured as this op, as the README names them
    attrs: ClassVar[tuple[Attr, ...]] = ()
    optional_attrs: ClassVar[tuple[str, ...]] = ()  # further keys some nodes carry (check_attrs checks them)
    inputs: ClassVar[int] = 1  # 0: one or more (concat)
    weighted: ClassVar[bool] = False  # has <node>.weight / .bias / .weight_scale tensors
    tabled: ClassVar[bool] = False  # has <node>.table: output code per input code (lookup-table ops)
    affine: ClassVar[bool] = False  # has float32 <node>.gamma and <node>.beta over the last dimension (norms)
    exp_tabled: ClassVar[bool] = False  # has int32 <node>.exp: round(2^30 exp(-k s_in)) for k = 0 .. 2^bits - 1
    valued: ClassVar[bool] = False  # has float32 <node>.value: a learned constant (class token, position embedding)
    observed: ClassVar[bool] = False  # its output gets its own scale and zero point; else the input's
    keeps_quantization: ClassVar[bool] = False  # output scale, zero point and bits are the input's
    moves_codes: ClassVar[bool] = False  # output codes are input codes moved, never recomputed
    # scaling input channel c by s > 0 scales only the outputs of channel c by s (cross-layer equalization
    # may rescale across it); a clamp only when its bounds are 0 or infinite
    channel_homogeneous: ClassVar[bool] = False

    @property
    def attr_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attrs)

    def check_attrs(self, a: Attrs) -> None:
        """Raise AttrError for a missing, mistyped or out-of-bounds attribute, or inconsistent ones."""
        missing = [name for name in self.attr_names if name not in a]
        if missing:
            raise AttrError(f"attributes {missing} are missing")
        for attr in self.attrs:
            attr.check(a[attr.name])

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """The op in floating point on a batch (any float dtype): the float model's and fake-quant's semantics."""
        raise NotImplementedError

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        """Per-sample output shape from per-sample input shapes, without running anything."""
        return shapes[0]

    def weight_shape(self, a: Attrs) -> Shape:
        """Shape of ``<node>.weight`` (weighted ops)."""
        raise NotImplementedError

    def dot_length(self, a: Attrs) -> int:
        """K: the number of products summed into one output (weighted ops)."""
        raise NotImplementedError


OPS: dict[str, Op] = {}


def register_op(cls: type[Op]) -> type[Op]:
    """Class decorator: add the op to :data:`OPS`; a second op of the same name is a programming error."""
    if cls.name in OPS:
        raise ValueError(f"op {cls.name!r} is registered twice")
    OPS[cls.name] = cls()
    return cls


def weighted_ops() -> tuple[str, ...]:
    """Names of the ops with integer weights (conv / linear)."""
    return tuple(name for name, op in OPS.items() if op.weighted)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """PyTorch's conv / pool output length (``pooling_output_shape``)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def _image(shape: Shape, channels: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of a per-sample image shape; AttrError when it is not one (or has other channels)."""
    if len(shape) != 3:
        raise AttrError(f"input of shape {shape} is not an image (C, H, W)")
    if channels is not None and shape[0] != channels:
        raise AttrError(f"input has {shape[0]} channels but in_channels is {channels}")
    return shape  # type: ignore[return-value]


def _windowed(shape: Shape, a: Attrs, dilation: Sequence[int], ceil_mode: bool) -> tuple[int, int]:
    """Output (H, W) of a sliding window (conv, pool); AttrError when the window does not fit."""
    _, h, w = shape
    out = tuple(conv_output_size(*args, ceil_mode)
                for args in zip((h, w), a["kernel"], a["stride"], a["padding"], dilation))
    if min(out) < 1:
        raise AttrError(f"kernel {list(a['kernel'])} (dilation {list(dilation)}) is larger than the padded "
                        f"input {h}x{w} (padding {list(a['padding'])}): the output would be {out[0]}x{out[1]}")
    return out  # type: ignore[return-value]


def _check_conv_work(shape: Shape, a: Attrs, out: tuple[int, int]) -> None:
    """The engine's conv works on the zero-padded input and on its im2col patches, (OH * OW) rows of
    kh * kw * C / groups per group: AttrError when either holds more than MAX_ELEMENTS per sample (padding 8188
    on a 7x7 input is 193 GB of patches in a 9 KiB file)."""
    c, h, w = shape
    (ph, pw), (kh, kw) = a["padding"], a["kernel"]
    padded = c * (h + 2 * ph) * (w + 2 * pw)
    patches = out[0] * out[1] * kh * kw * c
    for what, elements in (("zero-padded input", padded), ("im2col patches", patches)):
        if elements > MAX_ELEMENTS:
            raise AttrError(f"kernel {list(a['kernel'])}, stride {list(a['stride'])} and padding {list(a['padding'])} "
                            f"on the input {shape} make {elements:.3g} elements of {what} per sample, more than "
                            f"photosim's limit of {MAX_ELEMENTS} (2^31)")


def _check_pool_padding(a: Attrs) -> None:
    """PyTorch's pools pad at most half the kernel."""
    if any(p > k // 2 for p, k in zip(a["padding"], a["kernel"])):
        raise AttrError(f"padding {list(a['padding'])} exceeds half the kernel {list(a['kernel'])}")


_PAIR_ATTRS = (Attr("kernel", "pair", maximum=MAX_WINDOW), Attr("stride", "pair", maximum=MAX_WINDOW),
               Attr("padding", "pair", minimum=0, maximum=MAX_WINDOW))
_DILATION = Attr("dilation", "pair", maximum=MAX_WINDOW)


@register_op
class Conv2d(Op):
    name = "conv2d"
    description = "2-D convolution (stride, zero padding, dilation, groups) of integer codes with integer weights"
    layers = ("Conv2d",)
    attrs = (Attr("in_channels", "int"), Attr("out_channels", "int"), *_PAIR_ATTRS, _DILATION,
             Attr("groups", "int"))
    weighted = observed = True

    def check_attrs(self, a: Attrs) -> None:
        super().check_attrs(a)
        if a["in_channels"] % a["groups"] or a["out_channels"] % a["groups"]:
            raise AttrError(f"groups {a['groups']} must divide in_channels {a['in_channels']} and "
                            f"out_channels {a['out_channels']}")

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(xs[0], weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        shape = _image(shapes[0], a["in_channels"])
        out = _windowed(shape, a, a["dilation"], False)
        _check_conv_work(shape, a, out)
        return (a["out_channels"], *out)

    def weight_shape(self, a: Attrs) -> Shape:
        return (a["out_channels"], a["in_channels"] // a["groups"], *a["kernel"])

    def dot_length(self, a: Attrs) -> int:
        return a["in_channels"] // a["groups"] * a["kernel"][0] * a["kernel"][1]


@register_op
class Linear(Op):
    name = "linear"
    description = ("fully connected layer on the last dimension of (N, ..., features) codes with integer weights "
                   "(tokens: each position alone)")
    layers = ("Linear",)
    attrs = (Attr("in_features", "int"), Attr("out_features", "int"))
    weighted = observed = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(xs[0], weight, bias)

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        if shapes[0][-1] != a["in_features"]:
            raise AttrError(f"input of shape {shapes[0]} has {shapes[0][-1]} features in its last dimension but "
                            f"in_features is {a['in_features']}")
        return (*shapes[0][:-1], a["out_features"])

    def weight_shape(self, a: Attrs) -> Shape:
        return a["out_features"], a["in_features"]

    def dot_length(self, a: Attrs) -> int:
        return a["in_features"]


@register_op
class Add(Op):
    name = "add"
    description = "element-wise sum of two tensors of the same shape (residual connections), requantized"
    layers = ("residual + / torch.add",)
    inputs = 2
    observed = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0] + xs[1]

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        if shapes[0] != shapes[1]:
            raise AttrError(f"inputs have different shapes {shapes[0]} and {shapes[1]}")
        return shapes[0]


@register_op
class Clamp(Op):
    name = "clamp"
    description = "clamp of the codes to the output's [qmin, qmax] (a ReLU-like op not fused into its producer)"
    layers = ("ReLU", "ReLU6", "Hardtanh", "clamp")
    keeps_quantization = True
    channel_homogeneous = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0]  # the bounds are the output quantization's clamp range


class _Pool2d(Op):
    """A 2-D pool: PyTorch's windows, which pad at most half the kernel; every channel pooled alike."""

    channel_homogeneous = True

    def check_attrs(self, a: Attrs) -> None:
        super().check_attrs(a)
        _check_pool_padding(a)


@register_op
class MaxPool2d(_Pool2d):
    name = "maxpool2d"
    description = "max over each window of the codes (PyTorch's windows; padding never wins)"
    layers = ("MaxPool2d",)
    attrs = (*_PAIR_ATTRS, _DILATION, Attr("ceil_mode", "bool"))
    keeps_quantization = moves_codes = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.max_pool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        shape = _image(shapes[0])
        return (shape[0], *_windowed(shape, a, a["dilation"], a["ceil_mode"]))


@register_op
class AvgPool2d(_Pool2d):
    name = "avgpool2d"
    description = "average over each window with PyTorch's divisor, requantized"
    layers = ("AvgPool2d",)
    attrs = (*_PAIR_ATTRS, Attr("ceil_mode", "bool"), Attr("count_include_pad", "bool"),
             Attr("divisor_override", "optional_int"))

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.avg_pool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                            a["divisor_override"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        shape = _image(shapes[0])
        return (shape[0], *_windowed(shape, a, (1, 1), a["ceil_mode"]))


@register_op
class AdaptiveAvgPool2d(Op):
    name = "adaptive_avgpool2d"
    description = "average over PyTorch's adaptive windows to a fixed output size, requantized"
    layers = ("AdaptiveAvgPool2d",)
    attrs = (Attr("output_size", "pair"),)
    channel_homogeneous = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.adaptive_avg_pool2d(xs[0], a["output_size"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        return (_image(shapes[0])[0], *a["output_size"])


@register_op
class Flatten(Op):
    name = "flatten"
    description = "flatten from ``start_dim`` (counting the batch dimension) on; codes unchanged"
    layers = ("flatten",)
    attrs = (Attr("start_dim", "int"),)
    keeps_quantization = moves_codes = True
    channel_homogeneous = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.flatten(xs[0], a["start_dim"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        shape, start = shapes[0], a["start_dim"] - 1  # per-sample shapes have no batch dimension
        if start >= len(shape):
            raise AttrError(f"start_dim {a['start_dim']} is past the last dimension of the input {shape}")
        return (*shape[:start], math.prod(shape[start:]))


@register_op
class Reshape(Op):
    name = "reshape"
    description = "reshape of each sample (one dimension may be -1); codes unchanged"
    layers = ("view", "reshape")
    attrs = (Attr("shape", "shape"),)
    keeps_quantization = moves_codes = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0].reshape(xs[0].shape[0], *a["shape"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        target, elements = list(a["shape"]), math.prod(shapes[0])
        known = math.prod(d for d in target if d != -1)
        if -1 in target and elements % known == 0:
            target[target.index(-1)] = elements // known
        if math.prod(target) != elements:
            raise AttrError(f"cannot reshape the input {shapes[0]} ({elements} elements) to {list(a['shape'])}")
        return tuple(target)


@register_op
class Concat(Op):
    name = "concat"
    description = "concatenation of tensors along one dimension, each requantized to the output's scale"
    layers = ("torch.cat",)
    attrs = (Attr("dim", "int"),)
    inputs = 0
    observed = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat(list(xs), a["dim"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) > MAX_INPUTS:
            raise AttrError(f"{len(shapes)} inputs; photosim concatenates at most {MAX_INPUTS}")
        d = a["dim"] - 1  # per-sample shapes have no batch dimension
        if any(len(s) != len(shapes[0]) or d >= len(s) for s in shapes):
            raise AttrError(f"inputs {list(shapes)} do not all have dimension {a['dim']} (counting the batch)")
        if any(s[:d] + s[d + 1:] != shapes[0][:d] + shapes[0][d + 1:] for s in shapes):
            raise AttrError(f"inputs {list(shapes)} differ outside dimension {a['dim']}")
        return (*shapes[0][:d], sum(s[d] for s in shapes), *shapes[0][d + 1:])


def broadcast_shape(a: Shape, b: Shape) -> Shape:
    """numpy broadcasting of two per-sample shapes; AttrError when they do not broadcast."""
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        raise AttrError(f"inputs of shapes {a} and {b} do not broadcast") from None


@register_op
class Mul(Op):
    name = "mul"
    description = "element-wise product of two tensors of one rank, broadcasting (squeeze-excite, gating), requantized"
    layers = ("x * y / torch.mul",)
    inputs = 2
    observed = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0] * xs[1]

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        if len(shapes[0]) != len(shapes[1]):
            raise AttrError(f"inputs of shapes {shapes[0]} and {shapes[1]} differ in rank; broadcasting them would "
                            "pair the batch with a data dimension: give both the same rank (size-1 dimensions)")
        return broadcast_shape(shapes[0], shapes[1])


@register_op
class Mean(Op):
    name = "mean"
    description = "mean over the given dimensions (global pooling, token mean), requantized like an average pool"
    layers = ("torch.mean",)
    attrs = (Attr("dims", "dims"), Attr("keepdim", "bool"))

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0].mean(dim=a["dims"], keepdim=a["keepdim"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        shape = shapes[0]
        if max(a["dims"]) > len(shape):
            raise AttrError(f"dims {a['dims']} reach past the input's {len(shape)} dimensions (after the batch)")
        reduced = {d - 1 for d in a["dims"]}
        if a["keepdim"]:
            return tuple(1 if i in reduced else n for i, n in enumerate(shape))
        return tuple(n for i, n in enumerate(shape) if i not in reduced)


@register_op
class Permute(Op):
    name = "permute"
    description = "permutation of the non-batch dimensions (transpose, channel shuffle); codes unchanged"
    layers = ("permute", "transpose")
    attrs = (Attr("dims", "dims", minimum=0),)
    keeps_quantization = moves_codes = True

    def check_attrs(self, a: Attrs) -> None:
        super().check_attrs(a)
        if a["dims"][0] != 0 or sorted(a["dims"]) != list(range(len(a["dims"]))):
            raise AttrError(f"dims {a['dims']} must be a permutation of 0..{len(a['dims']) - 1} keeping the batch "
                            "dimension 0 first")

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0].permute(*a["dims"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        if len(a["dims"]) != len(shapes[0]) + 1:
            raise AttrError(f"dims {a['dims']} do not permute an input of {len(shapes[0]) + 1} dimensions")
        return tuple(shapes[0][d - 1] for d in a["dims"][1:])


@register_op
class Slice(Op):
    name = "slice"
    description = "the elements start..stop-1 of one non-batch dimension (split, chunk, x[:, a:b]); codes unchanged"
    layers = ("split", "chunk", "x[:, a:b]")
    attrs = (Attr("dim", "int"), Attr("start", "int", minimum=0), Attr("stop", "int"))
    keeps_quantization = moves_codes = True

    def check_attrs(self, a: Attrs) -> None:
        super().check_attrs(a)
        if a["stop"] <= a["start"]:
            raise AttrError(f"stop {a['stop']} must be larger than start {a['start']}")

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0].narrow(a["dim"], a["start"], a["stop"] - a["start"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        shape, d = shapes[0], a["dim"] - 1
        if d >= len(shape) or a["stop"] > shape[d]:
            raise AttrError(f"slice {a['start']}:{a['stop']} of dimension {a['dim']} does not fit the input {shape}")
        return (*shape[:d], a["stop"] - a["start"], *shape[d + 1:])


@register_op
class Roll(Op):
    name = "roll"
    description = ("cyclic shift of one non-batch dimension by a fixed number of positions (Swin's shifted windows); "
                   "codes unchanged")
    layers = ("torch.roll",)
    attrs = (Attr("dim", "int"), Attr("shift", "int", minimum=0))
    keeps_quantization = moves_codes = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0].roll(a["shift"], a["dim"])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        if a["dim"] > len(shapes[0]):
            raise AttrError(f"dim {a['dim']} is past the last dimension of the input {shapes[0]} (after the batch)")
        return shapes[0]


@register_op
class Pad(Op):
    name = "pad"
    description = ("zero padding of one non-batch dimension (Swin's windows on a map that is not a multiple of them): "
                   "the added codes are the input's zero point")
    layers = ("F.pad",)
    attrs = (Attr("dim", "int"), Attr("before", "int", minimum=0), Attr("after", "int", minimum=0))
    keeps_quantization = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.pad(xs[0], [0, 0] * (xs[0].dim() - 1 - a["dim"]) + [a["before"], a["after"]])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        shape, d = shapes[0], a["dim"] - 1
        if d >= len(shape):
            raise AttrError(f"dim {a['dim']} is past the last dimension of the input {shape} (after the batch)")
        return (*shape[:d], shape[d] + a["before"] + a["after"], *shape[d + 1:])


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# name -> the float function a lookup table samples (float64 in, float64 out)
TABLE_FUNCTIONS: dict[str, Any] = {
    "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid, "silu": F.silu, "hardswish": F.hardswish,
    "tanh": torch.tanh, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "exp": torch.exp,
}
MAX_TABLE_BITS = 16  # a table of 2^16 entries at most


@register_op
class Table(Op):
    name = "table"
    description = ("a unary nonlinearity as a lookup table from input code to output code, stored with the node "
                   "(sigmoid, hard-sigmoid, SiLU, hardswish, tanh, GELU, exp, or a curve of points: a measured "
                   "optical or electro-optic response)")
    layers = ("Sigmoid", "Hardsigmoid", "SiLU", "Hardswish", "Tanh", "GELU", "photosim.Curve")
    attrs = (Attr("function", "choice", choices=(*TABLE_FUNCTIONS, "curve")),)
    optional_attrs = ("x", "y")  # a curve's points
    observed = tabled = True

    def check_attrs(self, a: Attrs) -> None:
        super().check_attrs(a)
        if a["function"] == "curve":
            check_curve(a.get("x"), a.get("y"))

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        if a["function"] == "curve":
            return interpolate(xs[0], a["x"], a["y"])
        return TABLE_FUNCTIONS[a["function"]](xs[0])


@register_op
class Constant(Op):
    name = "constant"
    description = ("a learned constant of the model (class token, position embedding), the same for every sample; "
                   "its input only gives the batch size")
    layers = ("class token / position embedding parameters",)
    attrs = (Attr("shape", "shape"),)
    observed = valued = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        assert weight is not None
        return weight.to(xs[0].dtype).expand(xs[0].shape[0], *weight.shape)

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        if -1 in a["shape"]:
            raise AttrError(f"shape {a['shape']} must be explicit")
        return tuple(a["shape"])


@register_op
class MatMul(Op):
    name = "matmul"
    description = ("matrix product of two activations (attention's Q K^T and A V), batched over the leading "
                   "dimensions, from exact integer sums, requantized like mul")
    layers = ("torch.matmul / @",)
    inputs = 2
    observed = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.matmul(xs[0], xs[1])

    def output_shape(self, a: Attrs, shapes: Sequence[Shape]) -> Shape:
        left, right = shapes
        if len(left) != len(right) or len(left) < 2 or left[:-2] != right[:-2] or left[-1] != right[-2]:
            raise AttrError(f"inputs of shapes {left} and {right} are not (..., M, K) and (..., K, P) with the same "
                            "leading dimensions")
        return (*left[:-1], right[-1])


@register_op
class Scale(Op):
    name = "scale"
    description = "multiplication by a positive constant (attention's 1 / sqrt(d)), requantized"
    layers = ("x * constant", "x / constant")
    attrs = (Attr("factor", "float"),)
    observed = True

    def check_attrs(self, a: Attrs) -> None:
        super().check_attrs(a)
        if not a["factor"] > 0:
            raise AttrError(f"factor {a['factor']} must be positive")

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return xs[0] * a["factor"]


EXP_ONE = 1 << 30  # softmax's exp table holds round(2^30 exp(-k s_in))


@register_op
class Softmax(Op):
    name = "softmax"
    description = ("softmax over the last dimension: integer max subtraction, an exp table stored with the node, "
                   "exact integer sums, one division per element")
    layers = ("Softmax",)
    observed = exp_tabled = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.softmax(xs[0], dim=-1)


@register_op
class LayerNorm(Op):
    name = "layer_norm"
    description = ("normalization over the last dimension (transformers), from exact integer sums, scaled by gamma "
                   "and shifted by beta, requantized")
    layers = ("LayerNorm",)
    attrs = (Attr("eps", "float"),)
    observed = affine = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.layer_norm(xs[0], (xs[0].shape[-1],), weight, bias, a["eps"])


@register_op
class L2Normalize(Op):
    name = "l2_normalize"
    description = ("division by the Euclidean norm over the last dimension (Swin v2's cosine attention), from exact "
                   "integer sums of squares, requantized")
    layers = ("F.normalize",)
    attrs = (Attr("eps", "float"),)
    observed = True

    def reference(self, a: Attrs, xs: Sequence[torch.Tensor], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(xs[0], dim=-1, eps=a["eps"])


MAX_CURVE_POINTS = 1 << 16


def check_curve(x: Any, y: Any) -> None:
    """A curve's points: two lists of 2 .. 2^16 finite numbers, x strictly increasing; AttrError otherwise."""
    def numbers(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(p, (int, float)) and not isinstance(p, bool)
                                           and math.isfinite(p) for p in v)

    if not (numbers(x) and numbers(y) and 2 <= len(x) == len(y) <= MAX_CURVE_POINTS):
        raise AttrError(f"a curve needs attributes 'x' and 'y': lists of the same length, 2 to {MAX_CURVE_POINTS} "
                        "finite numbers")
    if any(b <= a for a, b in zip(x, x[1:])):
        raise AttrError("a curve's 'x' must be strictly increasing")


def interpolate(x: torch.Tensor, xp: Sequence[float], fp: Sequence[float]) -> torch.Tensor:
    """Piecewise-linear y(x) through the points (xp, fp), constant beyond the ends, in x's dtype:
    ``f[i-1] + (x - x[i-1]) / (x[i] - x[i-1]) * (f[i] - f[i-1])`` on the segment holding x."""
    xs = torch.tensor(xp, dtype=x.dtype, device=x.device)
    fs = torch.tensor(fp, dtype=x.dtype, device=x.device)
    clamped = x.clamp(xs[0], xs[-1])
    i = torch.searchsorted(xs, clamped.contiguous(), right=True).clamp(1, len(xs) - 1)
    x0, x1, f0, f1 = xs[i - 1], xs[i], fs[i - 1], fs[i]
    return f0 + (clamped - x0) / (x1 - x0) * (f1 - f0)


class GraphNode(Protocol):
    """What shape inference reads of a node (photosim.ir.format.Node has it)."""

    name: str
    op: str
    inputs: list[str]
    attrs: Attrs


NodeT = TypeVar("NodeT", bound=GraphNode)  # photosim.ir.format.Node or photosim.frontend.graph.FloatNode


def consumers(nodes: Sequence[NodeT]) -> dict[str, list[NodeT]]:
    """Tensor name -> the nodes that read it, in graph order (a node reading one tensor twice is listed twice)."""
    readers: dict[str, list[NodeT]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    return readers


def walk(nodes: Sequence[GraphNode], values: dict[str, Any], output: str,
         step: Callable[[Any, list[Any]], Any], *, keep_all: bool = False,
         observe: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run a graph in topological order: ``values[node.name] = step(node, its inputs' values)`` (``observe`` sees
    each result). Without ``keep_all`` a tensor is dropped after its last consumer, so a batch holds a few
    activations at a time, not the whole graph's; the output stays. Returns ``values``."""
    last_use = {name: i for i, node in enumerate(nodes) for name in node.inputs}
    for i, node in enumerate(nodes):
        values[node.name] = y = step(node, [values[name] for name in node.inputs])
        if observe:
            observe(node.name, y)
        if not keep_all:
            for name in set(node.inputs):  # an add may read one tensor twice
                if last_use[name] == i and name != output:
                    del values[name]
    return values


def infer_shapes(input_name: str, input_shape: Shape, nodes: Sequence[GraphNode]) -> dict[str, Shape]:
    """Per-sample shape of the graph input and of every node's output, from attributes alone.

    Raises AttrError naming the node whose attributes do not fit its inputs' shapes, or whose output
    would be absurdly large. Attributes must have been checked (``Op.check_attrs``).
    """
    shapes = {input_name: tuple(input_shape)}
    _check_size(input_name, shapes[input_name])
    for node in nodes:
        try:
            shape = OPS[node.op].output_shape(node.attrs, [shapes[i] for i in node.inputs])
        except AttrError as exc:
            raise AttrError(f"node {node.name!r} ({node.op}): {exc}") from None
        _check_size(node.name, shape)
        shapes[node.name] = shape
    return shapes


def _check_size(name: str, shape: Shape) -> None:
    if math.prod(shape) > MAX_ELEMENTS:
        raise AttrError(f"tensor {name!r} would have shape {shape}: {math.prod(shape):.3g} elements per sample, "
                        f"more than photosim's limit of {MAX_ELEMENTS} (2^31)")
