"""AdaRound and QDrop: each weight rounded up or down as a learnt soft rounding decides, fitted to the layer's output.

Nagel, Amjad, van Baalen, Louizos and Blankevoort, "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020 (arXiv:2004.10568), eq. (21)-(25): the weights become ``s * clip(floor(W / s) + h(V))``
with the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, and ``V`` minimises
``||f_a(W x_float) - f_a(W~ x_quant)||^2 + lambda f_reg(V)``, ``f_reg(V) = sum 1 - |2 h(V) - 1|^beta``: the
asymmetric reconstruction (the quantized prefix's input, the float layer's output as target) through the
layer's fused activation ``f_a`` (its clamp: errors a ReLU removes do not count), ``beta`` annealed from 20
to 2 after a warm-up without the regulariser; finally ``h >= 0.5`` rounds up. The loss (squared error summed
over output channels, averaged over batch and positions), ``lambda = 0.01``, the schedule and the
initialisation ``h(V) = W / s - floor(W / s)`` follow the BRECQ/QDrop reference code (Li et al., ICLR 2021,
arXiv:2102.05426, ``quant/adaptive_rounding.py`` and ``LinearTempDecay``).

QDrop (Wei, Gong, Yu, Liu and Yu, ICLR 2022, arXiv:2203.05740, sec. 4): the same optimisation, but each
element of the layer's input is, independently with probability 0.5 and redrawn every step, the float input
instead of the quantized one, so the rounding is fitted for a flat neighbourhood of the quantized input.
Both are label-free and run per layer; the weight scales, bit width and clamp range stay the observer's.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from photosim.frontend.algorithms.layer import LayerData
from photosim.frontend.algorithms.registry import ReconstructionAlgorithm, register_algorithm
from photosim.ir.ops import OPS
from photosim.ir.ranges import narrow_range

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches 0 and 1 at finite V (paper, sec. 4.1)
REGULARISER_WEIGHT = 0.01  # lambda of the BRECQ/QDrop reference code
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # fraction of the iterations without the regulariser, before beta starts to fall
ITERATIONS = 500  # per layer: the built-in digits models quantize in seconds (the paper: 10,000 to 20,000)
LEARNING_RATE = 1e-2  # Adam on V; Adam moves V by about lr a step: the paper's 1e-3 is for 10,000+ steps
BATCH_SAMPLES = 32  # calibration samples (images, or rows of a linear layer's input) per step, as the paper
DROP_PROBABILITY = 0.5  # QDrop: chance that an input element is the float one
SEED = 0


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, the soft rounding in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest: torch.Tensor) -> torch.Tensor:
    """The ``V`` with ``h(V) = rest`` (the fractional part of ``W / s``): start from the float weights."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def rounding_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``f_reg = sum 1 - |2 h - 1|^beta``: zero only when every ``h`` is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, iterations: int) -> float | None:
    """The annealed ``beta`` at ``step``: None during the warm-up (no regulariser), then 20 falling linearly to 2."""
    start = WARMUP * iterations
    if step < start:
        return None
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - (step - start) / (iterations - start))


def dropped_input(x_quant: torch.Tensor, x_float: torch.Tensor, generator: torch.Generator,
                  probability: float = DROP_PROBABILITY) -> torch.Tensor:
    """QDrop's input: each element the float one with ``probability``, else the quantized one."""
    keep_float = torch.rand(x_quant.shape, generator=generator, dtype=x_quant.dtype) < probability
    return torch.where(keep_float, x_float, x_quant)


def reconstruct(layer: LayerData, weight: torch.Tensor, scale: torch.Tensor, bits: int, *,
                drop_probability: float = 0.0, iterations: int = ITERATIONS, seed: int = SEED) -> torch.Tensor:
    """AdaRound codes (shape of ``weight``, int64) of the layer at ``scale`` (per output channel or scalar).

    ``drop_probability`` > 0 is QDrop's input mixing. Deterministic for a given ``seed`` (minibatches, masks).
    Round-to-nearest is kept instead where it reconstructs the calibration outputs better.
    """
    qmin, qmax = narrow_range(bits)
    op, attrs = OPS[layer.node.op], layer.node.attrs
    channels = -1 if layer.node.op == "linear" else 1  # a linear's outputs are its last dimension (tokens too)
    s64 = scale.double().expand(weight.shape[0]).reshape(-1, *([1] * (weight.dim() - 1)))
    ratio = weight.detach().double() / s64  # in float64 as the observer's round-to-nearest (quantize_weight)
    s, floor = s64.float(), ratio.floor().float()
    nearest = ratio.round().clamp(qmin, qmax).float()
    v = initial_v((ratio - ratio.floor()).float()).requires_grad_()
    bias = layer.node.bias.detach().float()
    x_quant, x_float = layer.x_quant.float(), layer.x_float.float()
    low, high = layer.node.act or (-math.inf, math.inf)

    def output(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer's output after its fused activation (a clamp)."""
        return op.reference(attrs, [x], w, bias).clamp(low, high)

    with torch.no_grad():
        target = output(x_float, weight.detach().float())
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([v], lr=LEARNING_RATE)
    for step in range(iterations):
        rows = torch.randint(len(x_quant), (min(BATCH_SAMPLES, len(x_quant)),), generator=generator)
        x = x_quant[rows] if drop_probability == 0 else dropped_input(x_quant[rows], x_float[rows], generator,
                                                                        drop_probability)
        h = rectified_sigmoid(v)
        soft = s * torch.clamp(floor + h, qmin, qmax)
        error = output(x, soft) - target[rows]
        loss = error.pow(2).sum(dim=channels).mean()
        beta = beta_at(step, iterations)
        if beta is not None:
            loss = loss + REGULARISER_WEIGHT * rounding_regulariser(h, beta)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    up = (rectified_sigmoid(v.detach()) >= 0.5).float()
    fitted = torch.clamp(floor + up, qmin, qmax)

    def calibration_loss(codes: torch.Tensor) -> float:
        """The reconstruction error of ``codes`` on the whole calibration set, without the regulariser."""
        with torch.no_grad():
            error = output(x_quant, s * codes) - target
        return float(error.pow(2).sum(dim=channels).mean())

    # the loss is not scale-free (lambda weighs a sum over weights against squared outputs, as in the reference
    # code): on layers with large outputs the soft rounding may stay fractional and its hard rounding lose
    return min((fitted, nearest), key=calibration_loss).to(torch.int64)


register_algorithm(ReconstructionAlgorithm("adaround", "Nagel et al. 2020, arXiv:2004.10568", reconstruct))
register_algorithm(ReconstructionAlgorithm("qdrop", "Wei et al. 2022, arXiv:2203.05740",
                                           partial(reconstruct, drop_probability=DROP_PROBABILITY)))
