"""Seeded random streams: one per (seed, repeat, effect, layer[, sample]), drawn with Philox4x32-10.

Every value is a pure function of a key derived from (seed, repeat, effect, layer) and a counter (sample index,
element index within the sample), see ``photosim.hardware.philox``: inference noise is drawn per sample index,
never per batch position, so results do not depend on the batch size, chunking, thread count or device; chip
noise (static weight error) depends on the repeat only (the counter's per-chip domain, sample word 0).
"""

from __future__ import annotations

import torch

from photosim.hardware import philox
from photosim.hardware.config import INPUT_MODELS, NOISE_EFFECTS, WEIGHT_MODELS

STREAMS = {**{name: effect.stream for name, effect in NOISE_EFFECTS.items()},
           **WEIGHT_MODELS, **INPUT_MODELS}  # effect, weight model or input model -> Philox stream number


def key(seed: int, repeat: int, stream: str, layer: int) -> tuple[int, int]:
    """The Philox key of one stream: SplitMix64 of (seed, repeat, effect number, layer)."""
    return philox.derive_key(seed, repeat, STREAMS[stream], layer)


def normal_per_sample(shape: tuple[int, ...], sample_ids: torch.Tensor, seed: int, repeat: int, stream: str,
                      layer: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 standard normals of ``(len(sample_ids), *shape)`` on device, row n = the first prod(shape) values of
    sample_ids[n]'s stream, all rows drawn in one vectorised pass."""
    count = int(torch.Size(shape).numel())
    ids = sample_ids.to(device=device, dtype=torch.int64)
    e = philox.normal(key(seed, repeat, stream, layer), ids, count, philox.PER_SAMPLE)
    return e.reshape(len(sample_ids), *shape)


def normal(shape: tuple[int, ...], seed: int, repeat: int, stream: str, layer: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 standard normals of one stream that does not depend on the sample (per-chip effects)."""
    count = int(torch.Size(shape).numel())
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    return philox.normal(key(seed, repeat, stream, layer), ids, count, philox.PER_CHIP).reshape(shape)


def chip_generator(seed: int, repeat: int, stream: str, layer: int) -> torch.Generator:
    """A torch generator for one chip's draws of one weight model (photosim.hardware.mesh, .drift): seeded from the
    stream's Philox key, so a chip's mesh or drift is the same in every run, batch and point of a time sweep."""
    k0, k1 = key(seed, repeat, stream, layer)
    return torch.Generator().manual_seed(((k0 << 32) | k1) & ((1 << 63) - 1))
