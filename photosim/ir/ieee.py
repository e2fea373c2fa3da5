"""Division by a number and square root, correctly rounded (IEEE 754) on every device, where torch's are not.

The integer file's float steps (docs/integer-semantics.md) and the noise laws (docs/hardware.md) are stated as
correctly rounded operations, so that every device and an outside reader get the same codes. Two torch operations
break that:

- a CUDA tensor divided by a Python number is computed as ``t * (1 / d)``, "which may lose one bit of precision"
  (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu); a tensor divided by a tensor on its device is divided;
- torch's CPU square root misrounds some inputs by one unit in the last place (torch 2.14, AVX512: 19% of random
  float32 and 1.4% of float64 values), while numpy's (the CPU's sqrt instruction) and CUDA's are IEEE.

A code that depends on that last bit would differ between devices; with noise in the network, one changed code
spreads to many (docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import torch


def divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` rounded once in the result's dtype (the divisor made a tensor on t's device)."""
    return t / torch.full((), divisor, dtype=torch.result_type(t, divisor), device=t.device)


def sqrt(t: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a float tensor: numpy's on the CPU, torch's elsewhere."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.sqrt(t.detach().numpy()))
    return torch.sqrt(t)
