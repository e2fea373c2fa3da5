"""Error-correcting PTQ algorithms, registered by name (registry.py); docs/ptq.md describes each."""

from photosim.frontend.algorithms import (  # noqa: F401 - they register
    adaround,
    bias_correction,
    equalization,
    gpfq,
    gptq,
    smoothing,
)
from photosim.frontend.algorithms.registry import ALGORITHMS, AUTO, Selection, check_selection

__all__ = ["ALGORITHMS", "AUTO", "Selection", "check_selection"]
