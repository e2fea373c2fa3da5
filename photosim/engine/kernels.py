"""Pure integer kernels: exact conv2d / linear accumulators and pooling on activation codes.

No modules and no graph: functions of tensors. Conv and linear build operands ``x - z_in`` (padding
contributes 0) and send them through :func:`matmul_exact`, the one place where integer dot products
are formed. Its floating-point paths are exact because every partial sum stays below the float
mantissa limit (the worst-case bound ``K * Xmax * Wmax``, split over K where needed).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from photosim.ir.ops import conv_output_size
from photosim.ir.ranges import int_range, max_magnitude

MatmulPath = Literal["int_mm", "float32", "float64", "int64"]
MATMUL_PATHS: tuple[MatmulPath, ...] = ("int_mm", "float32", "float64", "int64")
_MANTISSA_BITS = {"float32": 24, "float64": 53}
_OPERAND_DTYPES = {"int_mm": torch.int8, "float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
# A float32 plan whose K chunks would be shorter than this is slower than one float64 matmul.
MIN_FLOAT32_CHUNK = 64
INT8_MIN, INT8_MAX = int_range(8)
# torch._int_mm on CUDA: rows > 16, inner and output sizes multiples of 8.
CUDA_INT_MM_MIN_ROWS, _CUDA_INT_MM_MULTIPLE = 17, 8

IntPair = tuple[int, int]


def pair(v: int | list[int] | tuple[int, ...]) -> IntPair:
    """``3`` or ``[3, 3]`` -> ``(3, 3)`` (pooling and conv attributes come in both forms)."""
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


@dataclass(frozen=True)
class MatmulPlan:
    """How one layer forms exact dot products.

    ``int_mm``: int8 operands ``(x - z_in) - offset`` (the offset moves an unsigned range into int8),
    int32 results, ``offset * column sums`` added back. ``float32`` / ``float64``: K split into chunks
    of ``chunk`` terms whose partial sums stay exact, chunk results summed exactly. ``int64``: integer
    GEMM, CPU only (CUDA has none); never chosen automatically since chunked float64 is always exact.
    """

    path: MatmulPath
    chunk: int
    offset: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """Operand dtype of the matmul."""
        return _OPERAND_DTYPES[self.path]


def worst_case_bound(k: int, x_range: IntPair, w_bits: int) -> int:
    """``K * Xmax * Wmax``: the largest |partial sum| a K-term dot product can reach."""
    return k * max(-x_range[0], x_range[1], 0) * max_magnitude(w_bits)


def _float_chunk(path: str, x_range: IntPair, w_bits: int, k: int) -> int:
    """Most K terms per float matmul with every partial sum exactly representable (0 if none)."""
    per_term = worst_case_bound(1, x_range, w_bits)
    return k if per_term == 0 else min(k, (1 << _MANTISSA_BITS[path]) // per_term)


def _int_mm_offset(x_range: IntPair) -> int | None:
    """Shift that moves centred operands (and the 0 of padding) into int8, or None if they span > 256."""
    lo, hi = min(x_range[0], 0), max(x_range[1], 0)
    if hi - lo > INT8_MAX - INT8_MIN:
        return None
    return 0 if lo >= INT8_MIN and hi <= INT8_MAX else lo - INT8_MIN


def _float32_matmul_is_ieee(device: torch.device) -> bool:
    """False when the user allowed TF32 / bf16 for float32 matmuls (they would lose exactness)."""
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    precision = getattr(backend, "fp32_precision", None)
    if precision is None:  # torch without the per-backend precision API
        return torch.get_float32_matmul_precision() == "highest"
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision in ("none", "ieee")


@functools.cache
def int_mm_is_faster(device_type: str) -> bool:
    """Whether ``torch._int_mm`` beats a float32 matmul here (measured once per process on CPU).

    CPUs without VNNI run int8 GEMM 10-20x slower than float32; GPUs have int8 tensor cores.
    """
    if device_type == "cuda":
        return True
    a = torch.randint(INT8_MIN, INT8_MAX + 1, (2048, 256), dtype=torch.int8)  # large enough to beat timer noise
    b = torch.randint(INT8_MIN, INT8_MAX + 1, (256, 64), dtype=torch.int8)
    af, bf = a.float(), b.float()

    def best_time(fn: Callable[[], torch.Tensor]) -> float:
        times = []
        for _ in range(5):
            start = time.process_time()  # CPU time: robust to the process being descheduled on a busy machine
            fn()
            times.append(time.process_time() - start)
        return min(times)

    return best_time(lambda: torch._int_mm(a, b)) < 0.8 * best_time(lambda: af @ bf)


def plan_matmul(k: int, x_range: IntPair, w_bits: int, *, groups: int = 1, device: torch.device | str = "cpu",
                force: MatmulPath | None = None) -> MatmulPlan:
    """Pick the fastest exact matmul for K-term dot products of operands in ``x_range`` and ``w_bits`` weights.

    ``x_range`` is the range of ``x - z_in`` the input clamp allows. Order of preference: ``int_mm``
    (int8 operands, one group, where it is faster), ``float32`` (chunks of at least MIN_FLOAT32_CHUNK
    terms), ``float64``. ``force`` picks a path and raises ValueError when it cannot be exact.
    """
    device = torch.device(device)
    offset = _int_mm_offset(x_range)
    int_mm_ok = (offset is not None and w_bits <= 8 and groups == 1
                 and k * (-INT8_MIN) ** 2 < 2**31  # int32 results of int8 x int8 products
                 and k > 1)  # torch._int_mm misreads a (1, O) matrix, whose strides are (1, 1)
    chunks = {path: _float_chunk(path, x_range, w_bits, k) for path in _MANTISSA_BITS}
    if force is None:
        if int_mm_ok and int_mm_is_faster(device.type):
            force = "int_mm"
        elif chunks["float32"] >= min(k, MIN_FLOAT32_CHUNK) and _float32_matmul_is_ieee(device):
            force = "float32"
        else:
            force = "float64"
    if force == "int_mm" and int_mm_ok:
        return MatmulPlan("int_mm", k, offset or 0)
    if force in chunks and chunks[force] > 0:
        return MatmulPlan(force, chunks[force])
    if force == "int64" and device.type == "cpu":
        return MatmulPlan("int64", k)
    raise ValueError(f"matmul path {force!r} cannot be exact for K={k}, x in {x_range}, {w_bits}-bit weights, "
                     f"{groups} groups on {device}")


@dataclass(frozen=True)
class IntegerWeights:
    """Weights laid out for :func:`matmul_exact` on one device.

    ``matrix`` is (G, K, O/G) in the plan's dtype (for ``int_mm`` column-major, and on CUDA K and O
    padded with zeros to multiples of 8); ``correction`` (1, 1, O/G) int64 is ``offset * column sums``
    (int_mm only).
    """

    plan: MatmulPlan
    matrix: torch.Tensor
    correction: torch.Tensor | None
    k: int
    out_per_group: int


def prepare_weights(weight: torch.Tensor, groups: int, plan: MatmulPlan,
                    device: torch.device | str = "cpu") -> IntegerWeights:
    """Integer weights (O, in/groups, *kernel) -> :class:`IntegerWeights` for ``plan`` on ``device``.

    Conv weights get K ordered (kh, kw, C/G) to match :func:`conv2d_patches`.
    """
    og = weight.shape[0] // groups
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1)  # (O, kh, kw, C/G)
    w = weight.to(device=device, dtype=torch.int64).reshape(groups, og, -1).transpose(1, 2)  # (G, K, O/G)
    k = w.shape[1]
    if plan.path != "int_mm":
        return IntegerWeights(plan, w.to(plan.dtype).contiguous(), None, k, og)
    correction = plan.offset * w.sum(dim=1, keepdim=True)  # (1, 1, O) int64
    if w.device.type == "cuda":
        w = F.pad(w, (0, -og % _CUDA_INT_MM_MULTIPLE, 0, -k % _CUDA_INT_MM_MULTIPLE))
    # Column-major (K, O): the layout cuBLASLt's int8 GEMM expects, and 1.5-2x faster in oneDNN on CPU.
    matrix = w.to(plan.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    return IntegerWeights(plan, matrix, correction, k, og)


def _int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch._int_mm of (M, K) int8 by (K', O') int8, zero-padding to the CUDA shape rules -> (M, O') int32."""
    m, k = a.shape
    if a.device.type == "cuda":
        a = F.pad(a, (0, w.shape[0] - k, 0, max(0, CUDA_INT_MM_MIN_ROWS - m)))
    return torch._int_mm(a, w)[:m]


