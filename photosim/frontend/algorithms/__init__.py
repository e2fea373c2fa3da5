"""Error-correcting PTQ algorithms, registered by name (registry.py); docs/ptq.md describes each."""

from photosim.frontend.algorithms import adaround, bias_correction, equalization, gpfq, gptq  # noqa: F401 - they register
from photosim.frontend.algorithms.registry import ALGORITHMS, AUTO, Selection, check_selection

__all__ = ["ALGORITHMS", "AUTO", "Selection", "check_selection"]
