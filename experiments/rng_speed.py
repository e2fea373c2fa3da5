"""Time rng.normal_per_sample for 128 samples x 100k values (issue 9): best of 5, float32 and float64.

Run from a checkout (PYTHONPATH selects which photosim is timed): python experiments/rng_speed.py [cpu|cuda]
"""

from __future__ import annotations

import sys
import time

import torch

from photosim.hardware import rng


def best_seconds(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """Fastest of ``repeats`` draws of (128, 100_000) normals on device, synchronised."""
    ids = torch.arange(128)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        rng.normal_per_sample((100_000,), ids, 0, 0, "output", 1, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    for dtype in (torch.float32, torch.float64):
        print(f"{rng.__file__} {device} {dtype}: {best_seconds(device, dtype):.4f} s, "
              f"{torch.get_num_threads()} threads")
