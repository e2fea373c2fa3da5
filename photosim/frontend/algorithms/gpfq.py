"""GPFQ: greedy path following, each weight rounded so that the running output error stays smallest.

Lybrand and Saab, "A Greedy Algorithm for Quantizing Neural Networks", JMLR 22 (2021), and Zhang, Zhou and
Saab, "Post-training Quantization for Neural Networks with Provable Guarantees" (2023), eq. (2)-(3): for
each output row, with ``X_t`` the float-model inputs of column ``t`` and ``Xq_t`` those of the quantized
prefix, ``u_0 = 0``, ``q_t = Q(<Xq_t, u_{t-1} + w_t X_t> / |Xq_t|^2)``, ``u_t = u_{t-1} + w_t X_t - q_t Xq_t``.
Since ``u_{t-1}`` is a sum of earlier columns, the inner products need only the Gram matrices ``Xq^T Xq``
and ``Xq^T X``: the same result at a cost independent of the number of calibration patches.
"""

from __future__ import annotations

import torch

from photosim.frontend.algorithms.layer import LayerGrams
from photosim.frontend.algorithms.registry import RoundingAlgorithm, register_algorithm
from photosim.ir.ranges import narrow_range


def gpfq_round(w: torch.Tensor, scale: torch.Tensor, bits: int, grams: LayerGrams) -> torch.Tensor:
    """GPFQ codes (O, K) of weights ``w`` (O, K) at per-row ``scale`` (O,)."""
    qmin, qmax = narrow_range(bits)
    qq, qf = grams.qq, grams.qf
    carried = torch.zeros_like(w)  # carried[:, t] = <Xq_t, u>, updated as columns are rounded
    codes = torch.empty_like(w)
    for t in range(w.shape[1]):
        energy = qq[t, t]
        target = (carried[:, t] + w[:, t] * qf[t, t]) / energy if energy > 0 else w[:, t]
        codes[:, t] = torch.round(target / scale).clamp(qmin, qmax)
        carried += w[:, t, None] * qf[None, :, t] - (codes[:, t] * scale)[:, None] * qq[None, :, t]
    return codes


register_algorithm(RoundingAlgorithm("gpfq", "Lybrand and Saab 2021, JMLR 22(156)", gpfq_round))
