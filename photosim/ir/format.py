"""The portable integer model file: integer weights, integer bias, scales and zero points.

One ``.safetensors`` file readable by any safetensors reader. Tensors are named ``<node>.weight``,
``<node>.bias``, ``<node>.weight_scale`` (and, for models imported from PyTorch, ``<node>.bias_float``);
the metadata key ``photosim`` holds a JSON document with the graph. ``docs/format.md`` is the spec.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from photosim.errors import PhotosimError

FORMAT_VERSION = 1
METADATA_KEY = "photosim"

# op -> the attribute keys it must carry in the JSON node (besides the common keys).
OP_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "conv2d": ("in_channels", "out_channels", "kernel", "stride", "padding", "dilation", "groups"),
    "linear": ("in_features", "out_features"),
    "add": (),
    "clamp": (),
    "maxpool2d": ("kernel", "stride", "padding", "dilation", "ceil_mode"),
    "avgpool2d": ("kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "adaptive_avgpool2d": ("output_size",),
    "flatten": ("start_dim",),
    "reshape": ("shape",),
}
WEIGHTED_OPS = ("conv2d", "linear")
MIN_BITS, MAX_BITS = 2, 16
MAX_BIAS_BITS = 64


@dataclass(frozen=True)
class QParams:
    """Affine quantization of one activation tensor: ``real = scale * (code - zero_point)``.

    Codes are stored in ``bits`` (signed: [-2^(b-1), 2^(b-1)-1], else [0, 2^b-1]); ``qmin``/``qmax``
    is the clamp the producer applies (narrower than the storage range after a fused ReLU/ReLU6).
    """

    scale: float
    zero_point: int
    bits: int
    signed: bool
    qmin: int
    qmax: int

    @staticmethod
    def storage_range(bits: int, signed: bool) -> tuple[int, int]:
        """The code range of ``bits``-bit signed or unsigned integers."""
        return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Float -> codes as PyTorch's ``quantize_per_tensor``: multiply by the float32 reciprocal, round
        half to even, add the zero point, clamp. Returns int32 codes."""
        inv_scale = torch.tensor(1.0 / self.scale, dtype=torch.float32).item()
        q = torch.round(x.float() * inv_scale).to(torch.int64) + self.zero_point
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Codes -> float32 values."""
        return (q.to(torch.float64) - self.zero_point).mul(self.scale).float()


@dataclass
class Node:
    """One operation of the integer graph; its output tensor is named after the node."""

    name: str
    op: str
    inputs: list[str]
    input_q: list[QParams]
    output_q: QParams
    attrs: dict[str, Any] = field(default_factory=dict)
    w_bits: int | None = None
    bias_bits: int | None = None


@dataclass
class QuantizedModel:
    """An integer model: graph input quantization, nodes in topological order, integer tensors.

    Example:
        >>> qm = photosim.load("m.safetensors")
        >>> qm.save("copy.safetensors")
    """

    input_name: str
    input_shape: tuple[int, ...]  # per sample, e.g. (C, H, W)
    input_q: QParams
    nodes: list[Node]
    tensors: dict[str, torch.Tensor]
    output: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def qparams(self, tensor_name: str) -> QParams:
        """Quantization of a graph tensor (the graph input or a node's output)."""
        return self.input_q if tensor_name == self.input_name else self.node(tensor_name).output_q

    def save(self, path: str | Path) -> None:
        """Write the model as one safetensors file (see docs/format.md)."""
        validate(self)
        meta = {METADATA_KEY: json.dumps(_to_json(self), separators=(",", ":"))}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=meta)


def _qparams_json(q: QParams, prefix: str) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in asdict(q).items()}


def _to_json(model: QuantizedModel) -> dict[str, Any]:
    nodes = []
    for n in model.nodes:
        entry: dict[str, Any] = {"name": n.name, "op": n.op, "inputs": n.inputs, "outputs": [n.name]}
        entry.update(n.attrs)
        entry.update(w_bits=n.w_bits, a_bits=n.output_q.bits, bias_bits=n.bias_bits)
        for key in ("scale", "zero_point", "bits", "signed", "qmin", "qmax"):
            entry[f"input_{key}"] = [getattr(q, key) for q in n.input_q]
        entry.update(_qparams_json(n.output_q, "output"))
        nodes.append(entry)
    return {
        "format_version": FORMAT_VERSION,
        "input": {"name": model.input_name, "shape": list(model.input_shape), **asdict(model.input_q)},
        "output": model.output,
        "nodes": nodes,
        "provenance": model.provenance,
    }


