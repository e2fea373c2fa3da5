"""An independent interpreter of photosim's integer model file, written from docs/format.md and
docs/integer-semantics.md alone: numpy int64, one function per op, requant modes ``float`` and
``fixedpoint``.

It imports nothing from photosim: it parses the safetensors header itself and reads the tensors with
``safetensors.numpy``. Being short and literal is the point; it is slow and meant for small tensors.
tests/test_reference_executor.py checks it against the engine node by node.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

MODES = ("float", "fixedpoint")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass(frozen=True)
class Q:
    """Quantization of one activation tensor."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass
class Model:
    doc: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def input_q(self) -> Q:
        i = self.doc["input"]
        return Q(float(i["scale"]), int(i["zero_point"]), int(i["qmin"]), int(i["qmax"]))


def read(path: str | Path) -> Model:
    """The file: 8-byte little-endian header length, JSON header with ``__metadata__.photosim``, tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    doc = json.loads(header["__metadata__"]["photosim"])
    if doc["format_version"] != 1:
        raise ValueError(f"format_version {doc['format_version']}")
    return Model(doc, load_file(str(path)))


def input_q(node: dict[str, Any], i: int) -> Q:
    return Q(float(node["input_scale"][i]), int(node["input_zero_point"][i]), int(node["input_qmin"][i]),
             int(node["input_qmax"][i]))


def output_q(node: dict[str, Any]) -> Q:
    return Q(float(node["output_scale"]), int(node["output_zero_point"]), int(node["output_qmin"]),
             int(node["output_qmax"]))


def clamp(v: np.ndarray, q: Q) -> np.ndarray:
    return np.clip(v, q.qmin, q.qmax).astype(np.int64)


def rne(v: np.ndarray) -> np.ndarray:
    """Round half to even, float -> int64."""
    return np.rint(v).astype(np.int64)


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# -- graph input ----------------------------------------------------------------------------------

def quantize_input(x: np.ndarray, q: Q) -> np.ndarray:
    """``clamp(rne(f32(x * f32(1/scale))) + z)``: float32 reciprocal and product."""
    inv = np.float32(1.0 / q.scale)
    p = x.astype(np.float32) * inv  # float32 array times float32 scalar: a float32 product
    assert p.dtype == np.float32
    return clamp(rne(p) + q.zero_point, q)


# -- fixed point building blocks (gemmlowp / TFLite) ------------------------------------------------

def quantize_multiplier(m: float) -> tuple[int, int]:
    f, e = math.frexp(m)
    q = math.floor(f * 2.0**31 + 0.5)  # round half away from zero of a positive value
    if q == 1 << 31:
        q, e = 1 << 30, e + 1
    if e < -31:
        q, e = 0, 0
    return q, e


def c_div(a: np.ndarray, b: int | np.ndarray) -> np.ndarray:
    """C integer division (truncation toward zero) for b > 0."""
    a = np.asarray(a, dtype=np.int64)
    return np.where(a >= 0, a // b, -((-a) // b))


def srdhm(a: np.ndarray, b: int) -> np.ndarray:
    ab = a.astype(np.int64) * np.int64(b)
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    out = c_div(ab + nudge, 1 << 31)
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, out)


def rdbpot(x: np.ndarray, r: int) -> np.ndarray:
    mask = (1 << r) - 1
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> r) + ((x & mask) > threshold).astype(np.int64)


def mbqm(x: np.ndarray, m: int, e: int) -> np.ndarray:
    left, right = min(max(e, 0), 31), max(-e, 0)
    x1 = np.clip(np.asarray(x, dtype=np.int64) << left, INT32_MIN, INT32_MAX)
    return rdbpot(srdhm(x1, m), right)


# -- conv2d / linear ------------------------------------------------------------------------------

def _weights(model: Model, node: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    name = node["name"]
    w = model.tensors[f"{name}.weight"].astype(np.int64)
    b = model.tensors[f"{name}.bias"].astype(np.int64)
    s = model.tensors[f"{name}.weight_scale"]
    assert s.dtype == np.float32
    s_w = np.broadcast_to(s.astype(np.float64), (w.shape[0],))
    return w, b, s_w


def requantize(acc: np.ndarray, s_in: float, s_w: np.ndarray, out: Q, mode: str) -> np.ndarray:
    """acc (N, O, ...) with the integer bias already added -> output codes."""
    view = (1, -1) + (1,) * (acc.ndim - 2)
    if mode == "float":
        m = np.array([(s_in * float(s)) / out.scale for s in s_w]).reshape(view)
        return clamp(rne(acc.astype(np.float64) * m) + out.zero_point, out)
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise OverflowError("accumulator outside int32")
    y = np.empty_like(acc)
    for o, s in enumerate(s_w):
        m, e = quantize_multiplier((s_in * float(s)) / out.scale)
        y[:, o] = mbqm(acc[:, o], m, e)
    return clamp(y + out.zero_point, out)


def conv2d(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    w, b, s_w = _weights(model, node)
    qi = input_q(node, 0)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (pair(node[k]) for k in ("kernel", "stride", "padding", "dilation"))
    groups = int(node["groups"])
    n, c, h, wd = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=np.int64)
    xp[:, :, ph:ph + h, pw:pw + wd] = x.astype(np.int64) - qi.zero_point
    o_total, cg = w.shape[0], c // groups
    og = o_total // groups
    acc = np.zeros((n, o_total, oh, ow), dtype=np.int64)
    for g in range(groups):
        xg = xp[:, g * cg:(g + 1) * cg]
        wg = w[g * og:(g + 1) * og]
        for u in range(kh):
            for v in range(kw):
                taps = xg[:, :, u * dh:u * dh + (oh - 1) * sh + 1:sh, v * dw:v * dw + (ow - 1) * sw + 1:sw]
                acc[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", taps, wg[:, :, u, v])
    acc += b.reshape(1, -1, 1, 1)
    return requantize(acc, qi.scale, s_w, output_q(node), mode)


def linear(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    w, b, s_w = _weights(model, node)
    qi = input_q(node, 0)
    acc = (x.astype(np.int64) - qi.zero_point) @ w.T + b
    return requantize(acc, qi.scale, s_w, output_q(node), mode)


# -- add ------------------------------------------------------------------------------------------

def add(model: Model, node: dict[str, Any], a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    qa, qb, out = input_q(node, 0), input_q(node, 1), output_q(node)
    da, db = a.astype(np.int64) - qa.zero_point, b.astype(np.int64) - qb.zero_point
    if mode == "float":
        y = da.astype(np.float64) * (qa.scale / out.scale) + db.astype(np.float64) * (qb.scale / out.scale)
        return clamp(rne(y) + out.zero_point, out)
    widest = max(abs(v - q.zero_point) for q in (qa, qb) for v in (q.qmin, q.qmax))
    left_shift = min(20, 31 - widest.bit_length())
    twice_max = 2 * max(qa.scale, qb.scale)
    sa = mbqm(da << left_shift, *quantize_multiplier(qa.scale / twice_max))
    sb = mbqm(db << left_shift, *quantize_multiplier(qb.scale / twice_max))
    y = mbqm(sa + sb, *quantize_multiplier(twice_max / ((1 << left_shift) * out.scale)))
    return clamp(y + out.zero_point, out)


# -- clamp, pools, flatten, reshape ---------------------------------------------------------------

def clamp_op(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    return clamp(x, output_q(node))


def pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out




def maxpool2d(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (pair(node["kernel"]), pair(node["stride"]), pair(node["padding"]),
                                              pair(node["dilation"]))
    n, c, h, w = x.shape
    oh = pool_output_size(h, kh, sh, ph, dh, node["ceil_mode"])
    ow = pool_output_size(w, kw, sw, pw, dw, node["ceil_mode"])
    out = np.empty((n, c, oh, ow), dtype=np.int64)
    for i in range(oh):
        rows = [r for r in (i * sh - ph + u * dh for u in range(kh)) if 0 <= r < h]
        for j in range(ow):
            cols = [q for q in (j * sw - pw + v * dw for v in range(kw)) if 0 <= q < w]
            out[:, :, i, j] = x[:, :, rows][:, :, :, cols].max(axis=(2, 3))
    return out


def average(s: np.ndarray, d: np.ndarray, qi: Q, out: Q, mode: str) -> np.ndarray:
    """Window sums S of (x - z_in) and divisors D -> codes."""
    if mode == "float":
        return clamp(rne(s.astype(np.float64) * (qi.scale / out.scale) / d.astype(np.float64)) + out.zero_point, out)
    if qi.scale != out.scale:
        s = mbqm(s, *quantize_multiplier(qi.scale / out.scale))
    t = s + d * out.zero_point
    half = d // 2
    return clamp(np.where(t > 0, c_div(t + half, d), c_div(t - half, d)), out)


def avgpool2d(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = pair(node["kernel"]), pair(node["stride"]), pair(node["padding"])
    n, c, h, w = x.shape
    oh = pool_output_size(h, kh, sh, ph, 1, node["ceil_mode"])
    ow = pool_output_size(w, kw, sw, pw, 1, node["ceil_mode"])
    qi = input_q(node, 0)
    xc = x.astype(np.int64) - qi.zero_point
    sums = np.empty((n, c, oh, ow), dtype=np.int64)
    divisors = np.empty((1, 1, oh, ow), dtype=np.int64)
    for i in range(oh):
        hs = i * sh - ph
        he = min(hs + kh, h + ph)
        for j in range(ow):
            ws = j * sw - pw
            we = min(ws + kw, w + pw)
            r0, r1, c0, c1 = max(hs, 0), min(he, h), max(ws, 0), min(we, w)
            sums[:, :, i, j] = xc[:, :, r0:r1, c0:c1].sum(axis=(2, 3))
            override = node["divisor_override"]
            if override:
                divisors[0, 0, i, j] = int(override)
            elif node["count_include_pad"]:
                divisors[0, 0, i, j] = (he - hs) * (we - ws)
            else:
                divisors[0, 0, i, j] = (r1 - r0) * (c1 - c0)
    return average(sums, divisors, qi, output_q(node), mode)


def adaptive_avgpool2d(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    size = node["output_size"]
    oh, ow = (size, size) if isinstance(size, int) else size
    n, c, h, w = x.shape
    oh, ow = oh or h, ow or w
    qi = input_q(node, 0)
    xc = x.astype(np.int64) - qi.zero_point
    sums = np.empty((n, c, oh, ow), dtype=np.int64)
    divisors = np.empty((1, 1, oh, ow), dtype=np.int64)
    for i in range(oh):
        r0, r1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            c0, c1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            sums[:, :, i, j] = xc[:, :, r0:r1, c0:c1].sum(axis=(2, 3))
            divisors[0, 0, i, j] = (r1 - r0) * (c1 - c0)
    return average(sums, divisors, qi, output_q(node), mode)


def flatten(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    start = int(node["start_dim"])
    return x.reshape(*x.shape[:start], -1)


def reshape(model: Model, node: dict[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    return x.reshape(x.shape[0], *node["shape"])


OPS = {
    "conv2d": conv2d, "linear": linear, "clamp": clamp_op, "maxpool2d": maxpool2d, "avgpool2d": avgpool2d,
    "adaptive_avgpool2d": adaptive_avgpool2d, "flatten": flatten, "reshape": reshape,
}


def run(model: Model, x: np.ndarray, mode: str = "float") -> dict[str, np.ndarray]:
    """Float inputs (N, *input shape) -> every tensor's int64 codes, keyed by name (the input's too)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}")
    values = {model.doc["input"]["name"]: quantize_input(np.asarray(x), model.input_q)}
    for node in model.doc["nodes"]:
        xs = [values[name] for name in node["inputs"]]
        if node["op"] == "add":
            values[node["name"]] = add(model, node, xs[0], xs[1], mode)
        else:
            values[node["name"]] = OPS[node["op"]](model, node, xs[0], mode)
    return values
