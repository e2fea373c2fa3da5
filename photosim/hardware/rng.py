"""Seeded random streams: one per (seed, repeat, effect, layer[, sample]).

Inference noise is drawn per sample index, never per batch position, so results do not depend on the
batch size or chunking; chip noise (static weight error) depends on the repeat only.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = {"weight_static": 1, "weight_read": 2, "output": 3, "shot": 4, "custom": 5}


def generator(seed: int, repeat: int, stream: str, layer: int, sample: int | None = None) -> torch.Generator:
    """A CPU generator for one stream; distinct keys give independent streams (NumPy SeedSequence)."""
    key = [seed, repeat, STREAMS[stream], layer] + ([] if sample is None else [1, sample])
    state = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def normal_per_sample(shape: tuple[int, ...], sample_ids: torch.Tensor, seed: int, repeat: int, stream: str,
                      layer: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
                      ) -> torch.Tensor:
    """Standard normals of ``(len(sample_ids), *shape)``, row n drawn from sample_ids[n]'s stream."""
    rows = torch.empty(len(sample_ids), *shape, dtype=dtype)
    for row, sample in zip(rows, sample_ids.tolist()):
        row.normal_(generator=generator(seed, repeat, stream, layer, sample))
    return rows.to(device)


def normal(shape: tuple[int, ...], seed: int, repeat: int, stream: str, layer: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals (float64) of one stream that does not depend on the sample (per-chip effects)."""
    return torch.randn(shape, generator=generator(seed, repeat, stream, layer), dtype=torch.float64).to(device)
