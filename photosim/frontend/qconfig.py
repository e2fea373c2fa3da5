"""Post-training quantization settings: bit widths, granularity, observers, per-layer overrides, PTQ algorithms."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from photosim._config import LayerOverride, PerLayer, StrictModel, override_model
from photosim.frontend.algorithms import AUTO, check_selection
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
    activation_range: Literal["affine", "symmetric"] = Field(
        "affine", description="Activations that can be negative: `affine` covers their observed [min, max] with "
        "unsigned codes and a zero point; `symmetric` uses signed codes around zero point 0 (before issue 14).")


QuantOverride: type[LayerOverride] = override_model(LayerSettings)


class QuantSpec(LayerSettings, PerLayer):
    """Global PTQ settings; `layers` overrides them by glob, later entries winning.

    Example:
        >>> QuantSpec(w_bits=4, a_bits=4, layers=[{"match": "conv1", "w_bits": 8, "a_bits": 8}])
    """

    preset_kind: ClassVar[str | None] = "quant"
    layer_settings: ClassVar[type[StrictModel]] = LayerSettings
    calibration_samples: int = Field(512, ge=1, description="Calibration images (from the calibration split).")
    output_bits: int | None = Field(
        8, ge=MIN_BITS, le=MAX_BITS, description="The graph output (logits) gets at least this many activation "
        "bits (max(a_bits, output_bits)); per-layer overrides of its layer win; null: a_bits like every layer.")
    ptq: list[str] = Field(
        default_factory=list, description="Error-correcting PTQ algorithms (docs/ptq.md): any of equalize, "
        "smoothquant, bias_correction and one weight rounding (gptq, gpfq, adaround, qdrop), or `auto` alone (the "
        "combination whose outputs agree best with the float model on the calibration data). A comma-separated "
        "string works too.")
    layers: list[QuantOverride] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Per-layer overrides by glob.")

    @field_validator("ptq", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        """``"equalize,gptq"`` -> ``["equalize", "gptq"]``; ``"none"`` or ``""`` -> ``[]``."""
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        return [] if value == ["none"] else value

    @field_validator("ptq")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        check_selection(value)
        return value

    @property
    def auto(self) -> bool:
        """Whether the PTQ algorithms are chosen by agreement with the float model."""
        return self.ptq == [AUTO]

    def for_output(self, name: str) -> LayerSettings:
        """Settings of the layer producing the graph output: ``a_bits`` raised to ``output_bits``, then overrides."""
        if self.output_bits is None:
            return self.for_layer(name)
        return self.model_copy(update={"a_bits": max(self.a_bits, self.output_bits)}).for_layer(name)
