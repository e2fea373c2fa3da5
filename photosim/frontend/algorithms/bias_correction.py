"""Empirical bias correction: the mean output error of a quantized layer over the calibration set, folded into its bias.

Nagel, van Baalen, Blankevoort and Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019 (arXiv:1906.04721), section 4.2, the empirical variant: per output channel,
``E[y_float] - E[y_quant]`` over the calibration inputs is added to the bias, where ``y_float`` is the layer's
pre-activation output in the float model and ``y_quant`` that with quantized weights on the inputs of the
quantized prefix. It removes the bias that weight rounding and the error of earlier layers leave in the output.
"""

from __future__ import annotations

import torch

from photosim.frontend.algorithms.layer import LayerData
from photosim.frontend.algorithms.registry import BiasAlgorithm, register_algorithm


def mean_output_error(layer: LayerData, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of float minus quantized pre-activation outputs, (O,) float64."""
    error = layer.outputs(layer.node.weight, layer.node.bias, quantized_input=False) - layer.outputs(
        weight, bias, quantized_input=True)
    channels = -1 if layer.node.op == "linear" else 1  # a linear's outputs are its last dimension (tokens too)
    return error.movedim(channels, 0).reshape(error.shape[channels], -1).mean(dim=1)


def corrected_bias(layer: LayerData, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``bias`` plus the mean output error of the layer with dequantized weights ``weight`` and that bias."""
    return bias + mean_output_error(layer, weight, bias)


register_algorithm(BiasAlgorithm("bias_correction", "Nagel et al. 2019, arXiv:1906.04721", corrected_bias))
