"""Counter-based random numbers: Philox4x32-10 as vectorised torch integer arithmetic.

Philox4x32-R is the counter-based generator of Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy
as 1, 2, 3" (SC 2011), with the constants of the Random123 library (also used by cuRAND and JAX). Its output is
a pure function of a 2 x 32-bit key and a 4 x 32-bit counter, so a draw cannot depend on the batch size, the
chunking, the thread count or the device: every value is computed from its own (key, counter) alone.

Words are uint32 values held in int64 tensors (torch has no full uint32 arithmetic). The 32 x 32 -> 64-bit
product of a Philox round exceeds int64's range but wraps modulo 2^64, so the wrapped product holds both words
(see ``_mulhilo``). The same code runs on CPU and CUDA tensors and gives the same bits on both.

Noise streams (``normal``):

* key: (k0, k1) = the low and high 32 bits of ``derive_key(seed, repeat, effect, layer)``, a SplitMix64 chain
  over the tuple (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014);
* counter: (block index low word, block index high word, sample index, domain). Block b of a sample yields its
  elements 4b .. 4b + 3; ``domain`` separates per-sample streams (0) from per-chip streams (1), which have no
  sample index (their sample word is 0).

Uniform -> normal (``box_muller``): Box-Muller on the pairs (word 0, word 1) and (word 2, word 3) of a block,
giving r cos(theta), r sin(theta) with r = sqrt(-2 ln u), u = ((w0 >> 8) + 1) 2^-24 in (0, 1] (|z| <= 5.77) and
theta = 2 pi w1 2^-32. The logarithm, sine and cosine are fixed polynomials evaluated as a fixed sequence of
float32 operations (each correctly rounded in IEEE 754: the square root by photosim.ir.ieee), so the torch code
here and the compiled kernels that repeat the same sequence without contracting multiply-adds
(photosim.engine.fused_cpu, photosim.engine.triton_philox) give the same bits on every device:

* ln u = ln m + (e - 24) ln 2 where k = (w0 >> 8) + 1 = m 2^e, m in [sqrt(1/2), sqrt(2)); ln m = s (2 + z (2/3 +
  z (2/5 + z (2/7 + z 2/9)))) with s = (m - 1) / (m + 1), z = s^2 (the atanh series; |error| < 1e-8);
* theta = q pi/2 + pi/4 + phi with q = w1 >> 30 and phi = ((w1 & (2^30 - 1)) 2^-30 - 1/2) pi/2 in [-pi/4, pi/4):
  Taylor polynomials of sin phi (to phi^9) and cos phi (to phi^8), rotated by pi/4 and by the quadrant q.
"""

from __future__ import annotations

import math

import torch

from photosim.ir import ieee

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers (Random123 PHILOX_M4x32_0, _1)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule Weyl increments (golden ratio, sqrt(3) - 1)
PER_SAMPLE, PER_CHIP = 0, 1  # the counter's domain word
CHUNK_BLOCKS = 1 << 18  # counters per vectorised pass: bounds the temporaries, keeps them in cache

