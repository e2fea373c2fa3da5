"""A model's hardware plan: every layer's settings resolved once, shared by the engine and the experiments.

Resolving applies the per-layer overrides of a HardwareConfig and turns a layer's photonics section into the
noise its link budget implies (photosim.hardware.photonics), so the engine's kernels and the reports read the
same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from photosim.errors import PhotosimError
from photosim.hardware.config import HardwareConfig, LayerHardware, load_hardware
from photosim.hardware.photonics import with_link_budget
from photosim.hardware.readout import tile_length
from photosim.ir.format import Node, QuantizedModel
from photosim.ir.ops import OPS


@dataclass(frozen=True)
class HardwarePlan:
    """The hardware config of one model and each node's resolved settings (node name -> LayerHardware)."""

    config: HardwareConfig
    layers: dict[str, LayerHardware]

    @classmethod
    def resolve(cls, qmodel: QuantizedModel, hw: HardwareSpec) -> HardwarePlan:
        """The plan of ``qmodel`` under ``hw`` (a config, dict, YAML path, preset name or None; a plan of the same
        model is returned as it is). Per-layer overrides that match no node are refused with the node names. The
        one place a hardware description given by a user is parsed: everything after it takes the plan."""
        names = [n.name for n in qmodel.nodes]
        if isinstance(hw, HardwarePlan):
            if list(hw.layers) != names:
                raise PhotosimError("the hardware plan was resolved for another model; resolve it for this one.")
            return hw
        config = load_hardware(hw)
        unmatched = config.unmatched_overrides(names)
        if unmatched:
            raise PhotosimError(f"hardware layer override(s) {unmatched} match no layer of the model; layers: "
                                f"{', '.join(names)}.")
        return cls(config, {n.name: _physical(config.for_layer(n.name), n) for n in qmodel.nodes})

    @property
    def is_random(self) -> bool:
        """True when some layer draws noise (results depend on the seed and repeat)."""
        return any(settings.is_random for settings in self.layers.values())

    @property
    def calibrated_adc(self) -> bool:
        """True when some layer's ADC range is measured on calibration data."""
        return any(settings.calibrated_adc for settings in self.layers.values())

    def chips(self, repeats: int) -> int:
        """How many chips ``repeats`` Monte Carlo repeats need: all of them when some layer is random, else one."""
        return repeats if self.is_random else 1


HardwareSpec = HardwarePlan | HardwareConfig | dict[str, Any] | str | Path | None  # what a user may give as hardware


def _physical(hw: LayerHardware, node: Node) -> LayerHardware:
    """A layer's settings with the noise its photonics section implies (photosim.hardware.photonics)."""
    if hw.photonics is None or not OPS[node.op].weighted:
        return hw
    return with_link_budget(hw, tile_length(OPS[node.op].dot_length(node.attrs), hw.tile), node.name)
