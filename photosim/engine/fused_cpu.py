"""The analog readout of one layer as one compiled, parallel CPU pass (numba): tile values -> Philox noise ->
ADC -> finite accumulator -> accumulators and diagnostics, without the per-tile temporaries of the torch path.

It computes exactly what the torch backend's readout (``AnalogLayer._readout_torch``, the reference, used for custom
noise, calibration and other devices), bit for bit: the noise is the same Philox4x32-10 stream element
(``photosim.hardware.philox.normal``), its Box-Muller transform repeats philox.py's fixed sequence of float32
operations (no fused multiply-add: the functions compile with ``fastmath=False``), and the noise law, ADC
rounding and accumulator follow noise.py, adc.py and accumulator.py in the tile values' working dtype.

Layout (docs: the spec of issue 9): p is (G, T, M, O), rows sample-major with P = M / N rows per sample; element
(g, t, m, o) is element j = ((g*T + t)*P + m % P)*O + o of sample ``sample_ids[m // P]``'s stream. The kernel
runs over blocks of (g, m) rows in parallel; per row and tile it fills the row's normals from their Philox
blocks (a vectorised integer and float32 polynomial loop), then digitises and accumulates the row across o
(vectorised too). Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import njit, prange

from photosim.hardware import philox, rng
from photosim.hardware.readout import Readout

ROUNDS = 10
MASK32 = np.int64(philox.MASK32)
M0, M1 = (np.int64(m) for m in philox.PHILOX_M)
LN2, SQRT_HALF, HALF_PI = (np.float32(c) for c in (philox.LN2, philox.SQRT_HALF, philox.HALF_PI))
ONE, TWO, HALF, MINUS_TWO = (np.float32(c) for c in (1.0, 2.0, 0.5, -2.0))
TWO_M30 = np.float32(2.0 ** -30)
TWO_M24 = np.float32(2.0 ** -24)
LOG_SERIES = tuple(np.float32(c) for c in philox.LOG_SERIES)
SIN_SERIES = tuple(np.float32(c) for c in philox.SIN_SERIES)
COS_SERIES = tuple(np.float32(c) for c in philox.COS_SERIES)
ROW_BLOCKS_PER_THREAD = 8  # parallel work items per thread: balances rows of uneven cost
OVERFLOW_CODES = {"none": 0, "wrap": 1, "saturate": 2}
NARROW_LIMIT = 1 << 24  # running sums below this in magnitude are exact in float32 (_digitize_add_narrow)
_JIT = {"nogil": True, "cache": True, "error_model": "numpy", "fastmath": False}


class Counts(NamedTuple):
    """Diagnostics of one readout call (LayerStats' per-batch fields)."""

    clipped: int
    overflowed: int
    max_abs_acc: int
    signal_power: float  # 0 without diagnostics
    error_power: float


def round_keys(key: tuple[int, int]) -> np.ndarray:
    """The 10 round keys (10, 2) int64 of a Philox key: the Weyl-bumped schedule of philox.philox4x32."""
    k0, k1 = key
    out = np.empty((ROUNDS, 2), dtype=np.int64)
    for r in range(ROUNDS):
        out[r] = k0, k1
        k0, k1 = (k0 + philox.PHILOX_W[0]) & philox.MASK32, (k1 + philox.PHILOX_W[1]) & philox.MASK32
    return out


@njit(inline="always", **_JIT)
def _horner5(c: tuple, z: np.float32) -> np.float32:
    """c0 z^4 + ... + c4, one rounded float32 multiply and add per step (philox._horner)."""
    acc = c[0]
    acc = acc * z
    acc = acc + c[1]
    acc = acc * z
    acc = acc + c[2]
    acc = acc * z
    acc = acc + c[3]
    acc = acc * z
    return acc + c[4]


@njit(inline="always", **_JIT)
def _radius(w: np.int64) -> np.float32:
    """philox.radius: sqrt(-2 ln u) for u = ((w >> 8) + 1) 2^-24, the frexp exponent taken from the bit length."""
    k = (w >> 8) + 1  # 1 .. 2^24, k = m 2^e with m in [1/2, 1)
    e = np.int64(64) - numba.cpython.unsafe.numbers.leading_zeros(k)
    # exact: the shifted integer lies in [2^23, 2^24); k = 2^24 (w >= 0xFFFFFF00, u = 1) shifts right, as a shift
    # by a negative count is undefined (x86 shifts by 63: m = 0, a radius of 2.67 instead of 0)
    m = np.float32(k >> 1 if e > 24 else k << (24 - e)) * TWO_M24
    low = m < SQRT_HALF
    m = m * TWO if low else m
    e = e - 1 if low else e
    s = (m - ONE) / (m + ONE)
    ln_u = s * _horner5(LOG_SERIES, s * s) + np.float32(e - 24) * LN2
    return np.sqrt(ln_u * MINUS_TWO)


@njit(inline="always", **_JIT)
def _cos_sin(w: np.int64) -> tuple[np.float32, np.float32]:
    """philox.cos_sin: cos and sin of 2 pi w 2^-32 by quadrant rotation of the polynomials at pi/4 + phi."""
    phi = (np.float32(w & 0x3FFFFFFF) * TWO_M30 - HALF) * HALF_PI
    phi2 = phi * phi
    sin_phi = phi * _horner5(SIN_SERIES, phi2)
    cos_phi = _horner5(COS_SERIES, phi2)
    c = (cos_phi - sin_phi) * SQRT_HALF
    s = (cos_phi + sin_phi) * SQRT_HALF
    q = w >> 30  # quadrant 0..3: (cos, sin) = (c, s), (-s, c), (-c, -s), (s, -c), by bit tests (no switch)
    odd = (q & 1) != 0
    cos = s if odd else c
    sin = c if odd else s
    cos = -cos if ((q + 1) & 2) != 0 else cos
    sin = -sin if (q & 2) != 0 else sin
    return cos, sin


@njit(**_JIT)
def _fill_normals(keys: np.ndarray, sample: np.int64, first: np.int64, count: np.int64, out: np.ndarray) -> None:
    """out[: 4 * blocks] = the normals of Philox blocks first .. first + count - 1 (counter (b, 0, sample, 0))."""
    for i in range(count):
        b = first + i
        c0, c1, c2, c3 = b & MASK32, b >> 32, sample, np.int64(0)
        for r in range(ROUNDS):
            p0 = c0 * M0
            p1 = c2 * M1
            c0, c1, c2, c3 = ((p1 >> 32) & MASK32) ^ c1 ^ (keys[r, 0] & MASK32), p1 & MASK32, \
                ((p0 >> 32) & MASK32) ^ c3 ^ (keys[r, 1] & MASK32), p0 & MASK32  # masks: 32x32-bit products
        r0 = _radius(c0)
        cos0, sin0 = _cos_sin(c1)
        r1 = _radius(c2)
        cos1, sin1 = _cos_sin(c3)
        out[4 * i] = cos0 * r0
        out[4 * i + 1] = sin0 * r0
        out[4 * i + 2] = cos1 * r1
        out[4 * i + 3] = sin1 * r1


@njit(inline="always", **_JIT)
def _noisy(p: np.ndarray, shift: np.ndarray, e_out: np.ndarray, e_shot: np.ndarray, lane: int, coefs: np.ndarray,
           values: np.ndarray) -> None:
    """values = the row's tile values p + shift (O,) with output and shot noise (noise.py's laws), in values'
    dtype; the normals of element o are e_*[lane + o] (zeros: no such noise, which adds exactly 0)."""
    sigma_out, sigma_shot, full_scale = coefs[0], coefs[1], coefs[2]
    for o in range(values.size):
        values[o] = p[o] + shift[o]  # the working dtype's rounding, as (p + shift).to(Readout.dtype)
        v = values[o]
        v = v + sigma_out * e_out[lane + o]
        values[o] = v + (sigma_shot * np.sqrt(np.abs(v) * full_scale)) * e_shot[lane + o]


@njit(**_JIT)
def _digitize_add(values: np.ndarray, coefs: np.ndarray, total: np.ndarray, clamped: np.ndarray, flag: np.ndarray,
                  lo: int, hi: int) -> int:
    """ADC codes of one tile's row values (round half to even, clamp at the largest code) added to the exact and
    the saturating running sums; flag marks sums that left [lo, hi]. Returns the number of clipped values."""
    step, top = coefs[3], coefs[4]
    clipped = 0
    for o in range(values.size):
        x = np.rint(values[o] / step)
        clipped += np.abs(x) > top
        x = top if x > top else x
        x = -top if x < -top else x
        code = np.int64(x)
        s = total[o] + code
        total[o] = s
        c = clamped[o] + code
        c = hi if c > hi else c
        clamped[o] = lo if c < lo else c
        flag[o] |= (s < lo) | (s > hi)
    return clipped


@njit(**_JIT)
def _digitize_add_narrow(values: np.ndarray, coefs: np.ndarray, total: np.ndarray, clamped: np.ndarray,
                         flag: np.ndarray, clips: np.ndarray, lo: np.float32, hi: np.float32) -> None:
    """_digitize_add with float32 running sums, flags and per-output clip counts: exact where the caller proved
    every sum below 2^24 in magnitude, and twice as fast (16 lanes per vector, no int64 conversions)."""
    step, top = coefs[3], coefs[4]
    for o in range(values.size):
        x = np.float32(np.rint(values[o] / step))
        clips[o] += np.float32(np.abs(x) > top)
        x = min(max(x, -top), top)
        s = total[o] + x
        total[o] = s
        clamped[o] = min(max(clamped[o] + x, lo), hi)
        flag[o] = max(flag[o], np.float32((s < lo) | (s > hi)))


@njit(parallel=True, **_JIT)
def _readout(p: np.ndarray, shift: np.ndarray, coefs: np.ndarray, sample_ids: np.ndarray, keys: np.ndarray,
             noisy: np.ndarray,
             bias_codes: np.ndarray, bias_start: bool, bias: np.ndarray, exact: np.ndarray, step64: float,
             ints: np.ndarray, acc: np.ndarray, int_stats: np.ndarray, float_stats: np.ndarray) -> None:
    """The fused readout of p (G, T, M, O) + shift (G, T, O) into acc (G, M, O); per row block b: int_stats[b] =
    (clipped, overflowed, max |acc|), float_stats[b] = (signal power, error power).

    coefs (work dtype: the noise and ADC arithmetic's): output-noise std, shot sigma, FS, ADC step, largest code
    (inf: ideal readout). keys (2, 10, 2): output and shot round keys, used where noisy[s]. bias_codes (G, O) are
    the accumulator's bias term (zeros: no bias), bias (G, O) float64 its product-unit value for the exact sum.
    exact (G, M, O) float64 is the exact accumulator, or empty: the tile sums of p; step64 the step in float64
    for the error power. ints: rows per sample, accumulator low and high limits, bits, overflow code
    (OVERFLOW_CODES), diagnostics (0 / 1).
    """
    n_g, n_t, n_m, n_o = p.shape
    per_sample, lo, hi, bits, overflow, diagnostics = ints[0], ints[1], ints[2], ints[3], ints[4], ints[5]
    narrow = ints[6] != 0
    lo32, hi32 = np.float32(max(lo, -NARROW_LIMIT)), np.float32(min(hi, NARROW_LIMIT))
    shift64 = 64 - bits
    summed = diagnostics != 0 and exact.size == 0
    rows = n_g * n_m
    blocks = int_stats.shape[0]
    per_block = (rows + blocks - 1) // blocks
    for blk in prange(blocks):
        e_out = np.zeros(n_o + 8, dtype=np.float32)  # zeros: an absent noise adds exactly 0
        e_shot = np.zeros(n_o + 8, dtype=np.float32)
        values = np.empty(n_o, dtype=coefs.dtype)
        total = np.empty(n_o, dtype=np.int64)  # exact running sum
        clamped = np.empty(n_o, dtype=np.int64)  # saturating running sum
        flag = np.empty(n_o, dtype=np.int64)  # running sum left the range
        total32 = np.empty(n_o, dtype=np.float32)  # the same three in float32, when ``narrow``
        clamped32 = np.empty(n_o, dtype=np.float32)
        flag32 = np.empty(n_o, dtype=np.float32)
        clips32 = np.zeros(n_o, dtype=np.float32)
        tile_sum = np.empty(n_o, dtype=np.float64)
        signal = np.zeros(n_o, dtype=np.float64)
        error = np.zeros(n_o, dtype=np.float64)
        clipped = 0
        overflowed = 0
        largest = 0
        for row in range(blk * per_block, min(rows, (blk + 1) * per_block)):
            g, m = row // n_m, row % n_m
            sample = sample_ids[m // per_sample]
            for o in range(n_o):
                first = bias_codes[g, o] if bias_start else 0
                total[o] = first
                clamped[o] = min(max(first, lo), hi)  # a saturating accumulator clamps the bias term too
                flag[o] = (first < lo) | (first > hi)
                tile_sum[o] = 0.0
                total32[o] = first
                clamped32[o] = clamped[o]
                flag32[o] = flag[o]
            for t in range(n_t):
                j = ((g * n_t + t) * per_sample + m % per_sample) * n_o
                lane = j & 3
                if noisy[0]:
                    _fill_normals(keys[0], sample, j >> 2, (lane + n_o + 3) >> 2, e_out)
                if noisy[1]:
                    _fill_normals(keys[1], sample, j >> 2, (lane + n_o + 3) >> 2, e_shot)
                _noisy(p[g, t, m], shift[g, t], e_out, e_shot, lane, coefs, values)
                if narrow:
                    _digitize_add_narrow(values, coefs, total32, clamped32, flag32, clips32, lo32, hi32)
                else:
                    clipped += _digitize_add(values, coefs, total, clamped, flag, lo, hi)
                if summed:
                    for o in range(n_o):
                        tile_sum[o] += p[g, t, m, o] + shift[g, t, o]
            if narrow:
                for o in range(n_o):
                    total[o] = np.int64(total32[o])
                    clamped[o] = np.int64(clamped32[o])
                    flag[o] = np.int64(flag32[o])
            for o in range(n_o):
                last = 0 if bias_start else bias_codes[g, o]
                s = total[o] + last
                c = clamped[o] + last
                c = hi if c > hi else c
                c = lo if c < lo else c
                f = flag[o] | (s < lo) | (s > hi)
                a = c if overflow == 2 else ((s << shift64) >> shift64 if overflow == 1 else s)
                acc[g, m, o] = a
                overflowed += f
                a = -a if a < 0 else a
                largest = a if a > largest else largest
            if diagnostics:
                for o in range(n_o):
                    x = (tile_sum[o] if summed else exact[g, m, o]) + bias[g, o]
                    signal[o] += x * x
                    d = np.float64(acc[g, m, o]) * step64 - x
                    error[o] += d * d
        for o in range(n_o):
            clipped += np.int64(clips32[o])
        int_stats[blk, 0] = clipped
        int_stats[blk, 1] = overflowed
        int_stats[blk, 2] = largest
        float_stats[blk, 0] = signal.sum()
        float_stats[blk, 1] = error.sum()


def readout(p: torch.Tensor, sample_ids: torch.Tensor, settings: Readout, bias: torch.Tensor | None,
            bias_codes: torch.Tensor | None, exact: torch.Tensor | None, diagnostics: bool,
            shift: torch.Tensor | None = None) -> tuple[torch.Tensor, Counts]:
    """Tile values p (G, T, M, O) on the CPU -> accumulators (G, M, O) int64 and the diagnostics, in one pass.

    settings: the layer's readout (its output and shot noise, ADC, accumulator; the noise and ADC arithmetic in
    its dtype); bias (G, O) int64 in product units and bias_codes its ADC codes (both None: no bias); exact
    (G, M, O): the exact accumulator (None: the tile sums of p); diagnostics: also the signal and error powers;
    shift (G, T, O) int64 is added to every tile value (int8 GEMMs leave out offset * weight sums, see
    kernels.MatmulPlan). Uses torch's intra-op thread count.
    """
    work, full_scale, step, adc_bits = settings.dtype, settings.full_scale, settings.step, settings.adc_bits
    coefficients = {"output": settings.tile_noise.get("output", 0.0) * full_scale,
                    "shot": settings.tile_noise.get("shot", 0.0)}
    noise = {name: (rng.key(settings.seed, settings.repeat, name, settings.layer), c)
             for name, c in coefficients.items() if c}
    if p.dtype not in (torch.int32, torch.float32, torch.float64) or work not in (torch.float32, torch.float64):
        raise ValueError(f"tile values must be int32, float32 or float64 (got {p.dtype}, work dtype {work})")
    ids = sample_ids.to(torch.int64).contiguous().numpy()
    if ids.size and (ids.min() < 0 or ids.max() > philox.MASK32):
        raise ValueError("sample indices must lie in [0, 2^32)")
    n_g, _, n_m, n_o = p.shape
    bits, overflow, bias_at = settings.acc_bits, settings.overflow, settings.bias_at
    keys = np.zeros((2, ROUNDS, 2), dtype=np.int64)
    noisy = np.zeros(2, dtype=np.bool_)
    for s, name in enumerate(("output", "shot")):
        if name in noise:
            keys[s], noisy[s] = round_keys(noise[name][0]), True
    work_np = np.float32 if work == torch.float32 else np.float64
    top = np.inf if adc_bits is None else 2.0 ** (adc_bits - 1) - 1
    coefs = np.array([noise.get("output", (None, 0.0))[1], noise.get("shot", (None, 0.0))[1], full_scale, step, top],
                     dtype=work_np)
    zeros = torch.zeros(n_g, n_o, dtype=torch.int64)
    codes = (zeros if bias_codes is None else bias_codes.reshape(n_g, n_o)).contiguous().numpy()
    bias64 = (zeros if bias is None else bias.reshape(n_g, n_o)).double().contiguous().numpy()
    exact64 = np.zeros((0, 0, 0)) if exact is None else exact.double().contiguous().numpy()
    limit = 1 << (bits - 1)
    largest_sum = int(np.abs(codes).max(initial=0)) + p.shape[1] * top  # bias code + T codes (inf: ideal ADC)
    narrow = largest_sum < NARROW_LIMIT
    ints = np.array([n_m // max(len(ids), 1), -limit, limit - 1, bits, OVERFLOW_CODES[overflow], diagnostics,
                     narrow], dtype=np.int64)
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    blocks = max(1, min(n_g * n_m, threads * ROW_BLOCKS_PER_THREAD))
    acc = torch.empty(n_g, n_m, n_o, dtype=torch.int64)
    int_stats = np.zeros((blocks, 3), dtype=np.int64)
    float_stats = np.zeros((blocks, 2), dtype=np.float64)
    shifts = torch.zeros(n_g, p.shape[1], n_o, dtype=torch.int64) if shift is None else shift.to(torch.int64)
    _readout(p.detach().contiguous().numpy(), shifts.contiguous().numpy(), coefs, ids, keys, noisy, codes,
             bias_at == "start", bias64, exact64, float(step), ints, acc.numpy(), int_stats, float_stats)
    clipped, overflowed, _ = (int(v) for v in int_stats.sum(axis=0))
    signal, error = (float(v) for v in float_stats.sum(axis=0))
    return acc, Counts(clipped, overflowed, int(int_stats[:, 2].max()), signal, error)