Words = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele et al. 2014): a bijective 64-bit mix of x + the golden-ratio increment."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive_key(*words: int) -> tuple[int, int]:
    """A Philox key (k0, k1) from a tuple of integers: h = splitmix64(h ^ w) over the words (each taken mod
    2^64), starting from h = 0; k0, k1 are h's low and high 32 bits. Different tuples give unrelated keys."""
    h = 0
    for w in words:
        h = _splitmix64(h ^ (w & MASK64))
    return h & MASK32, h >> 32


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of x * m for uint32 x (int64 tensor) and a uint32 constant m.

    x * m < 2^64: torch's int64 product wraps modulo 2^64 (two's complement, on CPU and CUDA), so its bit pattern
    is the exact unsigned 64-bit product; the arithmetic shift by 32 and the mask read its high word, the mask
    alone its low word. The known-answer tests (all-ones words included) check this on each device."""
    p = x * m
    return (p >> 32).bitwise_and_(MASK32), p.bitwise_and_(MASK32)


def philox4x32(counter: Words, key: tuple[int, int], rounds: int = 10) -> Words:
    """Philox4x32-``rounds`` (Salmon et al. 2011) of a counter (4 broadcastable int64 tensors holding uint32
    words) under a key (2 uint32 ints) -> 4 int64 tensors of uint32 output words, elementwise.

    A round maps (c0, c1, c2, c3) to (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key
    is bumped by the Weyl increments between rounds (Random123's philox4x32_R)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), lo1, hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0
    return c0, c1, c2, c3


# float32 constants of the uniform -> normal transform (see the module docstring).
LN2, SQRT_HALF, HALF_PI = 0.6931471805599453, 0.7071067811865476, math.pi / 2
LOG_SERIES = (2 / 9, 2 / 7, 2 / 5, 2 / 3, 2.0)  # ln m = s * poly(s^2), Horner order
SIN_SERIES = (1 / 362880, -1 / 5040, 1 / 120, -1 / 6, 1.0)  # sin phi = phi * poly(phi^2)
COS_SERIES = (1 / 40320, -1 / 720, 1 / 24, -1 / 2, 1.0)  # cos phi = poly(phi^2)


def _horner(coefficients: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
    """c0 z^n + ... + cn in float32, one rounded multiply and one rounded add per step (no fused multiply-add)."""
    acc = torch.full_like(z, coefficients[0])
    for c in coefficients[1:]:
        acc = acc.mul_(z).add_(c)
    return acc


def radius(w: torch.Tensor) -> torch.Tensor:
    """sqrt(-2 ln u), u = ((w >> 8) + 1) 2^-24, float32, for uint32 words w (int64 tensor)."""
    m, e = torch.frexp((w.bitwise_right_shift(8) + 1).to(torch.float32))  # k = m 2^e, m in [1/2, 1): exact
    low = m < SQRT_HALF
    m = torch.where(low, m * 2, m)
    e = torch.where(low, e - 1, e)
    s = (m - 1) / (m + 1)
    ln_u = s * _horner(LOG_SERIES, s * s) + (e - 24).to(torch.float32) * LN2
    return ieee.sqrt(ln_u.mul_(-2.0))


def cos_sin(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of theta = 2 pi w 2^-32 (float32) for uint32 words w (int64 tensor)."""
    phi = (w.bitwise_and(0x3FFFFFFF).to(torch.float32) * 2.0 ** -30 - 0.5) * HALF_PI
    phi2 = phi * phi
    sin_phi, cos_phi = phi * _horner(SIN_SERIES, phi2), _horner(COS_SERIES, phi2)
    c, s = (cos_phi - sin_phi) * SQRT_HALF, (cos_phi + sin_phi) * SQRT_HALF  # at pi/4 + phi
    q = w.bitwise_right_shift(30)
    cos = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    sin = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    return cos, sin


def box_muller(bits: Words) -> torch.Tensor:
    """4 words -> 4 float32 standard normals (..., 4): Box-Muller on (w0, w1) and (w2, w3), see the module."""
    out = []
    for u_word, angle_word in ((bits[0], bits[1]), (bits[2], bits[3])):
        r = radius(u_word)
        cos, sin = cos_sin(angle_word)
        out += [cos.mul_(r), sin.mul_(r)]
    return torch.stack(out, dim=-1)


def check_samples(samples: torch.Tensor) -> None:
    """Refuse sample indices outside [0, 2^32). Checked where they live on the CPU only: reading a GPU tensor's
    range would wait for the GPU, so the engine checks a batch's indices before it sends them there."""
    if samples.device.type == "cpu" and samples.numel() and (int(samples.min()) < 0 or int(samples.max()) > MASK32):
        raise ValueError("sample indices must lie in [0, 2^32)")


def normal(key: tuple[int, int], samples: torch.Tensor, count: int, domain: int = PER_SAMPLE) -> torch.Tensor:
    """float32 standard normals (len(samples), count) on samples' device: row n holds elements 0 .. count - 1 of the
    stream (key, sample = samples[n], domain); element j comes from counter (j // 4, 0, sample, domain), lane
    j % 4. Sample indices must lie in [0, 2^32). The work runs in passes of CHUNK_BLOCKS counters over the
    flattened (row, block) index, which bounds memory and cannot change a value."""
    samples = samples.to(torch.int64)
    check_samples(samples)
    blocks = -(-count // 4)
    if blocks > MASK32:
        raise ValueError(f"{count} values per sample exceed the 2^34 of one stream")
    out = torch.empty(len(samples), blocks, 4, dtype=torch.float32, device=samples.device)
    flat = out.view(-1, 4)
    zero = torch.zeros((), dtype=torch.int64, device=samples.device)
    for start in range(0, flat.shape[0], CHUNK_BLOCKS):
        index = torch.arange(start, min(start + CHUNK_BLOCKS, flat.shape[0]), device=samples.device)
        counter = (index % blocks, zero, samples[index // blocks], zero + domain)
        flat[start:start + len(index)] = box_muller(philox4x32(counter, key))
    return out.view(len(samples), 4 * blocks)[:, :count]
