"""The portable integer model file: integer weights, integer bias, scales and zero points.

One ``.safetensors`` file readable by any safetensors reader. Tensors are named ``<node>.weight``,
``<node>.bias``, ``<node>.weight_scale`` (and, for models imported from PyTorch, ``<node>.bias_float``;
for lookup-table ops ``<node>.table``);
the metadata key ``photosim`` holds a JSON document with the graph. ``docs/format.md`` is the spec.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from photosim._files import require_file
from photosim.errors import PhotosimError
from photosim.ir.ops import EXP_ONE, MAX_TABLE_BITS, OPS, AttrError, infer_shapes, weighted_ops
from photosim.ir.ranges import MAX_BIAS_BITS, MAX_BITS, MIN_BITS, int_range, smallest_int_dtype

FORMAT_VERSION = 1
METADATA_KEY = "photosim"
WEIGHTED_OPS = weighted_ops()
_FIX = "Re-export the model (photosim quantize / import-torch) or correct the file."
MAX_JSON_DEPTH = 32  # nesting a reader accepts (the document, nodes, a node, an attribute list, provenance sections)
MAX_INT_DIGITS = 20  # decimal digits of a 64-bit integer


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

    @property
    def largest_offset(self) -> int:
        """max |code - zero_point| over the clamp range: the largest operand a dot product reads."""
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point))

    @staticmethod
    def storage_range(bits: int, signed: bool) -> tuple[int, int]:
        """The code range of ``bits``-bit signed or unsigned integers."""
        return int_range(bits, signed)

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
        if op not in OPS:
            raise PhotosimError(
                f"node {entry.get('name')!r} has op {op!r}, which this photosim does not know "
                f"(known ops: {', '.join(OPS)}). The file was written by a newer photosim "
                "or by another tool; upgrade photosim or re-export the model."
            )
        n_inputs = len(entry["inputs"])
        input_q = [
            QParams(**{k: entry[f"input_{k}"][i] for k in _Q_KEYS}) for i in range(n_inputs)
        ]
        output_q = QParams(**{k: entry[f"output_{k}"] for k in _Q_KEYS})
        attrs = {k: entry[k] for k in (*OPS[op].attr_names, *OPS[op].optional_attrs)
                 if k in entry}  # validate() names missing ones
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
    require_file(path, "model file", "give a photosim integer model file")
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = read_json(f.read(header_len), f"{path}: the safetensors header")
    except (SafetensorError, OSError, ValueError) as exc:
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
        doc = read_json(meta[METADATA_KEY], f"{path}: the {METADATA_KEY!r} metadata")
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
    _keep_input_sizes(model, str(path))
    validate(model, source=str(path))
    return model


def _keep_input_sizes(model: QuantizedModel, source: str) -> None:
    """Replace each null entry of an ``adaptive_avgpool2d`` output size by that input dimension (docs/format.md:
    a null entry keeps that input size), so every reader after ``load`` sees two integers. The nodes before it
    are validated first; a node whose input is not an earlier tensor is left to ``validate`` to name."""
    for index, node in enumerate(model.nodes):
        size = node.attrs.get("output_size")
        if node.op != "adaptive_avgpool2d" or not isinstance(size, list) or len(size) != 2 or None not in size:
            continue
        earlier = model.nodes[:index]
        if not node.inputs or node.inputs[0] not in {model.input_name, *(n.name for n in earlier)}:
            continue
        validate(replace(model, nodes=earlier, output=node.inputs[0]), source)
        shape = infer_shapes(model.input_name, model.input_shape, earlier)[node.inputs[0]]
        if len(shape) == 3:
            node.attrs["output_size"] = [shape[1 + axis] if kept is None else kept for axis, kept in enumerate(size)]


def read_json(text: str | bytes, where: str) -> Any:
    """Parse JSON whose nesting and integers stay within what a model file holds (MAX_JSON_DEPTH levels, integers
    of at most MAX_INT_DIGITS digits), so a crafted file is a PhotosimError, not a RecursionError or a huge int."""
    def bounded_int(literal: str) -> int:
        if len(literal.lstrip("-")) > MAX_INT_DIGITS:
            raise PhotosimError(f"{where} holds an integer of {len(literal.lstrip('-'))} digits; the format's "
                                f"integers have at most {MAX_INT_DIGITS} (64 bits). {_FIX}")
        return int(literal)

    try:
        doc = json.loads(text, parse_int=bounded_int)
        too_deep = _json_depth(doc) > MAX_JSON_DEPTH
    except RecursionError:
        too_deep = True
    if too_deep:
        raise PhotosimError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep; a model file needs a "
                            f"handful. {_FIX}")
    return doc


def _json_depth(doc: Any) -> int:
    """Levels of lists and objects in a parsed JSON value (0 for a number or string), without recursion."""
    deepest, stack = 0, [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth + 1)
            if depth + 1 <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return deepest


def weight_dtype(w_bits: int) -> torch.dtype:
    """Smallest integer dtype holding signed ``w_bits``-bit codes."""
    return smallest_int_dtype(*int_range(w_bits, True))


def bias_dtype(bias_bits: int) -> torch.dtype:
    """int32 up to 32 bits, int64 above."""
    return torch.int32 if bias_bits <= 32 else torch.int64


def _refuse(where: str, problem: str) -> PhotosimError:
    """The error for an inconsistent file: the culprit, what is wrong with it, and the fix."""
    return PhotosimError(f"{where}: {problem}. {_FIX}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bits(where: str, bits: Any, lo: int = MIN_BITS, hi: int = MAX_BITS) -> None:
    if not _is_int(bits) or not lo <= bits <= hi:
        raise PhotosimError(f"{where}: {bits!r} bits cannot be represented; photosim supports {lo} to {hi} bits.")


def _check_q(where: str, q: QParams) -> None:
    """The quantization of one tensor, checked where it is produced (the graph input or a node's output)."""
    if not (all(_is_int(v) for v in (q.zero_point, q.qmin, q.qmax)) and isinstance(q.signed, bool)
            and isinstance(q.scale, (int, float)) and not isinstance(q.scale, bool)):
        raise _refuse(where, f"zero point {q.zero_point!r}, clamp range [{q.qmin!r}, {q.qmax!r}], signed "
                             f"{q.signed!r} and scale {q.scale!r} must be integers, a boolean and a number")
    _check_bits(where, q.bits)
    lo, hi = int_range(q.bits, q.signed)
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
    """Check the graph, attributes, shapes, dtypes and integer ranges; raise PhotosimError naming the culprit."""
    shape = model.input_shape
    if not (isinstance(shape, (tuple, list)) and shape and all(_is_int(d) and d >= 1 for d in shape)):
        raise _refuse(f"{source}: graph input", f"shape {list(shape)} must be a non-empty list of positive integers")
    _check_q(f"{source}: graph input", model.input_q)
    produced = {model.input_name: model.input_q}  # tensor name -> its quantization
    for n in model.nodes:
        where = f"{source}: node {n.name!r} ({n.op})"
        if n.op not in OPS:
            raise _refuse(where, f"unknown op (known ops: {', '.join(OPS)})")
        op = OPS[n.op]
        if not isinstance(n.name, str) or n.name in produced:
            raise _refuse(where, "the name is not a string or is taken by an earlier tensor; names must be unique")
        try:
            op.check_attrs(n.attrs)
        except AttrError as exc:
            raise _refuse(where, str(exc)) from None
        unknown_inputs = [i for i in n.inputs if not isinstance(i, str) or i not in produced]
        count_ok = len(n.inputs) >= 1 if op.inputs == 0 else len(n.inputs) == op.inputs
        if unknown_inputs or len(n.inputs) != len(n.input_q) or not count_ok:
            raise _refuse(where, f"inputs {n.inputs} are not all produced by earlier nodes, or are not "
                                 f"{op.inputs or 'one or more'} with one quantization each")
        for i, (name, q) in enumerate(zip(n.inputs, n.input_q)):
            if q != produced[name]:
                raise _refuse(where, f"input {i} quantization (scale {q.scale}, zero point {q.zero_point}) differs "
                                     f"from that of {name!r}, its producer (scale {produced[name].scale}, zero "
                                     f"point {produced[name].zero_point})")
        _check_q(f"{where} output", n.output_q)
        if op.keeps_quantization and _storage(n.output_q) != _storage(n.input_q[0]):
            raise _refuse(where, f"output scale, zero point and bits {_storage(n.output_q)} differ from the "
                                 f"input's {_storage(n.input_q[0])}; this op keeps its input's quantization")
        if op.weighted:
            _validate_weights(model, n, where)
        if op.tabled:
            _validate_table(model, n, where)
        if op.exp_tabled:
            _validate_exp_table(model, n, where)
        if op.valued:
            key, t = f"{n.name}.value", model.tensors.get(f"{n.name}.value")
            if t is None or t.dtype != torch.float32 or list(t.shape) != list(n.attrs["shape"]) or not bool(
                    torch.isfinite(t).all()):
                got = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
                raise _refuse(where, f"tensor {key!r} is {got}; it must be finite float32 of shape {n.attrs['shape']}")
        produced[n.name] = n.output_q
    if model.output not in produced:
        raise PhotosimError(f"{source}: graph output {model.output!r} is not produced by any node.")
    try:
        shapes = infer_shapes(model.input_name, model.input_shape, model.nodes)
    except AttrError as exc:
        raise _refuse(source, str(exc)) from None
    for n in model.nodes:
        if OPS[n.op].affine:
            _validate_affine(model, n, shapes[n.inputs[0]][-1], f"{source}: node {n.name!r} ({n.op})")


def _storage(q: QParams) -> tuple[float, int, int, bool]:
    return q.scale, q.zero_point, q.bits, q.signed


def _validate_weights(model: QuantizedModel, n: Node, where: str) -> None:
    _check_bits(f"{where} weights", n.w_bits)
    _check_bits(f"{where} bias", n.bias_bits, 2, MAX_BIAS_BITS)
    w_shape = OPS[n.op].weight_shape(n.attrs)
    out_channels = w_shape[0]
    expected = {
        "weight": (w_shape, weight_dtype(n.w_bits)),
        "bias": ((out_channels,), bias_dtype(n.bias_bits)),
        "weight_scale": (None, torch.float32),
        "bias_float": ((out_channels,), torch.float32),
    }
    for suffix, (shape, dtype) in expected.items():
        key = f"{n.name}.{suffix}"
        t = model.tensors.get(key)
        if t is None and suffix == "bias_float":
            continue  # optional: only models imported from PyTorch have it
        if t is None:
            raise PhotosimError(f"{where}: tensor {key!r} is missing.")
        if shape is not None and tuple(t.shape) != shape:
            raise PhotosimError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}.")
        if t.dtype != dtype:
            kind = "float" if dtype.is_floating_point else "integer"
            raise _refuse(where, f"tensor {key!r} has dtype {t.dtype}; the spec's {kind} dtype for it is {dtype}")
    w, b, s = (model.tensors[f"{n.name}.{k}"] for k in ("weight", "bias", "weight_scale"))
    if s.shape not in ((), (out_channels,)) or not bool(torch.all(s > 0) & torch.all(torch.isfinite(s))):
        raise PhotosimError(f"{where}: weight_scale must be positive, a scalar or one per output channel.")
    _check_range(f"{where} weight", w, *int_range(n.w_bits, True))
    _check_range(f"{where} bias", b, *int_range(n.bias_bits, True))


