"""photosim: post-training quantization to 2-16-bit integers and bit-true simulation of photonic engines.

The package follows the data's path: ``frontend`` (float model, data, PTQ) -> ``ir`` (the integer file,
its op table, the float reference) -> ``engine`` (integer kernels and requantization) -> ``hardware``
(tiles, ADC, noise, accumulator) -> ``experiments`` (runs, sweeps, reports) -> ``cli``.
The public names below are imported on first use (PEP 562), so ``import photosim`` stays cheap.

Example:
    >>> import photosim
    >>> loaded = photosim.load_model("digits-resnet")
    >>> calibration = photosim.load_dataset("digits", "calibration")
    >>> qmodel = photosim.quantize(loaded.module, calibration, {"w_bits": 4, "a_bits": 4})
    >>> qmodel.save("m.safetensors")
    >>> logits = photosim.simulate(qmodel, images, hw={"tile": 64, "noise": {"output": {"sigma": 0.001}}})
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from photosim._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "Curve": "photosim.frontend.nonlinearity",
    "Engine": "photosim.engine.executor",
    "simulate": "photosim.engine.executor",
    "PhotosimError": "photosim.errors",
    "QuantizedModel": "photosim.ir.format",
    "load": "photosim.ir.format",
    "HardwareConfig": "photosim.hardware.config",
    "load_dataset": "photosim.frontend.data",
    "load_model": "photosim.frontend.models",
    "QuantSpec": "photosim.frontend.qconfig",
    "quantize": "photosim.frontend.ptq",
    "from_torch": "photosim.frontend.torch_import",
    "evaluate": "photosim.experiments.accuracy",
    "calibrate_adc_ranges": "photosim.experiments.workflow",
    "finetune": "photosim.experiments.finetune",
    "cheapest": "photosim.experiments.query",
    "run_hardware": "photosim.experiments.workflow",
    "run_sweep": "photosim.experiments.sweep",
    "layer_sensitivity": "photosim.experiments.sensitivity",
    "search_mixed_precision": "photosim.experiments.mixed_precision",
}
__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from photosim.engine.executor import Engine as Engine
    from photosim.engine.executor import simulate as simulate
    from photosim.errors import PhotosimError as PhotosimError
    from photosim.experiments.accuracy import evaluate as evaluate
    from photosim.experiments.finetune import finetune as finetune
    from photosim.experiments.mixed_precision import search_mixed_precision as search_mixed_precision
    from photosim.experiments.query import cheapest as cheapest
    from photosim.experiments.sensitivity import layer_sensitivity as layer_sensitivity
    from photosim.experiments.sweep import run_sweep as run_sweep
    from photosim.experiments.workflow import calibrate_adc_ranges as calibrate_adc_ranges
    from photosim.experiments.workflow import run_hardware as run_hardware
    from photosim.frontend.data import load_dataset as load_dataset
    from photosim.frontend.models import load_model as load_model
    from photosim.frontend.nonlinearity import Curve as Curve
    from photosim.frontend.ptq import quantize as quantize
    from photosim.frontend.qconfig import QuantSpec as QuantSpec
    from photosim.frontend.torch_import import from_torch as from_torch
    from photosim.hardware.config import HardwareConfig as HardwareConfig
    from photosim.ir.format import QuantizedModel as QuantizedModel
    from photosim.ir.format import load as load


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'photosim' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
