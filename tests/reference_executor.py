"""An independent interpreter of photosim's integer model file, written from docs/format.md and
docs/integer-semantics.md alone: numpy int64, one function per op, requant modes ``float``,
``fixedpoint`` and ``pytorch`` (every CPU family; float32 steps as numpy float32 operations, fused
multiply-adds exact; ``mean``, ``table`` and ``l2_normalize`` have no ``pytorch`` rule and raise ``Unsupported``
there, as the engine refuses them).

It imports nothing from photosim: it parses the safetensors header itself and reads the tensors with
``safetensors.numpy``. Being short and literal is the point; it is slow and meant for small tensors.
tests/test_reference_executor.py checks it against the engine node by node.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

MODES = ("float", "fixedpoint", "pytorch")
CPU_FAMILIES = ("avx2", "avx512-vnni", "amx")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
F32 = np.float32


@dataclass(frozen=True)
class Run:
    """What a run depends on besides the file: the mode and, for ``pytorch``, the CPU family, the thread count
    of the PyTorch run being reproduced and its torch version (major, minor)."""

    mode: str = "float"
    cpu: str = "avx512-vnni"
    threads: int = 1
    torch_version: tuple[int, int] = (2, 14)


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


# -- float32 building blocks (pytorch mode) -------------------------------------------------------

def f32(v: Any) -> np.ndarray:
    """Round to float32 (a float64 or integer value, or an array of them)."""
    return np.asarray(v).astype(F32)


def fma_exact(a: float, b: float, c: float) -> np.float32:
    """float32 ``a * b + c`` of three float32 values, from the exact rational value (slow; a cross-check)."""
    v = Fraction(float(F32(a))) * Fraction(float(F32(b))) + Fraction(float(F32(c)))
    f = F32(float(v))  # within one float32 step of the answer
    candidates = [np.nextafter(f, F32(-np.inf)), f, np.nextafter(f, F32(np.inf))]
    return min(candidates, key=lambda x: (abs(Fraction(float(x)) - v), int(np.asarray(x).view(np.uint32)) & 1))


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` computed exactly and rounded to float32 once.

    The product of two float32 values is exact in float64. TwoSum gives the float64 sum ``s`` and its exact
    error; where the error is not zero and ``s`` has an even last bit, ``s`` moves one float64 step toward the
    exact sum (round to odd). A value rounded to odd with 53 bits then rounds correctly to float32's 24."""
    a, b, c = f32(a).astype(np.float64), f32(b).astype(np.float64), f32(c).astype(np.float64)
    p = a * b
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


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
    """acc (N, O, ...) with the integer bias already added -> output codes (float, fixedpoint)."""
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