def _validate_exp_table(model: QuantizedModel, n: Node, where: str) -> None:
    """``<node>.exp``: int32, 2^input_bits entries, from 2^30 down (non-increasing), none negative."""
    key, size = f"{n.name}.exp", table_size(n.input_q[0])
    t = model.tensors.get(key)
    if n.input_q[0].bits > MAX_TABLE_BITS or t is None or t.dtype != torch.int32 or tuple(t.shape) != (size,):
        got = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
        raise _refuse(where, f"tensor {key!r} is {got}; it must be int32 of shape ({size},) (inputs of at most "
                             f"{MAX_TABLE_BITS} bits)")
    if int(t[0]) != EXP_ONE or bool((t < 0).any()) or bool((t[1:] > t[:-1]).any()):
        raise _refuse(where, f"tensor {key!r} must start at 2^30 and never increase or go below 0")


def _validate_affine(model: QuantizedModel, n: Node, channels: int, where: str) -> None:
    """``<node>.gamma`` and ``<node>.beta``: float32, finite, one per channel of the last dimension; and the exact
    int64 sums of a layer norm must fit (C^3 * 2^(2 bits) < 2^63, docs/integer-semantics.md)."""
    for suffix in ("gamma", "beta"):
        key = f"{n.name}.{suffix}"
        t = model.tensors.get(key)
        if t is None or t.dtype != torch.float32 or tuple(t.shape) != (channels,) or not bool(torch.isfinite(t).all()):
            got = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
            raise _refuse(where, f"tensor {key!r} is {got}; it must be finite float32 of shape ({channels},)")
    if channels ** 3 * (1 << (2 * n.input_q[0].bits)) >= 1 << 63:
        raise _refuse(where, f"{channels} channels of {n.input_q[0].bits}-bit codes: the exact sum of squares could "
                             "leave int64; use fewer bits or channels")


