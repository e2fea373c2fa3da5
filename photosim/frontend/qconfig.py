"""Post-training quantization settings: bit widths, granularity, observers, per-layer overrides."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import ClassVar, Literal

from pydantic import Field

from photosim._config import StrictModel
from photosim.ir.ranges import MAX_BITS, MIN_BITS


class LayerSettings(StrictModel):
    """Settings that a per-layer override may change; None keeps the global value."""

    w_bits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS, description="Weight bits (signed, symmetric).")
    a_bits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS, description="Bits of this layer's output activations.")
    bias_bits: int | None = Field(None, ge=8, le=64, description="Integer bias bits.")
    weight_granularity: Literal["per_channel", "per_tensor"] | None = Field(
        None, description="One weight scale per output channel, or one per tensor."
    )
    observer: Literal["minmax", "percentile", "mse"] | None = Field(
        None, description="How the activation clipping range is chosen from calibration data."
    )
    percentile: float | None = Field(None, gt=50, le=100, description="Percentile of |x| for `percentile`.")
    w_observer: Literal["minmax", "mse"] | None = Field(
        None, description="How the weight clipping range is chosen."
    )


class LayerOverride(LayerSettings):
    """Per-layer settings for the layers whose name matches a glob (e.g. `conv1`, `layer4.*`, `fc`)."""

    match: str = Field(description="fnmatch glob on the layer name (module path, e.g. layer1.0.conv1).")


class QuantSpec(StrictModel):
    """Global PTQ settings; `layers` overrides them by glob, later entries winning.

    Example:
        >>> QuantSpec(w_bits=4, a_bits=4, layers=[{"match": "conv1", "w_bits": 8, "a_bits": 8}])
    """

    preset_kind: ClassVar[str | None] = "quant"
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
    calibration_samples: int = Field(512, ge=1, description="Calibration images (from the calibration split).")
    layers: list[LayerOverride] = Field(default_factory=list, description="Per-layer overrides by glob.")

    def for_layer(self, name: str) -> LayerSettings:
        """Effective settings of one layer: global values, then every matching override in order."""
        values = self.model_dump(include=set(LayerSettings.model_fields))
        for override in self.layers:
            if fnmatchcase(name, override.match):
                values.update(override.model_dump(exclude={"match"}, exclude_none=True))
        return LayerSettings(**values)

    def unmatched_overrides(self, names: list[str]) -> list[str]:
        """Globs in `layers` that match no layer name (almost always a typo)."""
        return [o.match for o in self.layers if not any(fnmatchcase(n, o.match) for n in names)]