def matmul_exact(a: torch.Tensor, w: IntegerWeights) -> torch.Tensor:
    """Exact dot products ``sum_k (a + offset) * w``: operands (G, M, K) -> int64 (G, M, O/G).

    ``a`` holds ``x - z_in - plan.offset`` in ``plan.dtype``. This is the single place conv and
    linear form dot products, so that a hardware model can replace it.
    """
    plan = w.plan
    if plan.path == "int_mm":
        acc = _int_mm(a[0], w.matrix[0])[:, : w.out_per_group].unsqueeze(0).to(torch.int64)  # (1, M, O)
        return acc + w.correction
    if plan.path == "int64":
        return torch.bmm(a, w.matrix)
    parts = (torch.bmm(a[:, :, start : start + plan.chunk], w.matrix[:, start : start + plan.chunk])
             for start in range(0, w.k, plan.chunk))
    acc = next(parts).to(torch.int64 if plan.path == "float64" else torch.float64)
    for part in parts:  # float32 chunks add up exactly in float64 (K * 2^24 < 2^53), float64 ones in int64
        acc.add_(part.to(acc.dtype) if plan.path == "float64" else part)
    return acc.to(torch.int64)


def centred(x: torch.Tensor, z_in: int, plan: MatmulPlan) -> torch.Tensor:
    """Codes -> matmul operands ``x - z_in - plan.offset`` in the plan's dtype (exact)."""
    return (x.to(torch.int32) - (z_in + plan.offset)).to(plan.dtype)