def pytorch_kernel(model: Model, node: dict[str, Any], r: Run) -> str:
    """Which kernel PyTorch runs a conv2d / linear in: fbgemm, fbgemm-depthwise, onednn-sequential-scales or
    onednn-product-scale."""
    qengine = model.doc.get("provenance", {}).get("qengine", "x86")
    conv = node["op"] == "conv2d"
    if qengine == "onednn" or (qengine == "x86" and conv and r.cpu in ("avx512-vnni", "amx")
                               and int(node["groups"]) <= 100):
        one_per_group = conv and int(node["in_channels"]) == int(node["groups"]) == int(node["out_channels"])
        sequential = r.cpu == "avx512-vnni" or (r.cpu == "amx" and one_per_group)
        return "onednn-sequential-scales" if sequential else "onednn-product-scale"
    if not conv:
        return "fbgemm"
    groups, kernel = int(node["groups"]), pair(node["kernel"])
    kernels = [(3, 3), (5, 5), (7, 7)] if r.torch_version >= (2, 14) else [(3, 3), (5, 5)]
    depthwise = (groups == int(node["in_channels"]) and int(node["out_channels"]) in (groups, 2 * groups)
                 and groups % 8 == 0 and kernel in kernels and all(s in (1, 2) for s in pair(node["stride"]))
                 and pair(node["dilation"]) == (1, 1) and pair(node["padding"]) == ((kernel[0] - 1) // 2,) * 2)
    return "fbgemm-depthwise" if depthwise else "fbgemm"


def saturating_pairs(model: Model, node: dict[str, Any], kernel: str, r: Run) -> bool:
    """Whether the accumulators are FBGEMM's saturating int16 pair sums."""
    if r.mode != "pytorch" or node["input_signed"][0]:
        return False
    return kernel == "fbgemm-depthwise" or (kernel == "fbgemm" and r.cpu == "avx2")


def pair_sums(x: np.ndarray, w: np.ndarray, z_in: int) -> np.ndarray:
    """``sum over pairs sat16(x_a w_a + x_b w_b) - z_in * sum(w)``: raw codes x (M, K), weights (O, K) ->
    (M, O); indices pair as (0, 1), (2, 3), ..., an odd last index alone (a zero partner)."""
    k = x.shape[1]
    if k % 2:
        x, w = np.pad(x, ((0, 0), (0, 1))), np.pad(w, ((0, 0), (0, 1)))
    products = x[:, None, :] * w[None, :, :]  # (M, O, K)
    sums = products[:, :, 0::2] + products[:, :, 1::2]
    return np.clip(sums, -32768, 32767).sum(axis=2) - z_in * w.sum(axis=1)[None, :]


def pytorch_requantize(model: Model, node: dict[str, Any], acc: np.ndarray, kernel: str, r: Run) -> np.ndarray:
    """Accumulators (N, O, ...) without the integer bias -> codes, PyTorch's float32 formulas."""
    name, qi, out = node["name"], input_q(node, 0), output_q(node)
    w, b, s_w64 = _weights(model, node)
    view = (1, -1) + (1,) * (acc.ndim - 2)
    s_w = f32(s_w64).reshape(view)
    if f"{name}.bias_float" in model.tensors:
        bias = model.tensors[f"{name}.bias_float"]
        assert bias.dtype == np.float32
    else:
        bias = f32((b.astype(np.float64) * qi.scale) * s_w64)
    bias = bias.reshape(view)
    x = acc.astype(F32)
    one = F32(1.0)
    if kernel.startswith("onednn"):
        src = one / f32(1.0 / qi.scale)
        dst = one / f32(1.0 / out.scale)
        x = (x * src) * s_w if kernel == "onednn-sequential-scales" else x * (src * s_w)
        x = x + bias
        x = x * (one / dst) + F32(out.zero_point)
        assert x.dtype == F32
        return clamp(rne(x), out)
    ats = f32(qi.scale) * s_w
    m = ats / f32(out.scale)
    per_channel = model.tensors[f"{name}.weight_scale"].ndim == 1
    if per_channel:
        x = x + bias / ats
    elif kernel == "fbgemm-depthwise" and r.torch_version >= (2, 14):
        x = x + bias * (one / ats)
    else:
        x = fma(bias, one / ats, x)
    y = x * m
    assert y.dtype == F32
    return clamp(rne(y) + out.zero_point, out)


def _conv_patches(x: np.ndarray, fill: int, node: dict[str, Any]) -> tuple[np.ndarray, int, int]:
    """x (N, C, H, W) padded with ``fill`` -> patches (N, OH, OW, kh, kw, C), OH, OW."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (pair(node[k]) for k in ("kernel", "stride", "padding", "dilation"))
    n, c, h, wd = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.full((n, c, h + 2 * ph, wd + 2 * pw), fill, dtype=np.int64)
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    patches = np.empty((n, oh, ow, kh, kw, c), dtype=np.int64)
    for u in range(kh):
        for v in range(kw):
            taps = xp[:, :, u * dh:u * dh + (oh - 1) * sh + 1:sh, v * dw:v * dw + (ow - 1) * sw + 1:sw]
            patches[:, :, :, u, v, :] = taps.transpose(0, 2, 3, 1)
    return patches, oh, ow


def conv2d(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    w, b, s_w = _weights(model, node)
    qi = input_q(node, 0)
    groups = int(node["groups"])
    n, c = x.shape[:2]
    o_total, cg = w.shape[0], c // groups
    og = o_total // groups
    kernel = pytorch_kernel(model, node, r) if r.mode == "pytorch" else ""
    saturating = saturating_pairs(model, node, kernel, r)
    # raw codes padded with z_in (FBGEMM's pair sums), or centred codes padded with 0 (the exact sum)
    patches, oh, ow = (_conv_patches(x.astype(np.int64), qi.zero_point, node) if saturating
                       else _conv_patches(x.astype(np.int64) - qi.zero_point, 0, node))
    acc = np.zeros((n, oh, ow, o_total), dtype=np.int64)
    for g in range(groups):
        cols = patches[..., g * cg:(g + 1) * cg].reshape(n * oh * ow, -1)  # index (u, v, c), c fastest
        wg = w[g * og:(g + 1) * og].transpose(0, 2, 3, 1).reshape(og, -1)  # the same order
        part = pair_sums(cols, wg, qi.zero_point) if saturating else cols @ wg.T
        acc[..., g * og:(g + 1) * og] = part.reshape(n, oh, ow, og)
    acc = acc.transpose(0, 3, 1, 2)
    if r.mode == "pytorch":
        return pytorch_requantize(model, node, acc, kernel, r)
    return requantize(acc + b.reshape(1, -1, 1, 1), qi.scale, s_w, output_q(node), r.mode)


def linear(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    w, b, s_w = _weights(model, node)
    qi = input_q(node, 0)
    if r.mode == "pytorch":
        kernel = pytorch_kernel(model, node, r)
        if saturating_pairs(model, node, kernel, r):
            acc = pair_sums(x.astype(np.int64), w, qi.zero_point)
        else:
            acc = (x.astype(np.int64) - qi.zero_point) @ w.T
        return pytorch_requantize(model, node, acc, kernel, r)
    acc = (x.astype(np.int64) - qi.zero_point) @ w.T + b
    return requantize(acc, qi.scale, s_w, output_q(node), r.mode)


# -- add ------------------------------------------------------------------------------------------

def vectorised(shape: tuple[int, ...], threads: int) -> np.ndarray:
    """Which elements quantized::add computes in its vectorised body (bool, ``shape``)."""
    numel = math.prod(shape)
    if len(shape) == 4:  # memory order NHWC: index[n, c, h, w] = position in memory
        n, c, h, w = shape
        index = np.arange(numel).reshape(n, h, w, c).transpose(0, 3, 1, 2)
    else:
        index = np.arange(numel).reshape(shape)
    parts = max(1, min(threads, -(-numel // 32768)))
    chunk = -(-numel // parts)
    start = index // chunk * chunk
    length = np.minimum(start + chunk, numel) - start
    return index - start < length // 64 * 64


def add(model: Model, node: dict[str, Any], a: np.ndarray, b: np.ndarray, r: Run) -> np.ndarray:
    qa, qb, out = input_q(node, 0), input_q(node, 1), output_q(node)
    da, db = a.astype(np.int64) - qa.zero_point, b.astype(np.int64) - qb.zero_point
    if r.mode == "float":
        y = da.astype(np.float64) * (qa.scale / out.scale) + db.astype(np.float64) * (qb.scale / out.scale)
        return clamp(rne(y) + out.zero_point, out)
    if r.mode == "pytorch":
        body = np.broadcast_to(vectorised((1, *a.shape[1:]), r.threads), a.shape)  # each sample alone (the docs)

        def dequantize(codes: np.ndarray, centred: np.ndarray, q: Q) -> np.ndarray:
            s = f32(q.scale)
            return np.where(body, fma(s, f32(codes), s * f32(-q.zero_point)), s * f32(centred))

        c = dequantize(a, da, qa) + dequantize(b, db, qb)
        y = c * (F32(1.0) / f32(out.scale))
        assert y.dtype == F32
        return clamp(rne(y) + out.zero_point, out)
    widest = max(abs(v - q.zero_point) for q in (qa, qb) for v in (q.qmin, q.qmax))
    left_shift = min(20, 31 - widest.bit_length())
    twice_max = 2 * max(qa.scale, qb.scale)
    sa = mbqm(da << left_shift, *quantize_multiplier(qa.scale / twice_max))
    sb = mbqm(db << left_shift, *quantize_multiplier(qb.scale / twice_max))
    y = mbqm(sa + sb, *quantize_multiplier(twice_max / ((1 << left_shift) * out.scale)))
    return clamp(y + out.zero_point, out)


# -- clamp, pools, flatten, reshape ---------------------------------------------------------------

def clamp_op(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    return clamp(x, output_q(node))


def pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out




def maxpool2d(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
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
    if mode == "pytorch":
        m = (f32(qi.scale) / f32(out.scale)) / f32(d)
        y = f32(s) * m
        assert y.dtype == F32
        return clamp(rne(y) + out.zero_point, out)
    if qi.scale != out.scale:
        s = mbqm(s, *quantize_multiplier(qi.scale / out.scale))
    t = s + d * out.zero_point
    half = d // 2
    return clamp(np.where(t > 0, c_div(t + half, d), c_div(t - half, d)), out)


def avgpool2d(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
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
    return average(sums, divisors, qi, output_q(node), r.mode)


def adaptive_avgpool2d(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
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
    return average(sums, divisors, qi, output_q(node), r.mode)


def flatten(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    start = int(node["start_dim"])
    return x.reshape(*x.shape[:start], -1)


def reshape(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    return x.reshape(x.shape[0], *node["shape"])


# -- concat, mul, mean -----------------------------------------------------------------------------

def requant_scalar(v: np.ndarray, m_real: float, out: Q, mode: str) -> np.ndarray:
    """Exact integers ``v`` times one real multiplier -> output codes: ``rne(f64(v * m_real))`` (float) or
    MultiplyByQuantizedMultiplier (fixedpoint), then ``+ z_out`` and the output clamp."""
    if mode == "float":
        return clamp(rne(v.astype(np.float64) * m_real) + out.zero_point, out)
    return clamp(mbqm(v, *quantize_multiplier(m_real)) + out.zero_point, out)


def pytorch_cat_input(x: np.ndarray, qi: Q, out: Q) -> np.ndarray:
    """One input of PyTorch's quantized cat: a 4-D input at the output's quantization is copied; else channel
    ``c`` of ``C`` (4-D) is in the vectorised body when ``c < floor(C / 8) * 8``; other ranks are all tail."""
    if x.ndim == 4 and (qi.scale, qi.zero_point) == (out.scale, out.zero_point):
        return x.astype(np.int64)
    body = np.zeros(x.shape, dtype=bool)
    if x.ndim == 4:
        body[:, : x.shape[1] // 8 * 8] = True
    s = f32(qi.scale)
    d_body = fma(s, f32(x), s * f32(-qi.zero_point))
    d_tail = s * f32(x.astype(np.int64) - qi.zero_point)
    y = np.where(body, d_body * f32(1.0 / out.scale), d_tail * (F32(1.0) / f32(out.scale)))
    return clamp(rne(y) + out.zero_point, out)


def concat(model: Model, node: dict[str, Any], xs: list[np.ndarray], r: Run) -> np.ndarray:
    """Each input rescaled to the output quantization, then concatenated along ``dim`` (batch = 0)."""
    out = output_q(node)
    parts = []
    for i, x in enumerate(xs):
        qi = input_q(node, i)
        if r.mode == "pytorch":
            parts.append(pytorch_cat_input(x, qi, out))
        else:
            parts.append(requant_scalar(x.astype(np.int64) - qi.zero_point, qi.scale / out.scale, out, r.mode))
    return np.concatenate(parts, axis=int(node["dim"]))


def broadcast_per_sample(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy broadcasting of the per-sample shapes: the batch stays first, the shorter per-sample shape gets
    leading 1s after it."""
    rank = max(a.ndim, b.ndim)
    a = a.reshape(a.shape[0], *(1,) * (rank - a.ndim), *a.shape[1:])
    b = b.reshape(b.shape[0], *(1,) * (rank - b.ndim), *b.shape[1:])
    return a, b


def mul(model: Model, node: dict[str, Any], xs: list[np.ndarray], r: Run) -> np.ndarray:
    qa, qb, out = input_q(node, 0), input_q(node, 1), output_q(node)
    a, b = broadcast_per_sample(xs[0].astype(np.int64) - qa.zero_point, xs[1].astype(np.int64) - qb.zero_point)
    p = a * b  # exact int64
    if r.mode == "fixedpoint" and p.size and (p.min() < INT32_MIN or p.max() > INT32_MAX):
        raise OverflowError("product outside int32")
    if r.mode == "pytorch":
        m = (f32(qa.scale) * f32(qb.scale)) * (F32(1.0) / f32(out.scale))
        return clamp(rne(f32(p) * m) + out.zero_point, out)
    return requant_scalar(p, (qa.scale * qb.scale) / out.scale, out, r.mode)


def mean(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    """S = sum of (x - z_in) over ``dims`` (batch = 0), D = the number of elements summed; then as the
    average pools."""
    dims = tuple(int(d) for d in node["dims"])
    qi = input_q(node, 0)
    s = (x.astype(np.int64) - qi.zero_point).sum(axis=dims, keepdims=bool(node["keepdim"]))
    d = np.full((1,) * s.ndim, math.prod(x.shape[k] for k in dims), dtype=np.int64)
    return average(s, d, qi, output_q(node), r.mode)


# -- permute, slice, roll, table -------------------------------------------------------------------

def permute(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    dims = [int(d) for d in node["dims"]]
    assert dims[0] == 0 and sorted(dims) == list(range(x.ndim))
    return x.transpose(dims)


def slice_op(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    dim, start, stop = int(node["dim"]), int(node["start"]), int(node["stop"])
    assert dim >= 1 and 0 <= start < stop <= x.shape[dim]
    return np.take(x, np.arange(start, stop), axis=dim)


def roll(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    """``y[..., i, ...] = x[..., (i - shift) mod n, ...]`` along dimension ``dim`` (>= 1) of size n."""
    dim, shift = int(node["dim"]), int(node["shift"])
    assert dim >= 1 and shift >= 0
    n = x.shape[dim]
    return np.take(x, (np.arange(n) - shift) % n, axis=dim)


def pad(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    """``before`` and ``after`` codes clamp(z_in, qmin, qmax) (float 0) around dimension ``dim`` (>= 1)."""
    dim, qi = int(node["dim"]), input_q(node, 0)
    widths = [(0, 0)] * x.ndim
    widths[dim] = (int(node["before"]), int(node["after"]))
    return np.pad(x, widths, constant_values=min(max(qi.zero_point, qi.qmin), qi.qmax))


def l2_normalize(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    """d = x - z_in; V = sum d^2 over the last dimension (int64); y = f64(d) / max(sqrt(f64(V)), f64(eps / s_in));
    q = clamp(rne(y / s_out) + z_out)."""
    qi, out = input_q(node, 0), output_q(node)
    d = x.astype(np.int64) - qi.zero_point
    norm = np.maximum(np.sqrt((d * d).sum(-1, keepdims=True).astype(np.float64)), float(node["eps"]) / qi.scale)
    return clamp(rne(d.astype(np.float64) / norm / out.scale) + out.zero_point, out)


def table(model: Model, node: dict[str, Any], x: np.ndarray, r: Run) -> np.ndarray:
    """``q = table[x - lo]``, lo the lowest storage code of the input (0, or -2^(bits-1) signed)."""
    bits, signed = int(node["input_bits"][0]), bool(node["input_signed"][0])
    t = model.tensors[f"{node['name']}.table"]
    assert t.dtype == np.int32 and t.shape == (1 << bits,)
    lo = -(1 << (bits - 1)) if signed else 0
    return t.astype(np.int64)[x.astype(np.int64) - lo]


OPS = {
    "conv2d": conv2d, "linear": linear, "clamp": clamp_op, "maxpool2d": maxpool2d, "avgpool2d": avgpool2d,
    "adaptive_avgpool2d": adaptive_avgpool2d, "flatten": flatten, "reshape": reshape, "mean": mean,
    "permute": permute, "slice": slice_op, "roll": roll, "pad": pad,
    "l2_normalize": l2_normalize, "table": table,
}
MULTI_INPUT_OPS = {"add": lambda model, node, xs, r: add(model, node, xs[0], xs[1], r), "concat": concat, "mul": mul}
NO_PYTORCH_RULE = ("mean", "table", "l2_normalize")  # the pytorch mode refuses these (integer-semantics.md)


class Unsupported(ValueError):
    """An op the requested mode does not define (the engine refuses the model)."""


def run(model: Model, x: np.ndarray, mode: str = "float", *, cpu: str = "avx512-vnni", threads: int = 1,
        torch_version: tuple[int, int] = (2, 14)) -> dict[str, np.ndarray]:
    """Float inputs (N, *input shape) -> every tensor's int64 codes, keyed by name (the input's too).

    ``cpu``, ``threads`` and ``torch_version`` matter to the ``pytorch`` mode only: the CPU family, the
    ``torch.get_num_threads()`` and the torch (major, minor) of the PyTorch run being reproduced."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}")
    if cpu not in CPU_FAMILIES:
        raise ValueError(f"cpu {cpu!r}")
    r = Run(mode, cpu, threads, tuple(torch_version))
    values = {model.doc["input"]["name"]: quantize_input(np.asarray(x), model.input_q)}
    for node in model.doc["nodes"]:
        if mode == "pytorch" and node["op"] in NO_PYTORCH_RULE:
            raise Unsupported(f"node {node['name']!r}: {node['op']} has no pytorch-mode rule")
        widest = max([*node["input_bits"], node["output_bits"], node.get("w_bits") or 0])
        if mode == "pytorch" and widest > 8:
            raise Unsupported(f"node {node['name']!r}: {widest}-bit codes; PyTorch's kernels take at most 8 bits")
        xs = [values[name] for name in node["inputs"]]
        if node["op"] in MULTI_INPUT_OPS:
            values[node["name"]] = MULTI_INPUT_OPS[node["op"]](model, node, xs, r)
        else:
            assert len(xs) == 1, node["name"]
            values[node["name"]] = OPS[node["op"]](model, node, xs[0], r)
    return values