_COMMON_KEYS = {"name", "op", "inputs", "outputs", "w_bits", "a_bits", "bias_bits"}
_Q_KEYS = ("scale", "zero_point", "bits", "signed", "qmin", "qmax")


def _from_json(doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantizedModel:
    inp = doc["input"]
    nodes = []
    for entry in doc["nodes"]:
        op = entry["op"]
        if op not in OP_ATTRIBUTES:
            raise PhotosimError(
                f"node {entry.get('name')!r} has op {op!r}, which this photosim does not know "
                f"(known ops: {', '.join(OP_ATTRIBUTES)}). The file was written by a newer photosim "
                "or by another tool; upgrade photosim or re-export the model."
            )
        n_inputs = len(entry["inputs"])
        input_q = [
            QParams(**{k: entry[f"input_{k}"][i] for k in _Q_KEYS}) for i in range(n_inputs)
        ]
        output_q = QParams(**{k: entry[f"output_{k}"] for k in _Q_KEYS})
        attrs = {k: entry[k] for k in OP_ATTRIBUTES[op]}
        nodes.append(
            Node(entry["name"], op, list(entry["inputs"]), input_q, output_q, attrs,
                 entry.get("w_bits"), entry.get("bias_bits"))
        )
    return QuantizedModel(
        input_name=inp["name"],
        input_shape=tuple(inp["shape"]),
        input_q=QParams(**{k: inp[k] for k in _Q_KEYS}),
        nodes=nodes,
        tensors=tensors,
        output=doc["output"],
        provenance=doc.get("provenance", {}),
    )


def load(path: str | Path) -> QuantizedModel:
    """Read and validate an integer model file.

    Example:
        >>> qm = photosim.load("m.safetensors")
    """
    path = Path(path)
    if not path.is_file():
        raise PhotosimError(f"{path}: no such file. Create one with `photosim quantize ... -o {path}`.")
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise PhotosimError(
            f"{path} is not a readable safetensors file ({exc}). It may be truncated or corrupt; "
            "quantize the model again."
        ) from None
    meta = header.get("__metadata__") or {}
    if METADATA_KEY not in meta:
        raise PhotosimError(
            f"{path} is a safetensors file but not a photosim integer model (no {METADATA_KEY!r} "
            "metadata). Create one with `photosim quantize` or `photosim import-torch`."
        )
    try:
        doc = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise PhotosimError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON ({exc}).") from None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != FORMAT_VERSION:
        raise PhotosimError(
            f"{path} has format_version {version!r}; this photosim reads version {FORMAT_VERSION}. "
            "Use the photosim version that wrote it, or quantize the model again."
        )
    try:
        model = _from_json(doc, tensors)
    except (KeyError, TypeError, IndexError) as exc:
        raise PhotosimError(f"{path}: the graph description is missing or has a malformed key: {exc}.") from None
    validate(model, source=str(path))
    return model


def _smallest_int_dtype(lo: int, hi: int) -> torch.dtype:
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise ValueError(f"range [{lo}, {hi}] does not fit int64")


def weight_dtype(w_bits: int) -> torch.dtype:
    """Smallest integer dtype holding signed ``w_bits``-bit codes."""
    return _smallest_int_dtype(*QParams.storage_range(w_bits, True))


def bias_dtype(bias_bits: int) -> torch.dtype:
    """int32 up to 32 bits, int64 above."""
    return torch.int32 if bias_bits <= 32 else torch.int64


def _check_bits(where: str, bits: Any, lo: int = MIN_BITS, hi: int = MAX_BITS) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise PhotosimError(f"{where}: {bits!r} bits cannot be represented; photosim supports {lo} to {hi} bits.")


def _check_q(where: str, q: QParams) -> None:
    _check_bits(where, q.bits)
    lo, hi = QParams.storage_range(q.bits, q.signed)
    if not (lo <= q.qmin <= q.qmax <= hi and lo <= q.zero_point <= hi):
        raise PhotosimError(
            f"{where}: clamp range [{q.qmin}, {q.qmax}] or zero point {q.zero_point} lies outside the "
            f"{q.bits}-bit {'signed' if q.signed else 'unsigned'} range [{lo}, {hi}]."
        )
    if not (math.isfinite(q.scale) and q.scale > 0):
        raise PhotosimError(f"{where}: scale {q.scale!r} must be a positive finite number.")


def _check_range(where: str, t: torch.Tensor, lo: int, hi: int) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise PhotosimError(f"{where}: values span [{int(t.min())}, {int(t.max())}], outside [{lo}, {hi}].")


def validate(model: QuantizedModel, source: str = "model") -> None:
    """Check the graph, dtypes, shapes and integer ranges; raise PhotosimError naming the culprit."""
    _check_q(f"{source}: graph input", model.input_q)
    produced = {model.input_name: model.input_q}  # tensor name -> its quantization
    for n in model.nodes:
        where = f"{source}: node {n.name!r} ({n.op})"
        missing = [k for k in OP_ATTRIBUTES.get(n.op, ()) if k not in n.attrs]
        if n.op not in OP_ATTRIBUTES or missing:
            raise PhotosimError(f"{where}: unknown op or missing attributes {missing}.")
        unknown_inputs = [i for i in n.inputs if i not in produced]
        if unknown_inputs or len(n.inputs) != len(n.input_q) or not n.inputs:
            raise PhotosimError(f"{where}: inputs {n.inputs} are not all produced by earlier nodes.")
        for i, (name, q) in enumerate(zip(n.inputs, n.input_q)):
            if q != produced[name]:
                raise PhotosimError(f"{where}: input {i} quantization differs from that of {name!r}, its producer.")
        _check_q(f"{where} output", n.output_q)
        if n.op == "conv2d":
            _validate_conv_attrs(n.attrs, where)
        if n.op in WEIGHTED_OPS:
            _validate_weights(model, n, where)
        produced[n.name] = n.output_q
    if model.output not in produced:
        raise PhotosimError(f"{source}: graph output {model.output!r} is not produced by any node.")


def _validate_conv_attrs(a: dict[str, Any], where: str) -> None:
    pairs_ok = all(isinstance(a[k], list) and len(a[k]) == 2 for k in ("kernel", "stride", "padding", "dilation"))
    if not pairs_ok or min(a["kernel"] + a["stride"] + a["dilation"]) < 1 or min(a["padding"]) < 0:
        raise PhotosimError(f"{where}: kernel, stride, dilation must be pairs >= 1 and padding a pair >= 0.")
    if a["groups"] < 1 or a["in_channels"] % a["groups"] or a["out_channels"] % a["groups"]:
        raise PhotosimError(f"{where}: groups {a['groups']} must divide in_channels and out_channels.")


def _validate_weights(model: QuantizedModel, n: Node, where: str) -> None:
    _check_bits(f"{where} weights", n.w_bits)
    _check_bits(f"{where} bias", n.bias_bits, 2, MAX_BIAS_BITS)
    a = n.attrs
    if n.op == "conv2d":
        kh, kw = a["kernel"]
        w_shape = (a["out_channels"], a["in_channels"] // a["groups"], kh, kw)
    else:
        w_shape = (a["out_features"], a["in_features"])
    out_channels = w_shape[0]
    expected = {
        "weight": (w_shape, None),
        "bias": ((out_channels,), None),
        "weight_scale": (None, torch.float32),
    }
    for suffix, (shape, dtype) in expected.items():
        key = f"{n.name}.{suffix}"
        t = model.tensors.get(key)
        if t is None:
            raise PhotosimError(f"{where}: tensor {key!r} is missing.")
        if shape is not None and tuple(t.shape) != shape:
            raise PhotosimError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}.")
        if dtype is not None and t.dtype != dtype:
            raise PhotosimError(f"{where}: tensor {key!r} has dtype {t.dtype}, expected {dtype}.")
    w, b, s = (model.tensors[f"{n.name}.{k}"] for k in ("weight", "bias", "weight_scale"))
    if w.dtype.is_floating_point or b.dtype.is_floating_point:
        raise PhotosimError(f"{where}: weight and bias must be integer tensors, got {w.dtype} and {b.dtype}.")
    if s.shape not in ((), (out_channels,)) or not bool(torch.all(s > 0) & torch.all(torch.isfinite(s))):
        raise PhotosimError(f"{where}: weight_scale must be positive, a scalar or one per output channel.")
    _check_range(f"{where} weight", w, *QParams.storage_range(n.w_bits, True))
    _check_range(f"{where} bias", b, *QParams.storage_range(n.bias_bits, True))


def weights_scale(model: QuantizedModel, node: Node) -> torch.Tensor:
    """Per-output-channel weight scales as float64, shape (out_channels,)."""
    s = model.tensors[f"{node.name}.weight_scale"].double()
    out_channels = model.tensors[f"{node.name}.weight"].shape[0]
    return s.expand(out_channels) if s.dim() == 0 else s


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (provenance of weights files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