def _windows(x: torch.Tensor, kernel: IntPair, stride: IntPair, dilation: IntPair,
             dims: IntPair = (2, 3)) -> torch.Tensor:
    """Padded tensor with spatial ``dims`` -> view of its sliding windows, (kh, kw) appended as last dims."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    win = x.unfold(dims[0], dh * (kh - 1) + 1, sh).unfold(dims[1], dw * (kw - 1) + 1, sw)
    return win[..., ::dh, ::dw]


def conv2d_patches(x: torch.Tensor, z_in: int, plan: MatmulPlan, kernel: IntPair, stride: IntPair,
                   padding: IntPair, dilation: IntPair, groups: int) -> torch.Tensor:
    """Integer im2col: codes (N, C, H, W) -> operands (G, N*OH*OW, kh*kw*C/G) in ``plan.dtype``.

    K is ordered (kh, kw, C/G), as :func:`prepare_weights` lays out conv weights: gathering from a
    channels-last copy moves contiguous runs of channels. The zero point is subtracted before
    padding, so pads contribute exactly 0 (``-offset`` in the shifted int8 domain of ``int_mm``).
    """
    n, c = x.shape[:2]
    ph, pw = padding
    xc = F.pad(centred(x.permute(0, 2, 3, 1), z_in, plan), (0, 0, pw, pw, ph, ph), value=-plan.offset)  # NHWC
    win = _windows(xc, kernel, stride, dilation, dims=(1, 2))  # (N, OH, OW, C, kh, kw)
    oh, ow = win.shape[1:3]
    win = win.unflatten(3, (groups, c // groups)).permute(3, 0, 1, 2, 5, 6, 4)  # (G, N, OH, OW, kh, kw, C/G)
    return win.reshape(groups, n * oh * ow, kernel[0] * kernel[1] * (c // groups))


# Upper bound on the bytes of one im2col block; larger batches are processed in sub-batches.
PATCH_BYTES = 1 << 28


def conv2d_acc(x: torch.Tensor, z_in: int, weights: IntegerWeights, kernel: IntPair, stride: IntPair,
               padding: IntPair, dilation: IntPair, groups: int) -> torch.Tensor:
    """Exact conv2d accumulators ``sum (x - z_in) * w`` (no bias): codes (N, C, H, W) -> int64 (N, O, OH, OW)."""
    n, _, h, w = x.shape
    oh, ow = (conv_output_size(s, k, st, p, d) for s, k, st, p, d in zip((h, w), kernel, stride, padding, dilation))
    per_sample = oh * ow * weights.k * groups * weights.matrix.element_size()
    step = max(1, PATCH_BYTES // max(per_sample, 1))
    outs = []
    for start in range(0, max(n, 1), step):  # an empty batch still gives an (0, O, OH, OW) result
        patches = conv2d_patches(x[start : start + step], z_in, weights.plan, kernel, stride, padding, dilation,
                                 groups)
        acc = matmul_exact(patches, weights)  # (G, n*OH*OW, O/G)
        acc = acc.view(groups, -1, oh, ow, weights.out_per_group).permute(1, 0, 4, 2, 3)  # (n, G, O/G, OH, OW)
        outs.append(acc.reshape(acc.shape[0], groups * weights.out_per_group, oh, ow))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@functools.lru_cache(maxsize=1024)
def device_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor made once per device: a kernel's parameters without a host-to-device copy (which
    waits for the GPU) in every batch. Callers must not write to it."""
    return torch.tensor(values, dtype=dtype, device=device)


def linear_acc(x: torch.Tensor, z_in: int, weights: IntegerWeights) -> torch.Tensor:
    """Exact linear accumulators ``sum (x - z_in) * w`` (no bias): codes (N, K) -> int64 (N, O)."""
    return matmul_exact(centred(x, z_in, weights.plan).unsqueeze(0), weights)[0]


