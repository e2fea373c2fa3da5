"""Finite digital accumulators: tile partial sums added in order with wrap-around or saturation.

Pure integer functions on int64 tensors whose last dimension is the tile order.
"""

from __future__ import annotations

import torch

from photosim.ir.ranges import int_range, max_magnitude

OVERFLOW_MODES = ("wrap", "saturate", "none")


def wrap(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's-complement wrap-around: ``x mod 2^bits`` mapped to the signed range."""
    half = max_magnitude(bits)
    return torch.remainder(x + half, 2 * half) - half


def accumulate(tiles: torch.Tensor, bias: torch.Tensor | None, bits: int, overflow: str,
               bias_at: str = "start") -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``tiles`` (..., T) in tile order into a ``bits``-bit accumulator.

    The bias (broadcast to ``tiles.shape[:-1]``) enters first (``bias_at="start"``) or last. Returns the
    final accumulator values and a bool mask of the outputs whose running sum left the range at any step
    (for ``wrap`` and ``none`` too: that is when a hardware overflow flag would be raised).
    """
    terms = tiles
    if bias is not None:
        bias_term = bias.expand(tiles.shape[:-1]).unsqueeze(-1)
        terms = torch.cat([bias_term, tiles] if bias_at == "start" else [tiles, bias_term], dim=-1)
    lo, hi = int_range(bits, signed=True)
    prefix = torch.cumsum(terms, dim=-1)  # exact running sums, (..., T + 1)
    overflowed = ((prefix < lo) | (prefix > hi)).any(dim=-1)
    total = prefix[..., -1]
    if overflow == "none":
        return total, overflowed
    if overflow == "wrap":  # modular arithmetic: wrapping once at the end equals wrapping every step
        return wrap(total, bits), overflowed
    acc = total.clone()
    rows = overflowed.nonzero(as_tuple=True)  # only outputs that hit a rail need the sequential clamp
    if rows[0].numel():
        running = torch.zeros_like(acc[rows])
        for t in range(terms.shape[-1]):
            running = (running + terms[rows + (t,)]).clamp(lo, hi)
        acc[rows] = running
    return acc, overflowed
