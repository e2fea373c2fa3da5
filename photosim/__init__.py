"""photosim: post-training quantization to 2-16-bit integers and bit-true simulation of photonic engines.

Example:
    >>> import photosim
    >>> loaded = photosim.load_model("digits-resnet")
    >>> calibration = photosim.load_dataset("digits", "calibration")
    >>> qmodel = photosim.quantize(loaded.module, calibration, {"w_bits": 4, "a_bits": 4})
    >>> qmodel.save("m.safetensors")
    >>> logits = photosim.simulate(qmodel, images, hw={"tile": 64, "noise": {"output": {"sigma": 0.001}}})
"""

__version__ = "0.1.0"

from photosim.data import load_dataset as load_dataset
from photosim.engine import Engine as Engine
from photosim.engine import calibrate_adc_ranges as calibrate_adc_ranges
from photosim.engine import evaluate as evaluate
from photosim.engine import simulate as simulate
from photosim.errors import PhotosimError as PhotosimError
from photosim.format import QuantizedModel as QuantizedModel
from photosim.format import load as load
from photosim.hardware.config import HardwareConfig as HardwareConfig
from photosim.models import load_model as load_model
from photosim.qconfig import QuantSpec as QuantSpec
from photosim.quantize import quantize as quantize
from photosim.sweep import run_sweep as run_sweep
from photosim.torch_import import from_torch as from_torch
from photosim.workflow import run_hardware as run_hardware

__all__ = [
    "Engine", "HardwareConfig", "PhotosimError", "QuantSpec", "QuantizedModel", "__version__",
    "calibrate_adc_ranges", "evaluate", "from_torch", "load", "load_dataset", "load_model", "quantize",
    "run_hardware", "run_sweep", "simulate",
]