def max_pool2d(x: torch.Tensor, kernel: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair,
               ceil_mode: bool) -> torch.Tensor:
    """Max of codes over PyTorch's max_pool2d windows; padding (the dtype minimum) never wins."""
    h, w = x.shape[2:]
    oh, ow = (conv_output_size(s, k, st, p, d, ceil_mode)
              for s, k, st, p, d in zip((h, w), kernel, stride, padding, dilation))
    # Extra right/bottom padding so ceil_mode's last window is complete.
    extra_h = max(0, (oh - 1) * stride[0] + dilation[0] * (kernel[0] - 1) + 1 - (h + 2 * padding[0]))
    extra_w = max(0, (ow - 1) * stride[1] + dilation[1] * (kernel[1] - 1) + 1 - (w + 2 * padding[1]))
    lowest = torch.iinfo(x.dtype).min
    xp = F.pad(x, (padding[1], padding[1] + extra_w, padding[0], padding[0] + extra_h), value=lowest)
    return _windows(xp, kernel, stride, dilation).amax(dim=(-2, -1))[:, :, :oh, :ow]


def _window_matrix(bounds: tuple[torch.Tensor, torch.Tensor], size: int) -> torch.Tensor:
    """(out, size) float64 0/1 matrix whose row i marks the window [start_i, end_i) of one axis."""
    start, end = bounds
    i = torch.arange(size, device=start.device)
    return ((i >= start[:, None]) & (i < end[:, None])).to(torch.float64)


def _window_sums(x: torch.Tensor, z_in: int, h_bounds: tuple[torch.Tensor, torch.Tensor],
                 w_bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Sums of ``x - z_in`` over windows [hs, he) x [ws, we) -> int64 (N, C, OH, OW).

    Two float64 matmuls with the axes' 0/1 window matrices: exact, as every partial sum of codes under 2^17 over
    fewer than 2^36 elements stays below 2^53; no cumulative sum (a scan, slow on GPUs) and no int64 temporaries.
    """
    rows = _window_matrix(h_bounds, x.shape[2])  # (OH, H)
    cols = _window_matrix(w_bounds, x.shape[3])  # (OW, W)
    centred_x = x.to(torch.float64) - z_in
    return (rows @ (centred_x @ cols.T)).to(torch.int64)


def _avg_bounds(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """avg_pool2d windows along one axis: clipped input bounds and the padded window length (PyTorch)."""
    out = conv_output_size(size, kernel, stride, padding, 1, ceil_mode)
    start = torch.arange(out, device=device) * stride - padding
    end = (start + kernel).clamp(max=size + padding)
    return start.clamp(min=0), end.clamp(max=size), end - start


def avg_pool2d_sums(x: torch.Tensor, z_in: int, kernel: IntPair, stride: IntPair, padding: IntPair,
                    ceil_mode: bool, count_include_pad: bool,
                    divisor_override: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """avg_pool2d on codes: window sums of ``x - z_in`` (N, C, OH, OW) int64 and divisors (1, 1, OH, OW).

    Divisors follow PyTorch: ``divisor_override``, else the window size including padding (but not
    ceil_mode's overhang) when ``count_include_pad``, else the number of input elements.
    """
    h, w = x.shape[2:]
    hs, he, h_len = _avg_bounds(h, kernel[0], stride[0], padding[0], ceil_mode, x.device)
    ws, we, w_len = _avg_bounds(w, kernel[1], stride[1], padding[1], ceil_mode, x.device)
    sums = _window_sums(x, z_in, (hs, he), (ws, we))
    if divisor_override:
        counts = torch.full((len(hs), len(ws)), int(divisor_override), device=x.device)
    elif count_include_pad:
        counts = h_len[:, None] * w_len[None, :]
    else:
        counts = (he - hs)[:, None] * (we - ws)[None, :]
    return sums, counts.view(1, 1, *counts.shape)


def _adaptive_bounds(size: int, out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pooling windows: start = floor(i*size/out), end = ceil((i+1)*size/out)."""
    i = torch.arange(out, device=device)
    return (i * size) // out, ((i + 1) * size + out - 1) // out


def adaptive_avg_pool2d_sums(x: torch.Tensor, z_in: int,
                             output_size: tuple[int | None, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """adaptive_avg_pool2d on codes: window sums of ``x - z_in`` (N, C, OH, OW) and sizes (1, 1, OH, OW).

    A None output size keeps that input dimension, as in PyTorch.
    """
    h, w = x.shape[2:]
    h_bounds = _adaptive_bounds(h, output_size[0] or h, x.device)
    w_bounds = _adaptive_bounds(w, output_size[1] or w, x.device)
    counts = (h_bounds[1] - h_bounds[0])[:, None] * (w_bounds[1] - w_bounds[0])[None, :]
    return _window_sums(x, z_in, h_bounds, w_bounds), counts.view(1, 1, *counts.shape)
