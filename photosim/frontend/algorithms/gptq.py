"""GPTQ: weights rounded one input column at a time, the error of each spread onto the columns not yet rounded.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1 without lazy batching: with
``H = X^T X`` of the layer's inputs from the already-quantized prefix (damped by DAMP of its mean diagonal)
and ``U`` the upper Cholesky factor of ``H^-1``, column ``i`` is rounded to the nearest code and its error
``(w_i - q_i) / U_ii`` is subtracted, times ``U_i,j``, from every later column ``j``: the optimal (OBS) update
that keeps ``W X`` closest to the float ``W X`` in least squares. Columns go in order of decreasing
``H_ii`` ("act-order"), the inputs with the most energy first. The weight scales stay those of the observer.
"""

from __future__ import annotations

import torch

from photosim.frontend.algorithms.layer import LayerGrams
from photosim.frontend.algorithms.registry import RoundingAlgorithm, register_algorithm
from photosim.ir.ranges import narrow_range

DAMP = 0.01  # fraction of the mean diagonal of H added to it (the paper's percdamp)


def gptq_round(w: torch.Tensor, scale: torch.Tensor, bits: int, grams: LayerGrams) -> torch.Tensor:
    """GPTQ codes (O, K) of weights ``w`` (O, K) at per-row ``scale`` (O,), from H = ``grams.qq``."""
    qmin, qmax = narrow_range(bits)
    h = grams.qq.clone()
    dead = h.diagonal() == 0  # inputs never active in calibration: plain rounding, nothing to propagate
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    h = h[order][:, order]
    h.diagonal().add_(DAMP * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work = w[:, order].clone()
    codes = torch.empty_like(work)
    for i in range(work.shape[1]):
        codes[:, i] = torch.round(work[:, i] / scale).clamp(qmin, qmax)
        error = (work[:, i] - codes[:, i] * scale) / u[i, i]
        work[:, i + 1:] -= error[:, None] * u[i, i + 1:][None, :]
    return codes[:, torch.argsort(order)]


register_algorithm(RoundingAlgorithm("gptq", "Frantar et al. 2022, arXiv:2210.17323", gptq_round))
