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

Uniform -> normal: Box-Muller on the pairs (word 0, word 1) and (word 2, word 3) of a block, giving
r cos(2 pi v), r sin(2 pi v) with r = sqrt(-2 ln u). u is in (0, 1] so the logarithm is finite: float64 output
uses u = (bits + 1) 2^-32 (all 32 bits, exact in float64; |z| <= 6.66), float32 output u = (bits >> 8 + 1) 2^-24
(a 24-bit mantissa, exact in float32; |z| <= 5.77). The angle uses v = bits 2^-32 in [0, 1) in both.
"""

from __future__ import annotations

import math

import torch

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


def _box_muller(bits: Words, dtype: torch.dtype) -> torch.Tensor:
    """4 words -> 4 standard normals (..., 4) of dtype: Box-Muller on (w0, w1) and (w2, w3), see the module."""
    if dtype == torch.float64:
        radius = [(w + 1).to(dtype).mul_(2.0 ** -32) for w in (bits[0], bits[2])]
    elif dtype == torch.float32:
        radius = [(w.bitwise_right_shift(8) + 1).to(dtype).mul_(2.0 ** -24) for w in (bits[0], bits[2])]
    else:
        raise ValueError(f"normals are float32 or float64, not {dtype}")
    out = []
    for u, w in zip(radius, (bits[1], bits[3])):
        r = u.log_().mul_(-2.0).sqrt_()
        angle = w.to(dtype).mul_(2.0 * math.pi * 2.0 ** -32)
        out += [torch.cos(angle).mul_(r), angle.sin_().mul_(r)]
    return torch.stack(out, dim=-1)


def normal(key: tuple[int, int], samples: torch.Tensor, count: int, domain: int = PER_SAMPLE,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals (len(samples), count) on samples' device: row n holds elements 0 .. count - 1 of the
    stream (key, sample = samples[n], domain); element j comes from counter (j // 4, 0, sample, domain), lane
    j % 4. Sample indices must lie in [0, 2^32). The work runs in passes of CHUNK_BLOCKS counters over the
    flattened (row, block) index, which bounds memory and cannot change a value."""
    samples = samples.to(torch.int64)
    if samples.numel() and (int(samples.min()) < 0 or int(samples.max()) > MASK32):
        raise ValueError("sample indices must lie in [0, 2^32)")
    blocks = -(-count // 4)
    if blocks > MASK32:
        raise ValueError(f"{count} values per sample exceed the 2^34 of one stream")
    out = torch.empty(len(samples), blocks, 4, dtype=dtype, device=samples.device)
    flat = out.view(-1, 4)
    zero = torch.zeros((), dtype=torch.int64, device=samples.device)
    for start in range(0, flat.shape[0], CHUNK_BLOCKS):
        index = torch.arange(start, min(start + CHUNK_BLOCKS, flat.shape[0]), device=samples.device)
        counter = (index % blocks, zero, samples[index // blocks], zero + domain)
        flat[start:start + len(index)] = _box_muller(philox4x32(counter, key), dtype)
    return out.view(len(samples), 4 * blocks)[:, :count]
