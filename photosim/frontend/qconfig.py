"""Post-training quantization settings: bit widths, granularity, observers, per-layer overrides."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from photosim._config import LayerOverride, PerLayer, StrictModel, override_model
from photosim.ir.ranges import MAX_BITS, MIN_BITS


class LayerSettings(StrictModel):
    """The settings of one layer: the global values, or those after the per-layer overrides."""

    w_bits: int = Field(8, ge=MIN_BITS, le=MAX_BITS, description="Weight bits (signed, symmetric, zero point 0).")
    a_bits: int = Field(8, ge=MIN_BITS, le=MAX_BITS, description="Activation bits (unsigned after ReLU-like ops).")
    bias_bits: int = Field(32, ge=8, le=64, description="Integer bias bits; the bias saturates at this range.")
    weight_granularity: Literal["per_channel", "per_tensor"] = Field(
        "per_channel", description="One weight scale per output channel, or one per tensor."
    )
    observer: Literal["minmax", "percentile", "mse"] = Field(
        "minmax", description="Activation range: min/max, a percentile of |x|, or the MSE-optimal clip."
    )
    percentile: float = Field(99.99, gt=50, le=100, description="Percentile used by the `percentile` observer.")
    w_observer: Literal["minmax", "mse"] = Field("minmax", description="Weight range: max |w| or MSE-optimal.")


QuantOverride: type[LayerOverride] = override_model(LayerSettings)


class QuantSpec(LayerSettings, PerLayer):
    """Global PTQ settings; `layers` overrides them by glob, later entries winning.

    Example:
        >>> QuantSpec(w_bits=4, a_bits=4, layers=[{"match": "conv1", "w_bits": 8, "a_bits": 8}])
    """

    preset_kind: ClassVar[str | None] = "quant"
    layer_settings: ClassVar[type[StrictModel]] = LayerSettings
    calibration_samples: int = Field(512, ge=1, description="Calibration images (from the calibration split).")
    layers: list[QuantOverride] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Per-layer overrides by glob.")