def table_size(q: QParams) -> int:
    """Entries of a lookup table indexed by the codes of ``q``'s storage range: 2^bits."""
    return 1 << q.bits


def _validate_table(model: QuantizedModel, n: Node, where: str) -> None:
    """``<node>.table``: int32, one output code (within the output clamp range) per input storage code."""
    key = f"{n.name}.table"
    t = model.tensors.get(key)
    q_in = n.input_q[0]
    if q_in.bits > MAX_TABLE_BITS:
        raise _refuse(where, f"a lookup table over {q_in.bits}-bit inputs; tables take inputs of at most "
                             f"{MAX_TABLE_BITS} bits")
    size = table_size(q_in)
    if t is None or t.dtype != torch.int32 or tuple(t.shape) != (size,):
        got = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
        raise _refuse(where, f"tensor {key!r} is {got}; it must be int32 of shape ({size},)")
    _check_range(f"{where}: tensor {key!r}", t, n.output_q.qmin, n.output_q.qmax)


def weights_scale(model: QuantizedModel, node: Node) -> torch.Tensor:
    """Per-output-channel weight scales as float64, shape (out_channels,)."""
    s = model.tensors[f"{node.name}.weight_scale"].double()
    out_channels = model.tensors[f"{node.name}.weight"].shape[0]
    return s.expand(out_channels) if s.dim() == 0 else s


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (provenance of weights files); special and absurdly large files refused."""
    require_file(path, "hashed file", "give a regular file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
